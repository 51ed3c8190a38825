"""Grouped versions of the GEMM ops: one call (one Triton launch) runs K1 or K3 for a
whole list of matrices of one shape, dtype, rank and side.

A LLaMA has a handful of distinct (shape, rank, side) classes with tens of layers each; the
per-matrix ops launch a kernel per layer. ``grouped_project`` is ``ops.project`` over lists
(G_i, P_i, R_i) and ``grouped_backproject_update`` is ``ops.backproject_update`` over lists
(W_i, P_i, N_i), with one ``coef`` / ``pre_scale`` / ``post_decay`` per matrix (each layer's
learning rate and the bias correction of its own step counter) or one value for all;
``grouped_residual_backproject_update`` is AdaMeM's ``residual_backproject_update`` (K3 with
the residual term) over lists (W_i, G_i, P_i, R_i, N_i, col_scale_i).

Each list is a group: every member has the first member's shape, dtype and strides (one memory
layout; e.g. all contiguous) and all tensors are on one device; the outputs (R_i, W_i) must
not overlap. The fused backend addresses the members as offsets from the first
(``kernels/_grouped.py``); the reference is a loop over the single-matrix references.
"""
from __future__ import annotations

import math
import sys

import torch

from lowrank_fused import ops
from lowrank_fused.dispatch import implementation
from lowrank_fused.ops_multi import _DTYPE, _as_list, _per_tensor

__all__ = ["grouped_project", "grouped_backproject_update",
           "grouped_residual_backproject_update"]


def _check_members(name, tensors, shape, device, where, dtype=None):
    """Float 2-D tensors of ``shape``, one dtype (``dtype`` when given), one set of strides,
    all on ``device`` (that of ``where``)."""
    first = tensors[0]
    for i, t in enumerate(tensors):
        ops._check_float(f"{name}[{i}]", t)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}[{i}] must have shape {tuple(shape)} (the group's), got "
                             f"{tuple(t.shape)}")
        want = dtype or first.dtype
        if t.dtype != want:
            raise TypeError(f"{name}[{i}] is {t.dtype} but the group's {name} are {want}: a "
                            f"group shares one dtype")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {where} is on {device}; all "
                             f"tensors must be on one device")
        if t.stride() != first.stride():
            raise ValueError(f"{name}[{i}] has strides {t.stride()} but {name}[0] has "
                             f"{first.stride()}: the matrices of a group share one memory "
                             f"layout (e.g. make them all contiguous)")


def _check_disjoint(name, tensors):
    """Outputs written in place must not share memory (their kernels run concurrently)."""
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        start = t.data_ptr()
        spans.append((start, start + extent * t.element_size(), i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            a, b = sorted((i, j))
            raise ValueError(f"{name}[{b}] overlaps {name}[{a}] in memory: every member of a "
                             f"group must be written to its own tensor")


def _lists(**named):
    lists = {name: _as_list(name, t) for name, t in named.items()}
    names = list(lists)
    count = len(lists[names[0]])
    for name in names[1:]:
        if len(lists[name]) != count:
            raise ValueError(f"{name} has {len(lists[name])} tensors but {names[0]} has {count}")
    return lists, count


def _check_first(name, t):
    ops._check_float(f"{name}[0]", t)
    if t.dim() != 2:
        raise ValueError(f"{name}[0] must be 2-D, got shape {tuple(t.shape)}")


def _check_matrices_and_bases(name, Xs, Ps, side):
    """The group's m x n matrices ``Xs`` (named ``name``) and their bases ``Ps`` (m x r on the
    left, r x n on the right, the rank read off ``Ps[0]``): checked as members; returns
    ``(shape, rank, device)``."""
    _check_first(name, Xs[0])
    _check_first("Ps", Ps[0])
    shape = tuple(Xs[0].shape)
    rank = Ps[0].shape[1] if side == "left" else Ps[0].shape[0]
    device = Xs[0].device
    _check_members(name, Xs, shape, device, f"{name}[0]")
    want = ops.basis_shape(shape, rank, side)
    if tuple(Ps[0].shape) != want:
        raise ValueError(f"Ps[0] must have shape {want} for side={side!r} and {name}[0] of "
                         f"shape {shape}, got {tuple(Ps[0].shape)}")
    _check_members("Ps", Ps, want, device, f"{name}[0]")
    return shape, rank, device


def grouped_project(Gs, Ps, Rs=None, *, side="left", precision="ieee", backend="auto",
                    r_sumsq=None, sumsq=None):
    """K1 for every member: ``R_i = P_i^T @ G_i`` (left, P_i m x r) or ``R_i = G_i @ Q_i^T``
    (right, Q_i r x n), as ``ops.project``. G_i are read in their storage dtype; the R_i are
    fp32 and returned as a list (allocated when ``Rs`` is None). ``r_sumsq`` (fp32, shape
    (count,)): also ``||R_i||^2`` of every member (``ops.project``'s ``r_sumsq``).
    ``sumsq`` (fp32, shape (count, n) on the left, (count, m) on the right; rows must not
    share memory): row i receives ``ops.project``'s ``sumsq`` of member i, the squared norms
    along the projected dimension from the same pass over G_i: ``colsum(G_i^2)`` on the left,
    ``rowsum(G_i^2)`` on the right."""
    ops._check_side(side)
    ops._check_precision(precision)
    lists, count = _lists(Gs=Gs, Ps=Ps, **({} if Rs is None else {"Rs": Rs}))
    Gs, Ps = lists["Gs"], lists["Ps"]
    if count == 0:
        return [] if Rs is None else lists["Rs"]
    shape, rank, device = _check_matrices_and_bases("Gs", Gs, Ps, side)
    out_shape = ops.low_rank_shape(shape, rank, side)
    if Rs is None:
        Rs = [torch.empty(out_shape, device=device, dtype=torch.float32) for _ in range(count)]
    else:
        Rs = lists["Rs"]
        _check_members("Rs", Rs, out_shape, device, "Gs[0]", dtype=torch.float32)
        _check_disjoint("Rs", Rs)
    kw = dict(precision=precision)
    if r_sumsq is not None:
        ops._check_side_output("r_sumsq", r_sumsq, (count,), device, "Gs[0]")
        kw["r_sumsq"] = r_sumsq
    if sumsq is not None:
        length = shape[1] if side == "left" else shape[0]
        ops._check_side_output("sumsq", sumsq, (count, length), device, "Gs[0]")
        _check_disjoint("sumsq", list(sumsq.unbind(0)))   # one row per member
        kw["col_sumsq"] = sumsq
    impl = implementation("grouped_project", backend, device)
    if side == "left":
        impl(Gs, Ps, Rs, **kw)
    else:
        impl([G.t() for G in Gs], [P.t() for P in Ps], [R.t() for R in Rs], **kw)
    return Rs


def _finite_scalars(count, **named):
    """Each scalar as one float per member (one number broadcast, or a sequence of
    ``count``), all finite."""
    scalars = {name: _per_tensor(name, value, count) for name, value in named.items()}
    for name, values in scalars.items():
        if not all(map(math.isfinite, values)):
            i, x = next((i, x) for i, x in enumerate(values) if not math.isfinite(x))
            raise ValueError(f"{name}[{i}] must be finite, got {x}")
    return scalars


def grouped_backproject_update(Ws, Ps, Ns, *, side="left", coef, pre_scale=1.0, post_decay=0.0,
                               precision="ieee", backend="auto", skip=None):
    """K3 in place on every member: ``W_i = W_i*pre_scale_i; W_i -= coef_i * back(N_i);
    W_i -= post_decay_i*W_i``, as ``ops.backproject_update`` (``back(N)`` is ``P @ N`` on the
    left, ``N @ Q`` on the right). Each scalar is one number for all members or a sequence with
    one per member. Returns ``Ws``.

    ``skip`` (optional, a 0-dim torch.bool tensor on the members' device): when it holds True,
    every W_i is left bit-identical. The flag is read on the device only, never on the host."""
    ops._check_side(side)
    ops._check_precision(precision)
    lists, count = _lists(Ws=Ws, Ps=Ps, Ns=Ns)
    Ws, Ps, Ns = lists["Ws"], lists["Ps"], lists["Ns"]
    scalars = _finite_scalars(count, coef=coef, pre_scale=pre_scale, post_decay=post_decay)
    if count == 0:
        ops._check_skip(skip, None)
        return Ws
    shape, rank, device = _check_matrices_and_bases("Ws", Ws, Ps, side)
    _check_members("Ns", Ns, ops.low_rank_shape(shape, rank, side), device, "Ws[0]")
    _check_disjoint("Ws", Ws)
    impl = implementation("grouped_backproject_update", backend, device)
    kw = dict(precision=precision, **scalars)
    if skip is not None:
        ops._check_skip(skip, device)
        kw["skip"] = skip
    if side == "left":
        impl(Ws, Ps, Ns, **kw)
    else:
        impl([W.t() for W in Ws], [P.t() for P in Ps], [N.t() for N in Ns], **kw)
    return Ws


def _check_residual_group(Ws, Gs, Ps, Rs, Ns, css):
    """The members of a residual update (left form, see below), as the op checks them;
    returns their device."""
    shape, rank, device = _check_matrices_and_bases("Ws", Ws, Ps, "left")
    _check_first("Gs", Gs[0])
    _check_members("Gs", Gs, shape, device, "Ws[0]")
    low = ops.low_rank_shape(shape, rank, "left")
    _check_members("Rs", Rs, low, device, "Ws[0]")
    _check_members("Ns", Ns, low, device, "Ws[0]")
    ops._check_float("col_scales[0]", css[0])
    _check_members("col_scales", css, (shape[1],), device, "Ws[0]")
    _check_disjoint("Ws", Ws)
    return device


def grouped_residual_backproject_update(Ws, Gs, Ps, Rs, Ns, col_scales, *, coef, res_coef,
                                        pre_scale=1.0, post_decay=0.0, precision="ieee",
                                        backend="auto", skip=None):
    """AdaMeM's combined update (K3 with the residual term, docs/methods/adamem.md) in
    place on every member, as the single ``residual_backproject_update``: left (canonical)
    form only, W_i and G_i m x n (AdaMeM passes transposed views of tall matrices), P_i m x r,
    R_i = P_i^T G_i and N_i r x n, col_scale_i (n):

    ``W_i = W_i*pre_scale_i - coef_i*(P_i @ N_i)
    - res_coef_i*((G_i - P_i @ R_i) * col_scale_i[None, :]) ; W_i -= post_decay_i*W_i``.

    Each scalar is one number for all members or a sequence with one per member. Every list
    is a group (one shape, dtype and set of strides per list; the G_i may have another dtype
    than the W_i). ``skip`` (optional, a 0-dim torch.bool tensor on the members' device):
    when it holds True every W_i is left bit-identical (read on the device only). Returns
    ``Ws``."""
    ops._check_precision(precision)
    lists, count = _lists(Ws=Ws, Gs=Gs, Ps=Ps, Rs=Rs, Ns=Ns, col_scales=col_scales)
    Ws, Gs, Ps, Rs, Ns, css = (lists[k] for k in ("Ws", "Gs", "Ps", "Rs", "Ns", "col_scales"))
    scalars = _finite_scalars(count, coef=coef, res_coef=res_coef, pre_scale=pre_scale,
                              post_decay=post_decay)
    if count == 0:
        return Ws
    device = _check_residual_group(Ws, Gs, Ps, Rs, Ns, css)
    impl = implementation("grouped_residual_backproject_update", backend, device)
    if skip is not None:
        ops._check_skip(skip, device)
        scalars["skip"] = skip
    impl(Ws, Gs, Ps, Rs, Ns, css, precision=precision, **scalars)
    return Ws


# -- bound calls: a fixed group checked once, called every step -----------------------------

class _Layout:
    """One shape, strides, dtype and device for every tensor of a list of ``count`` (the
    cheap check of a bound call: four list comparisons, C loops, no per-tensor Python)."""

    def __init__(self, like, count):
        self.shape, self.stride, self.dtype, self.device = (like.shape, like.stride(),
                                                            like.dtype, like.device)
        self.count = count
        self._lists = ([like.shape] * count, [like.stride()] * count,
                       [like.get_device()] * count, [like.dtype] * count)

    def matches(self, Xs) -> bool:
        shapes, strides, devices, dtypes = self._lists
        return (len(Xs) == self.count and list(map(torch.Tensor.size, Xs)) == shapes
                and list(map(torch.Tensor.stride, Xs)) == strides
                and list(map(torch.Tensor.get_device, Xs)) == devices
                and list(map(_DTYPE, Xs)) == dtypes)


_PTR = torch.Tensor.data_ptr
_NUMBER = (float, int)


def _bound_impl(op, backend, device, static: dict):
    """The implementation of ``op`` and the keywords a bound call adds: for the Triton
    launchers, the element offsets of the fixed (left-form) lists, checked once here, and
    the launcher's planner (``plan_<op>``: its host work done once, kept by the bound call)."""
    from lowrank_fused.dispatch import resolve_call

    chosen, impl = resolve_call(op, backend, device)
    if chosen != "triton":
        return impl, {}, None
    from lowrank_fused.kernels import _grouped

    prepared = {}
    for name, lst in static.items():
        _grouped.check_layout(name, lst)
        prepared[name] = _grouped.element_offsets(name, lst)
    planner = None
    module = sys.modules.get(getattr(impl, "__module__", ""))
    if module is not None and getattr(impl, "__name__", "") == op:   # the launcher itself
        planner = getattr(module, f"plan_{op}", None)
    return impl, {"prepared": prepared}, planner


class BoundGroupedProject:
    """``grouped_project`` for a fixed group: the bases ``Ps`` and outputs ``Rs`` are checked
    once, here, with every check of the op, and the implementation is resolved once; a call
    takes the step's gradients (checked to have the layout of the ones given here, one cheap
    pass) and the precision. What an optimizer's step engine calls every step.

    On the Triton backend the launcher's host work (tile choice, offset tables, grid) is
    planned once per (precision, side outputs, gradient addresses) and kept: a step whose
    gradients sit where the last step's did (``zero_grad(set_to_none=False)``, or the
    caching allocator handing back the same blocks) makes the same launch with no Python
    per member but the layout check."""

    def __init__(self, Gs, Ps, Rs, *, side="left", backend="auto"):
        ops._check_side(side)
        lists, count = _lists(Gs=Gs, Ps=Ps, Rs=Rs)
        if count == 0:
            raise ValueError("a bound group needs at least one member")
        Gs, Ps, Rs = lists["Gs"], lists["Ps"], lists["Rs"]
        shape, rank, device = _check_matrices_and_bases("Gs", Gs, Ps, side)
        self.shape = ops.low_rank_shape(shape, rank, side)
        _check_members("Rs", Rs, self.shape, device, "Gs[0]", dtype=torch.float32)
        _check_disjoint("Rs", Rs)
        self.side, self.count, self.device = side, count, device
        self.layout = _Layout(Gs[0], count)
        self.out = Rs
        self.Ps, self.Rs = (Ps, Rs) if side == "left" else (
            [P.t() for P in Ps], [R.t() for R in Rs])
        self.impl, self.kw, self.planner = _bound_impl("grouped_project", backend, device,
                                                       {"Ps": self.Ps, "Rs": self.Rs})
        self._plans = {}      # (precision, side outputs) -> (gradient addresses, launch)
        self._token = None    # the layout_token of the last call whose Gs were checked

    def __call__(self, Gs, *, precision="ieee", r_sumsq=None, sumsq=None, layout_token=None):
        """``layout_token`` (optional, from the caller): a value that stays the same only
        while no gradient's shape, strides, dtype or device has changed since a call that
        gave it (the step engine's, renewed whenever its per-step check of every gradient
        sees a change); with the last checked call's token the per-member check of ``Gs`` is
        not repeated. None: checked every call."""
        if layout_token is None or layout_token != self._token:
            if not self.layout.matches(Gs):
                _lists(Gs=Gs, Ps=self.Ps)
                _check_members("Gs", Gs, self.layout.shape, self.device, "the bound Gs[0]",
                               dtype=self.layout.dtype)
                self.layout = _Layout(Gs[0], self.count)  # other strides, one for all: re-plan
                self._plans.clear()
            self._token = layout_token
        kw = dict(self.kw, precision=precision)
        if r_sumsq is not None:
            ops._check_side_output("r_sumsq", r_sumsq, (self.count,), self.device, "Gs[0]")
            kw["r_sumsq"] = r_sumsq
        if sumsq is not None:
            shape = self.layout.shape
            length = shape[1] if self.side == "left" else shape[0]
            ops._check_side_output("sumsq", sumsq, (self.count, length), self.device, "Gs[0]")
            kw["col_sumsq"] = sumsq
        if self.planner is None:
            self.impl(Gs if self.side == "left" else [G.t() for G in Gs], self.Ps, self.Rs,
                      **kw)
            return self.out
        key = (precision, None if r_sumsq is None else (r_sumsq.data_ptr(), r_sumsq.stride()),
               None if sumsq is None else (sumsq.data_ptr(), sumsq.stride()))
        ptrs = tuple(map(_PTR, Gs))
        known = self._plans.get(key)
        if known is None or known[0] != ptrs:
            left = Gs if self.side == "left" else [G.t() for G in Gs]
            launch = self.planner(left, self.Ps, self.Rs, precision=precision,
                                  r_sumsq=r_sumsq, col_sumsq=kw.get("col_sumsq"),
                                  prepared=dict(self.kw["prepared"]))
            if launch is None:                  # an empty dimension: the plain call
                self.impl(left, self.Ps, self.Rs, **kw)
                return self.out
            known = self._plans[key] = (ptrs, launch)
        known[1](Gs[0] if self.side == "left" else Gs[0].t())
        return self.out


class BoundGroupedBackprojectUpdate:
    """``grouped_backproject_update`` for a fixed group (Ws, Ps, Ns checked once, here, with
    every check of the op); a call takes the step's per-member scalars, the precision and the
    on-device ``skip`` flag. On the Triton backend the launch is planned once per precision
    (``BoundGroupedProject``): a call fills the persistent scalar table and launches."""

    def __init__(self, Ws, Ps, Ns, *, side="left", backend="auto"):
        ops._check_side(side)
        lists, count = _lists(Ws=Ws, Ps=Ps, Ns=Ns)
        if count == 0:
            raise ValueError("a bound group needs at least one member")
        Ws, Ps, Ns = lists["Ws"], lists["Ps"], lists["Ns"]
        shape, rank, device = _check_matrices_and_bases("Ws", Ws, Ps, side)
        _check_members("Ns", Ns, ops.low_rank_shape(shape, rank, side), device, "Ws[0]")
        _check_disjoint("Ws", Ws)
        self.count, self.device = count, device
        self.lists = (Ws, Ps, Ns) if side == "left" else tuple(
            [X.t() for X in lst] for lst in (Ws, Ps, Ns))
        self.impl, self.kw, self.planner = _bound_impl(
            "grouped_backproject_update", backend, device,
            dict(zip(("Ws", "Ps", "Ns"), self.lists)))
        self._plans = {}      # precision -> launch (None: an empty matrix)
        self._skip = None     # the last checked skip flag

    @property
    def takes_divisor(self) -> bool:
        """Whether a call may pass ``divisor`` (the Triton launcher's ``DIVIDE_N``)."""
        return self.planner is not None

    def __call__(self, *, coef, pre_scale=1.0, post_decay=0.0, precision="ieee", skip=None,
                 divisor=None):
        """``divisor`` (``takes_divisor`` only): fp32 (count,) on the device, member b's N
        read as ``N_b / divisor[b]`` (the class limiter's factors, its scale pass fused);
        its address is part of the plan."""
        self._skip = ops.checked_skip(skip, self.device, self._skip)
        if divisor is not None and self.planner is None:
            raise ValueError("divisor needs the Triton launcher (takes_divisor is False)")
        # the planned launch takes one number per scalar for every member (the common case,
        # written along the table's rows) as it is; anything else as checked per-member lists
        numbers = (type(coef) is float and type(pre_scale) in _NUMBER
                   and type(post_decay) in _NUMBER and math.isfinite(coef)
                   and math.isfinite(pre_scale) and math.isfinite(post_decay))
        if self.planner is None or not numbers:
            scalars = _finite_scalars(self.count, coef=coef, pre_scale=pre_scale,
                                      post_decay=post_decay)
            coef, pre_scale, post_decay = (scalars["coef"], scalars["pre_scale"],
                                           scalars["post_decay"])
        if self.planner is None:
            self.impl(*self.lists, precision=precision, **self.kw, coef=coef,
                      pre_scale=pre_scale, post_decay=post_decay,
                      **({} if skip is None else {"skip": skip}))
            return
        key = (precision, None if divisor is None else divisor.data_ptr())
        if key not in self._plans:
            ops._check_precision(precision)
            self._plans[key] = self.planner(*self.lists, precision=precision,
                                            prepared=dict(self.kw["prepared"]),
                                            divisor=divisor)
        launch = self._plans[key]
        if launch is not None:
            launch(coef, pre_scale, post_decay, skip=skip)


def stacked_view(tensors):
    """A ``(count,) + shape`` view whose slices are ``tensors`` when they are contiguous,
    consecutive slices of one buffer (the step engine's workspaces, a class's state block)
    with one shape and dtype, else None."""
    first = tensors[0]
    if not first.is_contiguous():
        return None
    step = first.numel() * first.element_size()
    base = first.data_ptr()
    if any(t.data_ptr() != base + b * step or not t.is_contiguous()
           or t.shape != first.shape or t.dtype != first.dtype
           or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
           for b, t in enumerate(tensors)):
        return None
    return first.as_strided((len(tensors),) + tuple(first.shape),
                            (first.numel(),) + tuple(first.stride()))


class BoundGroupedResidualBackprojectUpdate:
    """``grouped_residual_backproject_update`` for a fixed group (left form; Ws, Ps, Rs, Ns
    and col_scales checked once, here, with every check of the op, the implementation resolved
    once); a call takes the step's gradients ``Gs`` (checked to have the layout of the ones
    given here, one cheap pass), the per-member scalars and the precision.

    ``scratch=True``: the call may overwrite ``Rs`` and ``Ns`` (the caller's workspaces, dead
    after the update). The Triton launcher then forms every member's folded factor in place
    in ``Ns`` with four launches for the whole group instead of four per member, when the
    members of ``Rs``, ``Ns`` (fp32) and ``col_scales`` are consecutive slices of one buffer
    each (the step engine's workspaces are); the bits are the same either way."""

    def __init__(self, Ws, Gs, Ps, Rs, Ns, col_scales, *, backend="auto", scratch=False):
        lists, count = _lists(Ws=Ws, Gs=Gs, Ps=Ps, Rs=Rs, Ns=Ns, col_scales=col_scales)
        if count == 0:
            raise ValueError("a bound group needs at least one member")
        Ws, Gs, Ps, Rs, Ns, css = (lists[k] for k in ("Ws", "Gs", "Ps", "Rs", "Ns",
                                                      "col_scales"))
        device = _check_residual_group(Ws, Gs, Ps, Rs, Ns, css)
        if not isinstance(scratch, bool):
            raise TypeError(f"scratch must be a bool, got {scratch!r}")
        self.count, self.device = count, device
        self.layout = _Layout(Gs[0], count)
        self.lists = (Ws, Ps, Rs, Ns, css)
        static = {"Ws": Ws, "Ps": Ps}
        stacked = None
        if scratch and all(X[0].dtype == torch.float32 for X in (Rs, Ns, css)):
            stacked = tuple(stacked_view(X) for X in (Rs, Ns, css))
            if any(s is None for s in stacked):
                stacked = None
            else:
                static.update(Ns=Ns, col_scales=css)    # the factors are formed in Ns
        self.impl, self.kw, _ = _bound_impl("grouped_residual_backproject_update", backend,
                                            device, static)
        if stacked is not None and "prepared" in self.kw:    # the Triton launcher
            self.kw["stacked"] = stacked
        self._g_ptrs = None       # the gradients' addresses whose offsets ``prepared`` holds
        self._scalars_key = None  # the last call's scalars, checked (a class's change rarely)

    def __call__(self, Gs, *, coef, res_coef, pre_scale=1.0, post_decay=0.0,
                 precision="ieee", skip=None):
        if not self.layout.matches(Gs):
            _lists(Gs=Gs, Ws=self.lists[0])
            _check_members("Gs", Gs, self.layout.shape, self.device, "the bound Gs[0]",
                           dtype=self.layout.dtype)
        prepared = self.kw.get("prepared")
        if prepared is not None:  # Triton: the gradients' offsets, kept while they stay put
            ptrs = tuple(map(_PTR, Gs))
            if ptrs != self._g_ptrs:
                from lowrank_fused.kernels._grouped import element_offsets

                prepared["residuals"] = element_offsets("Gs", Gs)
                self._g_ptrs = ptrs
        key = (coef, res_coef, pre_scale, post_decay)   # checked once per distinct values
        if key != self._scalars_key:
            self._scalars = _finite_scalars(self.count, coef=coef, res_coef=res_coef,
                                            pre_scale=pre_scale, post_decay=post_decay)
            self._scalars_key = key
        scalars = dict(self._scalars)
        if skip is not None:
            ops._check_skip(skip, self.device)
            scalars["skip"] = skip
        Ws, Ps, Rs, Ns, css = self.lists
        self.impl(Ws, Gs, Ps, Rs, Ns, css, precision=precision, **self.kw, **scalars)
