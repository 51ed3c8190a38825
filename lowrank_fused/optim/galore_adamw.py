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

import functools
import math

import torch

from lowrank_fused import ops, ops_grouped, ops_multi
from lowrank_fused.linalg import canonical_svd_basis, fallback_basis
from lowrank_fused.subspace import grouped_refresh
from lowrank_fused.optim._base import (LowRankOptimizer, check_betas, check_bool, check_number,
                                       is_sharded)

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


def checked_bases(opt, bases, args, state_key="ortho"):
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
        lr, betas, eps, weight_decay, correct_bias: as galore_torch's AdamW (eps 1e-6, E-hf,
            decoupled weight decay applied after the update with ``lr*weight_decay``).
        no_deprecation_warning: accepted for galore_torch's signature (it silences HF
            AdamW's deprecation warning there); this class has no such warning.
        backend: ``"auto" | "reference" | "triton" | "cuda" | "cpu"`` (lowrank_fused.dispatch).
        faithful_dtypes: keep moments and the basis in the parameter dtype, as the official
            code does (default: fp32).
        sign_canon: make the largest-magnitude entry of every singular vector positive, so
            refreshes are reproducible across SVD libraries (default True).
        matmul_precision: ``"ieee" | "tf32" | "bf16" | "tf32x3"`` for the fused GEMMs, or None
            to follow ``torch.get_float32_matmul_precision()`` at every step ("high" -> tf32,
            "medium" -> bf16; "highest" -> tf32x3 for CUDA parameters, ieee for CPU ones;
            docs/precision.md).
        projector: ``"svd"`` (default, faithful: one full ``torch.linalg.svd`` per layer and
            refresh) or ``"randomized"`` (``lowrank_fused.subspace``: randomized range finder
            with ``proj_oversample`` (default 8) extra columns and ``proj_power_iters``
            (default 2) power iterations, CholeskyQR2, small SVD; all same-shape layers that
            refresh on a step are stacked into one batched call). Also a group key.
        multi_tensor_moments: run K2 (the low-rank Adam moments, docs/methods/galore.md)
            of every projected matrix in one ``ops_multi.adam_moments_multi`` call per step
            (one CUDA launch on the ``cuda`` backend, which ``auto`` picks for it on a GPU;
            one OpenMP loop on ``cpu``) instead of one ``adam_moments`` per matrix (default
            False). The step then runs in three phases: the refresh (when due) and K1 of every
            matrix in parameter order, one K2 over all of them, then K3 of every matrix. The
            result is that of the per-matrix step (bit for bit on the reference backend), but
            the step holds every matrix's projected gradient R (fp32) and normalised step N
            (state dtype) at once instead of one matrix's at a time: at the peak two r x n (or
            m x r) buffers per projected matrix, ``8 * r * n`` bytes with fp32 state (R and N
            cannot share memory: the compiled kernels take inputs and outputs as non-aliasing
            pointers). Per-layer mode, ``backend="triton"`` (no multi-tensor op)
            and tensors the compiled kernels do not take (float16 state) keep the per-matrix
            K2. A setting, not state: checkpoints do not record it.
        grouped_gemms: run K1 and K3 of all projected matrices of one class (shape, rank,
            side, dtypes, layout: a LLaMA has a handful) as one grouped launch each
            (``ops_grouped.grouped_project`` / ``grouped_backproject_update``, Triton: a
            member axis on the single kernels' grid, per-matrix lr/decay/bias-correction
            scalars from a small table), with K2 of the class as one ``adam_moments_multi``
            where the backend has it (default False). Between refreshes a LLaMA step then
            launches a few kernels per class instead of three per matrix. Equal bit for bit to
            the per-matrix step on the CPU (the same tiles; on a GPU K1 may split K
            differently for small matrices: rounding). Like ``multi_tensor_moments`` it holds
            each class's R and N at once (opt-in for that memory). Refreshes, per-layer mode
            and FSDP2-sharded parameters keep the per-matrix path for the refresh itself /
            the whole step respectively. A setting, not state.

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
                 correct_bias=True, no_deprecation_warning=True, *, backend="auto", nonfinite="raise",
                 faithful_dtypes=False, sign_canon=True, matmul_precision=None,
                 projector="svd", proj_oversample=8, proj_power_iters=2,
                 multi_tensor_moments=False, grouped_gemms=False):
        check_number("lr", lr, low=0.0)
        check_betas(betas)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        self.multi_tensor_moments = check_bool("multi_tensor_moments", multi_tensor_moments)
        self.grouped_gemms = check_bool("grouped_gemms", grouped_gemms)
        if projector not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {projector!r}")
        self._default_projector = (projector, proj_oversample, proj_power_iters)
        self._pending_bases = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=bool(correct_bias))
        super().__init__(params, defaults, backend=backend, nonfinite=nonfinite, faithful_dtypes=faithful_dtypes,
                         sign_canon=sign_canon, matmul_precision=matmul_precision)

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
        """(side, rank, 2-D shape) for a projected matrix, or None for the dense step. An
        FSDP2-sharded matrix (rows split over ranks) is always projected on the right, so the
        basis spans the unsharded dimension and every rank holds all of it."""
        if "rank" not in group or p.dim() < 2:
            return None
        shape = (p.shape[0], math.prod(p.shape[1:]))
        if group["rank"] >= min(shape):
            return None
        if is_sharded(p):
            return "right", group["rank"], shape
        return projection_side(shape, group["proj_type"]), group["rank"], shape

    # FSDP2: parameters sharded on dim 0 (``fully_shard``'s default), see _sharded_right_basis
    SUPPORTS_SHARDED = True

    # -- batched refresh ------------------------------------------------------------------
    def _refresh_due(self, p, group):
        state = self.state[p]
        return "ortho" not in state or state.get("step", 0) % group["update_proj_gap"] == 0

    def _check_grads(self):
        """A refresh computes an SVD of the gradient: a non-finite one is refused before any
        parameter of the step is touched (between refreshes it would only reach the moments,
        as in galore_torch). With ``nonfinite`` "raise" or "skip" the step's check has
        already covered every gradient."""
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

    # -- the step -------------------------------------------------------------------------
    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        if plan is None:
            self._dense_step(p, group, backend)
        else:
            self._galore_step(p, group, plan, backend, precision)

    def _dense_step(self, p, group, backend):
        """HF AdamW: galore_torch adamw.py without the rank key."""
        self._dense_adamw_step(p, group, backend, eps_mode="hf", wd_mode="post",
                               correct_bias=group["correct_bias"])

    def _galore_step(self, p, group, plan, backend, precision):
        side, rank, shape = plan
        state = self.state[p]
        W, G, write_back = self._as_matrix(p, shape)    # FSDP2: this rank's rows
        k = state.get("step", 0)       # counter BEFORE increment (docs/methods/galore.md)
        if "ortho" not in state or k % group["update_proj_gap"] == 0:
            P_new = self._pending_bases.pop(p, None)
            if P_new is None and is_sharded(p):
                P_new = self._sharded_right_basis(p, G, rank)
            if P_new is None:
                P_new = canonical_svd_basis(G, rank, side, self.sign_canon,
                                            label=self.param_label(p),
                                            previous=state.get("ortho"))
            state["ortho"] = P_new.to(self._state_dtype(p))
        P = state["ortho"]
        if self.grouped_gemms and not is_sharded(p):
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros(ops.low_rank_shape(tuple(W.shape), rank, side),
                                               dtype=self._state_dtype(p), device=p.device)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            batch = self._grouped_batch(backend, side, precision, W, G, P,
                                        state["exp_avg"].dtype)
            if batch is not None:                      # K1, K2, K3 of the class at the end
                state["step"] = k + 1
                batch.append((W, G, P, state["exp_avg"], state["exp_avg_sq"], group, k + 1,
                              write_back))
                return
        R = ops.project(G, P, side=side, precision=precision, backend=backend)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(R.shape, dtype=self._state_dtype(p), device=p.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] = k + 1
        t = state["step"]
        beta1, beta2 = group["betas"]
        M, V = state["exp_avg"], state["exp_avg_sq"]
        N = torch.empty_like(M)
        update = functools.partial(self._galore_update, W, P, N, group, side, t, write_back,
                                   backend, precision)
        if self.multi_tensor_moments:
            batch = self._batch_for("adam_moments", backend, (R, M, V, N), self._flush_moments)
            if batch is not None:                      # K2 and K3 after every matrix's K1
                batch.append((R, M, V, N, beta1, beta2, group["eps"], t, update))
                return
        ops.adam_moments(R, M, V, N, beta1=beta1, beta2=beta2, eps=group["eps"], step=t,
                         eps_mode="hf", backend=backend)
        update()

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
        step_size = ops.hf_step_size(group["lr"], beta1, beta2, t, group["correct_bias"])
        _, post_decay = ops.decay_coefficients(group["lr"], group["weight_decay"], "post")
        return step_size * group["scale"], post_decay

    def _flush_moments(self, backend, items):
        """``multi_tensor_moments``: K2 of every collected matrix in one
        ``adam_moments_multi`` call, then K3 of each in parameter order (each R is released
        after K2, each N after its K3)."""
        Rs, Ms, Vs, Ns, b1s, b2s, epss, steps, updates = (list(x) for x in zip(*items))
        items.clear()
        ops_multi.adam_moments_multi(Rs, Ms, Vs, Ns, beta1=b1s, beta2=b2s, eps=epss, step=steps,
                                     eps_mode="hf", backend=backend)
        del Rs, Ms, Vs, Ns
        updates.reverse()
        while updates:
            updates.pop()()

    def _flush_grouped(self, backend, side, precision, items):
        """``grouped_gemms``: one class's K1 (one launch), K2 (one multi-tensor call where the
        backend has it, else per matrix), K3 (one launch), then the write-backs."""
        Ws, Gs, Ps, Ms, Vs, groups, ts, wbs = (list(x) for x in zip(*items))
        items.clear()
        Rs = ops_grouped.grouped_project(Gs, Ps, side=side, precision=precision,
                                         backend=backend)
        Ns = [torch.empty_like(M) for M in Ms]
        b1 = [g["betas"][0] for g in groups]
        b2 = [g["betas"][1] for g in groups]
        eps = [g["eps"] for g in groups]
        where = self._multi_where("adam_moments", backend, Rs + Ms + Vs + Ns)
        if where is not None:
            ops_multi.adam_moments_multi(Rs, Ms, Vs, Ns, beta1=b1, beta2=b2, eps=eps, step=ts,
                                         eps_mode="hf", backend=where)
        else:
            for R, M, V, N, a, b, e, t in zip(Rs, Ms, Vs, Ns, b1, b2, eps, ts):
                ops.adam_moments(R, M, V, N, beta1=a, beta2=b, eps=e, step=t, eps_mode="hf",
                                 backend=backend)
        del Rs
        coef, post = zip(*(self._k3_coefficients(g, t) for g, t in zip(groups, ts)))
        ops_grouped.grouped_backproject_update(Ws, Ps, Ns, side=side, coef=list(coef),
                                               post_decay=list(post), precision=precision,
                                               backend=backend)
        for write_back, W in zip(wbs, Ws):
            write_back(W)
