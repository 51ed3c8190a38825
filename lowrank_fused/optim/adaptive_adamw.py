"""AdaptiveAdamW and the repository variants RSAdamW, GHAAdamW and GaLoreKFACAdamW
(docs/methods/adaptive_adamw.md).

All four extend GaLore-AdamW (docs/methods/galore.md: E-hf epsilon, WD-post, the 'std' side rule,
refresh when ``k % update_proj_gap == 0`` before the counter increments, HF AdamW for parameters
outside rank groups) and share one low-rank step (phase B)::

    basis update (method specific) -> R = P^T G -> normalised step N -> limiter (B1)
    -> W -= step_size * scale * (P @ N), WD-post

* ``AdaptiveAdamW``: every ``update_proj_gap`` steps all projected matrices of a rank group are
  refreshed together (phase A): a global budget ``B = rank * L`` is split greedily from rank 1
  per matrix by a spectral score (``rank_metric``), each matrix gets its top-``r_l`` singular
  basis and its Adam moments are transported into the new basis (``m <- C m``,
  ``v <- (C*C) v``, ``C = P_new^T P_old``).
* ``RSAdamW`` (rsadamw): uniform rank, random subspace drift instead of an SVD.
* ``GHAAdamW`` (gha): uniform rank, the basis tracks the gradient covariance by Sanger's rule
  every step.
* ``GaLoreKFACAdamW`` (galore_kfac): GaLore's SVD basis; the low-rank momentum is whitened by a
  Kronecker left factor instead of Adam's second moment.

The variants are reconstructions from one-line README descriptions (all design
choices). State is plain tensors and ints in ``self.state[p]``; AdaptiveAdamW's pool counter
lives in its param group (``pool_step``), so ``state_dict()`` round-trips through
``torch.save``/``torch.load(weights_only=True)`` and a resumed run continues bit-identically.
Right-projected matrices run every op in the canonical left form on transposed views
(docs/conventions.md).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import operator
import sys
import warnings
from typing import List, Optional, Sequence

import torch

from lowrank_fused import _capture, ops, ops_grouped, ops_multi, sharded
from lowrank_fused.dispatch import implementation
from lowrank_fused.linalg import (RefreshFallbackWarning, canonical_svd_basis, fallback_basis,
                                  orth)
from lowrank_fused.optim import _capacity
from lowrank_fused.optim._base import check_bool, check_number, is_sharded
from lowrank_fused.optim._engine import ClassRoute, per_member
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference._precision import matmul as precise_matmul
from lowrank_fused.optim.galore_adamw import GaLoreAdamW
from lowrank_fused.subspace import randomized_svd

__all__ = ["AdaptiveAdamW", "RSAdamW", "GHAAdamW", "GaLoreKFACAdamW", "RANK_METRICS",
           "rank_scores", "allocate_ranks"]

RANK_METRICS = ("explained_variance", "singular_value", "conditioning", "gap", "combined",
                "uniform_variance")
# Metrics whose per-matrix score is non-increasing in r (s is sorted descending), so the greedy
# allocation is a global top-k; "gap" (s[r+1]/s[r]) is not and runs the exact heap greedy.
MONOTONE_METRICS = frozenset(RANK_METRICS) - {"gap"}

_STEP = operator.itemgetter("step")


def _steps(states):
    """The distinct counters of ``states`` ({None} when one has none yet)."""
    try:
        return set(map(_STEP, states))
    except KeyError:
        return {None}

_ROOT_VALID = operator.itemgetter("kfac_root_valid")


# ---------------------------------------------------------------------------------------------
# Rank allocation (docs/methods/adaptive_adamw.md, phase A): host-side control logic, not a
# kernel op.

def rank_scores(s: torch.Tensor, metric: str, *, combined_weight: float = 0.5) -> torch.Tensor:
    """Scores of the increments ``r -> r+1`` of one matrix, for r = 1 .. len(s)-1.

    ``s`` are its singular values in descending order (length min(m, n)). Returns a fp32
    vector ``sc`` of length ``len(s) - 1`` with ``sc[r-1] = score(r)``; with 1-based ``s``
    and ``E = sum(s^2)``:

    ==================== ==============================================
    explained_variance   ``s[r+1]^2 / E``   (README formula)
    singular_value       ``s[r+1]^2``
    conditioning         ``s[r+1] / s[1]``
    gap                  ``s[r+1] / s[r]``   (0 where ``s[r] == 0``)
    combined             ``w*s[r+1]^2/E + (1-w)*s[r+1]/s[1]``
    uniform_variance     ``-(s[1]^2 + ... + s[r]^2) / E``
    ==================== ==============================================

    A matrix with ``E == 0`` (zero gradient) scores ``-inf`` everywhere (the zero-gradient guard).
    """
    if metric not in RANK_METRICS:
        raise ValueError(f"rank_metric must be one of {RANK_METRICS}, got {metric!r}")
    s = s.detach().float().reshape(-1)
    sq = s * s
    E = sq.sum()
    nxt = s[1:]
    if nxt.numel() == 0 or E.item() == 0.0:
        return torch.full_like(nxt, -math.inf)
    w = float(combined_weight)
    if metric == "explained_variance":
        return sq[1:] / E
    if metric == "singular_value":
        return sq[1:]
    if metric == "conditioning":
        return nxt / s[0]
    if metric == "gap":
        prev = s[:-1]
        return torch.where(prev > 0, nxt / torch.where(prev > 0, prev, 1.0), 0.0)
    if metric == "combined":
        return w * sq[1:] / E + (1.0 - w) * nxt / s[0]
    return -torch.cumsum(sq, 0)[:-1] / E          # uniform_variance


def allocate_ranks(spectra: Sequence[torch.Tensor], budget: int, metric: str = "explained_variance",
                   *, r_max: Optional[Sequence[int]] = None, combined_weight: float = 0.5,
                   algorithm: str = "auto") -> List[int]:
    """Greedy split of ``budget`` ranks over matrices with singular values ``spectra``.

    Every matrix starts at rank 1 (r_min); each of the ``budget - L`` increments goes to the
    matrix whose next increment scores highest (``rank_scores``), ties to the smallest index,
    never beyond ``r_max[l]`` (default and upper bound ``len(spectra[l])`` = min(m, n)).

    ``algorithm``: ``"topk"`` is the vectorised form, valid when every matrix's scores are
    non-increasing in r (all metrics but ``gap``): the greedy then takes the global top
    ``budget - L`` candidates ordered by (score desc, matrix, r), which one stable sort over the
    concatenated candidates gives. ``"heap"`` is the exact greedy with a max-heap over matrices,
    O(B log L), for any metric. ``"auto"`` picks ``topk`` for monotone metrics.
    """
    if metric not in RANK_METRICS:
        raise ValueError(f"rank_metric must be one of {RANK_METRICS}, got {metric!r}")
    if algorithm not in ("auto", "topk", "heap"):
        raise ValueError(f"algorithm must be 'auto', 'topk' or 'heap', got {algorithm!r}")
    L = len(spectra)
    caps = [int(s.numel()) for s in spectra]
    if r_max is not None:
        if len(r_max) != L:
            raise ValueError(f"r_max has {len(r_max)} entries for {L} matrices")
        caps = [max(1, min(c, int(x))) for c, x in zip(caps, r_max)]
    if any(c < 1 for c in caps):
        raise ValueError("every matrix needs at least one singular value")
    budget = int(budget)
    if budget < L:
        raise ValueError(f"rank budget {budget} is below the number of matrices {L} (r_min = 1)")
    if budget > sum(caps):
        raise ValueError(f"rank budget {budget} exceeds the total capacity {sum(caps)}")
    extra = budget - L
    scores = [rank_scores(s, metric, combined_weight=combined_weight)[:c - 1]
              for s, c in zip(spectra, caps)]
    if algorithm == "auto":
        algorithm = "topk" if metric in MONOTONE_METRICS else "heap"
    if extra == 0:
        return [1] * L
    if algorithm == "topk":
        cand = torch.cat(scores)
        owner = torch.repeat_interleave(torch.arange(L), torch.tensor([c - 1 for c in caps]))
        order = torch.sort(cand, descending=True, stable=True).indices[:extra]
        return (1 + torch.bincount(owner[order], minlength=L)).tolist()
    lists = [sc.tolist() for sc in scores]
    ranks = [1] * L
    heap = [(-lists[l][0], l) for l in range(L) if caps[l] > 1]
    heapq.heapify(heap)
    for _ in range(extra):
        _, l = heapq.heappop(heap)
        ranks[l] += 1
        if ranks[l] < caps[l]:
            heapq.heappush(heap, (-lists[l][ranks[l] - 1], l))
    return ranks


# ---------------------------------------------------------------------------------------------

_ROOT_VALID = operator.itemgetter("kfac_root_valid")


def _canon(side, X):
    """A tensor of the stored layout in the canonical left form (a view)."""
    return X if side == "left" else X.t()


def _uncanon(side, X):
    """A canonical-form result back in the stored layout (contiguous)."""
    return X.contiguous() if side == "left" else X.t().contiguous()


def _stack_class_state(cls, keys):
    """The members' state tensors under each of ``keys`` as one ``(count,) + shape`` block
    per key, in member order (a class's update then reads and writes each block whole):
    where they are not yet consecutive in one block, they are moved into a new one (the
    state then holds views of it; values and dtypes unchanged). None when some key's tensors
    differ in shape, dtype or layout (the caller gathers them per step instead)."""
    blocks = []
    for key in keys:
        Xs = [m.state[key] for m in cls.members]
        first = Xs[0]
        if not all(X.shape == first.shape and X.dtype == first.dtype
                   and X.device == first.device and X.is_contiguous() for X in Xs):
            return None
        blocks.append(ops_grouped.stacked_view(Xs))
    for i, key in enumerate(keys):
        if blocks[i] is None:
            blocks[i] = torch.stack([m.state[key] for m in cls.members])
            for m, X in zip(cls.members, blocks[i].unbind(0)):
                m.state[key] = X
    return blocks


def _is_int(x, low):
    return not isinstance(x, bool) and isinstance(x, int) and x >= low


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): deterministic across runs and machines."""
    mask = (1 << 64) - 1
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = ((x ^ (int(v) & mask)) * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & mask
        x ^= x >> 29
    return x & ((1 << 63) - 1)


class _SubspaceAdamW(GaLoreAdamW):
    """What the four classes share: GaLore's groups, checks and dense step, plus the low-rank
    step with a method-specific basis update, the norm-growth limiter and moment transport.
    FSDP2 shards (rows split over the ranks) take the per-matrix step with the sums over
    the sharded rows all-reduced (``lowrank_fused.sharded``; docs/methods/adaptive_adamw.md,
    "Under FSDP2")."""

    SUPPORTS_SHARDED = True
    # every state-writing op of a steady class step takes the on-device skip flag (K2, the
    # limiter, GHA's update and transport, K-FAC's whitening, K3): between refreshes the
    # non-finite flag is not read on the host (docs/engine.md)
    DEVICE_SKIP = True
    # AdaptiveAdamW and RSAdamW: a steady class step is bound calls only (K1, the
    # multi-tensor K2, the class limiter, K3); GHA adds its basis update as one capture unit,
    # K-FAC its grouped whitening (each method sets it)
    CAPTURABLE = False

    def _class_capturable(self, cls) -> bool:
        """K2 on its multi-tensor op and the limiter, when on, as one bound call for the
        class with one ``nl_gamma`` (``_class_limit``: not the per-member fallback)."""
        if cls.extra.get("where") is None:
            return False
        if cls.extra["limiter"] is None:
            return True
        return cls.extra.get("limit_call") is not None and self._class_gamma(cls) is not None

    @staticmethod
    def _class_gamma(cls, one=None):
        """The class's one ``nl_gamma`` (``one``: the members' shared group), None when its
        members' groups differ in it."""
        if one is not None:
            return one["nl_gamma"]
        gammas = per_member(cls.extra["groups"], lambda g: float(g["nl_gamma"]))
        return gammas[0] if all(g == gammas[0] for g in gammas) else None

    def _captured_values(self) -> tuple:
        """The class limiter takes ``nl_gamma`` by value."""
        return tuple(g.get("nl_gamma") for g in self.param_groups)

    def __init__(self, params, lr, betas, eps, weight_decay, bias_correction, *, family,
                 capacity_buffers=False, **options):
        # the method's group keys -> the constructor's values, filled into every rank group
        # (set before the base constructor, which checks the groups)
        self._family = dict(family)
        self.capacity_buffers = check_bool("capacity_buffers", capacity_buffers)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, **options)

    # -- group validation -----------------------------------------------------------------
    def _check_group(self, group):
        if "rank" in group:
            for key, value in self._family.items():
                group.setdefault(key, value)
        super()._check_group(group)
        if "rank" in group:
            self._check_family(group)

    def _lowrank_group_keys(self) -> set:
        """GaLore's rank-group keys and the method's own (an IgnoredGroupKeyWarning names
        any other key a group sets)."""
        return super()._lowrank_group_keys() | set(self._family)

    def _check_family(self, group):
        gamma = group["nl_gamma"]
        if gamma is not None:
            check_number("nl_gamma", gamma, low=1.0)

    def _ops_needed(self, group, p):
        if self._plan(p, group) is None:
            return ("adamw_step",)
        limiter = ("norm_growth_limit",) if group["nl_gamma"] is not None else ()
        return self._method_ops(group) + ("backproject_update",) + limiter

    def _method_ops(self, group):
        return ("project", "adam_moments", "moment_transport")

    # -- the optimizer step -----------------------------------------------------------------
    def _route(self, p, group):
        """Dense parameters on the engine's dense sets; projected ones on its classes, at their
        current rank (AdaptiveAdamW's ranks differ per matrix: a class is also one rank)."""
        route = super()._route(p, group)
        if isinstance(route, ClassRoute):
            rank = self.state[p].get("rank", route.rank) if p in self.state else route.rank
            if rank != route.rank:
                route = dataclasses.replace(route, rank=rank)
        return route

    def _managed(self, group):
        """(param, plan) of a group's projected matrices."""
        if "rank" not in group:
            return []
        return [(p, plan) for p in group["params"]
                for plan in [self._plan(p, group)] if plan is not None]

    def _check_grads(self):
        if self.nonfinite != "ignore":       # covered by the step's flag
            return
        for group in self.param_groups:
            for p, plan in self._managed(group):
                if p.grad is not None and self._basis_reads_grad(p, group):
                    self._require_finite(p, "where its subspace is computed")

    def _basis_reads_grad(self, p, group) -> bool:
        return False

    def _before_updates(self):
        pass

    def _step_param(self, p, group, backend, precision):
        plan = self._plan(p, group)
        if plan is None:
            self._dense_step(p, group, backend)
            return
        side, _, shape = plan
        state = self.state[p]
        W, G, write_back = self._as_matrix(p, shape)    # FSDP2: this rank's rows
        self._update_basis(p, group, side, G, state, backend)
        P = state["basis"]
        rows = sharded.rows_of(p)
        # a shard on the left: P^T G summed over the ranks (r x n, replicated); right: local
        R = sharded.project(G, P, side, rows, precision=precision, backend=backend)
        state["step"] += 1
        N, coef, post_decay = self._direction(R, state, group, side, backend, rows)
        # local on a shard too: this rank's rows of P (left) or of N (right)
        ops.backproject_update(W, P, N, side=side, coef=coef, post_decay=post_decay,
                               precision=precision, backend=backend)
        write_back(W)

    def _direction(self, R, state, group, side, backend, rows=None):
        """Phase B between K1 and K3: the normalised step N from R (the moments advance),
        the norm-growth limiter on it (B1), and K3's coefficient and WD-post decay.
        ``rows``: an FSDP2 shard's row split; on the right its N holds this rank's rows of
        the step, so ``||N||^2`` is summed over the ranks (every rank limits alike)."""
        limit = group["nl_gamma"] is not None
        N, step_size, sumsq = self._normalised_step(R, state, group, side, state["step"],
                                                    backend, want_sumsq=limit, rows=rows)
        if limit and rows is not None and side == "right":
            if sumsq is None:
                sumsq = N.float().square().sum().reshape(1)
            rows.sum_(sumsq)
        if limit:                                                # the limiter, B1
            self._limit(implementation("norm_growth_limit", backend, R.device), N, state,
                        group, sumsq)
        _, post_decay = ops.decay_coefficients(group["lr"], group["weight_decay"], "post")
        return N, step_size * group["scale"], post_decay

    @staticmethod
    def _limit(impl, N, state, group, sumsq):
        """The norm-growth limiter (B1) on one matrix's N, in place; its memory ``nl_prev``
        is created (0-dim fp32) on the first call."""
        first = "nl_prev" not in state
        if first:
            state["nl_prev"] = torch.zeros((), dtype=torch.float32, device=N.device)
        impl(N, state["nl_prev"], gamma=float(group["nl_gamma"]), first=first, sumsq=sumsq)

    # -- the step on the engine's classes (optim/_engine.py) --------------------------------
    # the state tensors a class's lists hold (a basis update that replaces one rebuilds them)
    _CLASS_STATE = ("basis", "exp_avg", "exp_avg_sq")

    def _refresh_classes(self, routed) -> bool:
        """Every member's basis update due on this step (``_update_basis``, as the per-matrix
        step runs it; AdaptiveAdamW's joint refresh ran before, in ``_before_updates``). True
        when one replaced a state tensor of the class lists or changed a rank; a changed rank
        also changes the member's route (the class key and its workspace shapes)."""
        # AdaptiveAdamW's refresh (before the engine step) replaced tensors
        replaced = self.__dict__.pop("_state_replaced", False)
        if self._skip_flag is not None:
            # the flag left on the device: _refresh_pending found nothing due on this step
            return replaced
        keys = self._CLASS_STATE
        backends = {}
        for i, (p, group, route, state) in enumerate(routed):
            if self._basis_due(group, state):
                before = [state.get(k) for k in keys]
                G = p.grad if p.dim() == 2 else p.grad.reshape(route.shape)
                backend = backends.get(id(group))      # one per group: all are projected
                if backend is None:
                    backend = backends[id(group)] = self._backend_for(group, p)
                self._update_basis(p, group, route.side, G, state, backend)
                if any(state.get(k) is not b for k, b in zip(keys, before)):
                    replaced = True
            rank = state["rank"]
            if rank != route.rank:
                routed[i] = (p, group, dataclasses.replace(route, rank=rank), state)
                replaced = True
        return replaced

    def _routed_by_group(self, plan):
        """``[(group, [state, ...]), ...]``: the routed members' states per group (cached
        while the plan's routes live), so a steady step checks what is due from the distinct
        counters of a group instead of one call per matrix."""
        cache = self.__dict__.get("_by_group")
        if cache is None or cache[0] is not plan.routed:
            by = {}
            for _, group, _, st in plan.routed:
                by.setdefault(id(group), (group, []))[1].append(st)
            cache = self._by_group = (plan.routed, list(by.values()))
        return cache[1]

    def _bases_exist(self, plan) -> bool:
        """Every routed member has its basis (remembered for the plan's routes: no step
        removes a basis, so a steady step checks nothing per member)."""
        if self.__dict__.get("_bases_seen") is plan.routed:
            return True
        if all(map(operator.contains, [st for *_, st in plan.routed], itertools.repeat("basis"))):
            self._bases_seen = plan.routed
            return True
        return False

    def _gap_due(self, plan) -> bool:
        """``_refresh_basis_due`` for any routed member: no basis yet, or a counter (before
        the increment) divisible by the group's ``update_proj_gap``."""
        if not self._bases_exist(plan):
            return True
        for group, states in self._routed_by_group(plan):
            steps = _steps(states)
            if None in steps:
                return True
            gap = group["update_proj_gap"]
            if any(k % gap == 0 for k in steps):
                return True
        return False

    def _refresh_pending(self, plan) -> bool:
        """Whether a member's basis update (an SVD or a drawn basis, or the first basis) is
        due on this step: the non-finite flag is then read at once."""
        if self._basis_due == self._refresh_basis_due:
            return self._gap_due(plan)
        due = self._basis_due
        return any(due(group, st) for _, group, _, st in plan.routed)

    def _basis_due(self, group, state) -> bool:
        """Whether ``_update_basis`` has anything to do on this step (default: always)."""
        return True

    def _refresh_basis_due(self, group, state) -> bool:
        """A refresh every ``update_proj_gap`` steps (counter before the increment)."""
        return "basis" not in state or state.get("step", 0) % group["update_proj_gap"] == 0

    def _class_lists(self, cls):
        members = cls.members
        device = cls.Ws[0].device
        cls.extra["groups"] = groups = [m.group for m in members]   # (states: the base's)
        cls.extra["one_group"] = all(g is groups[0] for g in groups)
        cls.extra["Ms"] = [m.state["exp_avg"] for m in members]
        limit = [m.group["nl_gamma"] is not None for m in members]
        cls.extra["limit"] = limit
        cls.extra["limiter"] = implementation("norm_growth_limit", cls.backend, device) \
            if any(limit) else None
        self._class_lists_k2(cls)

    def _class_lists_k2(self, cls):
        """The lists of the middle step: Adam's V and, where the backend has it, one
        multi-tensor K2 for the class with ``||N||^2`` of every member as a side output."""
        members = cls.members
        cls.extra["Vs"] = [m.state["exp_avg_sq"] for m in members]
        cls.extra["where"] = self._multi_where(
            "adam_moments", cls.backend, cls.Rs + cls.extra["Ms"] + cls.extra["Vs"] + cls.Ns) \
            if self.multi_tensor else None
        if any(cls.extra["limit"]):
            self._limiter_lists(cls)
        else:
            cls.extra["norms"] = None
            cls.extra["sumsq"] = [None] * len(members)

    def _limiter_lists(self, cls):
        """The class limiter's lists: every member's ``||N||^2`` (``norms``, written by the
        middle step) and, with the fused limiter and the class's N consecutive in the
        workspace, their (count, ...) view ``Nstack`` (``_class_limit``)."""
        count, device = len(cls.members), cls.Ws[0].device
        norms = torch.zeros(count, dtype=torch.float32, device=device)
        cls.extra["norms"] = norms
        cls.extra["sumsq"] = list(norms.view(count, 1).unbind(0))
        fused = cls.extra["limiter"] is not implementation("norm_growth_limit",
                                                             "reference", device)
        stack = ops_grouped.stacked_view(cls.Ns)
        if fused and stack is not None:
            cls.extra["Nstack"] = stack

    def _class_step(self, cls, precision):
        """One class: K1 of every member (one grouped launch), the middle step (one
        multi-tensor K2 where the backend has it, else per member; K-FAC's whitening per
        class where it can), the limiter (per class where ``_class_limit`` applies, else per
        member), K3 (one grouped launch). The per-member scalars are computed once when the
        class's members share one group and one step (the common case)."""
        states = cls.extra["states"]
        ts = [st["step"] + 1 for st in states]
        for st, t in zip(states, ts):
            st["step"] = t
        groups = cls.extra["groups"]
        count = len(ts)
        one = groups[0] if cls.extra["one_group"] and ts.count(ts[0]) == count else None
        Rs = self._class_project(cls, self._class_grads(cls), precision)
        steps = self._class_middle(cls, Rs, groups, ts, one)
        limiter = cls.extra["limiter"]
        divisor = None
        if limiter is not None:
            limited = self._class_limit(cls, one)
            if torch.is_tensor(limited):     # the factors, for K3 to divide N by
                divisor = limited
            elif not limited:
                skip = self._skip_flag
                for N, m, on, sumsq in zip(cls.Ns, cls.members, cls.extra["limit"],
                                           cls.extra["sumsq"]):
                    if on:
                        if skip is None or "nl_prev" not in m.state:
                            self._limit(limiter, N, m.state, m.group, sumsq)
                        else:       # its memory keeps its bits when the step is skipped
                            run_unless(skip, [m.state["nl_prev"]], self._limit, limiter, N,
                                       m.state, m.group, sumsq)
        if one is not None:                  # one number for every member
            _, posts = ops.decay_coefficients(one["lr"], one["weight_decay"], "post")
            coefs = steps[0] * one["scale"]
        else:
            memo = {}
            coefs, posts = [], []
            for g, step_size in zip(groups, steps):
                c = memo.get((id(g), step_size))
                if c is None:
                    _, post = ops.decay_coefficients(g["lr"], g["weight_decay"], "post")
                    c = memo[(id(g), step_size)] = (step_size * g["scale"], post)
                coefs.append(c[0])
                posts.append(c[1])
        self._class_update(cls, coefs, posts, precision, divisor=divisor)

    def _class_limit(self, cls, one=None):
        """The limiter (B1) on the whole class at once, where every member has it on with one
        ``gamma``, already has its memory and K2 gave every ``||N||^2`` (``norms``): one
        bound grouped call (``kernels/norm_growth_limit.py``, no allocation) instead of two
        launches per matrix, each member getting the single kernel's bits; only where the
        limiter is that kernel. Where the class's K3 takes a divisor (Triton) the call
        computes the factors only (one launch) and returns them: K3 divides N as it reads it
        (``DIVIDE_N``, the same bits as N divided first); else it also divides N (a second
        launch) and returns True. False: the caller runs the op per member."""
        call = cls.extra.get("limit_call")
        if call is None:                     # bound once the memories exist, then kept
            stack = cls.extra.get("Nstack")
            states = cls.extra["states"]
            if stack is None or not all(cls.extra["limit"]) or \
                    not all("nl_prev" in st for st in states):
                return False
            from lowrank_fused.kernels.norm_growth_limit import BoundGroupedNormGrowthLimit

            call = cls.extra["limit_call"] = BoundGroupedNormGrowthLimit(
                stack, cls.extra["norms"], [st["nl_prev"] for st in states])
        gamma = self._class_gamma(cls, one)
        if gamma is None:
            return False
        fuse = self._class_k3(cls).takes_divisor
        call(gamma, skip=self._skip_flag, scale=not fuse)
        return call.f if fuse else True

    def _class_middle(self, cls, Rs, groups, ts, one=None):
        """K2 on the class: the moments advance, N is written into the class's workspace
        (with ``||N||^2`` for the limiter). Returns each member's step size. ``one``: the
        members' group when they share it and the step."""
        if one is not None:
            hyper = [(one["betas"][0], one["betas"][1], one["eps"])]
        else:
            hyper = per_member(groups, lambda g: (g["betas"][0], g["betas"][1], g["eps"]))
        Ms, Vs, Ns = cls.extra["Ms"], cls.extra["Vs"], cls.Ns
        where = cls.extra["where"]
        if where is not None:
            k2 = cls.extra.get("k2")
            if k2 is None:
                k2 = cls.extra["k2"] = ops_multi.BoundAdamMomentsMulti(
                    Rs, Ms, Vs, Ns, eps_mode="hf", backend=where)
            # one row for all (the scalars derived once) when the members share them
            rows = hyper[0] + (ts[0],) if one is not None else \
                [h + (t,) for h, t in zip(hyper, ts)]
            k2(rows, norms=cls.extra["norms"], skip=self._skip_flag)
        else:
            if one is not None:
                hyper = hyper * len(ts)
            for R, M, V, N, (a, b, e), t, sumsq in zip(Rs, Ms, Vs, Ns, hyper, ts,
                                                       cls.extra["sumsq"]):
                ops.adam_moments(R, M, V, N, beta1=a, beta2=b, eps=e, step=t, eps_mode="hf",
                                 sumsq=sumsq, backend=cls.backend, skip=self._skip_flag)
        if one is not None:
            b1, b2 = one["betas"]
            return [ops.hf_step_size(one["lr"], b1, b2, ts[0], one["bias_correction"])] * len(ts)
        memo = {}
        out = []
        for g, t in zip(groups, ts):
            v = memo.get((id(g), t))
            if v is None:
                b1, b2 = g["betas"]
                v = memo[(id(g), t)] = ops.hf_step_size(g["lr"], b1, b2, t, g["bias_correction"])
            out.append(v)
        return out

    # -- pieces the methods choose from ------------------------------------------------------
    def _update_basis(self, p, group, side, G, state, backend):
        raise NotImplementedError

    def _normalised_step(self, R, state, group, side, t, backend, want_sumsq=False, rows=None):
        """GaLore's K2 (docs/methods/galore.md): Adam moments on R, E-hf. Returns (N, step_size,
        sumsq): with ``want_sumsq`` (the limiter is on), ``sumsq`` is ``||N||^2`` (1-element fp32)
        from K2's own pass, so the limiter does not read N for its norm; else None.
        Elementwise: an FSDP2 shard's (``rows``) local moments need nothing more."""
        beta1, beta2 = group["betas"]
        M, V = state["exp_avg"], state["exp_avg_sq"]
        N = torch.empty_like(M)
        sumsq = torch.empty(1, dtype=torch.float32, device=R.device) if want_sumsq else None
        where = self._multi_where("adam_moments", backend, (R, M, V, N)) \
            if want_sumsq and self.multi_tensor else None
        if where is not None:
            # the op the engine's class step runs (its ||N||^2 is a reduction: another
            # implementation, e.g. auto's single-matrix kernel, may round it differently)
            ops_multi.adam_moments_multi([R], [M], [V], [N], beta1=beta1, beta2=beta2,
                                         eps=group["eps"], step=t, eps_mode="hf", norms=sumsq,
                                         backend=where)
        else:
            ops.adam_moments(R, M, V, N, beta1=beta1, beta2=beta2, eps=group["eps"], step=t,
                             eps_mode="hf", sumsq=sumsq, backend=backend)
        return N, ops.hf_step_size(group["lr"], beta1, beta2, t, group["bias_correction"]), sumsq

    def _init_moments(self, p, state, side, shape, rank, cap=None):
        """Zero moments at ``rank``; with a capacity rank ``cap``, at the start of buffers
        sized for it (``optim._capacity``)."""
        state["step"] = 0
        low = ops.low_rank_shape(shape, rank, side)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = _capacity.new_zeros(low, rank, cap, dtype=self._state_dtype(p),
                                             device=p.device)

    def _transport_moments(self, state, side, P_new, backend, cap=None, rows=None):
        """A4 through the K8 op: ``M <- C M``, ``V <- (C*C) V`` with C = P_new^T P_old
        (canonical left form; right-projected matrices pass transposed views). An FSDP2
        shard (``rows``) on the left holds its rows of both bases: C is their product summed
        over the ranks (r_new x r_old), then the moments (replicated) move as the op moves
        them; on the right the bases are whole and each rank moves its rows of the moments."""
        if rows is not None and side == "left":
            C = rows.sum_(P_new.float().t() @ state["basis"].float())
            M0, V0 = state["exp_avg"], state["exp_avg_sq"]
            M = (C @ M0.float()).to(M0.dtype)
            V = ((C * C) @ V0.float()).to(V0.dtype)
        else:
            impl = implementation("moment_transport", backend, P_new.device)
            M, V = impl(_canon(side, P_new), _canon(side, state["basis"]),
                        _canon(side, state["exp_avg"]), _canon(side, state["exp_avg_sq"]))
        rank = M.shape[0]
        for key, X in (("exp_avg", M), ("exp_avg_sq", V)):
            state[key] = _capacity.keep(state[key], X if side == "left" else X.t(), rank, cap)

    def _rank_capacity(self, group, shape, count):
        """The largest rank a matrix of ``shape`` in a group of ``count`` projected matrices
        can receive (what a capacity buffer holds): the group's rank for the uniform-rank
        methods."""
        return group["rank"]

    def _after_load(self):
        """With ``capacity_buffers``: the loaded (compact) bases and moments go back into
        buffers of their matrix's capacity."""
        if not self.capacity_buffers:
            return
        for group in self.param_groups:
            managed = self._managed(group)
            for p, (side, _, shape) in managed:
                state = self.state.get(p, {})
                if "basis" not in state or "rank" not in state:
                    continue
                cap = self._rank_capacity(group, shape, len(managed))
                for key in ("basis", "exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = _capacity.keep(state[key], state[key], state["rank"], cap)

    def ranks(self) -> List[List[int]]:
        """Current rank of every projected matrix, per rank group (None before its first step)."""
        return [[self.state[p].get("rank") for p, _ in self._managed(g)]
                for g in self.param_groups if "rank" in g]


# ---------------------------------------------------------------------------------------------

class AdaptiveAdamW(_SubspaceAdamW):
    """AdaptiveAdamW (docs/methods/adaptive_adamw.md): GaLore-AdamW with a global rank budget.

    Args:
        params: parameters or param groups. Groups holding ``rank`` are projected; ``rank`` is
            the budget unit: a group with L projected matrices shares ``B = rank * L`` ranks.
            Group keys (defaults from the constructor): ``update_proj_gap`` (200), ``scale``
            (0.25, ``--galore_scale``), ``proj_type`` (``"std"``), ``rank_metric``,
            ``nl_gamma``, ``combined_weight``.
        lr, betas, eps, weight_decay, bias_correction: as GaLore (E-hf, WD-post), defaults
            0.01, (0.9, 0.999), 1e-6, 0, True.
        rank_metric: allocation score, one of ``RANK_METRICS`` (default
            ``"explained_variance"``, ``s[r+1]^2/||G||^2``); see ``rank_scores``.
        nl_gamma: norm-growth limiter factor (default 1.01, Fira/APOLLO); None switches it off.
        combined_weight: w of the ``combined`` metric (default 0.5).
        max_rank: the largest rank one matrix can receive (group key; default None:
            ``min(m, n)``, r_max). Must be >= ``rank``.
        capacity_buffers: allocate each matrix's basis and moments once, for the largest rank
            it can receive (``min(m, n, max_rank, B - L + 1)``), and keep them as views of
            their first r elements, so rank changes at a refresh reuse the same memory (fixed
            addresses, no allocation; ``optim._capacity``). Default False: they are
            reallocated at each refresh for the new ranks (the least memory). Without
            ``max_rank`` a capacity can be ``min(m, n)``: set both.
        backend, nonfinite, faithful_dtypes, sign_canon, matmul_precision: the options every
            method shares (``LowRankOptimizer``, docs/conventions.md).
        projector, proj_oversample, proj_power_iters: as ``GaLoreAdamW``. With
            ``"randomized"`` a refresh runs one batched randomized SVD per distinct matrix shape
            (and side) of the group, with k = the largest rank a matrix can receive
            (``min(min(m, n), B - L + 1)``); its k singular values feed the allocation (the
            energy ``E`` of the scores stays the exact ``||G||_F^2``) and its first r_l
            vectors are the new bases. ``"svd"`` (default): per-matrix ``svdvals`` + SVD.

    Every ``update_proj_gap`` steps of a group (its counter ``pool_step``, checked before the
    increment), all its projected matrices are refreshed together (phase A): singular
    values of every gradient, greedy allocation from rank 1 per matrix with r_max = min(m, n),
    top-r_l singular bases, moment transport across the change of basis and rank, and the
    limiter memory rescaled by ``sqrt(r_new/r_old)``. All projected matrices of a group need a
    gradient at a refresh step (use zeros for an unused layer). Between refreshes each matrix
    takes GaLore's step with the limiter on the normalised step (phase B). Matrices with
    ``rank >= min(m, n)`` and 1-D parameters get the dense HF AdamW step (the size guard), outside
    the budget.

    The step runs on the engine (docs/engine.md), as GaLore's does, for all four classes
    (``RSAdamW``, ``GHAAdamW`` and ``GaLoreKFACAdamW`` too): the matrices of one class (side,
    current rank, shape, dtypes, layout; adaptive ranks make more classes than shapes) take
    one grouped K1, one multi-tensor K2 with every ``||N||^2`` as a side output (K-FAC's
    whitening: one call per matrix), the limiter (once per class on the stacked N where
    the fused limiter and K2's norms allow, ``_class_limit``) and one grouped K3; the dense
    parameters one multi-tensor AdamW call. A basis update that replaces a state tensor or
    changes a rank rebuilds the classes. The result equals the per-matrix step bit for bit on
    the CPU (``opt.engine = False`` runs that; per-layer mode always does).
    """

    CAPTURABLE = True       # a steady step is bound calls only (docs/engine.md)

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, *, rank_metric="explained_variance", nl_gamma=1.01,
                 combined_weight=0.5, update_proj_gap=200, scale=0.25, max_rank=None,
                 capacity_buffers=False, projector="svd", proj_oversample=8,
                 proj_power_iters=2, **options):
        family = dict(update_proj_gap=update_proj_gap, scale=scale, rank_metric=rank_metric,
                      nl_gamma=nl_gamma, combined_weight=combined_weight, max_rank=max_rank,
                      pool_step=0)
        _check_adaptive_keys(family)
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction, family=family,
                         capacity_buffers=capacity_buffers, projector=projector,
                         proj_oversample=proj_oversample, proj_power_iters=proj_power_iters,
                         **options)

    def _check_family(self, group):
        super()._check_family(group)
        _check_adaptive_keys(group)
        if group.get("max_rank") is not None and group["max_rank"] < group["rank"]:
            raise ValueError(f"max_rank must be >= rank (the budget unit: a group of L "
                             f"matrices shares rank * L), got max_rank={group['max_rank']} "
                             f"with rank={group['rank']}")

    def _rank_capacity(self, group, shape, count):
        """r_max of a matrix: ``min(m, n)``, at most ``max_rank``, and never more than a
        budget of ``rank * L`` can give one matrix of L (``B - L + 1``, the rest at 1)."""
        cap = min(min(shape), group["rank"] * count - count + 1)
        return cap if group.get("max_rank") is None else min(cap, group["max_rank"])

    def _basis_due(self, group, state) -> bool:
        return "basis" not in state       # (an error: the joint refresh runs before)

    def _refresh_pending(self, plan) -> bool:
        """A group's joint refresh (its ``pool_step``, before the increment) or a missing
        basis."""
        if not self._bases_exist(plan):
            return True
        return any(group["pool_step"] % group["update_proj_gap"] == 0
                   for group, _ in self._routed_by_group(plan))

    def nonfinite_check(self):
        """As the base's, and a step skipped on the device also takes back its advance of
        the groups' ``pool_step`` (the refresh schedule is as if it had not run)."""
        advanced = self.__dict__.pop("_pool_advanced", None)
        pending = "_pending_nonfinite" in self.__dict__
        counts = (self.skipped_steps, self.step_calls)
        try:
            super().nonfinite_check()
        finally:
            if pending and advanced and counts != (self.skipped_steps, self.step_calls):
                for group in advanced:
                    group["pool_step"] -= 1

    def _update_basis(self, p, group, side, G, state, backend):
        if "basis" not in state:   # only reachable if a refresh was skipped: a bug
            raise RuntimeError("AdaptiveAdamW: projected matrix has no basis (refresh missed)")

    # -- phase A ------------------------------------------------------------------------------
    def _refresh_due(self, group, managed):
        return (any(p.grad is not None for p, _ in managed)
                and group["pool_step"] % group["update_proj_gap"] == 0)

    def _check_grads(self):
        for group in self.param_groups:
            if "rank" not in group or group["pool_step"] % group["update_proj_gap"]:
                continue                      # no refresh: nothing to check
            managed = self._managed(group)
            if not managed or not self._refresh_due(group, managed):
                continue
            for p, _ in managed:
                if p.grad is None:
                    raise ValueError(
                        f"AdaptiveAdamW refreshes all projected matrices of a group together "
                        f"(pool_step {group['pool_step']} is a multiple of update_proj_gap); "
                        f"{self.param_label(p)} has no gradient (give unused "
                        f"layers a zero gradient)")
                self._require_finite(p, "on a rank-allocation step")

    def _before_updates(self):
        for group in self.param_groups:
            if "rank" not in group:
                continue
            if group["pool_step"] % group["update_proj_gap"] == 0:
                managed = self._managed(group)
                if not managed or not any(p.grad is not None for p, _ in managed):
                    continue
                self._refresh(group, managed)
            elif not any(p.grad is not None and self._plan(p, group) is not None
                         for p in group["params"]):
                continue                      # (stops at the first projected gradient)
            group["pool_step"] += 1
            if self._skip_flag is not None:   # taken back if the step turns out skipped
                self.__dict__.setdefault("_pool_advanced", []).append(group)

    def _per_layer_defers(self):
        """A refresh allocates ranks over all matrices of a group: defer such steps."""
        return any(self._managed(g) and g["pool_step"] % g["update_proj_gap"] == 0
                   for g in self.param_groups)

    def _per_layer_before(self):
        pass                                  # the group counters advance in _after_per_layer

    def _after_per_layer(self, stepped):
        ids = {id(p) for p in stepped}
        for group in self.param_groups:
            if any(id(p) in ids for p, _ in self._managed(group)):
                group["pool_step"] += 1

    def _refresh(self, group, managed):
        if any(is_sharded(p) for p, _ in managed):
            return self._refresh_sharded(group, managed)
        if group.get("projector", "svd") == "randomized":
            return self._refresh_randomized(group, managed)
        grads = [self._as_matrix(p, plan[2])[1] for p, plan in managed]
        # A1: spectra, in fp32, one matrix at a time
        try:
            spectra = [torch.linalg.svdvals(G.float()) for G in grads]
            bad = next((p for s, (p, _) in zip(spectra, managed)
                        if not bool(torch.isfinite(s).all())), None)
            reason = "torch.linalg.svdvals returned non-finite values"
        except RuntimeError as e:             # torch.linalg.LinAlgError is a RuntimeError
            bad, reason = managed[0][0], f"torch.linalg.svdvals failed ({str(e)[:120]})"
        if bad is not None:                   # spectra and bases from the randomized path
            warnings.warn(f"rank allocation of {self.param_label(bad)}'s group: {reason}; "
                          "using the randomized SVD for this refresh", RefreshFallbackWarning)
            return self._refresh_randomized(group, managed)
        # A2: greedy allocation of B = rank * L from r = 1, r_max = min(m, n) (or max_rank)
        caps = [self._rank_capacity(group, plan[2], len(managed)) for _, plan in managed]
        ranks = allocate_ranks([s.cpu() for s in spectra], group["rank"] * len(managed),
                               group["rank_metric"], r_max=caps,
                               combined_weight=float(group["combined_weight"]))
        # A3: new bases, all computed before any state changes
        bases = [canonical_svd_basis(G, r, plan[0], self.sign_canon, label=self.param_label(p),
                                     previous=self.state[p].get("basis"))
                 for G, r, (p, plan) in zip(grads, ranks, managed)]
        for (p, (side, _, shape)), r_new, P_new, cap in zip(managed, ranks, bases, caps):
            self._change_basis(p, side, shape, P_new, r_new, cap)

    def _change_basis(self, p, side, shape, P_new, r_new, cap):
        """A4, A5 for one matrix: moments transported to the new basis and rank (or created),
        the limiter memory rescaled, the basis stored (in buffers for rank ``cap`` with
        ``capacity_buffers``)."""
        cap = cap if self.capacity_buffers else None
        state = self.state[p]
        self._state_replaced = True       # the engine's classes are rebuilt
        P_new = P_new.to(self._state_dtype(p))
        rows = sharded.rows_of(p)
        if rows is not None:              # FSDP2: the moments of this rank's rows
            shape = (rows.stop - rows.start, shape[1])
        if "basis" in state:
            self._transport_moments(state, side, P_new, self.backend, cap, rows)
            if "nl_prev" in state:
                state["nl_prev"].mul_(math.sqrt(r_new / state["rank"]))
        else:
            self._init_moments(p, state, side, shape, r_new, cap)
        state["basis"] = _capacity.keep(state.get("basis"), P_new, r_new, cap)
        state["rank"] = r_new

    def _refresh_sharded(self, group, managed):
        """Phase A with FSDP2 shards in the group (docs/methods/adaptive_adamw.md, "Under
        FSDP2"): per matrix the top ``cap`` singular values and vectors (``cap`` = the largest
        rank it can receive) from ``lowrank_fused.sharded``, without gathering the gradient:
        ``projector="svd"`` the exact SVD through the all-reduced Gram of the unsharded
        dimension where that Gram is small (``sharded.gram_is_small``), else (and with
        ``"randomized"``) the randomized SVD over the shards, seeded by ``pool_step`` as the
        one-process refresh. The spectra (replicated: every rank allocates the same ranks)
        end with the residual energy ``sqrt(||G||^2 - sum S^2)`` as one more value, so the
        scores see the exact ``E = ||G||_F^2``; the allocation is the one-process one. A
        matrix that is not sharded takes the one-process computation."""
        L = len(managed)
        randomized = group.get("projector", "svd") == "randomized"
        over, iters = group["proj_oversample"], group["proj_power_iters"]
        seed = group["pool_step"]
        grads, spectra, vecs, caps = [], [], [], []
        for p, (side, _, shape) in managed:
            G = self._as_matrix(p, shape)[1]
            rows = sharded.rows_of(p)
            cap = self._rank_capacity(group, shape, L)
            B = E = None
            if rows is None:
                if randomized:
                    A = G.float() if side == "left" else G.float().t()
                    U, S, _ = randomized_svd(A, cap, oversample=over, power_iters=iters,
                                             seed=seed, sign_canon=self.sign_canon,
                                             compute_v=False, check_finite=True)
                    B, E = (U if side == "left" else U.t()), A.pow(2).sum()
                else:
                    S = torch.linalg.svdvals(G.float())
            else:
                if not randomized and sharded.gram_is_small(shape, cap, over, iters):
                    B, S = sharded.exact_svd(G, cap, side, rows, sign_canon=self.sign_canon,
                                             label=self.param_label(p))
                else:
                    if not randomized:
                        sharded.warn_randomized_refresh(self, self.param_label(p), shape,
                                                        over, iters)
                    B, S = sharded.randomized_svd(G, cap, side, rows, oversample=over,
                                                  power_iters=iters, seed=seed,
                                                  sign_canon=self.sign_canon,
                                                  label=self.param_label(p))
                E = rows.sum_sq(G)
            S = S.float().reshape(-1)
            if E is not None:
                tail = (E.float() - S.pow(2).sum()).clamp_min(0).sqrt()
                S = torch.cat([S, tail.reshape(1)])
            grads.append(G)
            spectra.append(S.cpu())
            vecs.append(B)
            caps.append(cap)
        ranks = allocate_ranks(spectra, group["rank"] * L, group["rank_metric"], r_max=caps,
                               combined_weight=float(group["combined_weight"]))
        bases = []
        for G, r_new, B, (p, (side, _, _)) in zip(grads, ranks, vecs, managed):
            if B is None:
                bases.append(canonical_svd_basis(G, r_new, side, self.sign_canon,
                                                 label=self.param_label(p),
                                                 previous=self.state[p].get("basis")))
            else:
                bases.append((B[:, :r_new] if side == "left" else B[:r_new]).contiguous())
        for (p, (side, _, shape)), r_new, P_new, cap in zip(managed, ranks, bases, caps):
            self._change_basis(p, side, shape, P_new, r_new, cap)

    def _refresh_randomized(self, group, managed):
        """Phase A from batched randomized SVDs: one call per (shape, side) of the group."""
        grads = [self._as_matrix(p, plan[2])[1] for p, plan in managed]
        L = len(managed)
        budget = group["rank"] * L
        buckets = {}
        for i, (G, (p, (side, _, shape))) in enumerate(zip(grads, managed)):
            buckets.setdefault((tuple(G.shape), side, G.device), []).append(i)
        spectra, vecs = [None] * L, [None] * L
        for (shape, side, _), idx in buckets.items():
            k = self._rank_capacity(group, shape, L)
            A = torch.stack([grads[i].float() for i in idx])
            A = A if side == "left" else A.transpose(-1, -2)
            U, S, _ = randomized_svd(A, k, oversample=group["proj_oversample"],
                                     power_iters=group["proj_power_iters"],
                                     seed=group["pool_step"], sign_canon=self.sign_canon,
                                     compute_v=False)
            tail = (A.pow(2).sum(dim=(-2, -1)) - S.pow(2).sum(-1)).clamp_min(0).sqrt()
            for j, i in enumerate(idx):
                # the residual energy as one more "singular value" keeps E = ||G||_F^2 in the
                # scores; the cap k below keeps it out of the candidates
                spectra[i] = torch.cat([S[j], tail[j:j + 1]]).cpu()
                vecs[i] = U[j]
        for i, (p, (side, _, _)) in enumerate(managed):
            if not (bool(torch.isfinite(spectra[i]).all()) and bool(torch.isfinite(vecs[i]).all())):
                B = fallback_basis(grads[i], vecs[i].shape[1], side, self.sign_canon,
                                   label=self.param_label(p),
                                   reason="the randomized SVD returned non-finite values")
                vecs[i] = B if side == "left" else B.t()
                spectra[i] = torch.zeros_like(spectra[i])   # the layer gets the minimum rank
        caps = [int(s.numel()) - 1 for s in spectra]
        ranks = allocate_ranks(spectra, budget, group["rank_metric"], r_max=caps,
                               combined_weight=float(group["combined_weight"]))
        for i, ((p, (side, _, shape)), r_new) in enumerate(zip(managed, ranks)):
            U = vecs[i][:, :r_new].contiguous()
            P_new = U if side == "left" else U.t().contiguous()
            self._change_basis(p, side, shape, P_new, r_new, caps[i])


def _check_adaptive_keys(d):
    if d["rank_metric"] not in RANK_METRICS:
        raise ValueError(f"rank_metric must be one of {RANK_METRICS}, got {d['rank_metric']!r}")
    if d["nl_gamma"] is not None:
        check_number("nl_gamma", d["nl_gamma"], low=1.0)
    check_number("combined_weight", d["combined_weight"], low=0.0, high=1.0)
    check_number("scale", d["scale"])
    if d.get("max_rank") is not None and not _is_int(d["max_rank"], 1):
        raise ValueError(f"max_rank must be None or an int >= 1, got {d['max_rank']!r}")
    for key, low in (("update_proj_gap", 1), ("pool_step", 0)):
        if not _is_int(d[key], low):
            raise ValueError(f"{key} must be an int >= {low}, got {d[key]!r}")


def _check_uniform_keys(d):
    if d["nl_gamma"] is not None:
        check_number("nl_gamma", d["nl_gamma"], low=1.0)
    check_number("scale", d["scale"])
    if not _is_int(d["update_proj_gap"], 1):
        raise ValueError(f"update_proj_gap must be an int >= 1, got {d['update_proj_gap']!r}")


# ---------------------------------------------------------------------------------------------

class RSAdamW(_SubspaceAdamW):
    """rsadamw, "random subspace drift" (docs/methods/adaptive_adamw.md, a reconstruction):
    GaLore without SVD, uniform rank.

    At a refresh (``k % update_proj_gap == 0``, per matrix) the basis moves to
    ``orth(sqrt(1 - sigma^2) * P_old + sigma * Z)`` with ``Z_ij ~ N(0, 1/m)``; the first basis
    is ``orth(Z)``. ``sigma`` = 1 (default) draws a fresh random subspace at every refresh
    (GoLore-style); ``sigma`` < 1 drifts. Moments are transported as in A4. Z is drawn on
    the CPU from a generator seeded by (``seed``, the parameter's index in the optimizer, k),
    so runs and resumed runs are reproducible. Other arguments as ``AdaptiveAdamW``.
    """

    CAPTURABLE = True       # a steady step is bound calls only (docs/engine.md)

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, *, sigma=1.0, seed=0, nl_gamma=1.01, update_proj_gap=200,
                 scale=0.25, **options):
        family = dict(update_proj_gap=update_proj_gap, scale=scale, nl_gamma=nl_gamma,
                      sigma=sigma, seed=seed)
        self._check_rs(family)
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction, family=family,
                         **options)

    @staticmethod
    def _check_rs(d):
        _check_uniform_keys(d)
        check_number("sigma", d["sigma"], low=0.0, high=1.0)
        if not _is_int(d["seed"], 0):
            raise ValueError(f"seed must be an int >= 0, got {d['seed']!r}")

    def _check_family(self, group):
        self._check_rs(group)

    def _method_ops(self, group):
        return super()._method_ops(group) + ("subspace_drift",)

    _basis_due = _SubspaceAdamW._refresh_basis_due

    def _update_basis(self, p, group, side, G, state, backend):
        k = state.get("step", 0)
        if "basis" in state and k % group["update_proj_gap"] != 0:
            return
        split = sharded.rows_of(p)
        # FSDP2 on the left: every rank draws the whole m x r Z and drifts the whole basis
        # (its rows gathered: thin), then keeps its rows; on the right the basis is whole
        shard_left = split is not None and side == "left"
        rows = split.m if shard_left else G.shape[0] if side == "left" else G.shape[1]
        rank = group["rank"]
        index = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"])
                     if q is p)
        gen = torch.Generator(device="cpu").manual_seed(_mix_seed(group["seed"], index, k))
        Z = (torch.randn(rows, rank, generator=gen) / math.sqrt(rows)).to(p.device)
        old = _canon(side, state["basis"]) if "basis" in state else None
        if shard_left and old is not None:
            old = split.gather(old)
        P_new = implementation("subspace_drift", backend, p.device)(
            old, Z, sigma=float(group["sigma"]), sign_canon=self.sign_canon)
        P_new = _uncanon(side, P_new).to(self._state_dtype(p))
        if shard_left:
            if "basis" in state:        # C = P_new^T P_old from the whole bases (no sum)
                M, V = implementation("moment_transport", backend, p.device)(
                    P_new, old.to(P_new.dtype), state["exp_avg"], state["exp_avg_sq"])
                state["exp_avg"], state["exp_avg_sq"] = M.contiguous(), V.contiguous()
            else:
                self._init_moments(p, state, side, (G.shape[0], G.shape[1]), rank)
            state["basis"] = split.local(P_new).contiguous()
            state["rank"] = rank
            return
        if "basis" in state:
            self._transport_moments(state, side, P_new, backend)
        else:
            self._init_moments(p, state, side, (G.shape[0], G.shape[1]), rank)
        state["basis"] = P_new
        state["rank"] = rank


class _GHABatch:
    """GHAAdamW's per-step basis update and moment transport for a batch of same-shape
    matrices (a class of the engine, or one matrix on the per-matrix step: both run this, so
    they are equal bit for bit), canonical left form (G m x n, P m x r, moments r x n)::

        Y^T = P^T G and colsum(G^2)      one grouped K1 with its sum-of-squares side output
        GY  = G Y                        one grouped K1 on the right, with Y^T as the basis
        P_new = orth(P + eta*(GY/||G||^2 - P triu(Y^T Y/||G||^2)))
        C = P_new^T P ;  M <- C M ;  V <- (C*C) V

    (``reference/gha_update.py`` and ``reference/moment_transport.py`` per matrix). Where the
    K1 run on Triton (and the stored dtypes are fp32, bf16 or fp16), everything after them is
    ``kernels/gha_batch.py``'s launches over the whole batch: the GEMMs on
    ``batched_matmul``, ``orth`` as CholeskyQR2 (``small_cholesky_inverse``), the elementwise
    steps fused; no loop over the members and one torch op. Elsewhere (the reference backend,
    ``kernels=False``) the same update is batched torch ops with a Householder QR (``orth``);
    the two agree to fp32 rounding.

    A zero or non-finite gradient keeps P (the moments still move by ``C = P^T P``, as the
    per-matrix ops do); on the Triton path so does a Z whose Gram cannot be factored in fp32
    (docs/methods/adaptive_adamw.md). With the step's on-device ``skip`` flag set, P, M and V
    keep their bits. Buffers: the old bases, Y^T, colsum(G^2), G Y and every other
    intermediate, laid out once (``_buffers``); on the engine they are views of its shared
    workspace (``workspace``: dead between the class's steps, and the update ends before the
    class's K1 writes its R and K2 its N there), so a steady call allocates nothing; else
    allocated with the batch."""

    def __init__(self, Gs, Ps, Ms, Vs, backend, bound, workspace=None, stacks=None,
                 kernels=True):
        count = len(Ps)
        m, r = Ps[0].shape
        n = Gs[0].shape[1]
        dev = Ps[0].device
        self.Ps, self.Ms, self.Vs = list(Ps), list(Ms), list(Vs)
        # (count, ...) canonical views of the members' P, M and V where their state lives in
        # one block per key (``_stack_class_state``): read and written whole, not gathered
        # and scattered per member
        self.stacks = stacks
        self.dtype = Ps[0].dtype
        kernels = kernels and self._kernels_apply(backend, dev)
        self.b = b = self._buffers(count, m, r, n, dev, workspace, stacks is not None, kernels)
        self.pf, self.Y, self.cs, self.GY = b["pf"], b["Y"], b["cs"], b["GY"]   # Y is Y^T
        self.pfs = list(self.pf.unbind(0))
        Ys, GYs = list(self.Y.unbind(0)), list(self.GY.unbind(0))
        if bound:          # the engine: checked and resolved once per plan
            self.k1a = ops_grouped.BoundGroupedProject(Gs, self.pfs, Ys, backend=backend)
            self.k1b = ops_grouped.BoundGroupedProject(Gs, Ys, GYs, side="right",
                                                       backend=backend)
        else:
            self.k1a = lambda Gs, **kw: ops_grouped.grouped_project(
                Gs, self.pfs, Ys, backend=backend, **kw)
            self.k1b = lambda Gs, **kw: ops_grouped.grouped_project(
                Gs, Ys, GYs, side="right", backend=backend, **kw)
        self.kernels = self._bind_kernels(backend, dev) if kernels else None

    def _kernels_apply(self, backend, dev) -> bool:
        """Whether the update runs on ``kernels/gha_batch.py``: the K1 run on Triton and every
        stored dtype is one the kernels take."""
        from lowrank_fused.dispatch import resolve_call

        if resolve_call("grouped_project", backend, dev)[0] != "triton":
            return False
        from lowrank_fused.kernels.gha_batch import STATE_DTYPES

        return all(X[0].dtype in STATE_DTYPES for X in (self.Ps, self.Ms, self.Vs))

    def _bind_kernels(self, backend, dev):
        """The update after the K1 as Triton launches on the batch's buffers
        (``kernels/gha_batch.py``); None: the torch ops."""
        from lowrank_fused.kernels.gha_batch import BoundGHABatch

        b, stacks = self.b, self.stacks
        if stacks is not None:
            olds = dsts = stacks
        else:
            olds = (b["Pst"], b["M"], b["V"])
            dsts = (b["Pn"], b["Mnew"], b["Vnew"])
        return BoundGHABatch(
            Y=b["Y"], cs=b["cs"], g2=b["g2"], H=b["H"], ok=b["ok"], g2s=b["g2s"], T=b["T"],
            GY=b["GY"], PH=b["PH"], pf=b["pf"], Z=b["Z"], W=b["W"], L1=b["L1"], L2=b["L2"],
            qok1=b["qok1"], qok2=b["qok2"], Q1=b["Q1"], Q=b["Q"], Pnf=b["Pnf"], C=b["C"],
            C2=b["C2"], P_old=olds[0], P_dst=dsts[0], Mn=b["Mnew_f"], M_old=olds[1],
            M_dst=dsts[1], Vn=b["Vnew_f"], V_old=olds[2], V_dst=dsts[2])

    def _buffers(self, count, m, r, n, dev, workspace, stacked=False, kernels=False):
        """Every intermediate of the update, laid out once (a class's call every step then
        allocates nothing: each is written with ``out=`` or in place). Per dtype one flat
        block, from the engine's shared workspace where given (dead between the class's
        steps, like its R and N), else allocated; the bool masks and two constants are the
        instance's own. The lists of stacked members are unbound once."""
        f32 = torch.float32
        mdt, vdt, pdt = self.Ms[0].dtype, self.Vs[0].dtype, self.dtype
        specs = [("pf", (count, m, r), f32), ("Y", (count, r, n), f32), ("cs", (count, n), f32),
                 ("GY", (count, m, r), f32), ("g2", (count, 1, 1), f32),
                 ("g2s", (count, 1, 1), f32)]
        specs += [(k, (count, r, r), f32) for k in ("H", "T", "Rq", "C", "C2")]
        specs += [(k, (count, m, r), f32) for k in ("PH", "Z", "Q")]
        if kernels:        # the Triton path's CholeskyQR2: the Gram, the inverse factors, Q1
            specs += [(k, (count, r, r), f32) for k in ("W", "L1", "L2")]
            specs += [("Q1", (count, m, r), f32)]
        specs += [("sign", (count, r), f32)]
        if pdt != f32:     # P_new in the basis dtype, its fp32 form, the old bases' stack
            specs += [("Pn", (count, m, r), pdt), ("Pnf", (count, m, r), f32)]
            specs += [] if stacked else [("Pst", (count, m, r), pdt)]
        for key, dt in (("M", mdt), ("V", vdt)):
            # (with the state in blocks, the moments are read where they are stored)
            specs += [] if stacked else [(key, (count, r, n), dt)]
            specs += [(key + "new_f", (count, r, n), f32)]
            if dt != f32:
                specs += [(key + "f", (count, r, n), f32), (key + "new", (count, r, n), dt)]
        b = {}
        for dt in dict.fromkeys(dt for _, _, dt in specs):
            mine = [(k, sh) for k, sh, d in specs if d == dt]
            # each part 64-byte aligned, as a fresh allocation: torch's CPU GEMMs may round
            # differently at other alignments (the batch of one of the per-matrix step and
            # a class's batch then give the same bits)
            unit = 64 // torch.empty((), dtype=dt).element_size()
            sizes = [-(-math.prod(sh) // unit) * unit for _, sh in mine]
            if workspace is not None:
                flat = workspace.views(dt, dev, (sum(sizes),), 1)[0]
            else:
                flat = torch.empty(sum(sizes), dtype=dt, device=dev)
            for (k, sh), part in zip(mine, flat.split(sizes)):
                b[k] = part[:math.prod(sh)].view(sh)
        if pdt == f32:
            b["Pn"] = b["Pnf"] = b["Q"]
            b["Pst"] = b["pf"]
        for key, dt in (("M", mdt), ("V", vdt)):
            if dt == f32:
                b[key + "f"], b[key + "new"] = b.get(key), b[key + "new_f"]
            b[key + "news"] = list(b[key + "new"].unbind(0))
        b["Pns"] = list(b["Pn"].unbind(0))
        for k, sh in (("ok", (count, 1, 1)), ("fin", (count, 1, 1)), ("neg", (count, r))):
            b[k] = torch.empty(sh, dtype=torch.bool, device=dev)
        for k in ("qok1", "qok2"):
            b[k] = torch.empty(count, dtype=torch.int32, device=dev)
        b["one"] = torch.ones((), dtype=f32, device=dev)
        b["minus"] = torch.full((), -1.0, dtype=f32, device=dev)
        return b

    def __call__(self, Gs, eta, sign_canon, skip=None, layout_token=None, precision="ieee"):
        """``precision``: the two K1's operand precision (the optimizer's, as its own K1 and
        K3 take: docs/precision.md); the tensor-core modes' tiles cover a rank of up to 128 in
        one rank tile, so each K1 reads G once, where the FMA tiles (``ieee``) read it once
        per 32 ranks. On the Triton path the other GEMMs take ``ieee`` where it is ``ieee``,
        else ``tf32x3`` (fp32-accurate, for the QR's Gram)."""
        pf, b, stacks = self.pf, self.b, self.stacks
        if stacks is not None:               # the old bases, whole (rounded up to fp32)
            Pst = stacks[0]
            pf.copy_(Pst)
        else:
            Pst = b["Pst"]                   # the old bases in their dtype
            torch.stack(self.Ps, out=Pst)   # one op (a multi-tensor copy is one per member)
            if Pst is not pf:
                pf.copy_(Pst)
        token = {} if layout_token is None else {"layout_token": layout_token}
        self.k1a(Gs, sumsq=self.cs, precision=precision, **token)
        self.k1b(Gs, precision=precision, **token)
        if stacks is None:                   # the moments, gathered
            for key, lst in (("M", self.Ms), ("V", self.Vs)):
                torch.stack(lst, out=b[key])
        if self.kernels is not None:
            self.kernels(eta, skip, precision)
        else:
            self._torch_update(eta, sign_canon, skip, Pst)
        if stacks is not None:
            return
        torch._foreach_copy_(self.Ms, b["Mnews"])
        torch._foreach_copy_(self.Vs, b["Vnews"])
        torch._foreach_copy_(self.Ps, b["Pns"])

    def _torch_update(self, eta, sign_canon, skip, Pst):
        """The update after the K1 as batched torch ops (the reference backend's path)."""
        pf, Y, b, stacks = self.pf, self.Y, self.b, self.stacks
        g2, ok, fin = b["g2"], b["ok"], b["fin"]
        torch.sum(self.cs, dim=1, out=g2.view(-1))
        torch.gt(g2, 0, out=ok)             # ok: g2 > 0 and finite (g2 is a sum of squares)
        torch.lt(g2, math.inf, out=fin)
        ok.logical_and_(fin)
        torch.where(ok, g2, b["one"], out=g2)
        H, T, PH, Z = b["H"], b["T"], b["PH"], b["Z"]
        torch.bmm(Y, Y.transpose(1, 2), out=H)
        H.div_(g2)
        torch.triu(H, out=T)
        torch.bmm(pf, T, out=PH)
        torch.sub(self.GY.div_(g2), PH, out=Z)
        Z.mul_(eta).add_(pf)                 # pf + eta*(GY/g2 - P triu(H))
        torch.where(ok, Z, pf, out=Z)
        Q = b["Q"]
        torch.linalg.qr(Z, out=(Q, b["Rq"]))
        Pn = b["Pn"]
        if sign_canon:                       # orth (lowrank_fused.linalg): diag(R) >= 0
            torch.lt(torch.diagonal(b["Rq"], dim1=-2, dim2=-1), 0, out=b["neg"])
            torch.where(b["neg"], b["minus"], b["one"], out=b["sign"])
            Q.mul_(b["sign"].unsqueeze(-2))
        torch.where(ok, Q, pf, out=Q)
        if Pn is not Q:
            Pn.copy_(Q)                      # rounded once to the basis dtype
            b["Pnf"].copy_(Pn)
        # the transport (reference/moment_transport.py on the stored, rounded P_new)
        C = b["C"]
        torch.bmm(b["Pnf"].transpose(1, 2), pf, out=C)
        torch.mul(C, C, out=b["C2"])
        for i, (key, Cm) in enumerate((("M", C), ("V", b["C2"]))):
            new_f, new = b[key + "new_f"], b[key + "new"]
            X = stacks[1 + i] if stacks is not None else b[key]
            Xf = X if X.dtype == torch.float32 else b[key + "f"]
            if Xf is not X:
                Xf.copy_(X)
            torch.bmm(Cm, Xf, out=new_f)
            if new is not new_f:
                new.copy_(new_f)
            if skip is not None:
                torch.where(skip, X, new, out=new)
            if stacks is not None:
                X.copy_(new)
        if skip is not None:
            torch.where(skip, Pst, Pn, out=Pn)
        if stacks is not None:
            Pst.copy_(Pn)


def _gha_sharded(G, state, side, rows, eta, sign_canon, precision="ieee"):
    """``_GHABatch``'s update of one FSDP2 shard (this rank's rows of G), in place on the
    state: the products that run over the sharded rows are summed over the ranks, in one
    all-reduce per step. Left (P: this rank's m_i x r rows; M, V replicated r x n):
    ``Y^T = P^T G`` (r x n) and ``||G||^2``; then the m x r update Z is orthonormalised by
    the sign-canonical QR without gathering it: ``R^T R = Z^T Z`` (Cholesky of the fp64
    Gram, all-reduced together with ``Z^T P``, 2r x r), this rank's rows ``Z R^-1`` and
    ``C = P_new^T P = R^-T Z^T P`` (with ``sign_canon=False``, or a Gram Cholesky cannot
    factor, or a basis dtype other than fp32 for C, the update is gathered (thin) for the
    one-process QR and C summed, r x r). Right (P whole, r x n; M, V this rank's m_i x r rows): ``G^T Y`` (n x r),
    ``Y^T Y`` (r x r) and ``||G||^2``; the rest is replicated, and each rank moves its rows
    of the moments. A zero or non-finite gradient keeps P (as the one-process update).
    The two products over G take ``precision`` (the one-process update's K1)."""
    P = state["basis"]
    Pf, Gf = P.float(), G.float()
    r = Pf.shape[1] if side == "left" else Pf.shape[0]
    if side == "left":
        Yt = precise_matmul(Pf.t(), Gf, precision)                 # (r, n), this rank's part
        buf = rows.sum_(torch.cat([Yt.reshape(-1), Gf.square().sum().reshape(1)]))
        Yt, g2 = buf[:-1].view(Yt.shape), buf[-1]
        P0 = Pf                                                    # (m_i, r)
        GY = precise_matmul(Gf, Yt.t(), precision)                 # (m_i, r), local
        H = Yt @ Yt.t()
    else:
        Yt = precise_matmul(Pf, Gf.t(), precision)                 # (r, m_i), local
        n = Gf.shape[1]
        buf = rows.sum_(torch.cat([precise_matmul(Gf.t(), Yt.t(), precision).reshape(-1),
                                   (Yt @ Yt.t()).reshape(-1),
                                   Gf.square().sum().reshape(1)]))
        GY, H, g2 = buf[:n * r].view(n, r), buf[n * r:-1].view(r, r), buf[-1]
        P0 = Pf.t()                                                # (n, r), whole
    ok = (g2 > 0) & (g2 < math.inf)
    g2 = torch.where(ok, g2, torch.ones_like(g2))
    Z = (GY / g2 - P0 @ torch.triu(H / g2)) * eta + P0
    Z = torch.where(ok, Z, P0)
    Q = C = None
    if side == "left" and sign_canon:
        # orth (diag(R) > 0) is the Cholesky QR: Z = Q R with R^T R = Z^T Z
        Zd, Pd = Z.double(), P0.double()
        grams = rows.sum_(torch.cat([Zd.t() @ Zd, Zd.t() @ Pd]))
        L, info = torch.linalg.cholesky_ex(grams[:r])
        if int(info) == 0:                           # (replicated: every rank agrees)
            Q = torch.linalg.solve_triangular(L, Zd.t(), upper=False).t().float()
            if P.dtype == torch.float32:             # C = Q^T P = R^-T Z^T P
                C = torch.where(ok, torch.linalg.solve_triangular(L, grams[r:], upper=False),
                                grams[r:]).float()
    if Q is None and side == "left":
        Zw = rows.gather(Z)
        Q = rows.local(orth(Zw) if sign_canon else torch.linalg.qr(Zw)[0])
    elif Q is None:
        Q = orth(Z) if sign_canon else torch.linalg.qr(Z)[0]
    Q = torch.where(ok, Q, P0)
    Pn = Q.to(P.dtype)                                 # rounded once to the basis dtype
    if C is None:
        C = Pn.float().t() @ P0
        if side == "left":
            rows.sum_(C)
    for key, Cm in (("exp_avg", C), ("exp_avg_sq", C * C)):
        X = state[key]
        if side == "left":
            X.copy_((Cm @ X.float()).to(X.dtype))
        else:
            X.copy_((X.float() @ Cm.t()).to(X.dtype))
    P.copy_(Pn if side == "left" else Pn.t())


class GHAAdamW(_SubspaceAdamW):
    """gha, Generalised Hebbian Algorithm projector (docs/methods/adaptive_adamw.md, a
    reconstruction):
    uniform rank; the basis starts from the SVD of the first gradient and then follows Sanger's
    rule on the gradient covariance every step, before projecting::

        Y = G^T P ; H = (Y^T Y)/||G||^2 ; P_new = orth(P + eta*((G Y)/||G||^2 - P triu(H)))

    with the moments transported by ``C = P_new^T P`` (A4) every step. A zero gradient
    leaves the basis as it is. ``eta`` defaults to 0.5; ``update_proj_gap`` is not used. Other
    arguments as ``AdaptiveAdamW``.
    """

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, *, eta=0.5, nl_gamma=1.01, update_proj_gap=200, scale=0.25,
                 **options):
        family = dict(update_proj_gap=update_proj_gap, scale=scale, nl_gamma=nl_gamma, eta=eta)
        self._check_gha(family)
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction, family=family,
                         **options)

    @staticmethod
    def _check_gha(d):
        _check_uniform_keys(d)
        check_number("eta", d["eta"], low=0.0)

    def _check_family(self, group):
        self._check_gha(group)

    def _method_ops(self, group):
        return super()._method_ops(group) + ("gha_update",)

    # the basis update of a class runs as one capture unit (lowrank_fused/_capture.py)
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """The family's bound calls, and the basis update as one ``_GHABatch`` call for the
        class (one ``eta``: not the per-member path)."""
        return cls.extra.get("eta") is not None and super()._class_capturable(cls)

    def _captured_values(self) -> tuple:
        """The basis update takes ``eta`` and ``sign_canon`` by value."""
        return super()._captured_values() + (bool(self.sign_canon),) + tuple(
            g.get("eta") for g in self.param_groups)

    def _basis_reads_grad(self, p, group):
        # only the first basis is an SVD of G; the per-step GHA update keeps the basis by
        # itself (on the device) when G is zero or not finite
        return "basis" not in self.state.get(p, {})

    def _update_basis(self, p, group, side, G, state, backend):
        rows = sharded.rows_of(p)
        if "basis" not in state:
            if rows is None:
                P = canonical_svd_basis(G, group["rank"], side, self.sign_canon,
                                        label=self.param_label(p))
            else:
                P = self._sharded_basis(p, G, group, group["rank"], side, rows, "svd")
            state["basis"] = P.to(self._state_dtype(p))
            state["rank"] = group["rank"]
            self._init_moments(p, state, side, (G.shape[0], G.shape[1]), group["rank"])
            return
        precision = self.precision(p.device)
        if rows is not None:
            _gha_sharded(G, state, side, rows, float(group["eta"]), self.sign_canon, precision)
            return
        # every step: written into the stored basis and moments (same shapes); the batch
        # of one the engine's classes run for all their members at once
        Gs = [_canon(side, G)]
        batch = _GHABatch(Gs, [_canon(side, state["basis"])], [_canon(side, state["exp_avg"])],
                          [_canon(side, state["exp_avg_sq"])], backend, bound=False)
        batch(Gs, float(group["eta"]), self.sign_canon, precision=precision)

    # -- the engine: the basis update of a whole class in _class_step (_GHABatch) -------------
    def _basis_due(self, group, state) -> bool:
        return "basis" not in state           # the first basis (an SVD); the rest per class

    def _refresh_pending(self, plan) -> bool:
        return not self._bases_exist(plan)

    def _refresh_classes(self, routed) -> bool:
        fresh = self._gha_fresh = set()
        if self._skip_flag is not None:       # _refresh_pending: every basis exists
            return False
        for p, group, route, state in routed:
            if "basis" not in state:
                fresh.add(id(state))            # its first basis: no GHA update this step
        return super()._refresh_classes(routed) if fresh else False

    def _class_lists(self, cls):
        stacks = _stack_class_state(cls, ("basis", "exp_avg", "exp_avg_sq"))
        cls.Ps[:] = [m.state["basis"] for m in cls.members]
        super()._class_lists(cls)
        side = cls.route.side
        cls.extra["gha"] = _GHABatch(
            [_canon(side, G) for G in self._class_grads(cls)], [_canon(side, P) for P in cls.Ps],
            [_canon(side, m.state["exp_avg"]) for m in cls.members],
            [_canon(side, m.state["exp_avg_sq"]) for m in cls.members], cls.backend,
            bound=True, workspace=self.__dict__.get("_workspace"),
            stacks=None if stacks is None else [
                X if side == "left" else X.transpose(1, 2) for X in stacks])
        etas = per_member([m.group for m in cls.members], lambda g: float(g["eta"]))
        cls.extra["eta"] = etas[0] if all(e == etas[0] for e in etas) else None

    def _class_step(self, cls, precision):
        """The GHA update of every member (one ``_GHABatch`` call: two grouped K1, then on
        Triton fourteen launches, else batched torch GEMMs and QR), then the family's class
        step."""
        fresh = self.__dict__.get("_gha_fresh")
        side = cls.route.side
        if cls.extra["eta"] is None or (fresh and any(id(m.state) in fresh
                                                      for m in cls.members)):
            for m in cls.members:               # mixed etas, or a member's first step
                if not fresh or id(m.state) not in fresh:
                    G = m.p.grad if m.p.dim() == 2 else m.p.grad.reshape(cls.route.shape)
                    Gs = [_canon(side, G)]
                    _GHABatch(Gs, [_canon(side, m.state["basis"])],
                              [_canon(side, m.state["exp_avg"])],
                              [_canon(side, m.state["exp_avg_sq"])], cls.backend,
                              bound=False)(Gs, float(m.group["eta"]), self.sign_canon,
                                           self._skip_flag, precision=precision)
        else:
            Gs = self._class_grads(cls)
            if side != "left":               # the canonical views, kept while the grads are
                known = cls.extra.get("gha_grads")
                if known is None or not all(map(operator.is_, known[0], Gs)):
                    known = cls.extra["gha_grads"] = (Gs, [G.t() for G in Gs])
                Gs = known[1]
            # one unit: two bound K1 and (Triton) the update's launches, else batched torch
            # ops, on the class's fixed tensors, with eta and sign_canon in the capture key
            # (_captured_values)
            _capture.unit(cls.extra["gha"], Gs, cls.extra["eta"], self.sign_canon,
                          self._skip_flag, layout_token=self._layout_token,
                          precision=precision)
        super()._class_step(cls, precision)


def _kfac_scalars(group, state, t):
    """K-FAC's per-step numbers at step t: the betas, the bias corrections (1 without bias
    correction) and whether the factor's inverse root is recomputed."""
    beta1, beta2 = group["betas"]
    c1, c2 = ops.bias_corrections(beta1, beta2, t) if group["bias_correction"] else (1.0, 1.0)
    recompute = (t - 1) % group["kfac_update_freq"] == 0 or not state["kfac_root_valid"]
    return beta1, beta2, c1, c2, recompute


class GaLoreKFACAdamW(_SubspaceAdamW):
    """galore_kfac (docs/methods/adaptive_adamw.md, a reconstruction): GaLore's SVD basis
    (uniform rank, refreshed when ``k % update_proj_gap == 0``), and the low-rank momentum
    whitened by a Kronecker left factor instead of Adam's second moment (canonical left form,
    R is r x n)::

        M = beta1*M + (1-beta1)*R ;  F = beta2*F + (1-beta2)*(R R^T)/n
        N = (F/bc2 + eps_k*I)^(-1/2) @ (M/bc1),  eps_k = kfac_eps*trace(F/bc2)/r
        W -= lr*scale*(P @ N), WD-post

    The inverse root comes from ``eigh`` every ``kfac_update_freq`` steps (default 10; also
    after a refresh and while F is still zero). ``exp_avg_sq`` and ``eps`` are not used.
    ``transport_on_refresh`` (default True) moves M and F into the new basis at a refresh
    (``C M`` and ``C F C^T``, as A4); False keeps them as GaLore keeps its moments.
    Other arguments as ``AdaptiveAdamW``.
    """

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, *, kfac_eps=1e-6, kfac_update_freq=10,
                 transport_on_refresh=True, nl_gamma=1.01, update_proj_gap=200, scale=0.25,
                 **options):
        family = dict(update_proj_gap=update_proj_gap, scale=scale, nl_gamma=nl_gamma,
                      kfac_eps=kfac_eps, kfac_update_freq=kfac_update_freq,
                      transport_on_refresh=transport_on_refresh)
        self._check_kfac(family)
        super().__init__(params, lr, betas, eps, weight_decay, bias_correction, family=family,
                         **options)

    @staticmethod
    def _check_kfac(d):
        _check_uniform_keys(d)
        check_number("kfac_eps", d["kfac_eps"], low=0.0)
        if not d["kfac_eps"] > 0:
            raise ValueError(f"kfac_eps must be > 0, got {d['kfac_eps']!r}")
        if not _is_int(d["kfac_update_freq"], 1):
            raise ValueError(f"kfac_update_freq must be an int >= 1, got "
                             f"{d['kfac_update_freq']!r}")
        if not isinstance(d["transport_on_refresh"], bool):
            raise ValueError(f"transport_on_refresh must be a bool, got "
                             f"{d['transport_on_refresh']!r}")

    def _check_family(self, group):
        self._check_kfac(group)

    def _method_ops(self, group):
        return (("project", "kfac_precondition")
                + (("kfac_transport",) if group["transport_on_refresh"] else ()))

    def _basis_reads_grad(self, p, group):
        st = self.state.get(p, {})
        return "basis" not in st or st["step"] % group["update_proj_gap"] == 0

    _basis_due = _SubspaceAdamW._refresh_basis_due

    def _update_basis(self, p, group, side, G, state, backend):
        k = state.get("step", 0)
        if "basis" in state and k % group["update_proj_gap"] != 0:
            return
        rank = group["rank"]
        rows = sharded.rows_of(p)
        if rows is None:
            P_new = canonical_svd_basis(G, rank, side, self.sign_canon,
                                        label=self.param_label(p), previous=state.get("basis"))
        else:
            P_new = self._sharded_basis(p, G, group, rank, side, rows, "svd")
        P_new = P_new.to(self._state_dtype(p))
        if "basis" not in state:
            dtype = self._state_dtype(p)
            state["step"] = 0
            low = ops.low_rank_shape((G.shape[0], G.shape[1]), rank, side)
            state["exp_avg"] = torch.zeros(low, dtype=dtype, device=p.device)
            state["kfac_factor"] = torch.zeros(rank, rank, dtype=dtype, device=p.device)
            state["kfac_root"] = torch.zeros_like(state["kfac_factor"])
            state["kfac_root_valid"] = 0
        elif group["transport_on_refresh"] and rows is not None and side == "left":
            # this rank's rows of both bases: C summed over the ranks, M and F replicated
            C = rows.sum_(P_new.float().t() @ state["basis"].float())
            M0, F0 = state["exp_avg"], state["kfac_factor"]
            state["exp_avg"] = (C @ M0.float()).to(M0.dtype)
            state["kfac_factor"] = (C @ F0.float() @ C.t()).to(F0.dtype)
            state["kfac_root_valid"] = 0
        elif group["transport_on_refresh"]:
            M, F = implementation("kfac_transport", backend, p.device)(
                _canon(side, P_new), _canon(side, state["basis"]),
                _canon(side, state["exp_avg"]), state["kfac_factor"])
            state["exp_avg"], state["kfac_factor"] = _uncanon(side, M), F.contiguous()
            state["kfac_root_valid"] = 0
        state["basis"] = P_new
        state["rank"] = rank

    def _normalised_step(self, R, state, group, side, t, backend, want_sumsq=False, rows=None):
        """K-FAC whitening; no norm side output (the limiter computes ``||N||`` itself). An
        FSDP2 shard on the left has the whole R (replicated); on the right
        ``_whiten_sharded``."""
        N = torch.empty_like(state["exp_avg"])
        if rows is not None and side == "right":
            self._whiten_sharded(R, N, state, group, t, rows)
            return N, float(group["lr"]), None
        self._whiten(implementation("kfac_precondition", backend, R.device), R, N, state,
                     group, side, t)
        return N, float(group["lr"]), None

    @staticmethod
    def _whiten(impl, R, N, state, group, side, t):
        """One matrix's K-FAC step into ``N``: M and F advance, the inverse root is
        recomputed when due."""
        beta1, beta2, c1, c2, recompute = _kfac_scalars(group, state, t)
        valid = impl(_canon(side, R), _canon(side, state["exp_avg"]), state["kfac_factor"],
                     state["kfac_root"], _canon(side, N), beta1=float(beta1),
                     beta2=float(beta2), c1=c1, c2=c2, eps_rel=float(group["kfac_eps"]),
                     recompute=recompute)
        if recompute:
            state["kfac_root_valid"] = int(bool(valid))

    @staticmethod
    def _whiten_sharded(R, N, state, group, t, rows):
        """``_whiten`` for an FSDP2 shard projected on the right: this rank holds rows
        [start, stop) of R, M and N (columns of the canonical r x m forms), so the factor's
        statistic ``R R^T`` is summed over the ranks (r x r) and divided by the whole m;
        F, its inverse root and the decision to recompute it are then replicated, and M and
        N are local (the math of ``reference/kfac_precondition.py``)."""
        from lowrank_fused.reference.kfac_precondition import recompute_root

        beta1, beta2, c1, c2, recompute = _kfac_scalars(group, state, t)
        Rc, M, F, root = R.float().t(), state["exp_avg"].t(), state["kfac_factor"], \
            state["kfac_root"]
        M.copy_(beta1 * M.float() + (1.0 - beta1) * Rc)
        RRt = rows.sum_(Rc @ Rc.t())
        F.copy_(beta2 * F.float() + (1.0 - beta2) * RRt / rows.m)
        if recompute:
            state["kfac_root_valid"] = int(bool(recompute_root(
                F, root, c2=c2, eps_rel=float(group["kfac_eps"]))))
        N.t().copy_(root.float() @ (M.float() / c1))

    # the engine: no second moment, and the whitening per matrix (no multi-tensor form)
    _CLASS_STATE = ("basis", "exp_avg")

    # between the recomputes of the roots (refresh steps, eager) a class's whitening is one
    # grouped call that a replay stands in for (docs/engine.md)
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """The whitening as one grouped call for the class (``_kfac_class``: its members at
        one step with one set of its hyper-parameters) and the limiter, when on, as the
        class's grouped sum of squares and its bound call with one ``nl_gamma``."""
        if cls.extra.get("kfac_class") is None:
            return False
        states = cls.extra["states"]
        step = states[0].get("step")
        if not all(st.get("step") == step for st in states) or self._kfac_hyper(cls) is None:
            return False
        if cls.extra["limiter"] is None:
            return True
        return (cls.extra.get("class_sumsq") is not None
                and cls.extra.get("limit_call") is not None
                and self._class_gamma(cls) is not None)

    def _class_lists_k2(self, cls):
        """The whitening of the whole class (``grouped_kfac_precondition``: one batched Gram,
        one grouped launch for M, N and F) where the backend's
        whitening is the fused one and the class's R are consecutive in the workspace; and
        the limiter's norms from one grouped sum of squares (the bits the per-matrix fused
        limiter computes for itself) for the class limiter."""
        device, side = cls.Ws[0].device, cls.route.side
        impl = cls.extra["kfac"] = implementation("kfac_precondition", cls.backend, device)
        cls.extra["sumsq"] = [None] * len(cls.members)
        cls.extra["norms"] = None
        grouped = getattr(sys.modules.get(getattr(impl, "__module__", "")),
                          "grouped_kfac_precondition", None)
        Rs = ops_grouped.stacked_view(cls.Rs)
        cls.extra["kfac_class"] = None
        if grouped is not None and Rs is not None:
            states = [m.state for m in cls.members]
            lists = (Rs if side == "left" else Rs.transpose(1, 2),
                     [_canon(side, st["exp_avg"]) for st in states],
                     [st["kfac_factor"] for st in states], [st["kfac_root"] for st in states],
                     [_canon(side, N) for N in cls.Ns])
            module = sys.modules[impl.__module__]
            # checked, addressed and given its buffers once per plan
            cls.extra["kfac_class"] = (grouped,) + lists + (
                module.grouped_kfac_offsets(*lists), module.grouped_kfac_work(lists[0]))
        limiter = cls.extra["limiter"]
        class_sumsq = None if limiter is None else getattr(
            sys.modules.get(getattr(limiter, "__module__", "")), "grouped_sumsq", None)
        if class_sumsq is not None and all(cls.extra["limit"]):
            self._limiter_lists(cls)
            if "Nstack" in cls.extra:
                cls.extra["class_sumsq"] = class_sumsq
                cls.extra["sumsq_part"] = getattr(sys.modules[limiter.__module__],
                                                  "grouped_sumsq_part")(cls.extra["Nstack"])
            else:
                cls.extra["norms"] = None
                cls.extra["sumsq"] = [None] * len(cls.members)

    def _refresh_pending(self, plan) -> bool:
        """A basis refresh or a recompute of the factor's inverse root (``eigh``, which reads
        ``trace(F)`` on the host) is due."""
        if not self._bases_exist(plan):
            return True
        for group, states in self._routed_by_group(plan):
            steps = _steps(states)
            if None in steps:
                return True
            gap, freq = group["update_proj_gap"], group["kfac_update_freq"]
            if any(k % gap == 0 or k % freq == 0 for k in steps) or \
                    not all(map(_ROOT_VALID, states)):
                return True
        return False

    def _class_middle(self, cls, Rs, groups, ts, one=None):
        impl, side = cls.extra["kfac"], cls.route.side
        skip = self._skip_flag
        if not self._kfac_class(cls, ts, skip, one):
            self._kfac_members(cls, Rs, ts, impl, side, skip)
        sumsq = cls.extra.get("class_sumsq")
        if sumsq is not None:
            sumsq(cls.extra["Nstack"], cls.extra["norms"], cls.extra["sumsq_part"],
                  owner=cls)             # the launches planned once per class
        if one is not None:
            return [float(one["lr"])] * len(ts)
        return per_member(groups, lambda g: float(g["lr"]))

    @staticmethod
    def _kfac_hyper(cls, one=None):
        """The class's one ``(betas, bias_correction, kfac_update_freq)`` (``one``: the
        members' shared group), None when its members' groups differ in them."""
        def hyper(g):
            return tuple(g["betas"]), g["bias_correction"], g["kfac_update_freq"]
        if one is not None:
            return hyper(one)
        found = per_member(cls.extra["groups"], hyper)
        return found[0] if all(h == found[0] for h in found) else None

    def _kfac_class(self, cls, ts, skip, one=None) -> bool:
        """The whitening of the whole class in one ``grouped_kfac_precondition`` call, when
        the class has it, its members share the hyper-parameters and the step, and no
        member recomputes its root on this step; False: the caller runs it per member."""
        found = cls.extra["kfac_class"]
        if found is None:
            return False
        t = ts[0]
        hyper = self._kfac_hyper(cls, one)
        if hyper is None or (one is None and ts.count(t) != len(ts)):
            return False                    # (``one``: one group at one step)
        (beta1, beta2), bias, freq = hyper
        if (t - 1) % freq == 0 or not all(map(_ROOT_VALID, cls.extra["states"])):
            return False
        c1, c2 = ops.bias_corrections(beta1, beta2, t) if bias else (1.0, 1.0)
        grouped, Rs, Ms, Fs, roots, Ns, prepared, work = found
        grouped(Rs, Ms, Fs, roots, Ns, beta1=float(beta1), beta2=float(beta2), c1=c1, c2=c2,
                skip=skip, prepared=prepared, work=work)
        return True

    def _kfac_members(self, cls, Rs, ts, impl, side, skip):
        for R, N, m, t in zip(Rs, cls.Ns, cls.members, ts):
            if skip is None:
                self._whiten(impl, R, N, m.state, m.group, side, t)
            else:                  # (no recompute on such a step: _refresh_pending)
                st = m.state
                run_unless(skip, [st["exp_avg"], st["kfac_factor"], st["kfac_root"]],
                           self._whiten, impl, R, N, st, m.group, side, t)
