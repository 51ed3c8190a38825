"""GaLore-AdamW, a drop-in for ``galore_torch.GaLoreAdamW`` (docs/methods/galore.md).

Groups with a ``rank`` key are projected: the gradient is projected onto the top-r singular
subspace (refreshed by SVD every ``update_proj_gap`` steps, before the counter increments),
Adam runs on the r x n (or m x r) projection with the E-hf epsilon, and the step is projected
back, scaled by ``scale`` and applied with WD-post. Groups without ``rank`` get HF AdamW
(E-hf, WD-post), as in galore_torch. The same class runs every backend: ``reference`` is the
eager oracle, ``triton`` the fused kernels (K1 projection, K2 moments, K3 back-projection with
the weight update and decay in the GEMM epilogue: no m x n temporary per step).
"""
from __future__ import annotations

import math
import operator

import torch

from lowrank_fused import ops, ops_grouped, ops_multi, sharded
from lowrank_fused.linalg import canonical_svd_basis, fallback_basis
from lowrank_fused.subspace import grouped_refresh
from lowrank_fused.optim._base import LowRankOptimizer, check_betas, check_number, is_sharded
from lowrank_fused.optim._engine import ClassRoute, DenseRoute, per_member

_STEP = operator.itemgetter("step")


def _HAS_BASIS(state):
    return "basis" in state


PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJECTORS = ("svd", "randomized")


def projection_side(shape, proj_type: str) -> str:
    """galore_projector.py#L13-L45: 'std' projects on the right when m >= n."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def checked_bases(opt, bases, args, state_key="basis"):
    """Bases from a batched refresh, each checked finite; a non-finite one (the batched
    decomposition broke down) is replaced by ``fallback_basis`` with a warning naming the
    parameter. ``args``: parameter -> (G, rank, side) of its request."""
    for p, B in bases.items():
        if not bool(torch.isfinite(B).all()):
            G, rank, side = args[p]
            bases[p] = fallback_basis(G, rank, side, opt.sign_canon, label=opt.param_label(p),
                                      previous=opt.state[p].get(state_key),
                                      reason="the batched randomized SVD returned non-finite "
                                             "values")
    return bases


class GaLoreAdamW(LowRankOptimizer):
    """GaLore-AdamW.

    Args:
        params: parameters or param groups. Groups holding ``rank`` are projected; their keys
            ``update_proj_gap`` (default 50), ``scale`` (default 1.0) and ``proj_type``
            (default ``"std"``) follow galore_torch.
        lr, betas, eps, weight_decay, bias_correction: as galore_torch's AdamW (eps 1e-6, E-hf,
            decoupled weight decay applied after the update with ``lr*weight_decay``).
        projector: ``"svd"`` (default, faithful: one full ``torch.linalg.svd`` per layer and
            refresh) or ``"randomized"`` (``lowrank_fused.subspace``: randomized range finder
            with ``proj_oversample`` (default 8) extra columns and ``proj_power_iters``
            (default 2) power iterations, CholeskyQR2, small SVD; all same-shape layers that
            refresh on a step are stacked into one batched call). Also a group key.
        backend, nonfinite, faithful_dtypes, sign_canon, matmul_precision: the options every
            method shares (``LowRankOptimizer``, docs/conventions.md).

    The step runs on the engine (docs/engine.md): the matrices of one class (side, rank,
    shape, dtypes, layout: a LLaMA has a handful) take one grouped K1, one multi-tensor K2 and
    one grouped K3 per step, through workspaces planned once; the dense parameters take one
    multi-tensor AdamW call. The result equals the per-matrix step bit for bit on the CPU
    (``opt.engine = False`` runs that; FSDP2 shards and per-layer mode always do).

    A rank group's matrix gets the dense HF AdamW step instead when it is not 2-D after
    flattening trailing dimensions, or when ``rank >= min(m, n)`` (the size guard of
    docs/conventions.md: projection would be degenerate and save no memory).

    A group key this class never reads (a typo, another method's key, or a rank-group key
    such as ``update_proj_gap`` in a group without ``rank``) gives an
    ``IgnoredGroupKeyWarning`` naming the key and the group.
    """

    # read only by rank groups (filled in by _check_group)
    LOWRANK_GROUP_KEYS = frozenset({"rank", "update_proj_gap", "scale", "proj_type", "projector",
                                    "proj_oversample", "proj_power_iters"})

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, *, projector="svd", proj_oversample=8, proj_power_iters=2,
                 **options):
        check_number("lr", lr, low=0.0)
        check_betas(betas)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        self._default_projector = (projector, proj_oversample, proj_power_iters)
        self._pending_bases = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bool(bias_correction))
        super().__init__(params, defaults, **options)

    # -- group validation -----------------------------------------------------------------
    def _check_group(self, group):
        check_number("lr", group["lr"], low=0.0)
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        if "rank" not in group:
            return
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        group.setdefault("update_proj_gap", 50)
        group.setdefault("scale", 1.0)
        group.setdefault("proj_type", "std")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"update_proj_gap must be an int >= 1, got {gap!r}")
        check_number("scale", group["scale"])
        if group["proj_type"] == "full":
            raise NotImplementedError("proj_type='full' (two-sided projection) is not supported; "
                                      f"use one of {PROJ_TYPES}")
        projection_side((2, 1), group["proj_type"])  # validates the name
        proj, over, iters = self._default_projector
        group.setdefault("projector", proj)
        group.setdefault("proj_oversample", over)
        group.setdefault("proj_power_iters", iters)
        if group["projector"] not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {group['projector']!r}")
        for key in ("proj_oversample", "proj_power_iters"):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{key} must be an int >= 0, got {v!r}")

    def _ops_needed(self, group, p):
        if self._plan(p, group) is None:
            return ("adamw_step",)
        return ("project", "adam_moments", "backproject_update")

    def _plan(self, p, group):
        """(side, rank, 2-D shape) for a projected matrix, or None for the dense step. The
        shape is the whole matrix's, also for an FSDP2 shard (the side is the one-process
        run's)."""
        if "rank" not in group or p.dim() < 2:
            return None
        shape = (p.shape[0], math.prod(p.shape[1:]))
        if group["rank"] >= min(shape):
            return None
        return projection_side(shape, group["proj_type"]), group["rank"], shape

    # FSDP2: parameters sharded on dim 0 (``fully_shard``'s default): the per-parameter step
    # with the collectives of lowrank_fused/sharded.py (docs/distributed.md)
    SUPPORTS_SHARDED = True

    # -- batched refresh ------------------------------------------------------------------
    def _refresh_due(self, p, group):
        state = self.state[p]
        return "basis" not in state or state.get("step", 0) % group["update_proj_gap"] == 0

    def _check_grads(self):
        """A refresh computes an SVD of the gradient: a non-finite one is refused before any
        parameter of the step is touched (between refreshes it would only reach the moments,
        as in galore_torch). With ``nonfinite`` "raise" or "skip" the step's check has
        already covered every gradient."""
        if self.nonfinite != "ignore":       # covered by the step's flag
            return
        for group in self.param_groups:
            for p in group["params"]:
                if (p.grad is not None and self._plan(p, group) is not None
                        and self._refresh_due(p, group)):
                    self._require_finite(p, f"on a subspace-refresh step (step "
                                            f"{self.state[p].get('step', 0)})")

    def _before_updates(self):
        """projector="randomized": every layer that refreshes on this step gets its new basis
        here, same-shape layers of a group stacked into one batched randomized SVD."""
        requests = []
        for group in self.param_groups:
            if group.get("projector", "svd") != "randomized":
                continue
            for p in group["params"]:
                if p.grad is None or is_sharded(p):    # sharded: the all-reduced Gram
                    continue
                plan = self._plan(p, group)
                if plan is None or not self._refresh_due(p, group):
                    continue
                side, rank, shape = plan
                settings = (group["proj_oversample"], group["proj_power_iters"],
                            self.state[p].get("step", 0))
                requests.append((p, settings, (p.grad.reshape(shape), rank, side)))
        self._pending_bases = checked_bases(self, grouped_refresh(
            requests, sign_canon=self.sign_canon), {p: a for p, _, a in requests})

    def _after_updates(self):
        self._pending_bases = {}

    def _per_layer_defers(self):
        """A randomized refresh batches all same-shape layers: defer such steps."""
        return any(group.get("projector", "svd") == "randomized"
                   and any(p.requires_grad and self._plan(p, group) is not None
                           and self._refresh_due(p, group) for p in group["params"])
                   for group in self.param_groups)

    # -- the step: routes for the engine (optim/_engine.py) --------------------------------
    def _route(self, p, group):
        plan = self._plan(p, group)
        if plan is None:
            return DenseRoute("hf", "post", bool(group["bias_correction"]))
        if not self._grouped_available(group, p):
            return None
        side, rank, shape = plan
        return ClassRoute(side, rank, shape)

    # every state-writing op of the engine's steady step takes the on-device skip flag
    DEVICE_SKIP = True
    CAPTURABLE = True       # a steady step is bound calls only (docs/engine.md)

    def _refresh_pending(self, plan) -> bool:
        """True when some matrix has no basis yet or a counter (before its increment) that is
        a multiple of a group's gap. Once every basis exists (kept with the plan: a basis is
        never removed) the counters are read with C-level maps and only their distinct
        values tested: a step where they meet another group's gap reads the flag at once,
        which is safe; ``_refresh_classes`` decides per matrix."""
        held = plan.__dict__.get("galore_counters")
        if held is None:
            held = plan.galore_counters = [[st for _, _, _, st in plan.routed],
                                           list({id(g): g for _, g, _, _ in plan.routed}
                                                .values()), False]
        states, groups, bases = held
        if not bases:
            if not all(map(_HAS_BASIS, states)):
                return True
            held[2] = True
        try:
            steps = set(map(_STEP, states))
        except KeyError:                     # a matrix that has not stepped yet
            return True
        gaps = {g["update_proj_gap"] for g in groups}
        return any(k % gap == 0 for k in steps for gap in gaps)

    def _refresh_classes(self, routed) -> bool:
        """The refreshes due on this step (counter before increment divisible by
        ``update_proj_gap``, or no basis yet): the new basis is written into the stored one
        (same shape: the plan's tensors stay), or stored, with zero moments, the first time."""
        if self._skip_flag is not None:   # left on the device: _refresh_pending found none
            return False
        replaced = False
        for p, group, route, state in routed:
            k = state.get("step", 0)
            basis = state.get("basis")
            if basis is not None and k % group["update_proj_gap"]:
                continue
            G = p.grad if p.dim() == 2 else p.grad.reshape(route.shape)
            P_new = self._pending_bases.pop(p, None)
            if P_new is None:
                P_new = canonical_svd_basis(G, route.rank, route.side, self.sign_canon,
                                            label=self.param_label(p), previous=basis)
            P_new = P_new.to(self._state_dtype(p))
            if basis is not None and basis.shape == P_new.shape and basis.dtype == P_new.dtype:
                basis.copy_(P_new)
                continue
            state["basis"] = P_new
            if "exp_avg" not in state:
                low = ops.low_rank_shape(route.shape, route.rank, route.side)
                state["exp_avg"] = torch.zeros(low, dtype=self._state_dtype(p),
                                               device=p.device)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                state.setdefault("step", 0)
            replaced = True
        return replaced

    def _class_lists(self, cls):
        cls.extra["Ms"] = [m.state["exp_avg"] for m in cls.members]
        cls.extra["Vs"] = [m.state["exp_avg_sq"] for m in cls.members]
        cls.extra["where"] = self._multi_where("adam_moments", cls.backend,
                                               cls.Rs + cls.extra["Ms"] + cls.extra["Vs"]
                                               + cls.Ns) if self.multi_tensor else None

    def _class_capturable(self, cls) -> bool:
        """A class's steady step is three bound calls when K2 has its multi-tensor op."""
        return cls.extra.get("where") is not None

    def _class_step(self, cls, precision):
        """One class: K1 of every member (one grouped launch), K2 (one multi-tensor call
        where the backend has it, else per matrix), K3 (one grouped launch). The common case,
        every member of one group at one step count, derives its scalars once."""
        states = cls.extra["states"]
        ts = [st["step"] + 1 for st in states]
        for st, t in zip(states, ts):
            st["step"] = t
        skip = self._skip_flag        # K1 writes only the workspace: it needs no skip
        Rs = self._class_project(cls, self._class_grads(cls), precision)
        group = cls.extra["group"]
        if group is not None and ts.count(ts[0]) == len(ts):       # one group, one step
            t = ts[0]
            rows = (group["betas"][0], group["betas"][1], group["eps"], t)
            per = [rows] * len(ts)
            coefs, posts = self._k3_coefficients(group, t)
        else:
            groups = [m.group for m in cls.members]
            hyper = per_member(groups, lambda g: (g["betas"][0], g["betas"][1], g["eps"]))
            rows = per = [h + (t,) for h, t in zip(hyper, ts)]
            memo = {}
            coefs, posts = [], []
            for g, t in zip(groups, ts):
                c = memo.get((id(g), t))
                if c is None:
                    c = memo[(id(g), t)] = self._k3_coefficients(g, t)
                coefs.append(c[0])
                posts.append(c[1])
        Ms, Vs = cls.extra["Ms"], cls.extra["Vs"]
        if cls.extra["where"] is not None:
            k2 = cls.extra.get("k2")
            if k2 is None:
                k2 = cls.extra["k2"] = ops_multi.BoundAdamMomentsMulti(
                    Rs, Ms, Vs, cls.Ns, eps_mode="hf", backend=cls.extra["where"])
            k2(rows, skip=skip)
        else:
            for R, M, V, N, (a, b, e, t) in zip(Rs, Ms, Vs, cls.Ns, per):
                ops.adam_moments(R, M, V, N, beta1=a, beta2=b, eps=e, step=t, eps_mode="hf",
                                 backend=cls.backend, skip=skip)
        self._class_update(cls, coefs, posts, precision)

    # -- the per-parameter step (FSDP2 shards, per-layer mode, copied views) ----------------
    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        if plan is None:
            self._dense_step(p, group, backend)
        else:
            self._galore_step(p, group, plan, backend, precision)

    def _dense_step(self, p, group, backend):
        """HF AdamW: galore_torch adamw.py without the rank key."""
        self._dense_adamw_step(p, group, backend, eps_mode="hf", wd_mode="post",
                               bias_correction=group["bias_correction"])

    def _galore_step(self, p, group, plan, backend, precision):
        side, rank, shape = plan
        state = self.state[p]
        W, G, write_back = self._as_matrix(p, shape)    # FSDP2: this rank's rows
        rows = sharded.rows_of(p)
        k = state.get("step", 0)       # counter BEFORE increment (docs/methods/galore.md)
        if "basis" not in state or k % group["update_proj_gap"] == 0:
            P_new = self._pending_bases.pop(p, None)
            if P_new is None and rows is not None:
                P_new = self._sharded_basis(p, G, group, rank, side, rows)
            if P_new is None:
                P_new = canonical_svd_basis(G, rank, side, self.sign_canon,
                                            label=self.param_label(p),
                                            previous=state.get("basis"))
            state["basis"] = P_new.to(self._state_dtype(p))
        P = state["basis"]
        # a shard on the left: P^T G summed over the ranks' rows
        R = sharded.project(G, P, side, rows, precision=precision, backend=backend)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(R.shape, dtype=self._state_dtype(p), device=p.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] = k + 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        M, V = state["exp_avg"], state["exp_avg_sq"]
        N = torch.empty_like(M)
        ops.adam_moments(R, M, V, N, beta1=beta1, beta2=beta2, eps=group["eps"], step=t,
                         eps_mode="hf", backend=backend)
        self._galore_update(W, P, N, group, side, t, write_back, backend, precision)

    def _sharded_basis(self, p, G, group, rank, side, rows, projector=None):
        """The refresh of an FSDP2 shard (``sharded.basis``): ``projector`` (default the
        group's), the exact SVD only where its n x n Gram is small (``sharded.gram_is_small``;
        otherwise the randomized range finder, with one warning), seeded by the step counter.
        Returns this rank's part of the basis."""
        projector = projector or group.get("projector", "svd")
        return sharded.basis(G, rank, side, rows, projector=projector,
                             sign_canon=self.sign_canon,
                             oversample=group.get("proj_oversample", 8),
                             power_iters=group.get("proj_power_iters", 2),
                             seed=self.state[p].get("step", 0), label=self.param_label(p),
                             warn_owner=self)

    def _galore_update(self, W, P, N, group, side, t, write_back, backend, precision):
        """K3 (docs/methods/galore.md): ``W -= lr*sqrt(bc2)/bc1 * scale * back(N)``,
        then WD-post."""
        coef, post_decay = self._k3_coefficients(group, t)
        ops.backproject_update(W, P, N, side=side, coef=coef, post_decay=post_decay,
                               precision=precision, backend=backend)
        write_back(W)

    @staticmethod
    def _k3_coefficients(group, t):
        """K3's scalars at step t: ``coef = lr*sqrt(bc2)/bc1 * scale`` (HF step size) and the
        WD-post decay ``lr*weight_decay``."""
        beta1, beta2 = group["betas"]
        step_size = ops.hf_step_size(group["lr"], beta1, beta2, t, group["bias_correction"])
        _, post_decay = ops.decay_coefficients(group["lr"], group["weight_decay"], "post")
        return step_size * group["scale"], post_decay
