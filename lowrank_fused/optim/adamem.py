"""AdaMeM: memory-efficient momentum for Adafactor (docs/methods/adamem.md).

A low-rank matrix W (m x n, run on its transpose when m > n so that m <= n) keeps momentum
only in the top-r left singular subspace P of its gradient (refreshed by an SVD every
``update_proj_gap`` steps, and at the first step). Per step, with G the gradient:

* the projection ``R = P^T G`` gets momentum ``M`` and a factored (Adafactor) preconditioner,
  giving ``N1`` (r x n);
* the residual ``S = G - P R`` gets a one-sided, per-column Adafactor preconditioner, giving
  ``N2 = S / (sqrt(c_os/bc2) + eps)``; its statistics come from
  ``colsum(S^2) = colsum(G^2) - colsum(R^2)``, so S is never stored;
* ``W <- W*(1 - lr*wd) - lr*(P @ N1 + delta*N2)`` (WD-pre).

Per-column statistics keep ``<P N1, N2>_F = 0`` (Claim 3.1). The state per matrix is P, M, the
r + n factored statistics and the n one-sided statistics: ``mr + nr + r + 2n`` floats.

Everything else gets AdaMeM's Adafactor: groups without ``rank`` (the first and last layers,
per the paper), weights that are not 2-D after flattening, and matrices with
``rank >= min(m, n)`` (the size guard, docs/conventions.md) get a factored Adafactor with fixed
beta2, bias correction, no momentum, no clipping and no relative step; 1-D parameters get
its unfactored version. :func:`adamem_param_groups` builds the paper's groups from a model.

Conventions, all design choices of docs/methods/adamem.md: bias correction with bc1 on M and
bc2 on both second moments (``bias_correction`` flag), eps added outside the square root, eps1
added to the squares before averaging, decoupled weight decay applied before the update.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from itertools import repeat
from types import SimpleNamespace

import torch
import torch.nn as nn

from lowrank_fused import ops, ops_grouped
from lowrank_fused.ops_adamem_grouped import BoundAdamemResidualUpdate
from lowrank_fused.dispatch import lookup
from lowrank_fused.linalg import canonical_svd_basis, orth
from lowrank_fused.subspace import grouped_refresh
from lowrank_fused.optim.galore_adamw import checked_bases
from lowrank_fused.dispatch import resolve_call
from lowrank_fused.optim._base import (LowRankOptimizer, check_betas, check_bool, check_choice,
                                       check_int, check_number, is_sharded, local)
from lowrank_fused.optim._engine import ClassRoute
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference.adamem_moments import factored_second_moment

V_SOURCES = ("momentum", "gradient")
STATE_KEYS = ("M", "a_row", "a_col", "c_os")     # what the middle step writes
K3_SCALARS = ("coef", "res_coef", "pre_scale", "post_decay")
RESIDUAL_FORMS = ("identity", "explicit")
PROJECTORS = ("svd", "randomized")
_STEP = operator.itemgetter("step")
_GRAD = operator.attrgetter("grad")


def _set_counters(states, ts):
    """``state["step"] = t`` for every pair (one C loop)."""
    deque(map(operator.setitem, states, repeat("step"), ts), maxlen=0)


LOW_RANK_OPS = ("project", "adamem_moments", "residual_col_stats", "residual_backproject_update")


class AdaMeM(LowRankOptimizer):
    """AdaMeM (docs/methods/adamem.md).

    Args:
        params: parameters or param groups. Groups holding ``rank`` (an int >= 1) get AdaMeM;
            the others get AdaMeM's Adafactor (factored for matrices, unfactored for 1-D).
        lr: step size eta (the paper sweeps 3.16e-4 ... 1e-2).
        betas: (beta1, beta2) = (0.9, 0.95): momentum and second-moment decay rates.
        eps: 1e-8, added to the square root of the second-moment estimates.
        eps1: 1e-30, added to the squared entries before averaging (Adafactor style).
        weight_decay: 0.01, decoupled, applied as ``W*(1 - lr*weight_decay)`` before the update.
        delta: 1.0, relative step size of the residual term (the paper sweeps {0.5, 1}).
        update_proj_gap: T = 200; P is recomputed when ``(t - 1) % T == 0`` (t = 1, T+1, ...).
        v_source: ``"momentum"`` (paper: Alg. 1 feeds the bias-corrected momentum to the
            factored preconditioner) or ``"gradient"`` (statistics from ``R^2``, as
            GaLore-Adafactor).
        transport_on_refresh: False (paper: only P changes at a refresh). True rotates M with
            ``C = P_new^T P_old`` and the row statistics with ``C*C``.
        bias_correction: True (``M/bc1``, second moments ``/bc2``); False is paper-literal.
        residual_form: ``"identity"`` (residual statistics from ``colsum(G^2) - colsum(R^2)``,
            clamped at 0, no m x n residual for the statistics) or ``"explicit"`` (forms S).
        projector, proj_oversample, proj_power_iters: ``"svd"`` (default) or
            ``"randomized"`` (batched randomized SVD, ``lowrank_fused.subspace``: all
            same-shape matrices refreshing on a step in one call), as GaLoreAdamW.
        backend, nonfinite, sign_canon, matmul_precision: the options every method shares
            (``LowRankOptimizer``, docs/conventions.md; the state is fp32 by definition, so
            there is no ``faithful_dtypes``). Every op has a Triton implementation (the residual's column statistics:
            ``kernels/residual_col_stats.py``), so ``backend="triton"`` runs the whole step
            fused; a backend lacking an op raises ``BackendUnavailable`` at construction.

    The step runs on the engine (docs/engine.md): the low-rank matrices of one class
    (canonical shape, rank, dtypes, layout) take one grouped K1 with every ``colsum(G^2)``,
    the factored moments and the residual's column statistics of the class (four grouped
    launches on Triton, ``kernels/grouped_adamem_middle.py``; per matrix elsewhere), and one
    grouped combined update (K3 with the residual term) per step, through workspaces planned once.
    The result equals the per-matrix step bit for bit on the CPU (``opt.engine = False``
    runs that; so do per-layer mode, ``residual_form="explicit"``, whose statistics re-read G
    against P and R per matrix, and the Adafactor parameters). The refresh (SVD, transport)
    runs per matrix before the classes step.

    The refreshed basis is the fp32 SVD basis re-orthonormalised by a float64 QR (``_basis``):
    a design choice that keeps Claim 3.1 at fp32 rounding level.

    Every hyperparameter but ``rank`` is also a per-group key. State is plain tensors and ints
    (``state_dict`` loads with ``torch.load(weights_only=True)``) and always fp32.
    """

    # FSDP2 (dim-0 shards): the per-parameter step over the shards (``_sharded_adamem_step``,
    # ``_sharded_adafactor_step``; docs/methods/adamem.md, "Under FSDP2")
    SUPPORTS_SHARDED = True

    # projected groups hold ``rank``; the subspace keys mean nothing in the others
    RENAMED_KEYS = {"state": {"P": "basis"}, "group": {}}
    OPTIONS = frozenset({"backend", "nonfinite", "sign_canon", "matmul_precision"})
    LOWRANK_GROUP_KEYS = frozenset({"rank", "update_proj_gap", "projector", "proj_oversample",
                                    "proj_power_iters"})

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, eps1=1e-30,
                 weight_decay=0.01, delta=1.0, update_proj_gap=200, *, v_source="momentum",
                 transport_on_refresh=False, bias_correction=True, residual_form="identity",
                 projector="svd", proj_oversample=8, proj_power_iters=2, **options):
        self._pending_bases = {}
        defaults = dict(lr=lr, betas=betas, eps=eps, eps1=eps1, weight_decay=weight_decay,
                        delta=delta, update_proj_gap=update_proj_gap, v_source=v_source,
                        transport_on_refresh=transport_on_refresh,
                        bias_correction=bias_correction, residual_form=residual_form,
                        projector=projector, proj_oversample=proj_oversample,
                        proj_power_iters=proj_power_iters)
        self._check_group(defaults)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults, **options)

    # -- group validation -----------------------------------------------------------------
    def _check_group(self, group):
        check_number("lr", group["lr"], low=0.0)
        check_betas(group["betas"])
        check_number("eps", group["eps"], low=0.0)
        check_number("eps1", group["eps1"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        check_number("delta", group["delta"], low=0.0)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_choice("v_source", group["v_source"], V_SOURCES)
        check_bool("transport_on_refresh", group["transport_on_refresh"])
        check_bool("bias_correction", group["bias_correction"])
        check_choice("residual_form", group["residual_form"], RESIDUAL_FORMS)
        check_choice("projector", group.get("projector", "svd"), PROJECTORS)
        check_int("proj_oversample", group.get("proj_oversample", 8), 0)
        check_int("proj_power_iters", group.get("proj_power_iters", 2), 0)
        if "rank" in group:
            check_int("rank", group["rank"], 1)

    def _ops_needed(self, group, p):
        plan = self._plan(p, group)
        if plan is None:
            return ("adafactor_bc_factored_step",) if p.dim() >= 2 else (
                "adafactor_bc_unfactored_step",)
        return LOW_RANK_OPS + (("moment_transport",) if group["transport_on_refresh"] else ())

    def _plan(self, p, group):
        """(rank, 2-D shape, transposed) for a low-rank matrix, or None for Adafactor."""
        if "rank" not in group or p.dim() < 2:
            return None
        shape = (p.shape[0], math.prod(p.shape[1:]))
        if group["rank"] >= min(shape):
            return None
        return group["rank"], shape, shape[0] > shape[1]

    # the grouped ops the engine's class step needs (the dispatcher's availability check)
    GROUPED_OPS = ("grouped_project", "grouped_residual_backproject_update")

    # -- the step -------------------------------------------------------------------------
    def _coefficients(self, group, t):
        beta1, beta2 = group["betas"]
        if group["bias_correction"]:
            return ops.bias_corrections(beta1, beta2, t)
        return 1.0, 1.0

    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        self._check_path(self.state[p], plan)
        if is_sharded(p):
            if plan is None:
                self._sharded_adafactor_step(p, group, backend)
            else:
                self._sharded_adamem_step(p, group, plan, backend, precision)
        elif plan is None:
            self._adafactor_step(p, group, backend)
        else:
            self._adamem_step(p, group, plan, backend, precision)

    @staticmethod
    def _check_path(state, plan):
        """The state fits the path the parameter takes now (its group's rank may change)."""
        low_rank_state = "basis" in state
        dense_state = "row" in state or "v" in state
        if (plan is None and low_rank_state) or (plan is not None and dense_state):
            raise ValueError(
                "a parameter moved between AdaMeM's low-rank path and its Adafactor path "
                "(its group's rank changed); its state does not fit the new path")
        if plan is not None and low_rank_state and state["basis"].shape[1] != plan[0]:
            raise ValueError(f"rank changed from {state['basis'].shape[1]} to {plan[0]} mid-run; "
                             "AdaMeM keeps a fixed rank per matrix")

    def _adafactor_step(self, p, group, backend):
        """AdaMeM's Adafactor for non-low-rank parameters (docs/methods/adamem.md, Routing)."""
        state = self.state[p]
        factored = p.dim() >= 2
        if factored:
            shape = (p.shape[0], math.prod(p.shape[1:]))
            W, G, write_back = self._as_matrix(p, shape)
        else:
            W, G, write_back = p, p.grad, lambda W: None
        if "step" not in state:
            state["step"] = 0
            if factored:
                state["row"] = torch.zeros(shape[0], dtype=torch.float32, device=p.device)
                state["col"] = torch.zeros(shape[1], dtype=torch.float32, device=p.device)
            else:
                state["v"] = torch.zeros_like(p, dtype=torch.float32,
                                              memory_format=torch.contiguous_format)
        t = state["step"] + 1
        state["step"] = t
        _, c2 = self._coefficients(group, t)
        pre_scale, post_decay = ops.decay_coefficients(group["lr"], group["weight_decay"], "pre")
        kw = dict(lr=float(group["lr"]), beta2=float(group["betas"][1]),
                  eps1=float(group["eps1"]), eps=float(group["eps"]), c2=c2,
                  pre_scale=pre_scale, post_decay=post_decay)
        if factored:
            lookup("adafactor_bc_factored_step", backend)(
                W, G, state["row"], state["col"], **kw)
        else:
            lookup("adafactor_bc_unfactored_step", backend)(
                W, G, state["v"], **kw)
        write_back(W)

    def _before_updates(self):
        """projector="randomized": the bases of every matrix refreshing on this step, in one
        batched randomized SVD per (shape, rank) (canonical left form)."""
        requests = []
        for group in self.param_groups:
            if group.get("projector", "svd") != "randomized":
                continue
            for p in group["params"]:
                plan = self._plan(p, group) if p.grad is not None else None
                if plan is None or is_sharded(p):     # a shard refreshes in its own step
                    continue
                state = self.state[p]
                if not self._refresh_due(state, group):
                    continue
                rank, shape, transposed = plan
                G = p.grad.reshape(shape)
                settings = (group["proj_oversample"], group["proj_power_iters"],
                            state.get("step", 0))
                requests.append((p, settings, (G.t() if transposed else G, rank, "left")))
        self._pending_bases = checked_bases(
            self, grouped_refresh(requests, sign_canon=self.sign_canon),
            {p: a for p, _, a in requests}, state_key="basis")

    def _after_updates(self):
        self._pending_bases = {}

    @staticmethod
    def _refresh_due(state, group):
        """Alg. 2: a new basis at the first step and every ``update_proj_gap`` steps."""
        return "basis" not in state or state.get("step", 0) % group["update_proj_gap"] == 0

    def _per_layer_defers(self):
        """A randomized refresh batches all same-shape layers: defer such steps."""
        for group in self.param_groups:
            if group.get("projector", "svd") != "randomized":
                continue
            for p in group["params"]:
                if not p.requires_grad or self._plan(p, group) is None:
                    continue
                if self._refresh_due(self.state[p], group):
                    return True
        return False

    def _basis(self, Gc, rank, p=None):
        """Top-``rank`` left singular vectors of the canonical gradient (fp32 SVD,
        sign-canonical), re-orthonormalised by a float64 QR (signs kept, columns move by about
        1e-7). An fp32 SVD basis is orthonormal only to about 1e-6, and Claim 3.1's
        ``<P N1, N2> = 0`` and the residual identity both rest on ``P^T P = I``: this keeps
        them at fp32 rounding level (the invariants 2 and 3 of docs/conventions.md)."""
        P = self._pending_bases.pop(p, None) if p is not None else None
        if P is None:
            P = canonical_svd_basis(Gc, rank, "left", self.sign_canon,
                                    label=self.param_label(p) if p is not None else None,
                                    previous=self.state[p].get("basis") if p is not None else None)
        return orth(P.double()).float()

    def _refresh(self, p, state, group, Gc, rank, backend):
        """Update line 2 (docs/methods/adamem.md): a new basis at t = 1, T + 1, 2T + 1, ...,
        written into the stored one (the moments rotated with ``transport_on_refresh``), or
        stored with zero moments and statistics the first time; True when a state tensor was
        replaced. Everything that can fail (the SVD of a non-finite gradient) runs before any
        state is touched."""
        P_new = self._basis(Gc, rank, p)
        P_old = state.get("basis")
        if group["transport_on_refresh"] and P_old is not None:
            transport = lookup("moment_transport", backend)
            M_new, row_new = transport(P_new, P_old, state["M"], state["a_row"].unsqueeze(1))
            state["M"].copy_(M_new)
            state["a_row"].copy_(row_new.squeeze(1))
        if P_old is not None and P_old.shape == P_new.shape and P_old.dtype == P_new.dtype:
            P_old.copy_(P_new)
            return False
        state["basis"] = P_new
        if "M" not in state:
            low, cols = (rank, Gc.shape[1]), Gc.shape[1]
            dev = Gc.device
            state["M"] = torch.zeros(low, dtype=torch.float32, device=dev)
            state["a_row"] = torch.zeros(rank, dtype=torch.float32, device=dev)
            state["a_col"] = torch.zeros(cols, dtype=torch.float32, device=dev)
            state["c_os"] = torch.zeros(cols, dtype=torch.float32, device=dev)
            state.setdefault("step", 0)
        return True

    def _adamem_step(self, p, group, plan, backend, precision):
        rank, shape, transposed = plan
        state = self.state[p]
        W, G, write_back = self._as_matrix(p, shape)
        # canonical left form (docs/conventions.md): k x l with k <= l, as views
        Wc, Gc = (W.t(), G.t()) if transposed else (W, G)
        if self._refresh_due(state, group):
            self._refresh(p, state, group, Gc, rank, backend)
        P = state["basis"]
        explicit = group["residual_form"] == "explicit"
        # line 3; the identity form's colsum(G^2) comes from the same pass over G (K1 side output)
        g_sumsq = None if explicit else torch.empty(Gc.shape[1], dtype=torch.float32,
                                                     device=p.device)
        R = ops.project(Gc, P, side="left", precision=precision, backend=backend, sumsq=g_sumsq)
        t = state["step"] = state.get("step", 0) + 1                  # line 1
        N1 = torch.empty_like(state["M"])
        col_scale = torch.empty_like(state["c_os"])
        moments_kw, stats_kw, coefs = self._scalars(group, t)
        self._low_rank_middle(lookup("adamem_moments", backend),
                              lookup("residual_col_stats", backend), state, Gc, P, R, g_sumsq,
                              N1, col_scale, moments_kw, stats_kw)
        lookup("residual_backproject_update", backend)(                 # lines 8-9
            Wc, Gc, P, R, N1, col_scale, **coefs, precision=precision)
        write_back(W)

    # -- FSDP2: the per-parameter step over row shards (docs/methods/adamem.md) -------------
    def _sharded_adamem_step(self, p, group, plan, backend, precision):
        """``_adamem_step`` on this rank's rows of W and G (rows split over the ranks), with
        the sums over the split rows all-reduced (``lowrank_fused.sharded``):

        * m <= n (P over the rows, this rank holding its rows of P): ``R = P^T G`` and
          ``colsum(G^2)`` are sums over rows, all-reduced in one call ((r + 1) n numbers); the
          moments, statistics and N1 then run replicated on every rank with the op itself, the
          residual's column mean divides by the global m, and the update is local.
          ``residual_form="explicit"`` all-reduces ``colsum(S^2)`` (n) instead of colsum(G^2).
        * m > n (run on the transpose, P over the columns and replicated): R, M, ``a_col``
          and ``c_os`` are over this rank's rows (local); only the row statistics of the
          factored preconditioner are a mean over the split rows: their sums (r) are
          all-reduced.
        """
        from lowrank_fused import sharded

        rank, shape, transposed = plan
        rows = sharded.rows_of(p)
        state = self.state[p]
        W, G, _ = self._as_matrix(p, shape)            # this rank's rows, (m_i, n)
        Wc, Gc = (W.t(), G.t()) if transposed else (W, G)
        if self._refresh_due(state, group):
            self._sharded_refresh(p, state, group, G, rank, transposed, rows, backend)
        P = state["basis"]
        explicit = group["residual_form"] == "explicit"
        t = state["step"] = state.get("step", 0) + 1
        moments_kw, stats_kw, coefs = self._scalars(group, t)
        N1 = torch.empty_like(state["M"])
        col_scale = torch.empty_like(state["c_os"])
        if not transposed:
            cols = Gc.shape[1]
            buf = torch.empty(rank * cols + (0 if explicit else cols), dtype=torch.float32,
                              device=W.device)
            R = buf[:rank * cols].view(rank, cols)
            g_sumsq = None if explicit else buf[rank * cols:]
            ops.project(Gc, P, R, side="left", precision=precision, backend=backend,
                        sumsq=g_sumsq)
            rows.sum_(buf)                               # the whole R and colsum(G^2)
            lookup("adamem_moments", backend)(R, state["M"], state["a_row"], state["a_col"],
                                              N1, **moments_kw)
            if explicit:
                s = Gc.float() - P @ R
                sq = rows.sum_((s * s).sum(dim=0))
            else:
                sq = torch.clamp(g_sumsq - (R * R).sum(dim=0), min=0.0)
            beta2, c2 = stats_kw["beta2"], stats_kw["c2"]
            c_os = state["c_os"]
            c_os.copy_(c_os * beta2 + (1.0 - beta2) * (sq / rows.m + stats_kw["eps1"]))
            col_scale.copy_(1.0 / (torch.sqrt(c_os / c2) + stats_kw["eps"]))
        else:
            g_sumsq = None if explicit else torch.empty(Gc.shape[1], dtype=torch.float32,
                                                         device=W.device)
            R = ops.project(Gc, P, side="left", precision=precision, backend=backend,
                            sumsq=g_sumsq)
            self._sharded_moments(state, R, N1, rows, **moments_kw)
            lookup("residual_col_stats", backend)(Gc, P, R, state["c_os"], col_scale,
                                                  g_col_sumsq=g_sumsq, **stats_kw)
        lookup("residual_backproject_update", backend)(                 # lines 8-9, local
            Wc, Gc, P, R, N1, col_scale, **coefs, precision=precision)

    @staticmethod
    def _sharded_moments(state, R, N, rows, *, beta1, beta2, eps, eps1, c1, c2,
                         stats_from_momentum):
        """``adamem_moments`` of a transposed shard: R, M and ``a_col`` over this rank's
        columns (the rows of W), ``a_row``'s means over all ranks (its sums all-reduced)."""
        M, a_row, a_col = state["M"], state["a_row"], state["a_col"]
        M.copy_(M * beta1 + (1.0 - beta1) * R)
        m_hat = M / c1
        x = m_hat if stats_from_momentum else R
        q = x * x + eps1
        row_sum = rows.sum_(q.sum(dim=1))
        a_row.copy_(a_row * beta2 + (1.0 - beta2) * (row_sum / rows.m))
        a_col.copy_(a_col * beta2 + (1.0 - beta2) * q.mean(dim=0))
        N.copy_(m_hat / (torch.sqrt(factored_second_moment(a_row, a_col, c2)) + eps))

    def _sharded_refresh(self, p, state, group, G, rank, transposed, rows, backend):
        """``_refresh`` of a shard: the basis of the whole gradient from ``sharded.basis``
        (left, m <= n: this rank's rows of U; transposed: V, replicated), re-orthonormalised
        in float64 like the one-process basis (``orth``: the QR with ``diag(R) >= 0``). A left
        basis is row-sharded: its QR is the Cholesky QR through the all-reduced r x r Gram
        (fp64), the same Q up to rounding (the QR with a positive diagonal is unique, and the
        basis is orthonormal to ~1e-6, so the Gram is ~I). The transport's
        ``C = P_new^T P_old`` is all-reduced (r x r) on the left."""
        from lowrank_fused import sharded

        B = sharded.basis(G, rank, "right" if transposed else "left", rows,
                          projector=group.get("projector", "svd"), sign_canon=self.sign_canon,
                          oversample=group.get("proj_oversample", 8),
                          power_iters=group.get("proj_power_iters", 2),
                          seed=state.get("step", 0), label=self.param_label(p),
                          warn_owner=self)
        if transposed:
            P_new = orth(B.t().double()).float().contiguous()
        else:
            Bd = B.double()
            L = torch.linalg.cholesky(rows.sum_(Bd.t() @ Bd))
            P_new = torch.linalg.solve_triangular(L, Bd.t(), upper=False).t().float()
            P_new = P_new.contiguous()
        P_old = state.get("basis")
        if group["transport_on_refresh"] and P_old is not None:
            if transposed:
                M_new, row_new = lookup("moment_transport", backend)(
                    P_new, P_old, state["M"], state["a_row"].unsqueeze(1))
                state["M"].copy_(M_new)
                state["a_row"].copy_(row_new.squeeze(1))
            else:
                C = rows.sum_(P_new.t() @ P_old)
                state["M"].copy_(C @ state["M"])
                state["a_row"].copy_((C * C) @ state["a_row"])
        if P_old is not None and P_old.shape == P_new.shape and P_old.dtype == P_new.dtype:
            P_old.copy_(P_new)
            return
        state["basis"] = P_new
        if "M" not in state:
            cols = G.shape[0] if transposed else G.shape[1]     # local rows when transposed
            f32 = dict(dtype=torch.float32, device=G.device)
            state["M"] = torch.zeros((rank, cols), **f32)
            state["a_row"] = torch.zeros(rank, **f32)
            state["a_col"] = torch.zeros(cols, **f32)
            state["c_os"] = torch.zeros(cols, **f32)
            state.setdefault("step", 0)

    def _sharded_adafactor_step(self, p, group, backend):
        """``_adafactor_step`` of a shard: a vector is elementwise (the op on this rank's
        entries); a matrix keeps its row statistics local and all-reduces its column sums of
        ``G^2 + eps1`` and the sum of its row statistics (n + 1 numbers) for the column means
        and ``mean(row)``."""
        from lowrank_fused import sharded

        state = self.state[p]
        factored = p.dim() >= 2
        if factored:
            W, G, _ = self._as_matrix(p, (p.shape[0], math.prod(p.shape[1:])))
        else:
            W, G = local(p), local(p.grad)
        if "step" not in state:
            state["step"] = 0
            f32 = dict(dtype=torch.float32, device=W.device)
            if factored:
                state["row"] = torch.zeros(W.shape[0], **f32)
                state["col"] = torch.zeros(W.shape[1], **f32)
            else:
                state["v"] = torch.zeros(W.shape, **f32)
        t = state["step"] + 1
        state["step"] = t
        _, c2 = self._coefficients(group, t)
        lr, beta2 = float(group["lr"]), float(group["betas"][1])
        eps1, eps = float(group["eps1"]), float(group["eps"])
        pre_scale, post_decay = ops.decay_coefficients(lr, group["weight_decay"], "pre")
        if not factored:
            lookup("adafactor_bc_unfactored_step", backend)(
                W, G, state["v"], lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2,
                pre_scale=pre_scale, post_decay=post_decay)
            return
        rows = sharded.rows_of(p)
        row, col = state["row"], state["col"]
        g = G.float()
        q = g * g + eps1
        row.copy_(row * beta2 + (1.0 - beta2) * q.mean(dim=1))
        buf = rows.sum_(torch.cat([q.sum(dim=0), row.sum().reshape(1)]))
        n = col.shape[0]
        col.copy_(col * beta2 + (1.0 - beta2) * (buf[:n] / rows.m))
        v_hat = torch.outer(row, col) / (buf[n] / rows.m) / c2
        w = W.float()
        if pre_scale != 1.0:
            w = w * pre_scale
        w = w - lr * (g / (torch.sqrt(v_hat) + eps))
        if post_decay != 0.0:
            w = w - post_decay * w
        W.copy_(w)

    def _scalars(self, group, t):
        """The keywords of step t: the factored moments', the residual statistics' and the
        combined update's."""
        beta1, beta2 = group["betas"]
        c1, c2 = self._coefficients(group, t)
        eps, eps1 = float(group["eps"]), float(group["eps1"])
        moments_kw = dict(beta1=float(beta1), beta2=float(beta2), eps=eps, eps1=eps1, c1=c1,
                          c2=c2, stats_from_momentum=group["v_source"] == "momentum")
        stats_kw = dict(beta2=float(beta2), eps1=eps1, eps=eps, c2=c2,
                        explicit=group["residual_form"] == "explicit")
        lr = float(group["lr"])                                  # lines 8-9
        pre_scale, post_decay = ops.decay_coefficients(lr, group["weight_decay"], "pre")
        return moments_kw, stats_kw, dict(coef=lr, res_coef=lr * float(group["delta"]),
                                          pre_scale=pre_scale, post_decay=post_decay)

    @staticmethod
    def _low_rank_middle(moments, col_stats, state, Gc, P, R, g_sumsq, N1, col_scale,
                         moments_kw, stats_kw):
        """Lines 4-7 of one matrix after its projection R (and colsum(G^2) in the identity
        form): the factored moments into N1 (``moments``: the ``adamem_moments``
        implementation) and the residual's column statistics into col_scale (``col_stats``:
        ``residual_col_stats``)."""
        moments(R, state["M"], state["a_row"], state["a_col"], N1, **moments_kw)  # lines 5-6
        col_stats(Gc, P, R, state["c_os"], col_scale, g_col_sumsq=g_sumsq,       # lines 4, 7
                  **stats_kw)

    # -- the step on the engine (optim/_engine.py) ------------------------------------------
    MOMENT_KEY = "M"
    # every state-writing op of a class's steady step takes the on-device flag: the grouped
    # middle (or the per-matrix ops, their state put back), the combined update. A step with
    # AdaMeM's Adafactor parameters (per-parameter steps) still reads the flag at once.
    DEVICE_SKIP = True

    # a steady step is bound calls only where every class runs its grouped middle and the
    # planned combined update, and every Adafactor parameter its Triton form (docs/engine.md)
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """The class's middle as one grouped call and its combined update on the planned
        launcher (both skip their launches on a replay; the per-matrix middle does not)."""
        k3 = cls.extra.get("k3")
        return (cls.extra.get("middle") is not None and k3 is not None
                and k3.stacked is not None)

    def _graph_key(self):
        """The base's key, when the Adafactor parameters run their bound Triton calls too
        (the vector sets' grouped step, each factored matrix's step)."""
        key = super()._graph_key()
        plan = self.__dict__.get("_validated_plan")
        if key is None or plan is None:
            return None
        if not all(vs.chosen == "triton" and vs.bound is not None
                   for vs in getattr(plan, "vector_sets", ())):
            return None
        if not all(f.chosen == "triton" and f.bound is not None
                   for f in getattr(plan, "factored", ())):
            return None
        return key

    def _captured_values(self) -> tuple:
        """The factored step takes beta2 and eps1 by value (keyed with the groups' betas)."""
        return tuple((tuple(g.get("betas", ())), g.get("eps1")) for g in self.param_groups)

    def _route(self, p, group):
        """``ClassRoute`` for a low-rank matrix in the identity form (side "right": a tall
        matrix, run on its transpose), None for the rest (Adafactor, the explicit form)."""
        plan = self._plan(p, group)
        if plan is None or group["residual_form"] == "explicit":
            return None
        if not self._grouped_available(group, p):
            return None
        rank, shape, transposed = plan
        return ClassRoute("right" if transposed else "left", rank, shape)

    def _routed_by_group(self, routed):
        """``[(group, states)]`` of the routed matrices, kept while ``routed`` (the plan's
        list) is the same."""
        cached = self.__dict__.get("_routed_groups")
        if cached is not None and cached[0] is routed:
            return cached[1]
        by_group = {}
        for _, group, _, state in routed:
            by_group.setdefault(id(group), (group, []))[1].append(state)
        out = list(by_group.values())
        self._routed_groups = (routed, out)
        return out

    def _due_on_routed(self, routed) -> bool:
        """Whether some routed matrix refreshes on this step (``_refresh_due`` of each: at its
        first step and when its counter is a multiple of ``update_proj_gap``), from the
        distinct counters of each group."""
        for group, states in self._routed_by_group(routed):
            if not all(map(operator.contains, states, repeat("basis"))):
                return True                         # a first step (its counter counts as 0)
            gap = group["update_proj_gap"]
            if any(t % gap == 0 for t in set(map(_STEP, states))):
                return True
        return False

    def _refresh_pending(self, plan) -> bool:
        return self._due_on_routed(plan.routed)

    def _refresh_classes(self, routed) -> bool:
        """The refreshes due on this step; a steady step (no refresh due, the classes built)
        checks the distinct counters only: the paths of the members were checked when their
        classes were built (a rank change rebuilds the plan)."""
        if not self._classes_stale and not self._due_on_routed(routed):
            return False
        replaced = False
        for p, group, route, state in routed:
            self._check_path(state, (route.rank,))
            if not self._refresh_due(state, group):
                continue
            G = p.grad if p.dim() == 2 else p.grad.reshape(route.shape)
            Gc = G.t() if route.side == "right" else G
            replaced |= self._refresh(p, state, group, Gc, route.rank,
                                      self._backend_for(group, p))
        return replaced

    def _class_lists(self, cls):
        """Canonical (left-form) views of the class's weights and workspaces, the members'
        state, and the class's own colsum(G^2) and column-scale rows (kept with the plan)."""
        transposed = cls.route.side == "right"
        rank = cls.route.rank
        cols = cls.route.shape[0] if transposed else cls.route.shape[1]
        count = len(cls.members)
        device = cls.Ws[0].device
        cls.extra["Wc"] = [W.t() for W in cls.Ws] if transposed else list(cls.Ws)
        cls.extra["Rc"] = [R.view(rank, cols) for R in cls.Rs]
        cls.extra["Nc"] = [N.view(rank, cols) for N in cls.Ns]
        sumsq = torch.empty((count, cols), dtype=torch.float32, device=device)
        cls.extra["sumsq"] = sumsq
        cls.extra["sumsq_rows"] = list(sumsq.unbind(0))
        cls.extra["col_scales"] = list(torch.empty((count, cols), dtype=torch.float32,
                                                   device=device).unbind(0))
        cls.extra["impls"] = (lookup("adamem_moments", cls.backend),
                              lookup("residual_col_stats", cls.backend))
        cls.extra["middle"] = None
        if all(resolve_call(op, cls.backend, device)[0] == "triton"
               for op in ("adamem_moments", "residual_col_stats")):
            # both on Triton: the whole class's middle in four launches, the same bits
            from lowrank_fused.kernels.grouped_adamem_middle import GroupedAdamemMiddle

            sts = [m.state for m in cls.members]
            k = cls.route.shape[1] if transposed else cls.route.shape[0]
            try:
                cls.extra["middle"] = GroupedAdamemMiddle(
                    k, cls.extra["Rc"], [st["M"] for st in sts], [st["a_row"] for st in sts],
                    [st["a_col"] for st in sts], cls.extra["Nc"], [st["c_os"] for st in sts],
                    cls.extra["col_scales"], cls.extra["sumsq_rows"],
                    stats_from_momentum=cls.members[0].group["v_source"] == "momentum")
            except ValueError:     # a state tensor of another layout (e.g. loaded strided):
                pass               # the per-matrix middle, which takes any strides

    def _class_key_extra(self, p, group, state) -> tuple:
        # a class's grouped middle has one statistics source
        return (group["v_source"],)

    # -- AdaMeM's Adafactor parameters on the engine ----------------------------------------
    def _build_routes(self, live, signature):
        """The base's plan, with the Adafactor parameters taken off the per-parameter step:
        the 1-D ones (norm weights, biases) into *vector sets* (same size, dtypes, device and
        backend; one grouped step per set, ``kernels/grouped_adamem_vector_step.py`` on
        Triton, else the per-vector op in a loop), the matrices (the first and last layers)
        into ``plan.factored`` (one step each, ``kernels/adamem_factored_step.py``), both with
        the step's ``skip`` flag. FSDP2 shards, weights without a 2-D view and backends
        without these forms keep the per-parameter step."""
        plan = super()._build_routes(live, signature)
        plan.vector_sets, plan.factored = [], []
        if not self.engine:
            return plan
        sets, keep = {}, []
        for p, group in plan.legacy:
            G = p.grad
            if self._plan(p, group) is not None or is_sharded(p):
                keep.append((p, group))
                continue
            if p.dim() >= 2:
                if not self._add_factored(plan, p, group):
                    keep.append((p, group))
                continue
            if not p.is_contiguous() or not G.is_contiguous():
                keep.append((p, group))
                continue
            state = self.state[p]
            self._check_path(state, None)
            backend = self._backend_for(group, p)
            chosen = resolve_call("adafactor_bc_unfactored_step", backend, p.device)[0]
            key = (p.numel(), p.dtype, G.dtype, p.device, chosen)
            vs = sets.get(key)
            if vs is None:
                vs = sets[key] = SimpleNamespace(params=[], groups=[], states=[], Ws=[], Vs=[],
                                                 chosen=chosen, bound=None)
            if "step" not in state:       # as the per-parameter step's first call
                state["step"] = 0
                state["v"] = torch.zeros_like(p, dtype=torch.float32,
                                              memory_format=torch.contiguous_format)
            vs.params.append(p)
            vs.groups.append(group)
            vs.states.append(state)
            vs.Ws.append(p)
            vs.Vs.append(state["v"])
        plan.legacy = keep
        plan.vector_sets = list(sets.values())
        return plan

    def _add_factored(self, plan, p, group) -> bool:
        """An Adafactor matrix into ``plan.factored`` (its 2-D view, its backend's form);
        False when it keeps the per-parameter step."""
        shape = (p.shape[0], math.prod(p.shape[1:]))
        try:
            W = p if p.dim() == 2 else p.view(shape)
        except RuntimeError:             # no 2-D view: the per-parameter step copies back
            return False
        chosen = resolve_call("adafactor_bc_factored_step", self._backend_for(group, p),
                              p.device)[0]
        if chosen not in ("triton", "reference"):
            return False
        state = self.state[p]
        self._check_path(state, None)
        if "step" not in state:           # as the per-parameter step's first call
            state["step"] = 0
            state["row"] = torch.zeros(shape[0], dtype=torch.float32, device=p.device)
            state["col"] = torch.zeros(shape[1], dtype=torch.float32, device=p.device)
        plan.factored.append(SimpleNamespace(p=p, group=group, state=state, W=W, shape=shape,
                                             chosen=chosen, bound=None))
        return True

    def _engine_step(self):
        plan = self.__dict__.get("_validated_plan") or self._current_plan()
        if plan is not None:
            self._validated_plan = plan              # the base's step runs this plan
        super()._engine_step()
        for vs in getattr(plan, "vector_sets", ()):
            self._vector_set_step(vs)
        for f in getattr(plan, "factored", ()):
            self._factored_step(f)

    def _factored_step(self, f):
        """One Adafactor matrix: ``_adafactor_step``'s scalars and its factored op, with the
        step's ``skip`` flag."""
        group, state = f.group, f.state
        G = f.p.grad if f.p.dim() == 2 else f.p.grad.reshape(f.shape)
        t = state["step"] + 1
        _, c2 = self._coefficients(group, t)
        pre_scale, post_decay = ops.decay_coefficients(group["lr"], group["weight_decay"], "pre")
        kw = dict(lr=float(group["lr"]), beta2=float(group["betas"][1]),
                  eps1=float(group["eps1"]), eps=float(group["eps"]), c2=c2,
                  pre_scale=pre_scale, post_decay=post_decay, skip=self._skip_flag)
        if f.chosen == "triton":         # bound once: its buffers kept, nothing allocated
            if f.bound is None:
                from lowrank_fused.kernels.adamem_factored_step import (
                    BoundAdamemFactoredStep)

                f.bound = BoundAdamemFactoredStep(f.W, state["row"], state["col"])
            f.bound(G, **kw)
        else:
            from lowrank_fused.reference.adamem_factored_step import (
                adamem_factored_step_ref)

            adamem_factored_step_ref(f.W, G, state["row"], state["col"], **kw)
        state["step"] = t

    def _vector_set_step(self, vs):
        """One vector set: the rows of ``_adafactor_step``'s scalars (one per distinct group
        and counter), one grouped call, then the counters."""
        Gs = list(map(_GRAD, vs.params))
        ts = [t + 1 for t in map(_STEP, vs.states)]
        memo = {}
        rows = []
        one_group = vs.__dict__.get("one_group")
        if one_group is None:
            one_group = vs.one_group = all(g is vs.groups[0] for g in vs.groups)
        one = one_group and ts.count(ts[0]) == len(ts)
        for group, t in zip(vs.groups[:1] if one else vs.groups, ts):
            key = (id(group), t)
            row = memo.get(key)
            if row is None:
                _, c2 = self._coefficients(group, t)
                pre_scale, post_decay = ops.decay_coefficients(group["lr"],
                                                               group["weight_decay"], "pre")
                row = memo[key] = (float(group["lr"]), float(group["betas"][1]),
                                   float(group["eps1"]), float(group["eps"]), c2, pre_scale,
                                   post_decay)
            rows.append(row)
        if one:                           # one group, one counter: one row for every member
            rows = rows * len(ts)
        if vs.chosen == "triton":
            if vs.bound is None:
                from lowrank_fused.kernels.grouped_adamem_vector_step import (
                    GroupedAdamemVectorStep)

                vs.bound = GroupedAdamemVectorStep(vs.Ws, Gs, vs.Vs)
            vs.bound(Gs, rows, skip=self._skip_flag)
        else:
            from lowrank_fused.reference.grouped_adamem_vector_step import (
                grouped_adamem_vector_step_ref)

            grouped_adamem_vector_step_ref(vs.Ws, Gs, vs.Vs, rows, skip=self._skip_flag,
                                           impl=lookup("adafactor_bc_unfactored_step",
                                                       vs.chosen))
        _set_counters(vs.states, ts)

    def nonfinite_check(self):
        """The base's check; a step skipped on the device rolls back the counters of the
        Adafactor parameters too (the base knows the classes' and the dense sets')."""
        pending = self.__dict__.get("_pending_nonfinite")
        if pending is not None:
            host, event, plan, params, step_number = pending
            if getattr(plan, "vector_sets", None) or getattr(plan, "factored", None):
                self._pending_nonfinite = (host, event, _WithAdafactor(plan), params,
                                           step_number)
        super().nonfinite_check()

    def _class_step(self, cls, precision):
        """One class: K1 of every member with its colsum(G^2) (one grouped launch), each
        member's factored moments and residual statistics, the combined update (one grouped
        launch). The bound calls take the gradients as they are (a tall class's untransposed:
        the same launches); the common case, one group and one counter, derives its scalars
        once and passes them as single numbers."""
        ex = cls.extra
        Gs = self._class_grads(cls)
        right = cls.route.side == "right"
        k1 = ex.get("k1")
        if k1 is None:
            k1 = ex["k1"] = ops_grouped.BoundGroupedProject(
                Gs, [P.t() for P in cls.Ps] if right else cls.Ps,
                [R.t() for R in ex["Rc"]] if right else ex["Rc"],
                side=cls.route.side, backend=cls.backend)
        k1(Gs, precision=precision, sumsq=ex["sumsq"],
           layout_token=self._layout_token)
        states, count = ex["states"], len(cls.members)
        ts = [t + 1 for t in map(_STEP, states)]                # line 1: the counters
        _set_counters(states, ts)
        group = ex["group"]
        if group is not None and ts.count(ts[0]) == count:     # one group, one counter
            sc = self._scalars(group, ts[0])
            scalars, uniform = [sc] * count, True
        else:
            memo = {}
            scalars = []
            for m, t in zip(cls.members, ts):
                sc = memo.get((id(m.group), t))
                if sc is None:
                    sc = memo[(id(m.group), t)] = self._scalars(m.group, t)
                scalars.append(sc)
            uniform = scalars.count(scalars[0]) == count
        skip = self._skip_flag
        middle = ex["middle"]
        if middle is not None:           # the class's middle in four launches
            mk = scalars[0][0]
            row = (mk["beta1"], mk["beta2"], mk["eps"], mk["eps1"], mk["c1"], mk["c2"])
            rows = [row] * count if uniform else [
                (mk["beta1"], mk["beta2"], mk["eps"], mk["eps1"], mk["c1"], mk["c2"])
                for mk, _, _ in scalars]
            middle(rows, skip=skip)
        else:
            moments, col_stats = ex["impls"]
            left = [G.t() for G in Gs] if right else Gs

            def per_member():
                for m, G, P, R, N1, g_sumsq, col_scale, sc in zip(
                        cls.members, left, cls.Ps, ex["Rc"], ex["Nc"], ex["sumsq_rows"],
                        ex["col_scales"], scalars):
                    self._low_rank_middle(moments, col_stats, m.state, G, P, R, g_sumsq, N1,
                                          col_scale, sc[0], sc[1])
            if skip is None:
                per_member()
            else:                        # the per-matrix ops: their state put back on skip
                run_unless(skip, [m.state[k] for m in cls.members for k in STATE_KEYS],
                           per_member)
        k3 = ex.get("k3")
        if k3 is None:
            k3 = ex["k3"] = BoundAdamemResidualUpdate(
                ex["Wc"], Gs, cls.Ps, ex["Rc"], ex["Nc"], ex["col_scales"],
                side=cls.route.side, backend=cls.backend)
        if uniform:                      # one number for every member
            coefs = scalars[0][2]
        else:
            coefs = {k: tuple(sc[2][k] for sc in scalars) for k in K3_SCALARS}
        # the gradients' layout: checked by K1 on this list a moment ago
        k3(Gs, precision=precision, skip=skip, checked=k1.layout, **coefs)


class _WithAdafactor:
    """A plan's counters with those of its Adafactor parameters (listed only when a skipped
    step is rolled back)."""

    def __init__(self, plan):
        self.plan = plan

    @property
    def counters(self):
        plan = self.plan
        return (list(plan.counters) + [st for vs in plan.vector_sets for st in vs.states]
                + [f.state for f in plan.factored])


def adamem_param_groups(model: nn.Module, *, rank: int, all_layers: bool = False,
                        **extra) -> list:
    """The paper's routing (docs/methods/adamem.md): ``[{"params": low-rank weights,
    "rank": rank, **extra}, {"params": everything else}]``, empty groups dropped.

    Layers are the ``nn.Linear`` and ``nn.Embedding`` modules with a trainable weight, in
    registration order. The first (token embedding) and the last (output head) get Adafactor
    unless ``all_layers`` is True (the paper's "applied to all layers" variant); so do biases,
    norms and every other parameter. A weight shared by several modules (tied embeddings)
    appears once, in the group of its first occurrence.
    """
    check_int("rank", rank, 1)
    check_bool("all_layers", all_layers)
    layers = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.requires_grad:
            layers.append(module.weight)
    ends = set() if all_layers or not layers else {id(layers[0]), id(layers[-1])}
    low_rank, seen = [], set()
    for w in layers:
        if id(w) not in seen and id(w) not in ends and w.dim() >= 2:
            seen.add(id(w))
            low_rank.append(w)
    seen_all = set(seen)
    rest = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen_all:
            seen_all.add(id(p))
            rest.append(p)
    groups = [{"params": low_rank, "rank": int(rank), **extra}, {"params": rest}]
    return [g for g in groups if g["params"]]
