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
from types import SimpleNamespace

import torch

from lowrank_fused import _capture, ops, ops_grouped, ops_multi, sharded
from lowrank_fused.dispatch import lookup
from lowrank_fused.linalg import (RefreshFallbackWarning, canonical_svd_basis, fallback_basis,
                                  orth)
from lowrank_fused.optim._engine import ClassRoute, DenseRoute, Workspace
from lowrank_fused.reference._precision import _torch_matmul_precision
from lowrank_fused.reference._precision import matmul as _matmul
from lowrank_fused.optim._base import (LowRankNotEnabledWarning, LowRankOptimizer, check_betas,
                                       check_number, is_sharded)

PROJ_TYPES = ("std", "reverse_std", "left", "right")
PROJ_METHODS = ("power_iteration", "svd", "svd_lowrank")
FORMS = ("fused", "explicit")
EF_DTYPES = ("param", "fp32")
_SVD_LOWRANK_SEED = 0x1DAD
# what a step skipped on the device rolls back besides ``completed_steps``: no per-matrix
# counter (the dense parameters take the global counter too)
_NO_COUNTERS = SimpleNamespace(counters=())


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


def _randomized_svd_basis(X: torch.Tensor, rank: int, side: str, sign_canon: bool, seed: int,
                          rows=None):
    """Top-``rank`` singular basis of ``float32(X)`` by a randomized range finder with
    oversampling q = rank + 2 and one power iteration: the algorithm of
    ``torch.svd_lowrank(X, q=rank+2, niter=1)`` (ldadam ``projector.py#L27-L52``), but with a
    seeded generator instead of the global RNG, so runs and resumed runs are reproducible.
    Returns P (m x rank) for ``side='left'``, Q (rank x n) for ``'right'``, fp32.

    ``rows`` (``lowrank_fused.sharded``): X is this rank's rows of a row-sharded matrix; the
    same steps run over the shards (the thin m x q products gathered for their QRs, the
    n x q and q x n products all-reduced) and P is this rank's rows. Without it, every
    collective is a no-op."""
    A = X.float()
    if rows is None:
        rows = sharded.single_rows(A.shape[0])
    if rows.any_(not bool(torch.isfinite(A).all())):
        raise FloatingPointError("LDAdamW: the accumulated gradient has non-finite entries; "
                                 "cannot compute its subspace")
    n = A.shape[1]
    q = min(rank + 2, rows.m, n)
    gen = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=A.device, dtype=A.dtype)
    Qr = rows.local(torch.linalg.qr(rows.gather(A @ omega))[0])
    Z = torch.linalg.qr(rows.sum_((A.t() @ Qr).contiguous()))[0]
    Qr = torch.linalg.qr(rows.gather(A @ Z))[0]                        # niter = 1, whole
    Ub, _, Vh = torch.linalg.svd(rows.sum_((rows.local(Qr).t() @ A).contiguous()),
                                 full_matrices=False)
    B = (Qr @ Ub)[:, :rank] if side == "left" else Vh[:rank, :].t()
    if sign_canon:
        B = _canonical_signs(B)
    return rows.local(B).contiguous() if side == "left" else B.t().contiguous()


def _qr_basis(Y: torch.Tensor, sign_canon: bool) -> torch.Tensor:
    """Orthonormal basis of ``Y``'s columns: ``orth`` (sign-canonical QR) or the library's
    ``torch.linalg.qr`` signs (the official ``Gram_Schmidt``), in fp32."""
    if sign_canon:
        return orth(Y)
    return torch.linalg.qr(Y.float())[0]


def _mm(a, b, precision, out):
    """``reference._precision.matmul(a, b, precision)`` written into ``out`` (fp32): the same
    torch product, without a new tensor where the precision needs no operand rounding (fp32
    operands at "ieee"); the other precisions round copies of the operands, as ``matmul``."""
    if precision == "ieee" and a.dtype == torch.float32 and b.dtype == torch.float32:
        mm = torch.bmm if a.dim() == 3 else torch.matmul   # what matmul runs on batches
        if a.device.type != "cuda":
            return mm(a, b, out=out)
        with _torch_matmul_precision("highest"):
            return mm(a, b, out=out)
    return out.copy_(_matmul(a, b, precision))


class _BoundOwnInputsProject(ops_grouped.BoundGroupedProject):
    """``BoundGroupedProject`` whose inputs are the class's own error buffers: the same
    tensors, written in place only, for as long as the plan lives (replacing one, by a
    checkpoint load or an ``ef_dtype`` change, rebuilds the plan and this call with it). The
    first call with that very list at a precision runs every check and plans the launch, as
    the base does; the later ones skip the per-member layout and address checks (which the
    base repeats on every call, because a gradient may move) and make that launch, unchanged.
    Any other list, or a side output, takes the base's call."""

    def __init__(self, As, Ps, Rs, *, side, backend):
        super().__init__(As, Ps, Rs, side=side, backend=backend)
        self._own = As
        self._ready = {}                    # precision -> the planned launch
        self._first = As[0] if side == "left" else As[0].t()

    def __call__(self, Gs, *, precision="ieee", r_sumsq=None, sumsq=None):
        own = Gs is self._own and r_sumsq is None and sumsq is None
        if own:
            launch = self._ready.get(precision)
            if launch is not None:
                launch(self._first)
                return self.out
        out = super().__call__(Gs, precision=precision, r_sumsq=r_sumsq, sumsq=sumsq)
        if own and self.planner is not None:
            known = self._plans.get((precision, None, None))
            if known is not None and known[0] == tuple(map(torch.Tensor.data_ptr, Gs)):
                self._ready[precision] = known[1]
        return out


def _bound_project(As, Ps, Rs, side, backend, own=False):
    """A class's grouped projection ``Rs = proj(As, Ps)`` bound once
    (``ops_grouped.BoundGroupedProject``, which also plans its launch once per gradient
    addresses), as a call ``(As, precision)``. ``own``: ``As`` are the class's error buffers
    (``_BoundOwnInputsProject``: the three projections of a step check them once, when the
    plan is built, not on every call)."""
    cls = _BoundOwnInputsProject if own else ops_grouped.BoundGroupedProject
    bound = cls(As, Ps, Rs, side=side, backend=backend)
    return lambda Xs, precision: bound(Xs, precision=precision)


def _accumulator(backend, device):
    """Line 3's ``E += G`` for a batch (``Es, Gs, skip``): one Triton launch for the batch
    (``kernels/ldadam_error_accumulate.py``) where the grouped GEMMs run on Triton, else the
    reference (``torch._foreach_add_``, a snapshot and a select under a ``skip`` flag). Both
    give the bits of ``torch._foreach_add_``."""
    from lowrank_fused.dispatch import resolve_call

    if resolve_call("grouped_project", backend, device)[0] == "triton":
        from lowrank_fused.kernels.ldadam_error_accumulate import ldadam_error_accumulate

        return ldadam_error_accumulate
    from lowrank_fused.reference.ldadam_error_accumulate import ldadam_error_accumulate_ref

    return ldadam_error_accumulate_ref


def _bind_scaled(st, side, ef, backend, device):
    """A batch's elementwise steps that take per-step scalars (line 1's two mixes, the
    transport's two halves, the error feedback's right operand and the moment's update) as
    three Triton launches on the batch's tensors, reading the scalars from a table the call
    keeps (``kernels/ldadam_scaled_moments.py``), where the grouped GEMMs run on Triton and
    the moments are contiguous fp32, bf16 or fp16; else None (``_batch_step``'s torch ops,
    which take them by value: the reference backend)."""
    from lowrank_fused.dispatch import resolve_call

    if resolve_call("grouped_project", backend, device)[0] != "triton":
        return None
    from lowrank_fused.kernels.ldadam_scaled_moments import STATE_DTYPES, BoundScaledMoments

    M, V = st["M"], st["V"]
    if (M.dtype not in STATE_DTYPES or V.dtype not in STATE_DTYPES or not M.is_contiguous()
            or not V.is_contiguous()):
        return None
    return BoundScaledMoments(M, V, st["R1"], st["V1"], st["Yp"], st["corr"], st["mtr"],
                              st["w2"], st["R"] if ef else None, st["L"] if ef else None,
                              side=side)


class _BatchGemms:
    """A batch's five small products per step (line 1's ``P_old (M V1)``, the transport's
    ``C``, ``M_tr`` and ``(C o C) w``) as bound Triton batched GEMMs on the batch's fixed
    tensors (``kernels/batched_matmul.py``, one planned launch each), bound per precision
    at first use. Written so that the second operand is always fp32 (the kernel's contract):
    a product whose natural second operand is a stored moment or basis (possibly bf16) is
    made transposed, ``(X Y)^T = Y^T X^T``, into a transposed view of its output."""

    def __init__(self, st, side):
        M, P = st["M"], st["P"]
        if side == "left":
            self.products = dict(
                MV=(M, st["V1T"], st["MV"]),                      # M V1^T
                corr=(P, st["MV"], st["corr"]),                   # P_old (M V1^T)
                C=(st["PT"], st["P_old"], st["C"]),               # P_new^T P_old
                mtr=(M.transpose(1, 2), st["CT"], st["mtr"].transpose(1, 2)),   # C M
                w2=(st["CC"], st["R1"], st["w2"]))                # (C o C) w
        else:
            self.products = dict(
                MV=(M.transpose(1, 2), st["V1"], st["MV"].transpose(1, 2)),     # V1^T M
                corr=(P.transpose(1, 2), st["MV"].transpose(1, 2),
                      st["corr"].transpose(1, 2)),                # (V1^T M) P_old
                C=(P, st["Pc_old"], st["C"]),                     # Q_new Q_old^T
                mtr=(M, st["CT"], st["mtr"]),                     # M C^T
                w2=(st["R1"], st["CCT"], st["w2"]))               # w (C o C)^T
        self._bound = {}

    def __call__(self, name, precision):
        bound = self._bound.get((name, precision))
        if bound is None:
            from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmul

            A, B, C = self.products[name]
            bound = self._bound[(name, precision)] = BoundBatchedMatmul(A, B, C,
                                                                         precision=precision)
        bound()


def _bind_gemms(st, side, scaled):
    """``_BatchGemms`` where the batch's elementwise steps run on Triton (``scaled`` bound),
    else None (``_batch_step``'s torch products)."""
    return None if scaled is None else _BatchGemms(st, side)


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
        backend, nonfinite, faithful_dtypes, sign_canon, matmul_precision: the options every
            method shares (``LowRankOptimizer``, docs/conventions.md). ``faithful_dtypes``
            keeps the moments and the basis in the parameter dtype and runs the power
            iteration in the explicit form with ``b`` in that dtype, as the official code
            does; ``sign_canon`` makes the QR (``orth``) and SVD bases sign-canonical (False
            keeps the library's signs, as the official code).
        form: ``"fused"`` (default): the power iteration without materialising ``b`` and the
            error feedback as one K = 2r GEMM (the fused form); ``"explicit"``: the update
            rule literally (``b`` materialised, three in-place error-buffer updates). Both are
            equal up to rounding (invariant 4 of docs/conventions.md).
        size_guard: a low-rank group's matrix with ``rank >= min(m, n)`` gets the dense AdamW
            step (the size guard; default True). With False it runs LDAdam at rank
            ``min(rank, m, n)`` (the official code's behaviour at ``rank == min(m, n)``).

    The step runs on the engine (docs/engine.md): with ``proj_method="power_iteration"`` and
    the fused form (the defaults), the low-rank matrices of one class (side, rank, shape,
    dtypes, layout, param group) take their whole step together: the power iteration as two
    grouped projections of ``A`` and batched r x r products, one batched QR, one grouped
    projection (line 2), the transport and moments on the class's stacked state, the error
    feedback as one grouped K = 2r back-projection and one grouped K3 (line 9). The class's
    bases and moments are views of one stacked buffer per class (the state keeps one tensor
    per matrix). The result equals the per-matrix step (``opt.engine = False``, which runs the
    same composition one matrix at a time) bit for bit on the CPU. A matrix's first step (SVD
    basis), ``proj_method`` "svd" / "svd_lowrank", the explicit form (``form="explicit"`` or
    ``faithful_dtypes``), FSDP2 shards and per-layer mode take the per-matrix step.

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
                 form="fused", size_guard=True, **options):
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
        super().__init__(params, defaults, **options)
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
        """(side, rank, 2-D shape) for a low-rank matrix, or None for the dense step. The
        shape is the whole matrix's, also for an FSDP2 shard (the side is the one-process
        run's; ``_ldadam_step`` adds the collectives, docs/distributed.md)."""
        if not group["enable_lowrank"] or p.dim() < 2:
            return None
        shape = (p.shape[0], math.prod(p.shape[1:]))
        lo = min(shape)
        if self.size_guard and group["rank"] >= lo:
            return None
        side = ldadam_side(shape, group["proj_type"])
        return side, min(group["rank"], lo), shape

    SUPPORTS_SHARDED = True

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
        # the settings that decide a matrix's route (engine or per-matrix step) and its
        # class's lists: a change rebuilds the plan
        sig = (self.form, self.faithful_dtypes, self.sign_canon, tuple(
            (g["proj_method"], g["error_feedback"], g["ef_dtype"]) for g in self.param_groups))
        if sig != self.__dict__.get("_route_settings"):
            self._route_settings = sig
            self._invalidate_plan()

    def _after_updates(self):
        self.completed_steps = self.completed_steps + 1   # after all parameters (ldadamw.py#L124)
        if self.__dict__.pop("_routes_pending", False):
            self._invalidate_plan()      # matrices that took their first step join their class
        checks, self._pi_checks = getattr(self, "_pi_checks", []), []
        if checks and self.nonfinite != "ignore":          # one host read for the whole step
            lagged = self._lagged_nonfinite(checks[0][1].device)
            if lagged:
                # the previous step's guards first: the buffers below are reused
                self._take_pending_guards()       # per-layer mode: no step() in between
            ok, params = self._gathered_guards(checks)
            if lagged:
                # as the engine's non-finite flag (docs/engine.md): copied asynchronously and
                # read at the next step() (or nonfinite_check(), state_dict()), so the host
                # does not wait here for the step's kernels
                if ok.is_cuda:
                    # one pinned buffer per size, reused: the copy into it was waited for
                    # when the previous step's guards were read
                    host = self.__dict__.setdefault("_guards_host", {}).get(ok.numel())
                    if host is None:
                        host = self._guards_host[ok.numel()] = torch.empty(
                            ok.shape, dtype=torch.bool, pin_memory=True)
                    host.copy_(ok, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host, event = ok, None
                self._pending_guards = (host, event, params)
                return
            self._warn_fallbacks(ok, params)

    def _gathered_guards(self, checks):
        """The step's power-iteration flags as one vector and their matrices: a single batch's
        own flags, else the batches' flags gathered into a buffer kept per layout of the
        checks (the classes' flag buffers and member lists stay for the plan's life, so a
        steady step neither allocates nor rebuilds the list)."""
        if len(checks) == 1:
            return checks[0][1].reshape(-1), checks[0][0]
        key = tuple((id(ps), id(flag)) for ps, flag in checks)
        cached = self.__dict__.get("_guards_gather")
        if cached is None or cached[0] != key:
            flags = [flag.reshape(-1) for _, flag in checks]
            buf = torch.empty(sum(f.numel() for f in flags), dtype=torch.bool,
                              device=flags[0].device)
            cached = self._guards_gather = (key, flags, buf, [p for ps, _ in checks for p in ps],
                                            [ps for ps, _ in checks], [f for _, f in checks])
        _, flags, buf, params = cached[:4]
        return torch.cat(flags, out=buf), params

    def _warn_fallbacks(self, ok, params, on_host=False):
        """The warning for every matrix whose power iteration was not finite (``ok``: one
        flag per matrix of ``params``). ``on_host``: ``ok`` is the host copy of a step's flags
        whose copy has completed (the lagged guards), read as memory as the engine reads its
        lagged flag; else one host read of the device's flags."""
        if on_host:
            flags = ok.numpy()
            if flags.all():
                return
            flags = flags.tolist()
        else:
            if bool(ok.all()):
                return
            flags = ok.cpu().tolist()
        for p, good in zip(params, flags):
            if not good:
                warnings.warn(f"subspace refresh of {self.param_label(p)}: the power "
                              "iteration produced non-finite values; kept the previous "
                              "basis", RefreshFallbackWarning)

    # every state-writing op of a class's steady step takes the on-device flag (_batch_step)
    DEVICE_SKIP = True

    def nonfinite_check(self):
        """The base's check, and the power-iteration guards of the last step when they were
        left on the device (``lagged_nonfinite``, the default on CUDA): a matrix that kept its
        basis is named by a ``RefreshFallbackWarning`` here, one call later. A step skipped
        on the device is rolled back on the one counter LDAdam keeps, ``completed_steps``
        (its matrices have no per-matrix counter for the base to roll back)."""
        self._take_pending_guards()
        pending = self.__dict__.get("_pending_nonfinite")
        if pending is None:
            return
        host, event, _, params, step_number = pending
        self._pending_nonfinite = (host, event, _NO_COUNTERS, params, step_number)
        skipped, calls = self.skipped_steps, self.step_calls
        try:
            super().nonfinite_check()
        finally:
            if (self.skipped_steps, self.step_calls) != (skipped, calls):
                self.completed_steps = self.completed_steps - 1

    def _take_pending_guards(self):
        pending = self.__dict__.pop("_pending_guards", None)
        if pending is not None:
            host, event, params = pending
            if event is not None:
                event.synchronize()
            self._warn_fallbacks(host, params, on_host=True)

    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        if plan is None:
            self._dense_step(p, group, backend)
        else:
            self._ldadam_step(p, group, plan, backend, precision)

    def _route(self, p, group):
        """Dense parameters on the engine's dense sets (the global counter's bias
        correction); a low-rank matrix with a basis on its class (``_batched_ok``); its first
        step (the SVD basis) on the per-matrix step, after which the plan is rebuilt."""
        plan = self._plan(p, group)
        if plan is None:
            return DenseRoute("torch", "pre", global_step=True)
        side, rank, shape = plan
        state = self.state[p]
        if "basis" not in state:
            self._routes_pending = True
            return None
        if (not self._batched_ok(p, group)
                or tuple(state["basis"].shape) != ops.basis_shape(shape, rank, side)
                or tuple(state["exp_avg"].shape) != ops.low_rank_shape(shape, rank, side)):
            return None                   # the per-matrix step (which names a bad shape)
        return ClassRoute(side, rank, shape)

    def _batched_ok(self, p, group) -> bool:
        """Whether the matrix's steady step is the batched composition (``_batch_step``):
        the fused power iteration, not FSDP2-sharded, and a backend with grouped GEMMs."""
        if (group["proj_method"] != "power_iteration" or self._explicit or is_sharded(p)):
            return False
        return self._grouped_available(group, p)

    def _dense_step_number(self):
        return self.completed_steps + 1

    def _dense_step(self, p, group, backend):
        """torch AdamW with the global counter's bias correction (ldadamw.py#L131-L161)."""
        self._dense_adamw_step(p, group, backend, eps_mode="torch", wd_mode="pre",
                               step=self.completed_steps + 1)

    def _new_basis(self, X, rank, side, method, t, p=None):
        """Basis at a parameter's first step, or from ``b`` (proj_method 'svd', 'svd_lowrank').
        An FSDP2 shard takes the same decompositions over its rows (``sharded``): the exact
        SVD where its n x n Gram is small (else the randomized range finder, with a warning),
        ``svd_lowrank`` step for step."""
        label = self.param_label(p) if p is not None else None
        rows = sharded.rows_of(p) if p is not None else None
        if rows is not None:
            if method == "svd_lowrank":
                return _randomized_svd_basis(X, rank, side, self.sign_canon,
                                             _SVD_LOWRANK_SEED + t, rows)
            return sharded.basis(X, rank, side, rows, projector="svd",
                                 sign_canon=self.sign_canon, seed=t, label=label,
                                 warn_owner=self)
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
        if ("basis" in state and self._batched_ok(p, group)
                and tuple(state["basis"].shape) == ops.basis_shape(shape, rank, side)
                and tuple(state["exp_avg"].shape) == ops.low_rank_shape(shape, rank, side)):
            return self._single_step(p, group, plan, backend, precision)
        W, G, write_back = self._as_matrix(p, shape)
        shape = tuple(W.shape)                         # FSDP2: this rank's rows
        rows = sharded.rows_of(p)
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
            P_new = self._new_basis(A, rank, side, group["proj_method"], t, p)
            P_old = torch.zeros(basis_shape, dtype=sdt, device=p.device)
            M = torch.zeros(low_shape, dtype=sdt, device=p.device)
            V = torch.zeros_like(M)
        else:
            P_old, M, V = state["basis"], state["exp_avg"], state["exp_avg_sq"]
            bc1_t = 1.0 - beta1 ** t
            mix = dict(coef_m=rho / bc1_t, coef_a=1.0 - rho, precision=precision)
            b_dtype = p.dtype if self.faithful_dtypes else torch.float32
            if group["proj_method"] == "power_iteration":
                if rows is not None and side == "left":     # Y over the sharded rows
                    Y = rows.gather(self._sharded_left_power_iteration(A, P_old, M, rows,
                                                                       b_dtype, **mix))
                    # the QR's input when Y overflowed (P_new is then this rank's P_old)
                    Po = torch.eye(Y.shape[0], Y.shape[1], device=Y.device)
                else:
                    Y = torch.empty((cv(A).shape[0], rank), dtype=torch.float32,
                                    device=p.device)
                    lookup("ldadam_power_iteration", backend)(
                        cv(A), cv(P_old), cv(M), Y, explicit=self._explicit, b_dtype=b_dtype,
                        **mix)
                    if rows is not None:   # right: Y is linear in the row shards: sum them
                        rows.sum_(Y)
                    Po = cv(P_old).float()
                # overflow in b = rho*M-mix + A keeps the previous basis, chosen on the device
                # (no host read per parameter; _after_updates warns once per step)
                ok = torch.isfinite(Y).all()
                Q = _qr_basis(torch.where(ok, Y, Po), self.sign_canon)
                if rows is not None and side == "left":
                    Q, Po = rows.local(Q), P_old.float()
                P_new = cv(torch.where(ok, Q, Po))
                self._pi_checks.append(([p], ok))
            else:
                B = torch.empty(shape, dtype=b_dtype, device=p.device)
                lookup("ldadam_momentum_mix", backend)(cv(A), cv(P_old), cv(M), cv(B), **mix)
                P_new = self._new_basis(B, rank, side, group["proj_method"], t, p)
        P_new = P_new.to(sdt).contiguous()
        rest = functools.partial(self._ldadam_after_projection, p, group, side, shape, W, A, E,
                                 P_new, P_old, M, V, first, t, write_back, backend, precision)
        # line 2: project the accumulated gradient (left shards: summed over the ranks)
        Rg = sharded.project(A, P_new, side, rows, precision=precision, backend=backend)
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
            Pn, Po = cv(P_new), cv(P_old)
            rows = sharded.rows_of(p)
            if rows is not None and side == "left":
                # C = P_new^T P_old sums over the sharded rows: all-reduce the r x r product
                # and hand the op bases whose product is C (C^T as P_new, the identity as P_old)
                C = rows.sum_(_matmul(Pn.float().t(), Po.float(), precision).contiguous())
                Pn = C.t().contiguous()
                Po = torch.eye(C.shape[0], dtype=torch.float32, device=C.device)
            lookup("ldadam_moment_transport", backend)(
                Pn, Po, cv(M), cv(V), cv(M_tr), bc1=bc1_t, bc2=bc2_t, precision=precision)

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

    def _sharded_left_power_iteration(self, A, P_old, M, rows, b_dtype, *, coef_m, coef_a,
                                      precision):
        """The ``ldadam_power_iteration`` op's ``Y`` for a left basis over row shards: this
        rank's rows of ``Y = b (b^T P_old)``, ``b = coef_m P_old M + coef_a A``. ``b^T P_old``
        (n x r) sums over the rows: one all-reduce; the rest is local (the op's two forms)."""
        P = P_old.float()
        if self._explicit:
            B = torch.empty(A.shape, dtype=b_dtype, device=A.device)
            lookup("ldadam_momentum_mix", "reference")(A, P_old, M, B, coef_m=coef_m,
                                                        coef_a=coef_a)
            b = B.float()
            V = rows.sum_(b.t() @ P).to(b_dtype).float()
            return (b @ V).to(b_dtype).float()
        a, m = A.float(), M.float()
        V1 = coef_m * m.t() + coef_a * rows.sum_(_matmul(a.t(), P, precision).contiguous())
        return coef_m * (P @ _matmul(m, V1, precision)) + coef_a * _matmul(a, V1, precision)

    # -- the batched steady step: the engine's classes, and the per-matrix step as a batch of one

    @staticmethod
    def _scratch_shapes(side, rank, shape):
        low = ops.low_rank_shape(shape, rank, side)
        basis = ops.basis_shape(shape, rank, side)
        canon = basis if side == "left" else basis[::-1]
        small = (rank, rank)
        return (("R1", low), ("V1", low), ("Yp", basis),
                ("K", ops.basis_shape(shape, 2 * rank, side)),
                ("L", ops.low_rank_shape(shape, 2 * rank, side)),
                ("corr", basis), ("Ysel", canon), ("Q", canon), ("mtr", low), ("w2", low),
                ("MV", small), ("Rq", small), ("C", small), ("CC", small), ("sign", (1, rank)),
                ("fsum", ()))

    @classmethod
    def _scratch_numel(cls, side, rank, shape, count):
        return count * sum(math.prod(s) for _, s in cls._scratch_shapes(side, rank, shape))

    @classmethod
    def _carve(cls, flat, side, rank, shape, count):
        """A batch's fp32 scratch, (count, ...) views of ``flat``: R1 = proj(A, P_old) and
        V1 (line 1), Yp (line 1's Y), K = [P_new, P_old] (the error feedback's K = 2r bases,
        P_old kept there for the transport), L (its 2r rows / columns), and what the small
        products of the step write into instead of new tensors: corr (line 1's P_old M V1
        term, then the finiteness test of Y), Ysel and Q (the QR's input and factor, in the
        canonical m x r form), mtr and w2 (the transported moments), MV, Rq, C, CC (r x r),
        sign (the QR's column signs) and fsum (one number per matrix)."""
        out, off = {}, 0
        for name, shp in cls._scratch_shapes(side, rank, shape):
            n = count * math.prod(shp)
            out[name] = flat[off:off + n].view((count,) + tuple(shp))
            off += n
        return out

    @staticmethod
    def _derive_views(st, side, rank):
        """The views ``_batch_step`` reads, taken once per batch instead of once per step:
        transposes, the halves of K and L (K = [P_new, P_old]; the canonical m x r forms of
        both bases), the flags as (count, 1, 1) and the QR's diagonal."""
        left = side == "left"
        K, L = st["K"], st["L"]
        P_new, P_old = (K[:, :, :rank], K[:, :, rank:]) if left else (K[:, :rank], K[:, rank:])
        st.update(P_new=P_new, P_old=P_old,
                  Pc_new=P_new if left else P_new.transpose(1, 2),
                  Pc_old=P_old if left else P_old.transpose(1, 2),
                  Yc=st["Yp"] if left else st["Yp"].transpose(1, 2),
                  V1T=st["V1"].transpose(1, 2), PT=st["P"].transpose(1, 2),
                  CT=st["C"].transpose(1, 2), CCT=st["CC"].transpose(1, 2),
                  L_top=L[:, :rank] if left else L[..., :rank],
                  L_bot=L[:, rank:] if left else L[..., rank:],
                  fin3=st["fin"].view(-1, 1, 1), keep3=st["keep"].view(-1, 1, 1),
                  neg_row=st["neg"].unsqueeze(-2),
                  Rq_diag=torch.diagonal(st["Rq"], dim1=-2, dim2=-1))
        return st

    @staticmethod
    def _flag_buffers(count, rank, device):
        """A batch's boolean scratch and constants: ``ok`` (the flags the step returns,
        read after the step: one per class, never shared), ``fin``, ``keep``, ``neg`` and
        the 0-dim -1 / +1 of the QR's sign select."""
        flags = torch.empty(count * (3 + rank), dtype=torch.bool, device=device)
        ones = torch.tensor([-1.0, 1.0], dtype=torch.float32, device=device)
        return dict(ok=flags[:count], fin=flags[count:2 * count],
                    keep=flags[2 * count:3 * count],
                    neg=flags[3 * count:].view(count, rank), minus_one=ones[0], one=ones[1])

    def _batch_step(self, group, side, rank, t, Gs, Es, st, calls, precision, skip=None):
        """One steady step (docs/methods/ldadam.md lines 1-9, the fused form) of a batch of
        matrices of one param group: ``st`` holds the stacked state ``P``, ``M``, ``V``
        ((count, ...) views of the stored tensors), ``R`` (count, low) fp32, the scratch
        of ``_carve`` and the flags of ``_flag_buffers``; ``calls`` the grouped GEMMs on the
        batch's lists: ``k1a`` R1 = proj(A, P_old), ``k1b`` Yp = proj(A, V1) on the other
        side, ``k1`` R = proj(A, P_new), ``kef`` E -= K @ L, ``k2`` the Adam moments
        (R, M, V -> N), ``k3`` line 9 from N, ``acc`` line 3's E += G (``_accumulator``),
        and on the Triton backend ``scaled`` (``_bind_scaled``: the elementwise steps that
        take per-step scalars, as three launches reading them from the batch's table).
        ``Gs`` the gradients, ``Es`` the error buffers (None without error feedback).
        ``skip``: the step's on-device non-finite flag (docs/engine.md) or None; when it
        holds True every state tensor and weight keeps its bits (the error buffers, the
        basis, the moments, W), never read on the host. Every product and select writes
        into the scratch (``out=`` / in place): a step allocates no tensor. Returns the
        per-matrix flags (count,) of a finite power iteration (all True on a skipped step:
        its basis was kept because of the skip, not the iteration), ``st["ok"]`` (the same
        tensor every step, written on the device).

        The per-step values (``t``, lr) reach the device through tables only where
        ``scaled`` is bound: the host half (this function) fills ``scaled``'s table, runs
        everything up to K2 as one capture unit (``_batch_device``: constants only) and
        then K2 and K3, bound calls that fill their own tables; a replayed step
        (``lowrank_fused._capture``) runs only the table fills. Without ``scaled`` (the
        reference backend) the same torch ops take the scalars by value."""
        beta1, beta2 = group["betas"]
        rho = group["rho"]
        bc1_t = 1.0 - beta1 ** t
        coef_m, coef_a = rho / bc1_t, 1.0 - rho
        bc1, bc2 = ops.bias_corrections(beta1, beta2, t)
        scalars = dict(coef_m=coef_m, coef_a=coef_a, bc2=bc2, bc1_sq=bc1 * bc1,
                       c=beta1 / (1.0 - beta1))
        scaled = calls.get("scaled")
        if scaled is None:
            self._batch_device(side, rank, Gs, Es, st, calls, precision, skip, self.sign_canon,
                               scalars)
        else:
            scaled.fill(**scalars)           # the host half: the scalars into the table
            _capture.unit(self._batch_device, side, rank, Gs, Es, st, calls, precision, skip,
                          self.sign_canon, None)
        # lines 7 + 8 (bias correction at t + 1), line 9 (WD-pre): bound calls with tables
        calls["k2"](t + 1, skip)
        pre_scale, post_decay = ops.decay_coefficients(group["lr"], group["weight_decay"], "pre")
        calls["k3"](group["lr"], pre_scale, post_decay, precision, skip)
        return st["ok"]

    @staticmethod
    def _batch_device(side, rank, Gs, Es, st, calls, precision, skip, sign_canon, scalars):
        """``_batch_step``'s device work from line 3 to the error feedback (lines 1-6),
        everything but K2 and K3. ``scalars`` (a dict: coef_m, coef_a, bc2, bc1_sq, c): the
        torch path, which takes them by value; None: ``calls["scaled"]``'s kernels, which
        read them from its table, so that every argument here is the same at every step
        (one capture unit)."""
        left = side == "left"
        scaled = calls.get("scaled") if scalars is None else None
        P, M, V = st["P"], st["M"], st["V"]
        if (precision == "ieee" and P.device.type != "cuda" and P.dtype == torch.float32
                and M.dtype == torch.float32):
            bmm = torch.bmm                  # what _mm runs here, without its checks
        else:
            def bmm(a, b, out):
                return _mm(a, b, precision, out)
        if Es is not None:                   # A = E + G in place (the official p.grad)
            calls["acc"](Es, Gs, skip=skip)
            As = Es
        else:
            As = Gs
        # line 1, fused: V1 = coef_m M + coef_a proj(A, P_old) (low shape), then
        # Y = coef_a proj(A, V1) (the other side) + coef_m P_old (M V1) (basis shape)
        calls["k1a"](As, precision)
        if scaled is not None:               # V1, and the transport's w into R1 (free now)
            scaled.momentum_mix()
        else:
            torch.mul(M, scalars["coef_m"], out=st["V1"]).add_(st["R1"],
                                                               alpha=scalars["coef_a"])
        calls["k1b"](As, precision)
        corr = st["corr"]
        gemm = calls.get("gemm")
        if gemm is not None:                 # the Triton path: bound batched GEMMs
            gemm("MV", precision)
            gemm("corr", precision)
        elif left:
            bmm(P, bmm(M, st["V1T"], out=st["MV"]), out=corr)
        else:
            bmm(bmm(st["V1T"], M, out=st["MV"]), P, out=corr)
        Y = st["Yp"]
        if scaled is not None:
            scaled.basis_mix()
        else:
            Y.mul_(scalars["coef_a"]).add_(corr, alpha=scalars["coef_m"])
        # overflow in b keeps the previous basis, chosen on the device (read once per step):
        # Y * 0 is NaN exactly where Y is not finite, so its per-matrix sum is 0 iff Y is
        fin, ok = st["fin"], st["ok"]
        torch.eq(torch.sum(torch.mul(Y, 0.0, out=corr), dim=(1, 2), out=st["fsum"]), 0,
                 out=fin)
        if skip is not None:                 # a skipped step keeps the stored basis
            torch.logical_or(fin, skip, out=ok)
            torch.gt(fin, skip, out=st["keep"])                # fin and not skip
            keep = st["keep3"]
        else:
            ok.copy_(fin)
            keep = st["fin3"]
        # K = [P_new, P_old]: the stored basis into P_old's slot, the new one into P_new's
        # (through their canonical m x r views), then into the stored bases
        P_old, Pc_old = st["P_old"], st["Pc_old"]
        P_old.copy_(P)
        Ysel = torch.where(keep, st["Yc"], Pc_old, out=st["Ysel"])
        Q = st["Q"]
        torch.linalg.qr(Ysel, out=(Q, st["Rq"]))
        if sign_canon:                       # orth: the column signs that make diag(R) >= 0
            torch.lt(st["Rq_diag"], 0, out=st["neg"])
            Q.mul_(torch.where(st["neg_row"], st["minus_one"], st["one"], out=st["sign"]))
        torch.where(keep, Q, Pc_old, out=st["Pc_new"])
        P.copy_(st["P_new"])                 # into the stored bases
        # line 2
        calls["k1"](As, precision)
        # lines 4 + 6: the transport (as ldadam_moment_transport, on the batch)
        C, m_tr = st["C"], st["mtr"]
        if gemm is not None:
            gemm("C", precision)
            gemm("mtr", precision)
        elif left:
            bmm(st["PT"], P_old, out=C)
            bmm(C, M, out=m_tr)
        else:                                # canonical C = Q_new Q_old^T, M_tr^T = C M^T
            bmm(P, Pc_old, out=C)
            bmm(M, st["CT"], out=m_tr)
        # w = V/bc2 - M^2/bc1^2 (R1 and V1 are free by now: they hold w and the squares;
        # the Triton path wrote w with V1)
        w, sq = st["R1"], st["V1"]
        if scaled is None:
            bc2, bc1_sq = scalars["bc2"], scalars["bc1_sq"]
            if V.dtype == torch.float32:
                torch.div(V, bc2, out=w)
            else:
                w.copy_(V).div_(bc2)
            w.sub_(torch.mul(M, M, out=sq).div_(bc1_sq))
        torch.mul(C, C, out=st["CC"])
        w2 = st["w2"]
        if gemm is not None:
            gemm("w2", precision)
        elif left:
            bmm(st["CC"], w, out=w2)
        else:
            bmm(w, st["CCT"], out=w2)
        if scaled is not None:
            # V = |(w2 + M_tr^2/bc1^2) bc2|, L = [c M_tr + R; -c M] and M = M_tr, one launch
            # (nothing written under skip), then lines 3 + 5 as below
            scaled.transport_finish(skip)
            if Es is not None:
                calls["kef"](precision, skip)
            return
        w2.add_(torch.mul(m_tr, m_tr, out=sq).div_(bc1_sq))
        w2.mul_(bc2).abs_()
        if skip is None:
            V.copy_(w2)
        else:
            torch.where(skip, V, w2, out=V)
        # lines 3 + 5: E = A - [P_new, P_old] @ [R + c M_tr; -c M] (one K = 2r GEMM)
        if Es is not None:
            c = scalars["c"]
            torch.mul(m_tr, c, out=st["L_top"]).add_(st["R"])
            torch.mul(M, -c, out=st["L_bot"])
            calls["kef"](precision, skip)
        if skip is None:
            M.copy_(m_tr)
        else:
            torch.where(skip, M, m_tr, out=M)

    def _error_buffers(self, states, shape, group, dtype, device):
        """The matrices' error buffers in the group's ``ef_dtype`` (created at zero when error
        feedback was switched on mid-run), or None without error feedback (dropped)."""
        if not group["error_feedback"]:
            for state in states:
                state.pop("error", None)
            return None
        edt = torch.float32 if group["ef_dtype"] == "fp32" else dtype
        for state in states:
            E = state.get("error")
            if E is None:
                state["error"] = torch.zeros(shape, dtype=edt, device=device)
            elif E.dtype != edt:
                state["error"] = E.to(edt)
        return [state["error"] for state in states]

    def _single_step(self, p, group, plan, backend, precision):
        """The per-matrix steady step: ``_batch_step`` on a batch of one (what the engine's
        classes run, so both are equal bit for bit)."""
        side, rank, shape = plan
        state = self.state[p]
        W, G, write_back = self._as_matrix(p, shape)
        Es = self._error_buffers([state], shape, group, p.dtype, p.device)
        P, M, V = state["basis"], state["exp_avg"], state["exp_avg_sq"]
        flat = torch.empty(self._scratch_numel(side, rank, shape, 1), dtype=torch.float32,
                           device=p.device)
        st = self._carve(flat, side, rank, shape, 1)
        st.update(self._flag_buffers(1, rank, p.device))
        R = torch.empty(M.shape, dtype=torch.float32, device=p.device)
        N = torch.empty_like(M)
        st.update(P=P.unsqueeze(0), M=M.unsqueeze(0), V=V.unsqueeze(0), R=R.unsqueeze(0))
        self._derive_views(st, side, rank)
        other = "right" if side == "left" else "left"
        beta = group["betas"]

        def project(Ps, Rs, on):
            return lambda As, prec: ops_grouped.grouped_project(As, Ps, Rs, side=on,
                                                                precision=prec, backend=backend)

        calls = dict(
            k1a=project([P], [st["R1"][0]], side), k1b=project([st["V1"][0]], [st["Yp"][0]], other),
            k1=project([P], [R], side),
            kef=lambda prec, skip: ops_grouped.grouped_backproject_update(
                Es, [st["K"][0]], [st["L"][0]], side=side, coef=1.0, precision=prec,
                backend=backend, skip=skip),
            k2=lambda t, skip: ops.adam_moments(R, M, V, N, beta1=beta[0], beta2=beta[1],
                                                eps=group["eps"], step=t, eps_mode="torch",
                                                backend=backend, skip=skip),
            k3=lambda lr, pre, post, prec, skip: ops_grouped.grouped_backproject_update(
                [W], [P], [N], side=side, coef=lr, pre_scale=pre, post_decay=post,
                precision=prec, backend=backend, skip=skip),
            acc=_accumulator(backend, p.device),
            scaled=_bind_scaled(st, side, Es is not None, backend, p.device))
        calls["gemm"] = _bind_gemms(st, side, calls["scaled"])
        ok = self._batch_step(group, side, rank, self.completed_steps, [G], Es, st, calls,
                              precision)
        write_back(W)
        self._pi_checks.append(([p], ok))

    # CUDA-graph capture of the steady step (docs/engine.md): a class's step is a table fill,
    # one capture unit (_batch_device, constants only) and the bound K2 and K3
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """The class's per-step scalars all in tables: its elementwise steps on their Triton
        kernels (``_bind_scaled``: not the reference backend's torch ops, which take them by
        value) and K2 on the compiled multi-tensor op with its table."""
        calls = cls.extra.get("calls") or {}
        return calls.get("scaled") is not None and bool(cls.extra.get("k2_table"))

    def _captured_values(self) -> tuple:
        """The capture unit takes ``sign_canon`` by value (the QR's column signs); every
        hyperparameter (rho, betas, eps, lr, weight decay) reaches the kernels through tables."""
        return super()._captured_values() + (bool(self.sign_canon),)

    # the engine's hooks (optim/_engine.py)
    def _class_key_extra(self, p, group, state) -> tuple:
        return (id(group),)               # one group per class: its scalars are the class's

    def _refresh_classes(self, routed) -> bool:
        """No refresh of its own (the basis moves inside the step); when the classes are to be
        rebuilt, the scratch they share is reserved for the largest one."""
        if self._classes_stale:
            need = {}
            for p, _, route, _ in routed:
                key = (route, p.device)
                need[key] = need.get(key, 0) + 1
            ws = self.__dict__.setdefault("_batch_workspace", Workspace())
            for (route, device), count in need.items():
                ws.reserve(torch.float32, device,
                           self._scratch_numel(route.side, route.rank, route.shape, count))
        return False

    def _class_lists(self, cls):
        """The class's state stacked: its bases and moments become (count, ...) views of one
        buffer each (copied there once, when the class is built), its error buffers, the
        scratch (shared by the classes, which run one after the other) and the bound calls."""
        side, rank, shape = cls.route.side, cls.route.rank, cls.route.shape
        members = cls.members
        group = members[0].group
        count = len(members)
        device = cls.Ws[0].device
        st = {}
        for key, name in (("basis", "P"), ("exp_avg", "M"), ("exp_avg_sq", "V")):
            xs = [m.state[key] for m in members]
            X = ops_grouped.stacked_view(xs)
            if X is None:
                X = torch.stack(xs)
                for m, x in zip(members, X.unbind(0)):
                    m.state[key] = x
            st[name] = X
        cls.Ps = [m.state["basis"] for m in members]
        Ms = [m.state["exp_avg"] for m in members]
        Vs = [m.state["exp_avg_sq"] for m in members]
        Es = self._error_buffers([m.state for m in members], shape, group, cls.Ws[0].dtype,
                                 device)
        ws = self.__dict__.setdefault("_batch_workspace", Workspace())
        flat = ws.views(torch.float32, device,
                        (self._scratch_numel(side, rank, shape, count),), 1)[0]
        st.update(self._carve(flat, side, rank, shape, count))
        st.update(self._flag_buffers(count, rank, device))
        st["R"] = ops_grouped.stacked_view(cls.Rs)
        if st["R"] is None:
            st["R"] = torch.stack(cls.Rs)           # not reached: the workspace's views
        self._derive_views(st, side, rank)
        other = "right" if side == "left" else "left"
        like = Es if Es is not None else self._class_grads(cls)
        k1a, k1b, k1 = (_bound_project(like, Ps, Rs, on, cls.backend, own=Es is not None)
                        for Ps, Rs, on in ((cls.Ps, list(st["R1"].unbind(0)), side),
                                           (list(st["V1"].unbind(0)), list(st["Yp"].unbind(0)),
                                            other),
                                           (cls.Ps, cls.Rs, side)))
        kef = None if Es is None else ops_grouped.BoundGroupedBackprojectUpdate(
            Es, list(st["K"].unbind(0)), list(st["L"].unbind(0)), side=side,
            backend=cls.backend)
        where = self._multi_where("adam_moments", cls.backend,
                                  cls.Rs + Ms + Vs + cls.Ns) if self.multi_tensor else None
        if where is not None:
            # R, M, V and N are stacked (count, ...) buffers: the elementwise moments run on
            # one tensor each (the same bits, a call that handles 4 tensors, not 4 * count)
            Ns = ops_grouped.stacked_view(cls.Ns)
            lists = ((cls.Rs, Ms, Vs, cls.Ns) if Ns is None else
                     ([st["R"]], [st["M"]], [st["V"]], [Ns]))
            k2m = ops_multi.BoundAdamMomentsMulti(*lists, eps_mode="torch", backend=where)

            def k2(t, skip):                 # one row for the class: its one group
                b1, b2 = group["betas"]
                k2m((b1, b2, group["eps"], t), skip=skip)
        else:
            def k2(t, skip):
                b1, b2 = group["betas"]
                for R, M, V, N in zip(cls.Rs, Ms, Vs, cls.Ns):
                    ops.adam_moments(R, M, V, N, beta1=b1, beta2=b2, eps=group["eps"], step=t,
                                     eps_mode="torch", backend=cls.backend, skip=skip)
        cls.extra.update(
            st=st, Es=Es, params=[m.p for m in members],
            # K2 reads its per-step scalars from a table (the compiled multi-tensor op)
            k2_table=where is not None and k2m.table is not None,
            calls=dict(k1a=k1a, k1b=k1b, k1=k1,
                       kef=lambda prec, skip: kef(coef=1.0, precision=prec, skip=skip),
                       k2=k2,
                       k3=lambda lr, pre, post, prec, skip: self._class_update(
                           cls, lr, post, prec, pre_scales=pre),
                       acc=self._class_accumulator(cls, Es, device),
                       scaled=_bind_scaled(st, side, Es is not None, cls.backend, device)))
        calls = cls.extra["calls"]
        calls["gemm"] = _bind_gemms(st, side, calls["scaled"])

    def _class_accumulator(self, cls, Es, device):
        """Line 3's ``E += G`` of a class: on Triton bound to the class's error buffers once
        (``BoundErrorAccumulate``: a steady step checks and addresses nothing per member),
        else ``_accumulator``'s."""
        from lowrank_fused.dispatch import resolve_call

        if (Es is None or resolve_call("grouped_project", cls.backend, device)[0] != "triton"
                or not all(E.is_contiguous() for E in Es)):
            return _accumulator(cls.backend, device)
        from lowrank_fused.kernels.ldadam_error_accumulate import BoundErrorAccumulate

        bound = BoundErrorAccumulate(Es, self._class_grads(cls))
        return lambda Es, Gs, skip=None: bound(Gs, skip=skip, layout_token=self._layout_token)

    def _class_step(self, cls, precision):
        """One class: ``_batch_step`` on its stacked state (on the Triton backend 11 small
        torch calls, 14 with ``sign_canon``, the batched QR among them, and fifteen bound
        calls, whatever its size: 5 grouped GEMM launches, 5 batched small GEMMs
        (``_BatchGemms``), the accumulation, the three launches of the per-step-scaled
        elementwise steps, one multi-tensor moments call; nothing allocated)."""
        x = cls.extra
        ok = self._batch_step(cls.members[0].group, cls.route.side, cls.route.rank,
                              self.completed_steps, self._class_grads(cls), x["Es"], x["st"],
                              x["calls"], precision, skip=self._skip_flag)
        self._pi_checks.append((x["params"], ok))
