"""AdaPM and AdaPM-mini: adaptive partial momentum (docs/methods/adapm.md).

Every parameter belongs to a *block* that decides its momentum (docs/methods/adapm.md):

=========================================  ===========================  ======================
block (``group["block"]``)                  momentum                     second moment (mini)
=========================================  ===========================  ======================
``embedding`` (wte, wpe, embed_tokens)      none ("AdaGrad-style")       per token row
``attn_out`` (o_proj, attn.c_proj)          none ("AdaGrad-style")       per output row
``q``, ``k`` (q_proj, k_proj)               low rank + correction        per head
``mlp`` (c_fc, mlp.c_proj, *_proj of MLP)   low rank + correction        per output row
``v`` (v_proj)                              full                         per output row
``qkv`` (fused c_attn / qkv_proj)           split into q, k, v row blocks, each by its rule
``lm_head`` (untied)                        full                         per token row
``norm`` (1-D, not a bias)                  full                         one scalar
``bias``                                    full                         elementwise (Adam)
``other`` (unmatched non-Linear tensors)    full                         one scalar
``auto`` (no block given)                   ``mlp`` if >= 2-D, else ``norm``
=========================================  ===========================  ======================

A low-rank block (m x n) keeps ``L`` (m x r, orthonormal) and ``R`` (r x n) with the momentum
``L@R``; between refits R is the exact least-squares factor for the fixed L, every ``refit_T``
steps (L, R) is refitted by ``refit_K`` alternating gradient-descent iterations, and the update
uses the debiased estimate ``L@R/bc1 + e/(1-beta1)`` built from the one-step residual ``e``
(estimator A of docs/methods/adapm.md), an elementwise clip to [-1, 1], E-torch epsilon and WD-pre.

``AdaPMMini`` replaces the elementwise second moment with Adam-mini's block means.
:func:`adapm_param_groups` classifies a model's parameters by module name (HF LLaMA, GPT-2 /
nanoGPT, plain ``nn.Linear`` stacks; overridable) and returns the groups these classes expect.
"""
from __future__ import annotations

import math
import re
from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from lowrank_fused import ops, sharded
from lowrank_fused.dispatch import implementation
from lowrank_fused.optim._base import (LowRankOptimizer, check_betas, check_number, is_sharded,
                                       local)

BLOCKS = ("auto", "embedding", "attn_out", "q", "k", "v", "qkv", "mlp", "lm_head", "norm",
          "bias", "other")
LOWRANK_BLOCKS = ("q", "k", "mlp")
FULL_BLOCKS = ("v", "lm_head", "norm", "bias", "other")
NOMOMENTUM_BLOCKS = ("embedding", "attn_out")
CORRECTIONS = ("unbiased", "eq3", "alg1", "none")
CLIP_MODES = ("elementwise", "rms", "none")
NOMOMENTUM_MODES = ("ema", "adagrad")

# one logical block of a parameter: state keys start with ``prefix``; rows [r0, r1) of the
# (logical, left-form) matrix; kind is "lowrank" | "full" | "none"; nb is the number of
# Adam-mini blocks of the second moment (None: elementwise)
_Part = namedtuple("_Part", "prefix block kind r0 r1 n rank nb")


def sketch_matrix(n: int, r: int, seed: int, device) -> torch.Tensor:
    """The Gaussian sketch ``Omega`` (n x r, fp32) that seeds L at t = 1 (docs/methods/adapm.md):
    ``torch.randn`` from a ``torch.Generator`` on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(n, r, generator=gen, device=device, dtype=torch.float32)


def sketch_seed(base: int, param_index: int, part: int) -> int:
    """Seed of the sketch of part ``part`` (0, 1, 2 for the q, k, v of a fused QKV; else 0) of
    the ``param_index``-th parameter of the optimizer (counted over all groups in order)."""
    return (int(base) * 1_000_003 + 4 * int(param_index) + int(part)) % (2 ** 63 - 1)


def _qr(Y: torch.Tensor, sign_canon: bool):
    """Reduced QR of fp32 ``Y``; with ``sign_canon`` ``diag(R) >= 0`` (the QR of the
    ``adapm_init_basis`` / ``adapm_refit`` references)."""
    Q, Rq = torch.linalg.qr(Y)
    if sign_canon:
        sign = torch.where(torch.diagonal(Rq) < 0, -1.0, 1.0).to(Q.dtype)
        Q = Q * sign.unsqueeze(0)
        Rq = Rq * sign.unsqueeze(1)
    return Q, Rq


class _PartShard:
    """One logical block (``_Part``) of an FSDP2 shard: this rank's rows of it (``lo:hi`` of
    the shard's rows; a 1-D parameter is one row whose columns are sharded), and the
    collectives its math needs. ``cols``: the logical matrix is the transposed storage
    (``transposed=True``), so FSDP2 splits its columns: every rank holds all its rows and
    its own columns."""

    def __init__(self, rows, part, one_d, cols=False):
        self.rows, self.part, self.one_d, self.cols = rows, part, one_d, cols
        if one_d:
            self.lo, self.hi, self.first = 0, 1, 0
        elif cols:
            self.lo, self.hi, self.first = part.r0, part.r1, 0
        else:
            a = min(max(part.r0, rows.start), rows.stop)
            b = max(min(part.r1, rows.stop), a)
            self.lo, self.hi, self.first = a - rows.start, b - rows.start, a - part.r0
        self.whole = not (one_d or cols) and part.r0 == 0 and part.r1 == rows.m
        m = part.r1 - part.r0
        # Adam-mini blocks of one row each stay with their row (no communication), unless
        # the row is split over the ranks
        self.row_blocks = not (one_d or cols) and part.nb is not None and part.nb == m

    def gather(self, X):
        """The whole (m_part, k) matrix from every rank's rows of this block."""
        if self.whole:
            return self.rows.gather(X.contiguous())
        Z = X.new_zeros((self.rows.stop - self.rows.start,) + tuple(X.shape[1:]))
        Z[self.lo:self.hi] = X
        return self.rows.gather(Z)[self.part.r0:self.part.r1]

    def local(self, X):
        """This rank's rows of a whole (m_part, k) matrix of this block."""
        return X[self.first:self.first + self.hi - self.lo]

    def local_tail(self, V, group) -> bool:
        """Whether lines 5-7 are row-local (the op runs on the shard as it is): an elementwise
        or per-row second moment and no RMS clip."""
        return (group["clip_mode"] != "rms"
                and (self.part.nb is None or self.row_blocks))

    def tail(self, W, G, mc, V, *, v_keep, v_add, eps, c2, lr, pre_scale, clip_mode,
             clip_threshold):
        """Lines 5-7 (``second_moment_and_apply``) on this rank's rows, with the block means
        of blocks spanning ranks (an nb-vector) and the RMS of the clip (a scalar)
        all-reduced; V is this rank's (elementwise, per row) or whole (other block means)."""
        g = G.float()
        if self.part.nb is None:
            V.copy_(V.float() * v_keep + v_add * (g * g))
            u = mc / (torch.sqrt(V.float() / c2) + eps)
        else:
            if self.row_blocks:
                sq = (g * g).mean(dim=1)
                blk = None
            else:
                nb = self.part.nb
                if self.one_d:
                    per_block, blk = None, torch.zeros(1, dtype=torch.long, device=g.device)
                else:
                    per_block = (self.part.r1 - self.part.r0) // nb
                    blk = (torch.arange(W.shape[0], device=g.device) + self.first) // per_block
                sums = torch.zeros(nb, dtype=torch.float64, device=g.device)
                sums.index_add_(0, blk, (g.double() * g.double()).sum(dim=1))
                self.rows.sum_(sums)
                count = self.part.n if self.one_d else per_block * self.part.n
                sq = (sums / count).float()
            V.copy_(V.float() * v_keep + v_add * sq)
            h = torch.sqrt(V.float()) / math.sqrt(c2) + eps
            u = mc / (h if blk is None else h[blk]).unsqueeze(1)
        if clip_mode == "elementwise":
            u = u.clamp(-clip_threshold, clip_threshold)
        elif clip_mode == "rms":
            total = self.rows.sum_(u.double().square().sum().reshape(1))
            count = self.part.n if self.one_d else (self.part.r1 - self.part.r0) * self.part.n
            rms = torch.sqrt(total / count).float()
            u = u / torch.clamp(rms / clip_threshold, min=1.0)
        w = W.float()
        if pre_scale != 1.0:
            w = w * pre_scale
        W.copy_(w - lr * u)


def _is_int(x, low):
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


@dataclass(frozen=True)
class AdapmRoute:
    """The step engine's route of a one-block parameter (docs/methods/adapm.md, "Step engine"):
    its block kind ("lowrank", "full", "none"), the 2-D shape of its storage (trailing dims
    flattened), the rank of a low-rank block, the Adam-mini block count (None: elementwise),
    whether the method runs on its transpose and whether weight decay applies (``dim >= 2``)."""
    kind: str
    shape: tuple
    rank: Optional[int]
    nb: Optional[int]
    transposed: bool
    decayed: bool


class AdaPM(LowRankOptimizer):
    """AdaPM (docs/methods/adapm.md), torch.optim API.

    Args:
        params: parameters or param groups. Each group may carry ``block`` (one of
            :data:`BLOCKS`, default ``"auto"``) and override any keyword below;
            :func:`adapm_param_groups` builds the groups for a model.
        lr, betas, eps, weight_decay: ``lr`` (eta), ``(beta1, beta2)`` (paper: 0.9, 0.95),
            ``eps`` (1e-8, E-torch: ``sqrt(v/bc2) + eps``), decoupled weight decay ``lam``
            (paper 0.1) applied WD-pre (``W*(1 - lr*lam)``) and only to parameters with
            ``dim >= 2`` (nanoGPT's convention).
        rank: rank r of every low-rank block (capped at ``min(m, n)``), or None to use
            ``rank_ratio``: ``r = ceil(rank_ratio * min(m, n))`` (default 5%).
        refit_T: refit (L, R) at steps t with ``(t-1) % refit_T == 0`` (default 100; 1 refits
            every step).
        refit_K: alternating gradient-descent iterations per refit (default 10; 0 keeps L).
        adapm_correction: momentum estimator (docs/methods/adapm.md): ``"unbiased"`` (A, default:
            ``L@R/bc1 + e/(1-beta1)``), ``"eq3"`` (B: ``m/bc1 + e/(1-beta1)``), ``"alg1"``
            (C, Alg. 1 literal: ``m/bc1 - e/(1-beta1)``) or ``"none"`` (``L@R/bc1``), where
            ``m = L@R + e`` is the momentum before truncation and e the one-step residual.
        bias_correction: Adam bias correction with E-torch (default True); False is the
            paper-literal form (``bc1 = bc2 = 1``).
        clip_mode: ``"elementwise"`` (default, ``clamp(u, -c, c)``), ``"rms"`` (Adafactor
            style: ``u / max(1, rms(u)/c)`` per block) or ``"none"``; ``c = clip_threshold``
            (default 1.0). Applies to every block.
        nomomentum_mode: second moment of the no-momentum blocks: ``"ema"`` (default, the
            beta2 EMA with bias correction) or ``"adagrad"`` (``v += g^2``, no correction).
        size_guard: a low-rank block whose matrix is not 2-D or whose rank reaches
            ``min(m, n)`` takes the full-momentum step (default True, the size guard of
            docs/conventions.md). False keeps the low-rank path at ``r = min(m, n)`` (used to
            test the full-rank limit).
        seed: base seed of the Gaussian sketches that initialise L (see
            :func:`sketch_seed`).
        backend, nonfinite, faithful_dtypes, sign_canon, matmul_precision: the options every
            method shares (``LowRankOptimizer``, docs/conventions.md). ``faithful_dtypes``
            keeps L, R and the moments in the parameter dtype; ``sign_canon`` makes every QR
            factor sign-canonical (``orth``).

    Group-only keys: ``head_dim`` (rows per attention head of q/k/qkv blocks; AdaPM-mini
    needs it), ``transposed`` (the weight is stored (in, out), e.g. HF ``Conv1D``; the method
    runs on its transpose) and ``qkv_sizes`` (rows of q, k, v in a fused QKV; default three
    equal thirds).

    State (``self.state[p]``, plain tensors and ints; logical left-form shapes): ``step``;
    low-rank blocks ``L``, ``R``, ``exp_avg_sq``; full-momentum blocks ``exp_avg``,
    ``exp_avg_sq``; no-momentum blocks ``exp_avg_sq``. A fused QKV keeps one set per logical
    block with keys prefixed ``q.``, ``k.``, ``v.``.
    """

    _mini = False
    RENAMED_KEYS = {"state": {}, "group": {"sketch_seed": "seed",
                                           "full_rank_fallback": "size_guard"}}
    # FSDP2 shards take _sharded_step_param (docs/methods/adapm.md, "Under FSDP2")
    SUPPORTS_SHARDED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, *,
                 rank=None, rank_ratio=0.05, refit_T=100, refit_K=10,
                 adapm_correction="unbiased", bias_correction=True, clip_mode="elementwise",
                 clip_threshold=1.0, nomomentum_mode="ema", size_guard=True,
                 seed=0, **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block="auto",
                        rank=rank, rank_ratio=rank_ratio, refit_T=refit_T, refit_K=refit_K,
                        adapm_correction=adapm_correction, bias_correction=bias_correction,
                        clip_mode=clip_mode, clip_threshold=clip_threshold,
                        nomomentum_mode=nomomentum_mode, size_guard=size_guard,
                        seed=seed, head_dim=None, transposed=False,
                        qkv_sizes=None)
        self._check_hyper(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults, **options)

    # -- validation -------------------------------------------------------------------------
    @staticmethod
    def _check_hyper(group):
        check_number("lr", group["lr"], low=0.0)
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["block"] not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {group['block']!r}")
        if group["rank"] is not None and not _is_int(group["rank"], 1):
            raise ValueError(f"rank must be None or an int >= 1, got {group['rank']!r}")
        if check_number("rank_ratio", group["rank_ratio"], low=0.0, high=1.0) <= 0.0:
            raise ValueError(f"rank_ratio must be > 0, got {group['rank_ratio']!r}")
        if not _is_int(group["refit_T"], 1):
            raise ValueError(f"refit_T must be an int >= 1, got {group['refit_T']!r}")
        if not _is_int(group["refit_K"], 0):
            raise ValueError(f"refit_K must be an int >= 0, got {group['refit_K']!r}")
        for key, choices in (("adapm_correction", CORRECTIONS), ("clip_mode", CLIP_MODES),
                             ("nomomentum_mode", NOMOMENTUM_MODES)):
            if group[key] not in choices:
                raise ValueError(f"{key} must be one of {choices}, got {group[key]!r}")
        if check_number("clip_threshold", group["clip_threshold"], low=0.0) <= 0.0:
            raise ValueError(f"clip_threshold must be > 0, got {group['clip_threshold']!r}")
        for key in ("bias_correction", "size_guard", "transposed"):
            if not isinstance(group[key], bool):
                raise ValueError(f"{key} must be a bool, got {group[key]!r}")
        if not _is_int(group["seed"], 0):
            raise ValueError(f"seed must be an int >= 0, got {group['seed']!r}")
        if group["head_dim"] is not None and not _is_int(group["head_dim"], 1):
            raise ValueError(f"head_dim must be None or an int >= 1, got {group['head_dim']!r}")
        sizes = group["qkv_sizes"]
        if sizes is not None and not (isinstance(sizes, (tuple, list)) and len(sizes) == 3
                                      and all(_is_int(s, 1) for s in sizes)):
            raise ValueError(f"qkv_sizes must be None or three ints >= 1, got {sizes!r}")

    def _check_group(self, group):
        # every step validates every group: a group whose settings and parameter shapes are
        # those it last passed with is not checked again (the checks depend on nothing else;
        # a tensor setting, e.g. a scheduler's lr, is checked every time)
        settings = {k: (tuple(v) if isinstance(v, list) else v) for k, v in group.items()
                    if k != "params"}        # a copy: a list changed in place is seen
        shapes = [p.shape for p in group["params"]]
        cacheable = not any(isinstance(v, torch.Tensor) for v in settings.values())
        passed = self.__dict__.setdefault("_checked_groups", {})
        if cacheable and passed.get(id(group)) == (settings, shapes):
            return
        self._check_hyper(group)
        for p in group["params"]:
            self._plan(p, group)          # raises ValueError on shape / layout mismatches
        if cacheable:
            passed[id(group)] = (settings, shapes)

    def add_param_group(self, param_group):
        # validate a merged copy first, so a bad group is never appended
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, "
                            "but the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        merged = {**self.defaults, **param_group, "params": params}
        self._check_group(merged)
        super().add_param_group({**param_group, "params": params})

    # -- layout -----------------------------------------------------------------------------
    @staticmethod
    def _logical_shape(p, group):
        shape = (p.shape[0], math.prod(p.shape[1:])) if p.dim() >= 2 else (1, p.numel())
        return (shape[1], shape[0]) if group["transposed"] else shape

    def _plan(self, p, group) -> List[_Part]:
        """The logical blocks of ``p`` under ``group``'s settings."""
        if group["transposed"] and p.dim() != 2:
            raise ValueError(f"transposed=True needs a 2-D weight, got shape {tuple(p.shape)}")
        m, n = self._logical_shape(p, group)
        block = group["block"]
        if block == "auto":
            block = "mlp" if p.dim() >= 2 else "norm"
        if block != "qkv":
            return [self._part("", block, 0, m, n, p, group)]
        if p.dim() < 2:
            raise ValueError(f"block 'qkv' needs a 2-D weight, got shape {tuple(p.shape)}")
        sizes = group["qkv_sizes"]
        if sizes is None:
            if m % 3:
                raise ValueError(f"block 'qkv': {m} rows do not split into three equal q, k, v "
                                 "blocks; pass qkv_sizes")
            sizes = (m // 3,) * 3
        elif sum(sizes) != m:
            raise ValueError(f"qkv_sizes {tuple(sizes)} must sum to the {m} rows of the fused "
                             "QKV weight")
        parts, r0 = [], 0
        for name, size in zip("qkv", sizes):
            parts.append(self._part(name + ".", name, r0, r0 + size, n, p, group))
            r0 += size
        return parts

    def _part(self, prefix, block, r0, r1, n, p, group) -> _Part:
        m = r1 - r0
        if block in LOWRANK_BLOCKS:
            cap = min(m, n)
            rank = group["rank"]
            if rank is None:
                rank = math.ceil(group["rank_ratio"] * cap)
            rank = min(rank, cap)
            if p.dim() < 2 or (group["size_guard"] and rank >= cap):
                kind, rank = "full", None
            else:
                kind = "lowrank"
        else:
            kind = "full" if block in FULL_BLOCKS else "none"
            rank = None
        return _Part(prefix, block, kind, r0, r1, n, rank, self._v_blocks(block, m, p, group))

    def _v_blocks(self, block, m, p, group) -> Optional[int]:
        """Number of Adam-mini blocks of the second moment (AdaPM-mini), None: elementwise."""
        if not self._mini or block == "bias":
            return None
        if block in ("norm", "other") or p.dim() < 2:
            return 1
        if block in ("q", "k"):
            hd = group["head_dim"]
            if hd is None:
                raise ValueError(f"AdaPM-mini needs head_dim for the {block!r} block of a "
                                 f"parameter of shape {tuple(p.shape)} (per-head second moment)")
            if m % hd:
                raise ValueError(f"head_dim={hd} does not divide the {m} rows of the {block!r} "
                                 f"block of a parameter of shape {tuple(p.shape)}")
            return m // hd
        return m          # per output row / per token row

    def _state_shapes(self, p, group) -> Dict[str, tuple]:
        if is_sharded(p):
            return self._sharded_state_shapes(p, group)
        shapes = {}
        for part in self._plan(p, group):
            m = part.r1 - part.r0
            v_shape = (m, part.n) if part.nb is None else (part.nb,)
            if part.kind == "lowrank":
                shapes[part.prefix + "L"] = (m, part.rank)
                shapes[part.prefix + "R"] = (part.rank, part.n)
            elif part.kind == "full":
                shapes[part.prefix + "exp_avg"] = (m, part.n)
            shapes[part.prefix + "exp_avg_sq"] = v_shape
        return shapes

    def _ops_needed(self, group, p):
        kinds = {part.kind for part in self._plan(p, group)}
        needed = ()
        if "lowrank" in kinds:
            needed += ("adapm_init_basis", "project", "adapm_refit", "adapm_update")
        if kinds - {"lowrank"}:
            needed += ("adapm_dense_update",)
        return needed

    def _param_index(self, p) -> int:
        i = 0
        for group in self.param_groups:
            for q in group["params"]:
                if q is p:
                    return i
                i += 1
        raise KeyError("parameter not in this optimizer")

    def _factorises_now(self, p, group) -> bool:
        """Whether this step initialises or refits a low-rank block of ``p``."""
        if not any(part.kind == "lowrank" for part in self._plan(p, group)):
            return False
        t = self.state[p].get("step", 0) + 1
        return (t - 1) % group["refit_T"] == 0

    # -- the step ---------------------------------------------------------------------------
    def _check_grads(self):
        if self.nonfinite != "ignore":       # covered by the step's flag
            return
        when = "on a step that initialises or refits its low-rank momentum"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not self._factorises_now(p, group):
                    continue
                self._require_finite(p, when)    # a shard's check: agreed over the ranks

    @staticmethod
    def _param_scalars(p, group, t):
        """A parameter's per-step numbers at step t: the betas, the bias corrections (1
        without bias correction) and the keywords every part's update takes."""
        beta1, beta2 = group["betas"]
        c1, c2 = (ops.bias_corrections(beta1, beta2, t) if group["bias_correction"]
                  else (1.0, 1.0))
        lr = float(group["lr"])
        decay = group["weight_decay"] if p.dim() >= 2 else 0.0
        pre_scale, _ = ops.decay_coefficients(lr, decay, "pre")
        common = dict(eps=float(group["eps"]), lr=lr, pre_scale=pre_scale,
                      clip_mode=group["clip_mode"], clip_threshold=float(group["clip_threshold"]))
        return beta1, beta2, c1, c2, common

    @staticmethod
    def _dense_part_state(state, key, part, shape, v_shape, sd, device, group, beta2, c2):
        """A dense part's moments (created at its first step: exp_avg of ``shape`` for a
        "full" part, the second moment of ``v_shape``) and its second moment's keywords
        (adagrad accumulation for a "none" part in that mode). Returns (M or None, V, kw)."""
        if key + "exp_avg_sq" not in state:
            if part.kind == "full":
                state[key + "exp_avg"] = torch.zeros(shape, dtype=sd, device=device)
            state[key + "exp_avg_sq"] = torch.zeros(v_shape, dtype=sd, device=device)
        if part.kind == "none" and group["nomomentum_mode"] == "adagrad":
            v_kw = dict(v_keep=1.0, v_add=1.0, c2=1.0)
        else:
            v_kw = dict(v_keep=float(beta2), v_add=1.0 - beta2, c2=c2)
        return state.get(key + "exp_avg"), state[key + "exp_avg_sq"], v_kw

    def _step_param(self, p, group, backend, precision):
        if is_sharded(p):
            self._sharded_step_param(p, group, backend, precision)
            return
        parts = self._plan(p, group)
        state = self.state[p]
        t = state.get("step", 0) + 1
        shape = (p.shape[0], math.prod(p.shape[1:])) if p.dim() >= 2 else (1, p.numel())
        W_mat, G_mat, write_back = self._as_matrix(p, shape)
        W2, G2 = (W_mat.t(), G_mat.t()) if group["transposed"] else (W_mat, G_mat)

        beta1, beta2, c1, c2, common = self._param_scalars(p, group, t)
        sd = self._state_dtype(p)
        for i, part in enumerate(parts):
            W, G = W2[part.r0:part.r1], G2[part.r0:part.r1]
            m, n = W.shape
            v_shape = (m, n) if part.nb is None else (part.nb,)
            key = part.prefix
            if part.kind == "lowrank":
                if key + "L" not in state:
                    L = torch.empty((m, part.rank), dtype=sd, device=p.device)
                    omega = sketch_matrix(n, part.rank, sketch_seed(
                        group["seed"], self._param_index(p), i), p.device)
                    implementation("adapm_init_basis", backend, p.device)(
                        G, omega, L, sign_canon=self.sign_canon, precision=precision)
                    state[key + "L"] = L
                    state[key + "R"] = torch.zeros((part.rank, n), dtype=sd, device=p.device)
                    state[key + "exp_avg_sq"] = torch.zeros(v_shape, dtype=sd, device=p.device)
                self._lowrank_step(state, key, W, G, t, group, c1, c2, common, backend,
                                   precision)
            else:
                M, V, v_kw = self._dense_part_state(state, key, part, (m, n), v_shape, sd,
                                                    p.device, group, beta2, c2)
                implementation("adapm_dense_update", backend, p.device)(
                    W, G, M, V, beta1=float(beta1), c1=c1, **v_kw, **common)
        state["step"] = t
        write_back(W_mat)

    def _lowrank_step(self, state, key, W, G, t, group, c1, c2, common, backend, precision):
        """Update lines 2-7 of docs/methods/adapm.md for one low-rank block (left form)."""
        beta1, beta2 = group["betas"]
        L, R, V = state[key + "L"], state[key + "R"], state[key + "exp_avg_sq"]
        Rg = ops.project(G, L, side="left", precision=precision, backend=backend)   # line 3
        L0 = R0 = None
        if (t - 1) % group["refit_T"] == 0:                                         # line 4
            L0, R0 = L.clone(), R.clone()
            implementation("adapm_refit", backend, G.device)(
                G, L0, R0, Rg, L, R, beta1=float(beta1), iters=group["refit_K"],
                sign_canon=self.sign_canon, precision=precision)
        # line 5: mc = s_coef*L@R + e_coef*e, with m = L@R + e the untruncated momentum
        k = 1.0 / (1.0 - beta1)
        e_coef = {"unbiased": k, "eq3": 1.0 / c1 + k, "alg1": 1.0 / c1 - k,
                  "none": 0.0}[group["adapm_correction"]]
        implementation("adapm_update", backend, G.device)(                          # lines 5-8
            W, G, L, R, Rg, V, L0, R0, beta1=float(beta1), s_coef=1.0 / c1, e_coef=e_coef,
            v_keep=float(beta2), v_add=1.0 - beta2, c2=c2, precision=precision, **common)

    # -- FSDP2 (docs/methods/adapm.md, "Under FSDP2") -----------------------------------------
    def _sharded_step_param(self, p, group, backend, precision):
        """The per-parameter step of an FSDP2 shard (this rank's rows [start, stop) of the
        logical matrix; a 1-D parameter is the (1, numel) matrix whose columns are sharded).
        Everything row-local runs the one-process ops on the shard; what sums over the rows
        is all-reduced: ``Rg = L^T G`` (r x n), the refit's Gram products (r x (2r + n) per
        iteration), AdaPM-mini block means spanning rows of several ranks (one nb-vector) and
        the RMS clip (one scalar); the QRs of the initialisation and the refit run on the
        whole thin L (gathered, m x r), with the one-process seeds and signs. States: L, a
        per-row or elementwise second moment and the dense moments are this rank's rows; R
        and block means spanning ranks are whole (the same on every rank). A
        ``transposed=True`` weight is split over its logical columns: L is whole, R, Rg and
        the moments are this rank's columns (``_sharded_init_basis_cols``,
        ``_sharded_refit_cols``), its row means all-reduced."""
        rows = sharded.rows_of(p)
        parts = self._plan(p, group)
        state = self.state[p]
        t = state.get("step", 0) + 1
        one_d = p.dim() < 2
        cols = bool(group["transposed"])          # a 2-D weight: the split is over columns
        W_loc, G_loc = local(p), local(p.grad)
        if one_d:
            W2, G2 = W_loc.reshape(1, -1), G_loc.reshape(1, -1)
        elif cols:
            W2, G2 = W_loc.t(), G_loc.t()
        else:
            ncols = math.prod(p.shape[1:])
            W2, G2 = W_loc.reshape(W_loc.shape[0], ncols), G_loc.reshape(G_loc.shape[0], ncols)
        beta1, beta2, c1, c2, common = self._param_scalars(p, group, t)
        sd = self._state_dtype(p)
        for i, part in enumerate(parts):
            shard = _PartShard(rows, part, one_d, cols)
            W, G = W2[shard.lo:shard.hi], G2[shard.lo:shard.hi]
            mi, n = W.shape
            key = part.prefix
            if part.nb is None:
                v_shape = (mi, n)
            else:
                v_shape = (mi,) if shard.row_blocks else (part.nb,)
            if part.kind == "lowrank":
                if key + "L" not in state:
                    omega = sketch_matrix(part.n, part.rank, sketch_seed(
                        group["seed"], self._param_index(p), i), p.device)
                    init = self._sharded_init_basis_cols if cols else self._sharded_init_basis
                    state[key + "L"] = init(shard, G, omega).to(sd)
                    state[key + "R"] = torch.zeros((part.rank, n), dtype=sd, device=p.device)
                    state[key + "exp_avg_sq"] = torch.zeros(v_shape, dtype=sd, device=p.device)
                self._sharded_lowrank_step(shard, state, key, W, G, t, group, c1, c2, common,
                                           backend, precision)
                continue
            M, V, v_kw = self._dense_part_state(state, key, part, (mi, n), v_shape, sd,
                                                p.device, group, beta2, c2)
            if shard.local_tail(V, group):
                if W.numel():
                    implementation("adapm_dense_update", backend, p.device)(
                        W, G, M, V, beta1=float(beta1), c1=c1, **v_kw, **common)
                continue
            g = G.float()
            if M is None:
                mc = g
            else:
                M.copy_(M.float() * beta1 + (1.0 - beta1) * g)
                mc = M.float() / c1
            shard.tail(W, G, mc, V, **v_kw, **common)
        state["step"] = t

    def _sharded_state_shapes(self, p, group) -> Dict[str, tuple]:
        """The state shapes ``_sharded_step_param`` makes on this rank."""
        rows, one_d, cols = sharded.rows_of(p), p.dim() < 2, bool(group["transposed"])
        shapes = {}
        for part in self._plan(p, group):
            shard = _PartShard(rows, part, one_d, cols)
            mi = shard.hi - shard.lo
            n = local(p).numel() if one_d else local(p).shape[0] if cols else part.n
            if part.nb is None:
                v_shape = (mi, n)
            else:
                v_shape = (mi,) if shard.row_blocks else (part.nb,)
            if part.kind == "lowrank":
                shapes[part.prefix + "L"] = (mi, part.rank)
                shapes[part.prefix + "R"] = (part.rank, n)
            elif part.kind == "full":
                shapes[part.prefix + "exp_avg"] = (mi, n)
            shapes[part.prefix + "exp_avg_sq"] = v_shape
        return shapes

    def _sharded_init_basis(self, shard, G, omega):
        """``adapm_init_basis`` (update line 1) over row shards: ``L = orth(G Omega)``, then
        ``L = orth(G orth(G^T L))``, each QR on the whole (m x r) matrix. Returns this rank's
        rows of L (fp32)."""
        g = G.float()
        Y = _qr(shard.gather(g @ omega), self.sign_canon)[0]
        Z = _qr(shard.rows.sum_((g.t() @ shard.local(Y)).contiguous()), self.sign_canon)[0]
        Y = _qr(shard.gather(g @ Z), self.sign_canon)[0]
        return shard.local(Y).contiguous()

    def _sharded_init_basis_cols(self, shard, G, omega):
        """``adapm_init_basis`` over column shards (``transposed=True``; G: all m rows, this
        rank's columns): ``G Omega`` (with this rank's rows of the whole sketch) and ``G Z``
        are all-reduced (m x r), ``G^T L`` gathered (n x r) for its QR. Returns the whole L
        (the same on every rank)."""
        g, rows = G.float(), shard.rows
        Y = _qr(rows.sum_((g @ rows.local(omega)).contiguous()), self.sign_canon)[0]
        Z = _qr(rows.gather((g.t() @ Y).contiguous()), self.sign_canon)[0]
        Y = _qr(rows.sum_((g @ rows.local(Z)).contiguous()), self.sign_canon)[0]
        return Y.contiguous()

    @staticmethod
    def _sharded_refit_cols(shard, G, L0, R0, Rg, L, R, *, beta1, iters, sign_canon):
        """``adapm_refit`` over column shards (``transposed=True``): L (m x r) is whole and R
        (r x n_i) this rank's columns; the L half-step's ``R R^T``, ``R0 R^T`` and ``G R^T``
        sum over columns: one all-reduce of an r x (2r + m) matrix per iteration; the R
        half-step and the final QR of L are local (the same on every rank)."""
        g = G.float()
        l0, r0 = L0.float(), R0.float()
        Lc = l0.clone()
        Rc = beta1 * r0 + (1.0 - beta1) * Rg.float()
        r = Rc.shape[0]
        for _ in range(int(iters)):
            packed = shard.rows.sum_(torch.cat([Rc @ Rc.t(), r0 @ Rc.t(), (g @ Rc.t()).t()],
                                               dim=1))
            gram, R0Rt, GRt = packed[:, :r], packed[:, r:2 * r], packed[:, 2 * r:].t()
            lmax = torch.linalg.eigvalsh(gram)[-1].item()
            if lmax > 0.0:
                grad_L = Lc @ gram - beta1 * (l0 @ R0Rt) - (1.0 - beta1) * GRt
                Lc = Lc - grad_L / lmax
            gram = Lc.t() @ Lc
            lmax = torch.linalg.eigvalsh(gram)[-1].item()
            if lmax > 0.0:
                grad_R = gram @ Rc - beta1 * ((Lc.t() @ l0) @ r0) - (1.0 - beta1) * (Lc.t() @ g)
                Rc = Rc - grad_R / lmax
        Q, Rq = _qr(Lc, sign_canon)
        L.copy_(Q)
        R.copy_(Rq @ Rc)

    def _sharded_lowrank_step(self, shard, state, key, W, G, t, group, c1, c2, common,
                              backend, precision):
        """``_lowrank_step`` on this rank's rows: ``Rg = L^T G`` all-reduced, the refit over
        the shards (``_sharded_refit``), then the row-local update (the ``adapm_update`` op
        on the shard, or its eager form with ``shard.tail`` where the second moment or the
        clip reduce over rows of other ranks)."""
        beta1, beta2 = group["betas"]
        L, R, V = state[key + "L"], state[key + "R"], state[key + "exp_avg_sq"]
        mi, n = G.shape
        if G.numel():
            Rg = ops.project(G, L, side="left", precision=precision, backend=backend)
        else:
            Rg = torch.zeros((L.shape[1], n), dtype=torch.float32, device=G.device)
        if not shard.cols:           # over split columns Rg is this rank's columns: local
            shard.rows.sum_(Rg)
        L0 = R0 = None
        if (t - 1) % group["refit_T"] == 0:
            L0, R0 = L.clone(), R.clone()
            refit = self._sharded_refit_cols if shard.cols else self._sharded_refit
            refit(shard, G, L0, R0, Rg, L, R, beta1=float(beta1), iters=group["refit_K"],
                  sign_canon=self.sign_canon)
        k = 1.0 / (1.0 - beta1)
        e_coef = {"unbiased": k, "eq3": 1.0 / c1 + k, "alg1": 1.0 / c1 - k,
                  "none": 0.0}[group["adapm_correction"]]
        v_kw = dict(v_keep=float(beta2), v_add=1.0 - beta2, c2=c2)
        if shard.local_tail(V, group) and G.numel():
            implementation("adapm_update", backend, G.device)(
                W, G, L, R, Rg, V, L0, R0, beta1=float(beta1), s_coef=1.0 / c1,
                e_coef=e_coef, precision=precision, **v_kw, **common)
            return
        g, Lf = G.float(), L.float()              # adapm_update_ref, on the shard
        if L0 is None:
            R.copy_(R.float() * beta1 + (1.0 - beta1) * Rg)
            e = (1.0 - beta1) * (g - Lf @ Rg)
        else:
            e = beta1 * (L0.float() @ R0.float()) + (1.0 - beta1) * g - Lf @ R.float()
        mc = (1.0 / c1) * (Lf @ R.float()) + e_coef * e
        shard.tail(W, G, mc, V, **v_kw, **common)

    @staticmethod
    def _sharded_refit(shard, G, L0, R0, Rg, L, R, *, beta1, iters, sign_canon):
        """``adapm_refit`` (update line 3, refit branch) over row shards, iteration for
        iteration: the L half-step is row-local; the R half-step's ``L^T L``, ``L^T L0`` and
        ``L^T G`` are one all-reduce of an r x (2r + n) matrix; the final QR runs on the whole
        (gathered) L. Every rank takes the same step sizes (from the same replicated Grams)."""
        g = G.float()
        l0, r0 = L0.float(), R0.float()
        Lc = l0.clone()
        Rc = beta1 * r0 + (1.0 - beta1) * Rg.float()
        r = Rc.shape[0]
        for _ in range(int(iters)):
            gram = Rc @ Rc.t()
            lmax = torch.linalg.eigvalsh(gram)[-1].item()
            if lmax > 0.0:
                grad_L = Lc @ gram - beta1 * (l0 @ (r0 @ Rc.t())) - (1.0 - beta1) * (g @ Rc.t())
                Lc = Lc - grad_L / lmax
            packed = shard.rows.sum_(torch.cat([Lc.t() @ Lc, Lc.t() @ l0, Lc.t() @ g], dim=1))
            gram, LtL0, LtG = packed[:, :r], packed[:, r:2 * r], packed[:, 2 * r:]
            lmax = torch.linalg.eigvalsh(gram)[-1].item()
            if lmax > 0.0:
                grad_R = gram @ Rc - beta1 * (LtL0 @ r0) - (1.0 - beta1) * LtG
                Rc = Rc - grad_R / lmax
        Q, Rq = _qr(shard.gather(Lc), sign_canon)
        L.copy_(shard.local(Q))
        R.copy_(Rq @ Rc)

    # -- the step engine (optim/_engine.py; docs/methods/adapm.md, "Step engine") ------------
    # every state-writing op of a steady engine step (the grouped launches of
    # ops_adapm_grouped) takes the on-device skip flag; refits and first steps read it at once
    DEVICE_SKIP = True
    # a steady step is each class's bound K1 and bound class step (docs/engine.md, "CUDA-graph
    # capture"); refits and first steps read the flag at once and run eagerly
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """The class step on the Triton launches (``GroupedAdapmStep``: the scalar table
        filled, then every launch skipped on a replay) and, for a low-rank class, its K1 on
        the planned Triton launch; not the reference backend's torch ops nor an empty
        matrix. Every per-step and per-group scalar is in the class's table, so nothing is
        taken by value (no ``_captured_values``). A step on which a member refits is never
        captured (``_refresh_pending``: the flag is read at once, the step runs eagerly)."""
        step = cls.extra.get("step")
        if step is None or step.impl is None:
            return False
        return cls.route.kind != "lowrank" or cls.extra["k1"].planner is not None

    def _route(self, p, group):
        """An ``AdapmRoute`` for a parameter of one block whose clip the grouped kernels take;
        None (its own per-parameter step) for a fused QKV (three blocks in one weight) and
        for the RMS clip (a per-matrix reduction between two passes)."""
        if group["clip_mode"] == "rms" or group["block"] == "qkv":
            return None
        parts = self._plan(p, group)
        if len(parts) != 1:
            return None
        part = parts[0]
        shape = (p.shape[0], math.prod(p.shape[1:])) if p.dim() >= 2 else (1, p.numel())
        return AdapmRoute(part.kind, shape, part.rank, part.nb, bool(group["transposed"]),
                          p.dim() >= 2)

    def _refresh_pending(self, plan) -> bool:
        """A routed parameter without state (its first step initialises L from the gradient)
        or a low-rank block that refits on this step: the non-finite flag is read at once."""
        routed = plan.routed
        if self.__dict__.get("_states_made") is not routed:
            return True                   # some parameter may have no state yet
        watch = self.__dict__.get("_refit_watch")
        if watch is None or watch[0] is not routed:
            watch = self._refit_watch = (routed, [(st, g) for _, g, r, st in routed
                                                  if r.kind == "lowrank"])
        for state, group in watch[1]:
            if state["step"] % group["refit_T"] == 0:
                return True
        return False

    def _refresh_classes(self, routed) -> bool:
        """The state of routed parameters that have none yet, as the per-parameter step makes
        it (a low-rank block's L from the seeded sketch of its gradient); True when any was
        made (the classes are then rebuilt). Refits run in the class step."""
        if self.__dict__.get("_states_made") is routed:
            return False                  # every parameter of this plan has its state
        made = False
        for p, group, route, state in routed:
            if state:
                continue
            part = self._plan(p, group)[0]
            G = self._class_grad(p, route)
            m, n = G.shape
            sd = self._state_dtype(p)
            v_shape = (m, n) if part.nb is None else (part.nb,)
            if part.kind == "lowrank":
                backend = self._backend_for(group, p)
                L = torch.empty((m, part.rank), dtype=sd, device=p.device)
                omega = sketch_matrix(n, part.rank, sketch_seed(
                    group["seed"], self._param_index(p), 0), p.device)
                implementation("adapm_init_basis", backend, p.device)(
                    G, omega, L, sign_canon=self.sign_canon, precision=self.precision(p.device))
                state["L"] = L
                state["R"] = torch.zeros((part.rank, n), dtype=sd, device=p.device)
            elif part.kind == "full":
                state["exp_avg"] = torch.zeros((m, n), dtype=sd, device=p.device)
            state["exp_avg_sq"] = torch.zeros(v_shape, dtype=sd, device=p.device)
            state["step"] = 0
            made = True
        self._states_made = routed
        return made

    @staticmethod
    def _class_grad(p, route):
        """The gradient as the method's (logical, left-form) 2-D view."""
        G = p.grad if p.dim() == 2 else p.grad.view(route.shape)
        return G.t() if route.transposed else G

    def _build_classes(self, plan):
        """AdaPM's classes: the routed parameters grouped by block kind, logical shape, rank,
        second-moment layout, decay, dtypes, strides and backend. Each class binds its
        launches once (``ops_adapm_grouped.BoundAdapmClass``; a low-rank class also its grouped
        K1 into a workspace view Rg and the scratch B, shared by the classes)."""
        from lowrank_fused import ops_adapm_grouped, ops_grouped
        from lowrank_fused.optim import _engine

        classes = {}
        for p, group, route, state in plan.routed:
            backend = self._backend_for(group, p)
            W = p if p.dim() == 2 else p.view(route.shape)
            if route.transposed:
                W = W.t()
            names = ("L", "R", "exp_avg_sq") if route.kind == "lowrank" else \
                ("exp_avg", "exp_avg_sq") if route.kind == "full" else ("exp_avg_sq",)
            tensors = [W] + [state[k] for k in names]
            key = (route.kind, tuple(W.shape), route.rank, route.nb, route.decayed,
                   route.transposed, p.grad.stride(), p.grad.dtype, str(backend),
                   id(backend)) + tuple(
                (t.dtype, tuple(t.shape), t.stride()) for t in tensors)
            cls = classes.get(key)
            if cls is None:
                cls = classes[key] = _engine.MatrixClass(key=key, route=route, backend=backend)
            cls.members.append(_engine.Member(p=p, group=group, state=state, W=W))
            cls.Ws.append(W)
        workspace = self.__dict__.setdefault("_workspace", _engine.Workspace())
        need = {}
        for cls in classes.values():
            if cls.route.kind == "lowrank":
                device = cls.Ws[0].device
                numel = 2 * len(cls.members) * cls.route.rank * cls.Ws[0].shape[1]
                need[device] = max(need.get(device, 0), numel)
        for device, numel in need.items():
            workspace.reserve(torch.float32, device, numel)
        for cls in classes.values():
            states = [m.state for m in cls.members]
            Gs = [self._class_grad(m.p, cls.route) for m in cls.members]
            Vs = [st["exp_avg_sq"] for st in states]
            if cls.route.kind == "lowrank":
                count, n = len(states), cls.Ws[0].shape[1]
                views = workspace.views(torch.float32, cls.Ws[0].device,
                                        (cls.route.rank, n), 2 * count)
                Rgs, Bs = views[:count], views[count:]
                Ls = [st["L"] for st in states]
                cls.Ps = Ls
                cls.extra["k1"] = ops_grouped.BoundGroupedProject(Gs, Ls, Rgs, side="left",
                                                                  backend=cls.backend)
                cls.extra["step"] = ops_adapm_grouped.BoundAdapmClass(
                    cls.Ws, Gs, Vs, Ls=Ls, Rs=[st["R"] for st in states], Rgs=Rgs, Bs=Bs,
                    backend=cls.backend)
            else:
                Ms = [st["exp_avg"] for st in states] if cls.route.kind == "full" else None
                cls.extra["step"] = ops_adapm_grouped.BoundAdapmClass(
                    cls.Ws, Gs, Vs, Ms=Ms, backend=cls.backend)
            cls.extra["states"] = states
            cls.extra["params"] = [m.p for m in cls.members]
            cls.extra["plain"] = not cls.route.transposed and all(
                m.p.dim() == 2 for m in cls.members)
            cls.extra["group"] = _engine.shared_group(cls.members)
        plan.classes = classes
        self._classes_stale = False

    def _class_rows(self, cls, ts):
        """The scalar table of a class's step (``ops_adapm_grouped.ROWS``), per member from its
        group and step, with the per-parameter step's arithmetic (one evaluation per distinct
        group and step)."""
        from lowrank_fused.ops_adapm_grouped import ROWS

        kind, decayed = cls.route.kind, cls.route.decayed
        memo = {}
        per = []
        for m, t in zip(cls.members, ts):
            group = m.group
            k = (id(group), t)
            row = memo.get(k)
            if row is None:
                row = memo[k] = self._scalars(group, t, kind, decayed)
            per.append(row)
        if len(memo) == 1:
            return per[0]                 # one float per row: every member's
        return [list(col) for col in zip(*per)] if per else [[] for _ in ROWS]

    @staticmethod
    def _scalars(group, t, kind, decayed):
        """One member's scalars in the order of ``ops_adapm_grouped.ROWS``: what
        ``_step_param`` passes to ``adapm_update`` / ``adapm_dense_update`` for the step ``t``."""
        beta1, beta2 = group["betas"]
        if group["bias_correction"]:
            c1, c2 = ops.bias_corrections(beta1, beta2, t)
        else:
            c1, c2 = 1.0, 1.0
        lr = float(group["lr"])
        pre_scale, _ = ops.decay_coefficients(lr, group["weight_decay"] if decayed else 0.0,
                                              "pre")
        clip = float(group["clip_threshold"]) if group["clip_mode"] == "elementwise" \
            else math.inf
        s_coef = e_coef = coef_g = 0.0
        if kind == "lowrank":
            k = 1.0 / (1.0 - beta1)
            e_coef = {"unbiased": k, "eq3": 1.0 / c1 + k, "alg1": 1.0 / c1 - k,
                      "none": 0.0}[group["adapm_correction"]]
            s_coef = 1.0 / c1
            coef_g = float(e_coef) * (1.0 - float(beta1))
            v_keep, v_add = float(beta2), 1.0 - beta2
        elif kind == "none" and group["nomomentum_mode"] == "adagrad":
            v_keep, v_add, c2 = 1.0, 1.0, 1.0
        else:
            v_keep, v_add = float(beta2), 1.0 - beta2
        # ROWS: beta1, c1, s_coef, e_coef, coef_g, v_keep, v_add, eps, c2, sqrt_c2, lr,
        # pre_scale, clip
        return (float(beta1), c1, s_coef, e_coef, coef_g, v_keep, v_add, float(group["eps"]),
                c2, math.sqrt(c2), lr, pre_scale, clip)

    def _class_step(self, cls, precision):
        """One class: a low-rank class's grouped K1 (Rg) and its two launches (right operand,
        fused GEMM + second moment + clip + update), a dense class's one launch (plus two for
        Adam-mini block means), all with the step's skip flag. A step on which a member of a
        low-rank class refits runs the class's members through the per-parameter step."""
        ex = cls.extra
        states = ex["states"]
        steps = [st["step"] for st in states]
        if cls.route.kind == "lowrank" and any(
                k % m.group["refit_T"] == 0 for k, m in zip(steps, cls.members)):
            for m in cls.members:
                self._step_param(m.p, m.group, cls.backend, precision)
            return
        group = ex["group"]
        if group is not None and steps.count(steps[0]) == len(steps):   # one group, one step
            t = steps[0] + 1
            rows = self._scalars(group, t, cls.route.kind, cls.route.decayed)
            ts = None
        else:
            ts = [k + 1 for k in steps]
            rows = self._class_rows(cls, ts)
        if ex["plain"]:
            Gs = self._step_grads(ex["params"], ex)
        else:
            Gs = [self._class_grad(p, cls.route) for p in ex["params"]]
        token = self._layout_token
        if cls.route.kind == "lowrank":
            ex["k1"](Gs, precision=precision, layout_token=token)
        ex["step"](Gs, rows, precision=precision, skip=self._skip_flag, layout_token=token)
        if ts is None:
            for st in states:
                st["step"] = t
        else:
            for st, t in zip(states, ts):
                st["step"] = t

    # -- checkpoints ------------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """As torch's (state tensors keep their saved dtypes), after checking that every saved
        state tensor has the shape the saved groups' layout implies (block, rank, QKV split,
        transposition), so a checkpoint of another layout fails before anything is loaded."""
        self._check_checkpoint(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved_groups = state_dict["param_groups"]
        for saved in saved_groups:
            group = {**self.defaults, **saved}
            self._check_hyper(group)
            for idx in saved["params"]:
                st = state_dict["state"].get(idx)
                if st is None or int(idx) >= len(params):
                    continue
                expected = self._state_shapes(params[int(idx)], group)
                for name, value in st.items():
                    if not torch.is_tensor(value):
                        continue
                    if name not in expected or tuple(value.shape) != expected[name]:
                        raise ValueError(
                            f"checkpoint state {name!r} of shape {tuple(value.shape)} does not "
                            f"match the layout of its group (block {group['block']!r}): "
                            f"expected {expected}")
        super().load_state_dict(state_dict)


class AdaPMMini(AdaPM):
    """AdaPM-mini (docs/methods/adapm.md): AdaPM whose second moment is Adam-mini's block mean
    ``vb = beta2*vb + (1-beta2)*mean_block(g^2)`` with ``h = sqrt(vb)/sqrt(bc2) + eps``:
    per head for ``q``/``k`` (needs the group key ``head_dim``), per output row for ``v``,
    ``attn_out`` and ``mlp``, per token row for ``embedding`` and ``lm_head``, one scalar for
    ``norm``, ``other`` and any 1-D tensor outside ``bias``, elementwise (Adam) for ``bias``.
    Everything else, the clip included, is AdaPM's; same arguments."""

    _mini = True


# ---------------------------------------------------------------------------------------------
# block classification by module name

_EMBED = {"wte", "wpe", "embed_tokens", "embed_positions", "word_embeddings",
          "position_embeddings", "tok_embeddings", "token_embedding", "pos_embedding"}
_HEAD = {"lm_head", "embed_out"}
_QKV = {"c_attn", "qkv_proj", "wqkv"}
_Q = {"q_proj", "wq", "query"}
_K = {"k_proj", "wk", "key"}
_V = {"v_proj", "wv", "value"}
_ATTN_OUT = {"o_proj", "out_proj", "wo"}
_MLP = {"c_fc", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3",
        "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj", "c_fc2"}
_MLP_PARENTS = ("mlp", "feed_forward", "ffn")
_ATTN_PARENTS = ("attn", "attention")

OverrideSpec = Union[None, Mapping[str, Union[str, dict]],
                     Callable[[str, torch.Tensor, Optional[nn.Module]], Union[None, str, dict]]]


def _is_conv1d(module) -> bool:
    """HF ``transformers.pytorch_utils.Conv1D``: a linear layer stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def classify_parameter(name: str, param: torch.Tensor, module: Optional[nn.Module] = None) -> str:
    """The AdaPM block of parameter ``name`` (as in ``named_parameters``) owned by ``module``.

    Rules (docs/methods/adapm.md, names of HF LLaMA, GPT-2/nanoGPT and Meta LLaMA): 1-D tensors are
    ``bias`` (named ``*.bias``) or ``norm``; then by the module's own name: embeddings
    (``nn.Embedding``, wte, wpe, embed_tokens) -> ``embedding``; lm_head (or a top-level
    ``output``) -> ``lm_head``; fused
    c_attn / qkv_proj -> ``qkv``; q_proj, k_proj, v_proj -> ``q``, ``k``, ``v``; o_proj,
    out_proj and a ``c_proj`` under an attention module -> ``attn_out``; c_fc, gate/up/down_proj
    and any module under mlp / feed_forward / ffn -> ``mlp``; any other ``nn.Linear`` or
    ``Conv1D`` -> ``mlp`` (plain Linear stacks get low-rank momentum, a design choice);
    anything else -> ``other`` (full momentum).
    """
    path = name.split(".")
    pname = path[-1]
    owner = [x.lower() for x in path[:-1]]
    leaf = owner[-1] if (pname in ("weight", "bias") and owner) else pname.lower()
    parents = owner[:-1] if pname in ("weight", "bias") else owner
    if param.dim() < 2:
        return "bias" if pname == "bias" else "norm"
    if isinstance(module, nn.Embedding) or leaf in _EMBED:
        return "embedding"
    if leaf in _HEAD or (leaf == "output" and not parents):     # Meta LLaMA: "output.weight"
        return "lm_head"
    if leaf in _QKV:
        return "qkv"
    for names, block in ((_Q, "q"), (_K, "k"), (_V, "v"), (_ATTN_OUT, "attn_out")):
        if leaf in names:
            return block
    if leaf == "c_proj":
        if any(a in x for x in parents for a in _ATTN_PARENTS):
            return "attn_out"
        return "mlp"
    if leaf in _MLP or any(a in x for x in parents for a in _MLP_PARENTS):
        return "mlp"
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return "mlp"
    return "other"


def _apply_overrides(names, param, module, overrides) -> Optional[dict]:
    """The override for the first of ``names`` that one matches, as a dict of group keys."""
    if overrides is None:
        return None
    for name in names:
        if callable(overrides):
            hit = overrides(name, param, module)
        else:
            hit = None
            for pattern, value in overrides.items():
                if re.search(pattern, name):
                    hit = value
                    break
        if hit is None:
            continue
        hit = {"block": hit} if isinstance(hit, str) else dict(hit)
        if "block" in hit and hit["block"] not in BLOCKS:
            raise ValueError(f"override for {name!r}: block must be one of {BLOCKS}, "
                             f"got {hit['block']!r}")
        if "params" in hit:
            raise ValueError(f"override for {name!r} must not set 'params'")
        return hit
    return None


def _owner(modules: Dict[str, nn.Module], name: str):
    return modules.get(name.rsplit(".", 1)[0] if "." in name else "")


def _infer_head_dim(model, modules, name, n, n_heads):
    """Rows per head of an attention projection with ``n`` input features, from the owning
    attention module's attributes or the model config; None when unknown."""
    if n_heads is not None:
        return n // n_heads if n % n_heads == 0 else None
    path = name.split(".")[:-2]           # drop "<proj>.weight"
    candidates = [modules.get(".".join(path[:i])) for i in range(len(path), -1, -1)]
    candidates.append(getattr(model, "config", None))
    for obj in candidates:
        if obj is None:
            continue
        hd = getattr(obj, "head_dim", None)
        if isinstance(hd, int) and hd > 0:
            return hd
        for attr in ("num_heads", "n_head", "num_attention_heads", "n_heads"):
            h = getattr(obj, attr, None)
            if isinstance(h, int) and h > 0:
                return n // h if n % h == 0 else None
    return None


def adapm_block_names(model: nn.Module, overrides: OverrideSpec = None) -> Dict[str, str]:
    """``{parameter name: block}`` for every trainable parameter of ``model`` (a parameter
    shared by several modules is listed once, under its first name; a tied lm_head follows the
    embedding rule)."""
    return {name: info["block"] for name, (_, info) in _classify_model(model, overrides).items()}


def _classify_model(model, overrides, head_dim=None, n_heads=None):
    modules = dict(model.named_modules())
    names_of: Dict[int, List[str]] = {}
    first: Dict[int, tuple] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        names_of.setdefault(id(p), []).append(name)
        first.setdefault(id(p), (name, p))
    out = {}
    for pid, (name, p) in first.items():
        names = names_of[pid]
        blocks = [classify_parameter(nm, p, _owner(modules, nm)) for nm in names]
        block = "embedding" if "embedding" in blocks else blocks[0]
        module = _owner(modules, name)
        info = {"block": block, "transposed": bool(p.dim() == 2 and _is_conv1d(module))}
        hit = _apply_overrides(names, p, module, overrides)
        if hit:
            info.update(hit)
        if info["block"] in ("q", "k", "qkv") and "head_dim" not in info:
            n = p.shape[0] if info["transposed"] else math.prod(p.shape[1:])
            hd = head_dim if head_dim is not None else _infer_head_dim(model, modules, name, n,
                                                                       n_heads)
            if hd is not None:
                info["head_dim"] = int(hd)
        out[name] = (p, info)
    return out


def adapm_param_groups(model: nn.Module, *, rank: Optional[int] = None,
                       overrides: OverrideSpec = None, head_dim: Optional[int] = None,
                       n_heads: Optional[int] = None, **kw) -> List[dict]:
    """Param groups for :class:`AdaPM` / :class:`AdaPMMini`, one per distinct block layout, each
    with a ``block`` key (see :func:`classify_parameter`).

    ``rank`` (None: the optimizer's ``rank_ratio``) goes to the groups that can be low rank
    (``q``, ``k``, ``mlp``, ``qkv``); ``kw`` (``lr``, ``weight_decay``, ``refit_T``, ...) to every
    group. HF ``Conv1D`` weights get ``transposed=True``. q/k/qkv groups get ``head_dim``
    from ``head_dim``, from ``n_heads`` (rows per head = in_features / n_heads), or from the
    attention module / model config (``head_dim``, ``num_heads``, ``n_head``,
    ``num_attention_heads``).

    ``overrides``: ``{regex: block or dict of group keys}`` (``re.search`` on the parameter
    name, first match wins) or a callable ``(name, param, module) -> block | dict | None``;
    e.g. ``{r"lm_head": "other", r"\\.0\\.weight$": dict(block="mlp", rank=8)}``.
    Frozen parameters are left out.
    """
    if rank is not None and not _is_int(rank, 1):
        raise ValueError(f"rank must be None or an int >= 1, got {rank!r}")
    for name, value in (("head_dim", head_dim), ("n_heads", n_heads)):
        if value is not None and not _is_int(value, 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    if overrides is not None and not (callable(overrides) or isinstance(overrides, Mapping)):
        raise TypeError("overrides must be None, a mapping {regex: block | dict} or a callable")
    groups: Dict[tuple, dict] = {}
    for name, (p, info) in _classify_model(model, overrides, head_dim, n_heads).items():
        extra = dict(info)
        block = extra.pop("block")
        if rank is not None and block in ("q", "k", "mlp", "qkv") and "rank" not in extra:
            extra["rank"] = rank
        key = (block,) + tuple(sorted((k, repr(v)) for k, v in extra.items()))
        if key not in groups:
            groups[key] = {"params": [], "block": block, **kw, **extra}
        groups[key]["params"].append(p)
    return list(groups.values())


__all__ = ["AdaPM", "AdaPMMini", "adapm_param_groups", "adapm_block_names",
           "classify_parameter", "sketch_matrix", "sketch_seed", "BLOCKS"]
