"""LDAdamW, the exact behaviour of ``ldadamw_torch.LDAdamW`` (docs/methods/ldadam.md).

Groups with ``enable_lowrank=True`` are low-rank: every step the subspace moves by one
power-iteration step warm-started at the previous basis (SVD only at the first step), the
Adam statistics are carried into the new subspace with LDAdam's projection-aware
(variance-aware) transport, and a generalised error-feedback buffer ``E`` keeps both the
gradient-compression error and the momentum the new subspace cannot represent; it is added
to the next gradient. Epsilon and weight decay follow torch AdamW (E-torch, WD-pre). Other
groups get dense torch AdamW. One optimizer-wide counter, ``completed_steps`` (starts at 0),
drives every bias correction, as in the official code.

Differences from the official code, on purpose (docs/methods/ldadam.md):
  * ``E`` is optimizer state (``state[p]["error"]``), not ``p.grad``: ``zero_grad()``,
    ``set_to_none`` and gradient clipping act on the fresh gradient only and cannot lose it;
  * ``E`` and ``completed_steps`` are in ``state_dict()``, so a resumed run continues
    bit-identically (the official checkpoint drops both);
  * states and the basis are fp32 unless ``faithful_dtypes=True``;
  * the second moment is transported with ``C∘C`` exactly as docs/methods/ldadam.md states.

The per-step math is a sequence of ops (the update lines of docs/methods/ldadam.md: 1 / 2 / 3+5 /
4+6 / 7-8 / 9): ``ldadam_power_iteration`` (or ``ldadam_momentum_mix`` + SVD), ``project``,
``ldadam_error_feedback``, ``ldadam_moment_transport``, ``adam_moments`` (E-torch) and
``backproject_update`` (WD-pre); dense parameters use ``adamw_step``. Right-projected
matrices run the same ops on transposed views (the canonical form of docs/conventions.md).
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from lowrank_fused import ops, ops_grouped
from lowrank_fused.dispatch import lookup
from lowrank_fused.linalg import (RefreshFallbackWarning, canonical_svd_basis, fallback_basis,
                                  orth)
from lowrank_fused.optim._engine import DenseRoute
from lowrank_fused.optim._base import (LowRankNotEnabledWarning, LowRankOptimizer, check_betas,
                                       check_number, is_sharded)

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJ_METHODS = ("power_iteration", "svd", "svd_lowrank")
FORMS = ("fused", "explicit")
EF_DTYPES = ("param", "fp32")
_SVD_LOWRANK_SEED = 0x1DAD


def ldadam_side(shape, proj_type: str) -> str:
    """ldadamw.py#L77-L88: under 'std' a matrix is left-projected when m <= n (square
    matrices are left-projected, unlike GaLore); 'reverse_std' is left when m >= n."""
    m, n = shape
    if proj_type == "std":
        return "left" if m <= n else "right"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def _normalise_ef_dtype(value) -> str:
    if value is None or value == "param":
        return "param"
    if value in ("fp32", "float32", torch.float32):
        return "fp32"
    raise ValueError(f"ef_dtype must be 'param' (the parameter dtype) or 'fp32', got {value!r}")


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _canonical_signs(B: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive (docs/conventions.md)."""
    idx = B.abs().argmax(dim=0, keepdim=True)
    return B * torch.where(B.gather(0, idx) < 0, -1.0, 1.0).to(B.dtype)


def _randomized_svd_basis(X: torch.Tensor, rank: int, side: str, sign_canon: bool, seed: int):
    """Top-``rank`` singular basis of ``float32(X)`` by a randomized range finder with
    oversampling q = rank + 2 and one power iteration: the algorithm of
    ``torch.svd_lowrank(X, q=rank+2, niter=1)`` (ldadam ``projector.py#L27-L52``), but with a
    seeded generator instead of the global RNG, so runs and resumed runs are reproducible.
    Returns P (m x rank) for ``side='left'``, Q (rank x n) for ``'right'``, fp32."""
    A = X.float()
    if not torch.isfinite(A).all():
        raise FloatingPointError("LDAdamW: the accumulated gradient has non-finite entries; "
                                 "cannot compute its subspace")
    m, n = A.shape
    q = min(rank + 2, m, n)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=A.device, dtype=A.dtype)
    Qr = torch.linalg.qr(A @ omega)[0]
    Qr = torch.linalg.qr(A @ torch.linalg.qr(A.t() @ Qr)[0])[0]       # niter = 1
    Ub, _, Vh = torch.linalg.svd(Qr.t() @ A, full_matrices=False)
    B = (Qr @ Ub)[:, :rank] if side == "left" else Vh[:rank, :].t()
    if sign_canon:
        B = _canonical_signs(B)
    return B.contiguous() if side == "left" else B.t().contiguous()


def _qr_basis(Y: torch.Tensor, sign_canon: bool) -> torch.Tensor:
    """Orthonormal basis of ``Y``'s columns: ``orth`` (sign-canonical QR) or the library's
    ``torch.linalg.qr`` signs (the official ``Gram_Schmidt``), in fp32."""
    if sign_canon:
        return orth(Y)
    return torch.linalg.qr(Y.float())[0]


class LDAdamW(LowRankOptimizer):
    """LDAdam with decoupled weight decay (docs/methods/ldadam.md).

    Args:
        params: parameters or param groups. Group keys (each may be set per group):
            ``enable_lowrank`` (default False: the group gets dense AdamW, as the official
            code's groups without the flag), ``rank`` (16), ``rho`` (0.908), ``proj_type``
            (``"std"``: left when m <= n; ``"reverse_std"``, ``"left"``, ``"right"``),
            ``proj_method`` (``"power_iteration"``; ``"svd"`` or ``"svd_lowrank"`` recompute
            the basis from ``b`` every step), ``error_feedback`` (True), ``ef_dtype``
            (``"param"``: the error buffer in the parameter dtype, as the official code;
            ``"fp32"``), and ``lr``, ``betas``, ``eps``, ``weight_decay``.
        lr, betas, eps, weight_decay: torch AdamW semantics (E-torch, WD-pre); class
            defaults of ``ldadamw_torch``: 1e-3, (0.908, 0.99), 1e-8, 0.0.
        backend: ``"auto" | "reference" | "triton" | "cuda" | "cpu"`` (lowrank_fused.dispatch).
        faithful_dtypes: keep the moments and the basis in the parameter dtype and run the
            power iteration in the explicit form with ``b`` in that dtype, as the official
            code does (default: fp32 states and basis).
        sign_canon: sign-canonical QR (``orth``) and SVD bases (default True); False keeps
            the library's signs, as the official code.
        matmul_precision: ``"ieee" | "tf32" | "bf16" | "tf32x3"`` for fused GEMMs, or None to
            follow ``torch.get_float32_matmul_precision()`` (as GaLoreAdamW).
        form: ``"fused"`` (default): the power iteration without materialising ``b`` and the
            error feedback as one K = 2r GEMM (the fused form); ``"explicit"``: the update
            rule literally (``b`` materialised, three in-place error-buffer updates). Both are
            equal up to rounding (invariant 4 of docs/conventions.md).
        size_guard: a low-rank group's matrix with ``rank >= min(m, n)`` gets the dense AdamW
            step (the size guard; default True). With False it runs LDAdam at rank
            ``min(rank, m, n)`` (the official code's behaviour at ``rank == min(m, n)``).
        grouped_gemms: run the projection (line 2) and the back-projection with the update
            (line 9) of the matrices of one class (shape, rank, side, dtypes, layout) as one
            grouped launch each (``lowrank_fused.ops_grouped``); the per-step power iteration,
            transport, error feedback and moments stay per matrix in between. Bit-identical to
            the per-matrix step on the CPU; holds each class's Rg and N at once (default
            False). Not for FSDP2-sharded matrices (they keep the per-matrix step).

    Tensors with more than 2 dimensions are projected as ``(shape[0], prod(rest))``; 1-D
    parameters of a low-rank group get the dense step.

    State: per low-rank matrix ``basis`` (P m x r, or Q r x n when right-projected),
    ``exp_avg``, ``exp_avg_sq`` (r x n, or m x r) and ``error`` (m x n, with error feedback);
    per dense parameter ``exp_avg``, ``exp_avg_sq``; the global ``completed_steps`` (an int)
    lives in the state of the first parameter of the first group.

    Groups are low-rank only with ``enable_lowrank=True`` (the official code's convention): a
    group that sets a low-rank key (``rank``, ``rho``, ``proj_type``, ``proj_method``,
    ``error_feedback``, ``ef_dtype``) without ``enable_lowrank``, and an optimizer none of
    whose groups is low-rank, give a ``LowRankNotEnabledWarning`` (they run dense AdamW);
    other keys it never reads give an ``IgnoredGroupKeyWarning``.
    """

    LOWRANK_GROUP_KEYS = frozenset({"rank", "rho", "proj_type", "proj_method", "error_feedback",
                                    "ef_dtype"})
    LOWRANK_RULE = "an LDAdamW group is low-rank only with enable_lowrank=True"

    def __init__(self, params, lr=1e-3, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.0,
                 rank=16, rho=0.908, proj_type="std", proj_method="power_iteration",
                 error_feedback=True, ef_dtype="param", enable_lowrank=False, *,
                 backend="auto", nonfinite="raise", faithful_dtypes=False, sign_canon=True, matmul_precision=None,
                 form="fused", size_guard=True, grouped_gemms=False):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        _check_bool("size_guard", size_guard)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        rho=rho, proj_type=proj_type, proj_method=proj_method,
                        error_feedback=error_feedback, ef_dtype=ef_dtype,
                        enable_lowrank=enable_lowrank)
        self._check_group(defaults)
        self.form = form
        self.size_guard = size_guard
        _check_bool("grouped_gemms", grouped_gemms)
        self.grouped_gemms = grouped_gemms
        super().__init__(params, defaults, backend=backend, nonfinite=nonfinite, faithful_dtypes=faithful_dtypes,
                         sign_canon=sign_canon, matmul_precision=matmul_precision)
        if not any(g["enable_lowrank"] for g in self.param_groups):
            warnings.warn("LDAdamW: no param group has enable_lowrank=True, so every parameter "
                          "gets dense AdamW and rank is never used (groups are low-rank only "
                          "with enable_lowrank=True, the official code's convention; pass "
                          "enable_lowrank=True, or set it on the groups to project)",
                          LowRankNotEnabledWarning, stacklevel=2)

    def _is_lowrank_group(self, group) -> bool:
        return bool(group["enable_lowrank"])

    def _ignored_key_category(self, group, given, key):
        if key in self.LOWRANK_GROUP_KEYS and "enable_lowrank" not in given:
            return LowRankNotEnabledWarning
        return super()._ignored_key_category(group, given, key)

    # -- validation -----------------------------------------------------------------------
    def _check_group(self, group):
        """Validate (and normalise) every hyperparameter of a group before anything mutates."""
        check_number("lr", group["lr"], low=0.0)
        group["betas"] = check_betas(group["betas"])
        if check_number("eps", group["eps"], low=0.0) <= 0.0:
            raise ValueError(f"eps must be > 0, got {group['eps']!r}")
        check_number("weight_decay", group["weight_decay"], low=0.0)
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        check_number("rho", group["rho"], low=0.0, high=1.0, high_open=True)
        ldadam_side((2, 1), group["proj_type"])            # validates the name
        if group["proj_method"] not in PROJ_METHODS:
            raise ValueError(f"proj_method must be one of {PROJ_METHODS}, "
                             f"got {group['proj_method']!r}")
        _check_bool("error_feedback", group["error_feedback"])
        _check_bool("enable_lowrank", group["enable_lowrank"])
        group["ef_dtype"] = _normalise_ef_dtype(group["ef_dtype"])

    # -- the global step counter ----------------------------------------------------------
    def _anchor_state(self):
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def completed_steps(self) -> int:
        """Optimizer steps completed so far (``ldadamw.py#L101,L124``); checkpointed."""
        return int(self._anchor_state().get("completed_steps", 0))

    @completed_steps.setter
    def completed_steps(self, value: int):
        self._anchor_state()["completed_steps"] = int(value)

    # -- routing --------------------------------------------------------------------------
    @property
    def _explicit(self) -> bool:
        return self.form == "explicit" or self.faithful_dtypes

    def _plan(self, p, group):
        """(side, rank, 2-D shape) for a low-rank matrix, or None for the dense step. An
        FSDP2-sharded matrix (rows split over ranks) is projected on the right: the basis
        spans the unsharded dimension, and the power iteration's n x r product is summed over
        the ranks (one all-reduce per step)."""
        if not group["enable_lowrank"] or p.dim() < 2:
            return None
        shape = (p.shape[0], math.prod(p.shape[1:]))
        lo = min(shape)
        if self.size_guard and group["rank"] >= lo:
            return None
        side = "right" if is_sharded(p) else ldadam_side(shape, group["proj_type"])
        return side, min(group["rank"], lo), shape

    SUPPORTS_SHARDED = True

    def _check_sharding(self, group):
        super()._check_sharding(group)
        method = group.get("proj_method", self.defaults["proj_method"])
        if method != "power_iteration":
            p = next(q for q in group["params"] if is_sharded(q))
            raise ValueError(f"LDAdamW under FSDP2 supports proj_method='power_iteration' "
                             f"only; {self.param_label(p)} has proj_method={method!r}")

    def _ops_needed(self, group, p):
        if self._plan(p, group) is None:
            return ("adamw_step",)
        needed = ["project", "adam_moments", "backproject_update", "ldadam_moment_transport"]
        if group["proj_method"] == "power_iteration":
            needed.append("ldadam_power_iteration")
        else:
            needed.append("ldadam_momentum_mix")
        if group["error_feedback"]:
            needed.append("ldadam_error_feedback")
        return tuple(needed)

    # -- the step -------------------------------------------------------------------------
    def _before_updates(self):
        self._pi_checks = []

    def _after_updates(self):
        self.completed_steps = self.completed_steps + 1   # after all parameters (ldadamw.py#L124)
        checks, self._pi_checks = getattr(self, "_pi_checks", []), []
        if checks and self.nonfinite != "ignore":          # one host read for the whole step
            ok = torch.stack([flag for _, flag in checks])
            if bool(ok.all()):
                return
            for (p, _), good in zip(checks, ok.cpu().tolist()):
                if not good:
                    warnings.warn(f"subspace refresh of {self.param_label(p)}: the power "
                                  "iteration produced non-finite values; kept the previous "
                                  "basis", RefreshFallbackWarning)

    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        if plan is None:
            self._dense_step(p, group, backend)
        else:
            self._ldadam_step(p, group, plan, backend, precision)

    def _route(self, p, group):
        """Dense parameters on the engine's dense sets (the global counter's bias
        correction); projected ones per matrix."""
        if self._plan(p, group) is None:
            return DenseRoute("torch", "pre", global_step=True)
        return None

    def _dense_step_number(self):
        return self.completed_steps + 1

    def _dense_step(self, p, group, backend):
        """torch AdamW with the global counter's bias correction (ldadamw.py#L131-L161)."""
        self._dense_adamw_step(p, group, backend, eps_mode="torch", wd_mode="pre",
                               step=self.completed_steps + 1)

    def _new_basis(self, X, rank, side, method, t, p=None):
        """Basis at a parameter's first step, or from ``b`` (proj_method 'svd', 'svd_lowrank')."""
        label = self.param_label(p) if p is not None else None
        previous = self.state[p].get("basis") if p is not None else None
        if method == "svd_lowrank":
            try:
                B = _randomized_svd_basis(X, rank, side, self.sign_canon, _SVD_LOWRANK_SEED + t)
                reason = None if bool(torch.isfinite(B).all()) else "its basis is non-finite"
            except RuntimeError as e:             # torch.linalg.LinAlgError is a RuntimeError
                reason = f"it failed ({str(e).splitlines()[0][:120]})"
            if reason is None:
                return B
            return fallback_basis(X, rank, side, self.sign_canon, label=label, previous=previous,
                                  reason="the svd_lowrank refresh: " + reason)
        return canonical_svd_basis(X, rank, side, self.sign_canon, label=label,
                                   previous=previous)

    def _ldadam_step(self, p, group, plan, backend, precision):
        """docs/methods/ldadam.md, left form; a right-projected matrix runs the canonical ops on
        transposed views (``cv``)."""
        side, rank, shape = plan
        state = self.state[p]
        W, G, write_back = self._as_matrix(p, shape)
        shape = tuple(W.shape)                         # FSDP2: this rank's rows
        t = self.completed_steps                    # 0-based, before this step's increment
        beta1, rho = group["betas"][0], group["rho"]
        sdt = self._state_dtype(p)
        low_shape = ops.low_rank_shape(shape, rank, side)
        basis_shape = ops.basis_shape(shape, rank, side)

        def cv(x):                                  # canonical (left-form) view
            return x if side == "left" else x.t()

        first = "basis" not in state
        if not first and (tuple(state["basis"].shape) != basis_shape
                          or tuple(state["exp_avg"].shape) != low_shape):
            raise ValueError(
                f"LDAdamW: the stored basis {tuple(state['basis'].shape)} does not match rank "
                f"{rank} and side {side!r} of a {shape} matrix (rank or proj_type changed "
                "mid-run?)")

        # A = E_{t-1} + G_t: what the official code holds in p.grad after backward.
        ef = group["error_feedback"]
        edt = torch.float32 if group["ef_dtype"] == "fp32" else p.dtype
        E = state.get("error") if ef else None
        if E is not None and E.dtype != edt:        # ef_dtype changed mid-run
            E = E.to(edt)
        if not ef:
            A = G
        elif E is None:
            A = G.to(edt)
        else:
            # in place, as the official code's backward accumulates into p.grad: one rounding
            # to E's dtype, the same value as (E + G) formed out of place, and no m x n
            # temporary. Gradients were checked finite by the step's validation.
            A = E.add_(G)

        # line 1: the new basis (no weight is written before it exists)
        if first:
            P_new = (self._sharded_right_basis(p, A, rank) if is_sharded(p)
                     else self._new_basis(A, rank, side, group["proj_method"], t, p))
            P_old = torch.zeros(basis_shape, dtype=sdt, device=p.device)
            M = torch.zeros(low_shape, dtype=sdt, device=p.device)
            V = torch.zeros_like(M)
        else:
            P_old, M, V = state["basis"], state["exp_avg"], state["exp_avg_sq"]
            bc1_t = 1.0 - beta1 ** t
            mix = dict(coef_m=rho / bc1_t, coef_a=1.0 - rho, precision=precision)
            b_dtype = p.dtype if self.faithful_dtypes else torch.float32
            if group["proj_method"] == "power_iteration":
                Y = torch.empty((cv(A).shape[0], rank), dtype=torch.float32, device=p.device)
                lookup("ldadam_power_iteration", backend)(
                    cv(A), cv(P_old), cv(M), Y, explicit=self._explicit, b_dtype=b_dtype, **mix)
                if is_sharded(p):      # Y is linear in the row shards: sum the ranks' parts
                    import torch.distributed as dist

                    dist.all_reduce(Y, group=p.device_mesh.get_group())
                # overflow in b = rho*M-mix + A keeps the previous basis, chosen on the device
                # (no host read per parameter; _after_updates warns once per step)
                ok = torch.isfinite(Y).all()
                Po = cv(P_old).float()
                Q = _qr_basis(torch.where(ok, Y, Po), self.sign_canon)
                P_new = cv(torch.where(ok, Q, Po))
                self._pi_checks.append((p, ok))
            else:
                B = torch.empty(shape, dtype=b_dtype, device=p.device)
                lookup("ldadam_momentum_mix", backend)(cv(A), cv(P_old), cv(M), cv(B), **mix)
                P_new = self._new_basis(B, rank, side, group["proj_method"], t, p)
        P_new = P_new.to(sdt).contiguous()
        rest = functools.partial(self._ldadam_after_projection, p, group, side, shape, W, A, E,
                                 P_new, P_old, M, V, first, t, write_back, backend, precision)
        if self.grouped_gemms and not is_sharded(p):
            batch = self._grouped_batch(backend, side, precision, W, A, P_new)
            if batch is not None:                 # K1 and K3 of the class at the end
                batch.append((W, A, P_new, rest))
                return
        # line 2: project the accumulated gradient
        Rg = ops.project(A, P_new, side=side, precision=precision, backend=backend)
        N, coef, pre_scale, post_decay, finish = rest(Rg)
        ops.backproject_update(W, P_new, N, side=side, coef=coef, pre_scale=pre_scale,
                               post_decay=post_decay, precision=precision, backend=backend)
        finish()

    def _ldadam_after_projection(self, p, group, side, shape, W, A, E, P_new, P_old, M, V,
                                 first, t, write_back, backend, precision, Rg):
        """Lines 3-8 after the projection Rg: transport, error feedback, Adam. Returns N,
        K3's scalars (line 9) and what ends the step after K3 (write-back, line 10)."""
        state = self.state[p]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        ef = group["error_feedback"]
        edt = torch.float32 if group["ef_dtype"] == "fp32" else p.dtype

        def cv(x):                                  # canonical (left-form) view
            return x if side == "left" else x.t()

        # lines 4 + 6: transport the statistics into the new subspace (v in place)
        M_tr = torch.zeros_like(M)
        if not first:
            bc1_t, bc2_t = ops.bias_corrections(beta1, beta2, t)
            lookup("ldadam_moment_transport", backend)(
                cv(P_new), cv(P_old), cv(M), cv(V), cv(M_tr), bc1=bc1_t, bc2=bc2_t,
                precision=precision)

        # lines 3 + 5: generalised error feedback
        if ef:
            if E is None:
                E = torch.empty(shape, dtype=edt, device=p.device)
            lookup("ldadam_error_feedback", backend)(
                cv(A), cv(P_new), cv(P_old), cv(Rg), cv(M), cv(M_tr), cv(E),
                c=beta1 / (1.0 - beta1), explicit=self._explicit, precision=precision)
            state["error"] = E
        else:
            state.pop("error", None)
        if not first:
            M.copy_(M_tr)

        # lines 7 + 8: Adam recursion and E-torch normalisation, bias correction at t + 1
        N = torch.empty_like(M)
        ops.adam_moments(Rg, M, V, N, beta1=beta1, beta2=beta2, eps=group["eps"], step=t + 1,
                         eps_mode="torch", backend=backend)
        # line 9: W <- W*(1 - lr*wd) - lr * P_new @ N (K3, by the caller)
        pre_scale, post_decay = ops.decay_coefficients(lr, group["weight_decay"], "pre")

        def finish():
            write_back(W)
            # line 10
            state["basis"], state["exp_avg"], state["exp_avg_sq"] = P_new, M, V

        return N, lr, pre_scale, post_decay, finish

    def _flush_grouped(self, backend, side, precision, items):
        """``grouped_gemms``: one class's K1 (one launch), each matrix's lines 3-8, K3 (one
        launch), then each matrix's write-back and state."""
        Ws, As, Ps, rests = (list(x) for x in zip(*items))
        items.clear()
        Rgs = ops_grouped.grouped_project(As, Ps, side=side, precision=precision,
                                          backend=backend)
        out = [rest(Rg) for rest, Rg in zip(rests, Rgs)]
        del Rgs
        Ns, coefs, pres, posts, finishes = (list(x) for x in zip(*out))
        ops_grouped.grouped_backproject_update(Ws, Ps, Ns, side=side, coef=coefs,
                                               pre_scale=pres, post_decay=posts,
                                               precision=precision, backend=backend)
        for finish in finishes:
            finish()
