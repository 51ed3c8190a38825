"""AdaRankGrad: adaptive gradient rank and moments (docs/methods/adarankgrad.md).

Groups holding ``rank`` (= r_max, the paper's "initial rank") are projected. A subspace is
chosen from the gradient by IASS: one seeded randomized range finder (SSRF: sketch, q power
iterations, sign-canonical QR) of width ``k = min(rank + proj_oversample, m, n)``, then the
smallest prefix rank r whose projection keeps a fraction ``eta_th`` of ``||G||^2``. Adam
(E-torch, WD-pre) runs on the r x n projection until the projected-gradient norm has
converged (exit rule), then the subspace is re-selected at the next step and the moments are
carried over with ``C = P_new^T P_old`` (``M <- C M``, ``V <- (C*C) V``), also across rank
changes. Every other parameter gets torch AdamW (E-torch, WD-pre) through ``ops.adamw_step``.

One step of a projected matrix (left form; a matrix with m >= n runs on its transpose,
docs/conventions.md), docs/methods/adarankgrad.md::

    if refresh pending (always at t = 1):  P, r = IASS(G) ; transport M, V ; new block j
    Ghat = P^T G ; z = ||Ghat||                               # K1 (z^2 a side output)
    M = b1 M + (1-b1) Ghat ; V = b2 V + (1-b2) Ghat^2         # K2, E-torch
    N = (M/bc1(t)) / (sqrt(V/bc2(t)) + eps)
    W = W (1 - lr lam) - lr scale (P @ N)                     # K3, WD-pre
    exit test on z: set "refresh pending" for the next step

Ops: ``project``, ``adam_moments``, ``backproject_update`` (shared, ``lowrank_fused.ops``);
``range_finder`` (SSRF), ``iass_select`` and ``moment_transport`` /
``moment_transport_linear`` (through the dispatch table: Triton has the range finder, on the
batched GEMM kernel and CholeskyQR2, both transports and IASS, whose ``||G||^2`` is the sum of
the ``colsum(G^2)`` side output of the projection ``B = Qb^T G``: G is read once for both).
"""
from __future__ import annotations

import math
import operator

import torch

from lowrank_fused import ops, ops_multi, sharded
from lowrank_fused.dispatch import lookup
from lowrank_fused.optim import _capacity
from lowrank_fused.optim._base import (LowRankOptimizer, check_bool, check_choice, check_int,
                                       check_number)
from lowrank_fused.optim._engine import ClassRoute, DenseRoute, per_member
from lowrank_fused.reference.iass_select import IASS_MODES, iass_select_ref
from lowrank_fused.reference.range_finder import staged_orth

EXIT_RULES = ("relative", "absolute")
V_TRANSPORTS = ("cc", "linear")
_TRANSPORT_OP = {"cc": "moment_transport", "linear": "moment_transport_linear"}

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 64-bit seed from integers (splitmix64 chain): the same parts give the same seed on
    every machine and in every process."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h


def sketch_matrix(seed: int, layer_id: int, block: int, n: int, k: int,
                  device=None) -> torch.Tensor:
    """SSRF's Gaussian sketch ``Omega`` (n x k, fp32) for block ``block`` of parameter
    ``layer_id`` (SSRF's sketch, docs/methods/adarankgrad.md: seeded by (seed, layer_id, j)).

    Drawn on a CPU generator (the same numbers on every device) one column at a time, so
    ``sketch_matrix(..., k)[:, :r] == sketch_matrix(..., r)``: a prefix of the sketch is the
    sketch of the smaller width (one k x n draw would not do: torch's CPU ``randn`` fills
    tensors of different sizes by different code paths)."""
    gen = torch.Generator(device="cpu").manual_seed(mix_seed(seed, layer_id, block, 0))
    omega = torch.stack([torch.randn(n, generator=gen, dtype=torch.float32)
                         for _ in range(k)], dim=1)
    return omega if device is None else omega.to(device)


def fill_seed(seed: int, layer_id: int, block: int) -> int:
    """Seed of the orthonormal complement that fills rank-deficient sketch columns."""
    return mix_seed(seed, layer_id, block, 1)


def _check_hparams(h):
    """Validate one group's (or the defaults') hyperparameters; raise ValueError naming the
    offending one. Mutates nothing."""
    check_number("lr", h["lr"], low=0.0)
    betas = h["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    check_number("eps", h["eps"], low=0.0)
    check_number("weight_decay", h["weight_decay"], low=0.0)
    check_number("scale", h["scale"])
    if check_number("eta_th", h["eta_th"], high=1.0) <= 0.0:
        raise ValueError(f"eta_th must be in (0, 1], got {h['eta_th']!r}")
    check_int("proj_power_iters", h["proj_power_iters"], 0)
    check_int("proj_oversample", h["proj_oversample"], 0)
    check_choice("iass_mode", h["iass_mode"], IASS_MODES)
    check_choice("exit_rule", h["exit_rule"], EXIT_RULES)
    check_number("eps_rel", h["eps_rel"], low=0.0)
    check_number("beta_c", h["beta_c"], low=0.0, high=1.0, high_open=True)
    check_int("t_min", h["t_min"], 1)
    check_int("t_max", h["t_max"], 1)
    if h["eps_0"] is not None:
        check_number("eps_0", h["eps_0"], low=0.0)
    elif h["exit_rule"] == "absolute":
        raise ValueError("eps_0 must be given (a float >= 0) with exit_rule='absolute': the "
                         "threshold eps_j = eps_0/j is absolute, so it has no default")
    check_choice("v_transport", h["v_transport"], V_TRANSPORTS)
    if isinstance(h["seed"], bool) or not isinstance(h["seed"], int):
        raise ValueError(f"seed must be an int, got {h['seed']!r}")


_REFRESH = operator.itemgetter("refresh")


class AdaRankGrad(LowRankOptimizer):
    """AdaRankGrad (docs/methods/adarankgrad.md), with the torch.optim API.

    Args:
        params: parameters or param groups. Groups holding ``rank`` (an int >= 1: r_max, the
            largest rank IASS may select) are projected; every other parameter, and a rank
            group's matrix with ``rank >= min(m, n)`` or fewer than 2 dimensions
            (the size guard, docs/conventions.md), gets torch AdamW (E-torch, WD-pre). Trailing
            dimensions are flattened: a (o, i, kh, kw) weight is the (o, i*kh*kw) matrix.
            Every hyperparameter below may be overridden per group.
        lr, betas, eps, weight_decay: Adam with E-torch epsilon
            ``(M/bc1)/(sqrt(V/bc2)+eps)``, bias correction from the parameter's step counter
            (never reset at a refresh) and decoupled weight decay applied first, ``W*(1-lr*wd)``
            (defaults 1e-3, (0.9, 0.999), 1e-8, 0.0).
        scale: alpha, the factor on the back-projected step (default 1.0).
        eta_th: information threshold in (0, 1]: the selected rank is the smallest r whose
            projection keeps ``eta_th * ||G||^2`` (default 0.96).
        proj_power_iters: q, power iterations of the range finder (default 1; 0 is the paper's
            stated cost).
        proj_oversample: p, extra sketch columns: the sketch width is
            ``min(rank + proj_oversample, m, n)`` (default 0).
        iass_mode: ``"prefix"`` (default): energies of the sketch basis' column prefixes;
            ``"ritz"``: rotate the sketch basis by the SVD of ``B = Qb^T G`` first (best rank
            r within the sketch's range).
        exit_rule: when to re-select the subspace. ``"relative"`` (default): with
            ``s = t - t_j + 1`` steps into block j, ``z_ema`` the EMA (``beta_c``) of
            ``z = ||P^T G||`` and ``z_ref`` its value at ``s == t_min``, refresh when
            ``s > t_min and z_ema <= eps_rel * z_ref``, or when ``s >= t_max``
            (defaults eps_rel 0.5, beta_c 0.9, t_min 10, t_max 200; ``t_max <= t_min`` is a
            fixed refresh interval t_max, as in the paper's ablation). ``"absolute"``: refresh
            when ``z <= eps_0 / j`` (paper-literal; ``eps_0`` required, no t_min / t_max).
        v_transport: second-moment transport on a subspace change: ``"cc"`` (default),
            ``V <- (C*C) @ V``, which keeps V >= 0; ``"linear"``, ``V <- C @ V`` (a third-party
            transcription of the paper; can make V negative and the step NaN).
        seed: seeds the sketches: block j of the i-th parameter (in param-group order) uses
            ``sketch_matrix(seed, i, j, ...)``; the seed and the parameter index are stored
            in the state, so a resumed run redraws the same sketches.
        backend: ``"auto" | "reference" | "triton" | "cuda" | "cpu"``. An explicit backend
            must implement every op a parameter needs (``triton`` has them all; the
            extension's ``cuda`` / ``cpu`` backends raise ``BackendUnavailable`` at
            construction for a projected parameter).
        sign_canon: sign-canonical QR (``diag(R) >= 0``) and Ritz vectors (default True);
            False keeps the library's signs.
        size_guard: apply the size guard of docs/conventions.md (default True). False runs the
            low-rank path even when ``rank >= min(m, n)`` (the sketch is then square): the
            full-rank limit, for tests.
        matmul_precision: as GaLoreAdamW (for the fused GEMMs; the references run fp32).
        capacity_buffers: allocate each matrix's basis and moments once, for rank
            ``min(rank, m, n)`` (the largest IASS can select), and keep them as views of their
            first r_cur elements, so a rank change at a refresh reuses the same memory (fixed
            addresses, no allocation; ``optim._capacity``). Default False: they are
            reallocated at each refresh for the selected rank (the least memory).

    The step runs on the engine (docs/engine.md): the projected matrices of one class (side,
    current rank, shape, dtypes, layout) take one grouped K1 with every ``||Ghat||^2`` as its
    side output, one multi-tensor K2 and one grouped K3 per step; a subspace selection that
    changes a matrix's rank moves it to another class (the classes are rebuilt), one that
    keeps it writes the new basis and the transported moments into the stored tensors. The
    exit tests of all matrices read their norms in one host read per step. The result equals
    the per-matrix step bit for bit on the CPU (``opt.engine = False`` runs that; FSDP2 shards
    and per-layer mode always do).

    State of a projected matrix (plain tensors and Python scalars, so ``state_dict``
    round-trips through ``torch.save`` / ``torch.load(weights_only=True)``):
    ``step`` (t), ``basis`` (P, m x r_cur; for m >= n the transposed basis Q, r_cur x n),
    ``exp_avg`` / ``exp_avg_sq`` (M, V: r_cur x n, or m x r_cur), ``rank`` (r_cur), ``j`` (blocks
    started), ``t_j`` (step that started the block), ``z_ema``, ``z_ref``, ``refresh``
    (re-select at the next step), ``seed``, ``layer_id``. All tensors fp32.

    Zero gradients (docs/methods/adarankgrad.md): a refresh whose gradient is exactly zero keeps the
    subspace, the moments and the block, skips the exit test and stays pending; before the
    first subspace exists such a step only applies the weight decay (M and V would be zero).
    A rank-deficient sketch is completed with a seeded orthonormal complement
    (``lowrank_fused.reference.range_finder.orth_complete``), so the basis is always
    orthonormal with the requested width.
    """

    LOWRANK_GROUP_KEYS = frozenset({"rank"})     # projected groups hold it
    # FSDP2 shards take the per-matrix step: IASS over the shards (_select_subspace_sharded),
    # a left basis and right moments kept as each rank's rows (docs/methods/adarankgrad.md)
    SUPPORTS_SHARDED = True
    RENAMED_KEYS = {"state": {"r_cur": "rank"},
                    "group": {"power_iters": "proj_power_iters",
                              "oversampling": "proj_oversample"}}
    # its state is fp32 by definition (no faithful_dtypes)
    OPTIONS = frozenset({"backend", "nonfinite", "sign_canon", "matmul_precision"})

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 scale=1.0, eta_th=0.96, proj_power_iters=1, proj_oversample=0,
                 iass_mode="prefix",
                 exit_rule="relative", eps_rel=0.5, beta_c=0.9, t_min=10, t_max=200,
                 eps_0=None, v_transport="cc", seed=0, size_guard=True, capacity_buffers=False,
                 **options):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, scale=scale,
                        eta_th=eta_th, proj_power_iters=proj_power_iters,
                        proj_oversample=proj_oversample,
                        iass_mode=iass_mode, exit_rule=exit_rule, eps_rel=eps_rel,
                        beta_c=beta_c, t_min=t_min, t_max=t_max, eps_0=eps_0,
                        v_transport=v_transport, seed=seed)
        _check_hparams(defaults)
        defaults["betas"] = tuple(betas)
        if not isinstance(size_guard, bool):
            raise ValueError(f"size_guard must be a bool, got {size_guard!r}")
        self.size_guard = size_guard
        self.capacity_buffers = check_bool("capacity_buffers", capacity_buffers)
        super().__init__(params, defaults, **options)

    # -- validation -----------------------------------------------------------------------
    def _check_group(self, group):
        _check_hparams(group)
        if "rank" in group:
            check_int("rank", group["rank"], 1)

    def _plan(self, p, group):
        """(side, r_max, 2-D shape) for a projected matrix, or None for dense AdamW."""
        if "rank" not in group or p.dim() < 2:
            return None
        shape = (p.shape[0], math.prod(p.shape[1:]))
        if self.size_guard and group["rank"] >= min(shape):
            return None
        side = "right" if shape[0] >= shape[1] else "left"      # docs/conventions.md
        return side, group["rank"], shape

    def _ops_needed(self, group, p):
        if self._plan(p, group) is None:
            return ("adamw_step",)
        return ("project", "adam_moments", "backproject_update", "range_finder",
                "iass_select", _TRANSPORT_OP[group["v_transport"]])

    def _layer_id(self, p):
        for i, q in enumerate(q for g in self.param_groups for q in g["params"]):
            if q is p:
                return i
        raise KeyError("parameter is not in this optimizer")

    # -- the step -------------------------------------------------------------------------
    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        if plan is None:
            self._dense_step(p, group, backend)
        else:
            self._lowrank_step(p, group, plan, backend, precision)

    def _dense_step(self, p, group, backend):
        """torch AdamW: E-torch, WD-pre (docs/methods/adamw.md)."""
        self._dense_adamw_step(p, group, backend, eps_mode="torch", wd_mode="pre")

    def _select_subspace(self, G, state, group, side, backend, precision, rows=None):
        """IASS (docs/methods/adarankgrad.md) for the block about to start. Returns (basis in the
        stored orientation, r), or None for a zero gradient. Mutates no state. ``rows``: G is
        this rank's rows of an FSDP2-sharded gradient (``_select_subspace_sharded``)."""
        if rows is not None:
            return self._select_subspace_sharded(G, state, group, side, rows)
        Gc = G if side == "left" else G.t()                 # canonical left form
        mc, nc = Gc.shape
        k = min(group["rank"] + group["proj_oversample"], mc, nc)
        block = state["j"] + 1
        seed, layer = state["seed"], state["layer_id"]
        omega = sketch_matrix(seed, layer, block, nc, k, device=G.device)
        Qb = torch.empty(mc, k, dtype=torch.float32, device=G.device)
        lookup("range_finder", backend)(Gc, omega, Qb, power_iters=group["proj_power_iters"],
                                        sign_canon=self.sign_canon,
                                        fill_seed=fill_seed(seed, layer, block),
                                        precision=precision)
        # B = Qb^T G (k x nc) and, from the same pass over G, colsum(G^2): E = ||G||^2
        col_sumsq = torch.empty(nc, dtype=torch.float32, device=G.device)
        B = ops.project(Gc, Qb, side="left", precision=precision, backend=backend,
                        sumsq=col_sumsq)
        r = lookup("iass_select", backend)(Gc, Qb, B, eta_th=group["eta_th"],
                                           r_max=group["rank"], mode=group["iass_mode"],
                                           sign_canon=self.sign_canon, E=col_sumsq.sum())
        if r == 0:
            return None
        P = Qb[:, :r]
        return (P.contiguous() if side == "left" else P.t().contiguous()), r

    def _select_subspace_sharded(self, G, state, group, side, rows):
        """IASS over FSDP2 row shards (G: this rank's (m_i, n) rows), step for step the
        one-process SSRF and selection: the same sketch (drawn whole; a right-projected matrix
        uses this rank's rows of it), the same power iterations, the same sign-canonical
        ``orth_complete`` QRs with the same fill seeds, applied to the whole thin matrices
        (over the sharded rows: gathered, m x k); the products that sum over the sharded rows
        are all-reduced (n x k). ``||G||^2`` and so the threshold are all-reduced, so every
        rank selects the same rank. Returns (this rank's stored basis, r, the whole
        canonical-left basis (mc x r)), or None for a zero gradient."""
        op = sharded.Operand(G, side, rows)
        mc, nc = op.shape
        k = min(group["rank"] + group["proj_oversample"], mc, nc)
        block = state["j"] + 1
        seed, layer = state["seed"], state["layer_id"]
        omega = sketch_matrix(seed, layer, block, nc, k, device=G.device)
        # range_finder_ref's QR sequence and seeds, on the whole thin matrices
        orth = staged_orth(sign_canon=self.sign_canon, fill_seed=fill_seed(seed, layer, block))
        Qb = orth(op.full_rows(op.mm(op.local_cols(omega))))          # (mc, k), whole
        for _ in range(int(group["proj_power_iters"])):
            Z = orth(op.full_cols(op.tmm(op.local_rows(Qb))))           # (nc, k), whole
            Qb = orth(op.full_rows(op.mm(op.local_cols(Z))))
        B = op.full_cols(op.tmm(op.local_rows(Qb))).t()                # Qb^T Gc: (k, nc)
        E = rows.sum_sq(G.float())
        r = iass_select_ref(B, Qb, B, eta_th=group["eta_th"], r_max=group["rank"],
                            mode=group["iass_mode"], sign_canon=self.sign_canon, E=E)
        if r == 0:
            return None
        P = Qb[:, :r].contiguous()
        stored = rows.local(P).contiguous() if side == "left" else P.t().contiguous()
        return stored, r, P

    def _transport(self, P_new, state, group, side, backend, P_old=None):
        """Block 2: carry M, V from the old basis to the new one (K8). Returns them in the
        stored layout (views for right-projected matrices). ``P_old``: the whole old basis
        where the stored one is a shard's rows (FSDP2, left)."""
        op = lookup(_TRANSPORT_OP[group["v_transport"]], backend)
        P_old, M, V = (state["basis"] if P_old is None else P_old, state["exp_avg"],
                       state["exp_avg_sq"])
        if side == "left":
            return op(P_new, P_old, M, V)
        M_new, V_new = op(P_new.t(), P_old.t(), M.t(), V.t())
        return M_new.t(), V_new.t()

    def _rank_capacity(self, group, shape):
        """The rank a capacity buffer holds: ``min(rank, m, n)`` (the largest rank IASS can
        select) with ``capacity_buffers``, else 0 (no buffers)."""
        return min(group["rank"], *shape) if self.capacity_buffers else 0

    @staticmethod
    def _keep(state, values, rank, cap):
        """``state.update(values)`` (tensors of rank ``rank`` in the stored layout) through
        ``_capacity.keep``: contiguous, or in the keys' buffers for rank ``cap``."""
        for key, value in values.items():
            state[key] = _capacity.keep(state.get(key), value, rank, cap)

    def _after_load(self):
        """With ``capacity_buffers``: the loaded (compact) bases and moments go back into
        buffers of their matrix's capacity."""
        if not self.capacity_buffers:
            return
        for group in self.param_groups:
            for p in group["params"]:
                plan = self._plan(p, group)
                state = self.state.get(p, {})
                if plan is None or "basis" not in state:
                    continue
                self._keep(state, {k: state[k] for k in ("basis", "exp_avg", "exp_avg_sq")},
                           state["rank"], self._rank_capacity(group, plan[2]))

    def _init_state(self, p, state, group):
        """A projected matrix's scalars before its first step (no subspace yet)."""
        if "step" not in state:
            state.update(step=0, rank=0, j=0, t_j=0, z_ema=0.0, z_ref=0.0, refresh=True,
                         seed=int(group["seed"]), layer_id=self._layer_id(p))

    def _new_block(self, G, state, group, side, shape, backend, precision, rows=None):
        """Blocks 1 and 2 at a pending refresh: IASS on ``G``, then zero moments (first block)
        or the old ones transported. Returns ({"basis", "exp_avg", "exp_avg_sq"}: the new
        tensors, r), or None for a zero gradient. Mutates no state. ``rows``: G is this
        rank's rows of an FSDP2-sharded gradient; the tensors are then this rank's (a left
        basis and right moments: its rows; the rest whole)."""
        chosen = self._select_subspace(G, state, group, side, backend, precision, rows)
        if chosen is None:
            return None
        P_new, r_new = chosen[:2]
        if state["j"] == 0:
            local_shape = shape if rows is None else (G.shape[0], shape[1])
            shape_lr = ops.low_rank_shape(local_shape, r_new, side)
            cap = self._rank_capacity(group, shape)
            M, V = (_capacity.new_zeros(shape_lr, r_new, cap, dtype=torch.float32,
                                        device=G.device) for _ in range(2))
        elif rows is not None and side == "left":
            # C = P_new^T P_old sums over the sharded rows: both bases whole (m x r, thin)
            M, V = self._transport(chosen[2], state, group, side, backend,
                                   P_old=rows.gather(state["basis"]))
        else:
            M, V = self._transport(P_new, state, group, side, backend)
        return dict(basis=P_new, exp_avg=M, exp_avg_sq=V), r_new

    def _lowrank_step(self, p, group, plan, backend, precision):
        side, _, shape = plan
        state = self.state[p]
        rows = sharded.rows_of(p)
        W, G, write_back = self._as_matrix(p, shape)      # FSDP2: this rank's rows
        self._init_state(p, state, group)
        t = state["step"] + 1
        lr, beta1, beta2 = group["lr"], group["betas"][0], group["betas"][1]
        pre_scale, _ = ops.decay_coefficients(lr, group["weight_decay"], "pre")

        exit_test = True
        if state["refresh"]:                                  # Block 1 + Block 2
            block = self._new_block(G, state, group, side, shape, backend, precision, rows)
            if block is None:                                 # zero gradient: keep P
                exit_test = False
            else:
                values, r_new = block
                self._keep(state, values, r_new, self._rank_capacity(group, shape))
                state.update(rank=r_new, j=state["j"] + 1, t_j=t, refresh=False)

        if "basis" not in state:      # zero gradient before any subspace: M = V = 0, N = 0
            if pre_scale != 1.0:
                W.mul_(pre_scale)
            write_back(W)
            state["step"] = t
            return

        P, M, V = state["basis"], state["exp_avg"], state["exp_avg_sq"]
        if rows is None:
            z2 = torch.empty(1, dtype=torch.float32, device=G.device)   # ||Ghat||^2 (K1's)
            R = ops.project(G, P, side=side, precision=precision, backend=backend, r_sumsq=z2)
        else:   # left: R = P^T G all-reduced (whole); right: this rank's rows of G Q^T
            R = sharded.project(G, P, side, rows, precision=precision, backend=backend)
            z2 = (R.double().square().sum().float() if side == "left"
                  else rows.sum_sq(R)).reshape(1)
        N = torch.empty_like(M)
        ops.adam_moments(R, M, V, N, beta1=beta1, beta2=beta2, eps=group["eps"], step=t,
                         eps_mode="torch", backend=backend)
        ops.backproject_update(W, P, N, side=side, coef=lr * group["scale"],
                               pre_scale=pre_scale, post_decay=0.0, precision=precision,
                               backend=backend)
        write_back(W)
        state["step"] = t
        if exit_test:
            self._pending_exit.append((state, group, z2, t))

    # -- the step: routes and classes for the engine (optim/_engine.py) ---------------------
    def _route(self, p, group):
        """Dense parameters on the engine's dense sets; a projected matrix in the class of its
        current rank (0 before its first subspace: such a matrix is in no class)."""
        plan = self._plan(p, group)
        if plan is None:
            return DenseRoute("torch", "pre")
        if not self._grouped_available(group, p):
            return None
        side, _, shape = plan
        return ClassRoute(side, int(self.state[p].get("rank", 0)), shape)

    # every state-writing op of the engine's steady step takes the on-device skip flag (the
    # exit tests, on the host, are not applied on a step whose flag is set: _after_updates)
    DEVICE_SKIP = True

    def _refresh_pending(self, plan) -> bool:
        states = plan.__dict__.get("arg_states")
        if states is None:
            states = plan.arg_states = [st for _, _, _, st in plan.routed]
        try:
            return any(map(_REFRESH, states))       # C-level reads of the flags
        except KeyError:                           # a matrix not yet initialised
            return True

    def _refresh_classes(self, routed) -> bool:
        """Blocks 1 and 2 of every matrix whose refresh is pending. A new block of the same
        rank writes its basis and moments into the stored tensors (the classes stay); a new
        rank (or the first block) stores new tensors and moves the matrix to the class of its
        rank: True (the classes are rebuilt). A zero gradient keeps the block (and skips this
        step's exit test); before any subspace it only applies the weight decay."""
        if self._skip_flag is not None:   # left on the device: _refresh_pending found none
            return False
        replaced = False
        for i, (p, group, route, state) in enumerate(routed):
            self._init_state(p, state, group)
            if not state["refresh"]:
                continue
            t = state["step"] + 1
            side, shape = route.side, route.shape
            G = p.grad if p.dim() == 2 else p.grad.reshape(shape)
            block = self._new_block(G, state, group, side, shape, self._backend_for(group, p),
                                    self.precision(p.device))
            if block is None:
                self._no_exit_test.add(id(state))
                if "basis" not in state:      # zero gradient before any subspace
                    pre_scale, _ = ops.decay_coefficients(group["lr"], group["weight_decay"],
                                                          "pre")
                    if pre_scale != 1.0:
                        (p if p.dim() == 2 else p.view(shape)).mul_(pre_scale)
                    state["step"] = t
                continue
            values, r_new = block
            if route.rank == r_new and all(
                    state.get(k) is not None and state[k].shape == v.shape
                    and state[k].dtype == v.dtype for k, v in values.items()):
                for k, v in values.items():   # v was computed from the old tensors: read
                    state[k].copy_(v)          # completely before this write
            else:
                self._keep(state, values, r_new, self._rank_capacity(group, shape))
                routed[i] = (p, group, ClassRoute(side, r_new, shape), state)
                replaced = True
            state.update(rank=r_new, j=state["j"] + 1, t_j=t, refresh=False)
        return replaced

    def _build_classes(self, plan):
        """The engine's classes of the matrices that have a subspace, and one buffer for every
        member's ``||Ghat||^2`` (K1's side output), read once per step by the exit tests."""
        routed = plan.routed
        plan.routed = [e for e in routed if "basis" in e[3]]
        try:
            super()._build_classes(plan)
        finally:
            plan.routed = routed
        members = [m for cls in plan.classes.values() for m in cls.members]
        device = members[0].W.device if members else None
        z2 = torch.empty(len(members), dtype=torch.float32, device=device)
        offset = 0
        for cls in plan.classes.values():
            cls.extra["z2"] = z2[offset:offset + len(cls.members)]
            offset += len(cls.members)
        self._class_z2 = (z2, [(m.state, m.group) for m in members])
        self._class_zs = torch.empty_like(z2)

    # a steady class step is bound calls only (K1 with its ||Ghat||^2 output, the
    # multi-tensor K2, K3); the exit tests' square root and copy to the host run after the
    # step's launches (``_after_updates``), eagerly after a replay too (docs/engine.md)
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """K2 on its multi-tensor op (not the per-matrix calls)."""
        return cls.extra.get("where") is not None

    def _class_lists(self, cls):
        cls.extra["Ms"] = [m.state["exp_avg"] for m in cls.members]
        cls.extra["Vs"] = [m.state["exp_avg_sq"] for m in cls.members]
        cls.extra["where"] = self._multi_where("adam_moments", cls.backend,
                                               cls.Rs + cls.extra["Ms"] + cls.extra["Vs"]
                                               + cls.Ns) if self.multi_tensor else None

    def _class_step(self, cls, precision):
        """One class: K1 of every member with its ``||Ghat||^2`` (one grouped launch), K2
        (one multi-tensor call where the backend has it, else per matrix), K3 (one grouped
        launch, WD-pre). The exit tests run after every class (``_after_updates``)."""
        states = cls.extra["states"]
        ts = [st["step"] + 1 for st in states]
        for st, t in zip(states, ts):
            st["step"] = t
        skip = self._skip_flag        # K1 writes only the workspace: it needs no skip
        Rs = self._class_project(cls, self._class_grads(cls), precision,
                                 r_sumsq=cls.extra["z2"])
        # per member: (beta1, beta2, eps, t) of K2, then K3's coef = lr*scale and WD-pre
        # scale; the common case, one group at one step count, derives them once
        group = cls.extra["group"]
        if group is not None and ts.count(ts[0]) == len(ts):
            rows = (group["betas"][0], group["betas"][1], group["eps"], ts[0])
            per = [rows] * len(ts)
            coefs = group["lr"] * group["scale"]
            pre_scales = ops.decay_coefficients(group["lr"], group["weight_decay"], "pre")[0]
        else:
            groups = [m.group for m in cls.members]
            hyper = per_member(groups, lambda g: (
                (g["betas"][0], g["betas"][1], g["eps"]), g["lr"] * g["scale"],
                ops.decay_coefficients(g["lr"], g["weight_decay"], "pre")[0]))
            rows = per = [h[0] + (t,) for h, t in zip(hyper, ts)]
            coefs, pre_scales = [h[1] for h in hyper], [h[2] for h in hyper]
        Ms, Vs = cls.extra["Ms"], cls.extra["Vs"]
        where = cls.extra["where"]
        if where is not None:
            k2 = cls.extra.get("k2")
            if k2 is None:
                k2 = cls.extra["k2"] = ops_multi.BoundAdamMomentsMulti(
                    Rs, Ms, Vs, cls.Ns, eps_mode="torch", backend=where)
            k2(rows, skip=skip)
        else:
            for R, M, V, N, (a, b, e, t) in zip(Rs, Ms, Vs, cls.Ns, per):
                ops.adam_moments(R, M, V, N, beta1=a, beta2=b, eps=e, step=t,
                                 eps_mode="torch", backend=cls.backend, skip=skip)
        self._class_update(cls, coefs, 0.0, precision, pre_scales)
        self._class_exit = True

    def _before_updates(self):
        self._pending_exit = []
        self._no_exit_test = set()
        self._class_exit = False

    def _after_updates(self):
        """The exit tests of every matrix of the step, from one host read of all ``||Ghat||``
        (the decisions only act at the next step). On a step whose non-finite flag was left
        on the device, the flag comes with that read: when it is set the step was skipped on
        the device and no exit test is applied (``nonfinite_check`` does the rest)."""
        pending, self._pending_exit = getattr(self, "_pending_exit", []), []
        entries = [(state, group, t) for state, group, _, t in pending]
        norms = [z2 for _, _, z2, _ in pending]
        if getattr(self, "_class_exit", False):
            self._class_exit = False
            z2, members = self._class_z2
            norms.append(z2)
            no_exit = self._no_exit_test
            entries += [None if id(state) in no_exit else (state, group, state["step"])
                        for state, group in members]
        if not norms:
            return
        held = self.__dict__.get("_class_z2")
        if len(norms) == 1 and held is not None and norms[0] is held[0]:   # steady: no allocation
            zs = torch.sqrt(norms[0], out=self._class_zs)
        else:
            zs = (norms[0] if len(norms) == 1 else torch.cat(norms)).sqrt()
        skip = self._skip_flag
        if skip is not None and self.__dict__.get("_pending_nonfinite") is not None:
            # the flag was left on the device: the norms follow it to the host without a
            # read now, and the tests run when the flag is read (_settle_lagged; the
            # decisions act at the next step's refresh check, which comes after that read)
            if zs.is_cuda:
                host = self.__dict__.get("_exit_host")
                if host is None or host.shape != zs.shape:
                    host = self._exit_host = torch.empty(zs.shape, dtype=zs.dtype,
                                                         pin_memory=True)
                host.copy_(zs, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = zs, None
            self._lagged_exit = (host, event, entries)
            return
        if skip is not None:
            zs = torch.cat([zs, skip.reshape(1).to(zs.dtype)])
        zs = zs.cpu().tolist()
        if skip is not None and zs.pop():
            return
        for entry, z in zip(entries, zs):
            if entry is not None:
                self._exit_test(entry[0], entry[1], z, entry[2])

    def _settle_lagged(self, skipped):
        """The exit tests of the last step, from its norms copied with its non-finite flag;
        none when that step was skipped on the device."""
        lagged = self.__dict__.pop("_lagged_exit", None)
        if lagged is None or skipped:
            return
        host, event, entries = lagged
        if event is not None:
            event.synchronize()        # the copy of a step the GPU has long finished
        for entry, z in zip(entries, host.numpy().tolist()):
            if entry is not None:
                self._exit_test(entry[0], entry[1], z, entry[2])

    @staticmethod
    def _exit_test(state, group, z, t):
        """Block 3's stopping condition (the exit test, docs/methods/adarankgrad.md): sets
        ``refresh`` for the next step."""
        if group["exit_rule"] == "absolute":
            if z <= group["eps_0"] / state["j"]:
                state["refresh"] = True
            return
        s = t - state["t_j"] + 1
        if s == 1:
            state["z_ema"] = z
        else:
            state["z_ema"] = group["beta_c"] * state["z_ema"] + (1.0 - group["beta_c"]) * z
        if s == group["t_min"]:
            state["z_ref"] = state["z_ema"]
        if ((s > group["t_min"] and state["z_ema"] <= group["eps_rel"] * state["z_ref"])
                or s >= group["t_max"]):
            state["refresh"] = True
