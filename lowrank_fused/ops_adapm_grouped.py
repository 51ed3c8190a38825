"""AdaPM / AdaPM-mini steady step for a class of same-shape matrices (docs/methods/adapm.md):
the bound call the optimizer's step engine makes once per class and step, and the plain
functions the tests call.

A class is either low-rank (every member a low-rank block between refits: weights ``Ws``,
bases ``Ls``, factors ``Rs``, second moments ``Vs``, the projections ``Rgs = L^T @ G`` that
the class's grouped K1 wrote) or dense (full-momentum blocks with ``Ms``, or no-momentum blocks
without), all in the left (logical) form, each list one shape, dtype and set of strides.
``Vs`` are elementwise (m x n) or Adam-mini block means (nb, contiguous). The per-member
scalars are one table of rows ``ROWS`` (see ``adapm_rows``). The Triton backend runs
``kernels/grouped_adapm_update.py`` (two to four launches per class); the reference runs the
single-matrix references member by member. Both take the on-device ``skip`` flag.
"""
from __future__ import annotations

import torch

from lowrank_fused import ops
from lowrank_fused.dispatch import choose_backend
from lowrank_fused.reference.grouped_adapm_update import ROWS, grouped_adapm_step_ref

SCALARS = len(ROWS)


def adapm_rows(count, **scalars):
    """The scalar table (``len(ROWS)`` lists of ``count`` floats) from keyword scalars, each a
    float (every member) or a sequence of ``count``; missing rows are 0. (A bound call also
    takes a row as one float for every member.)"""
    unknown = set(scalars) - set(ROWS)
    if unknown:
        raise ValueError(f"unknown scalars {sorted(unknown)}; the rows are {ROWS}")
    rows = []
    for name in ROWS:
        value = scalars.get(name, 0.0)
        if isinstance(value, (int, float)):
            rows.append([float(value)] * count)
        else:
            value = [float(v) for v in value]
            if len(value) != count:
                raise ValueError(f"{name} has {len(value)} values for {count} members")
            rows.append(value)
    return rows


def _check_list(name, tensors, shape, device, dtype=None):
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}[{i}] must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device}, the class on {device}")
        if t.dtype != (dtype or first.dtype) or not t.is_floating_point():
            raise TypeError(f"{name}[{i}] is {t.dtype}, {name}[0] {first.dtype}: a class "
                            f"shares one floating dtype" + (f" ({dtype})" if dtype else ""))
        if t.stride() != first.stride():
            raise ValueError(f"{name}[{i}] has strides {t.stride()}, {name}[0] "
                             f"{first.stride()}: a class shares one layout")


def _check_disjoint(name, tensors):
    spans = []
    for i, t in enumerate(tensors):
        if t.numel():
            extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
            spans.append((t.data_ptr(), t.data_ptr() + extent * t.element_size(), i))
    spans.sort()
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name}[{min(i, j)}] and {name}[{max(i, j)}] overlap: outputs "
                             f"written in place must not share memory")


class BoundAdapmClass:
    """One class's steady step, checked and resolved once (what the step engine calls every
    step). ``Gs`` fixes the gradients' layout (a call's may lie elsewhere). ``Bs`` (r x n fp32,
    contiguous) is the low-rank scratch the Triton backend folds the right operand into."""

    def __init__(self, Ws, Gs, Vs, *, Ls=None, Rs=None, Rgs=None, Bs=None, Ms=None,
                 backend="auto"):
        count = len(Ws)
        if count == 0:
            raise ValueError("a class needs at least one member")
        named = dict(Gs=Gs, Vs=Vs, Ls=Ls, Rs=Rs, Rgs=Rgs, Ms=Ms)
        for name, lst in named.items():
            if lst is not None and len(lst) != count:
                raise ValueError(f"{name} has {len(lst)} tensors but Ws has {count}")
        W0 = Ws[0]
        if W0.dim() != 2:
            raise ValueError(f"Ws[0] must be 2-D (the left form), got shape {tuple(W0.shape)}")
        device = W0.device
        m, n = W0.shape
        _check_list("Ws", Ws, (m, n), device)
        _check_list("Gs", Gs, (m, n), device)          # G's dtype may differ from W's
        _check_disjoint("Ws", Ws)
        if Vs[0].shape == W0.shape:
            _check_list("Vs", Vs, (m, n), device)
        else:
            nb = Vs[0].numel()
            if Vs[0].dim() != 1 or nb == 0 or m % nb:
                raise ValueError(f"Vs[0] must be m x n = {(m, n)} or a vector of block means "
                                 f"whose count divides m, got shape {tuple(Vs[0].shape)}")
            _check_list("Vs", Vs, (nb,), device)
            if Vs[0].stride(0) != 1:
                raise ValueError("Vs (block means) must be contiguous")
        _check_disjoint("Vs", Vs)
        self.lowrank = Ls is not None
        if self.lowrank:
            if Rs is None or Rgs is None:
                raise ValueError("a low-rank class needs Ls, Rs and Rgs")
            rank = Ls[0].shape[-1]
            _check_list("Ls", Ls, (m, rank), device)
            _check_list("Rs", Rs, (rank, n), device, Ls[0].dtype)
            _check_list("Rgs", Rgs, (rank, n), device, torch.float32)
            _check_disjoint("Rs", Rs)
            if Ms is not None:
                raise ValueError("a low-rank class keeps no Ms (its momentum is L @ R)")
        elif Ms is not None:
            _check_list("Ms", Ms, (m, n), device)
            _check_disjoint("Ms", Ms)
        op = "adapm_update" if self.lowrank else "adapm_dense_update"
        self.backend = choose_backend(backend, device, (op,))
        self.count, self.device = count, device
        self.layout = (W0.shape, Gs[0].stride(), Gs[0].dtype, device)
        self.strides, self.shapes = [Gs[0].stride()] * count, [W0.shape] * count
        self.dtypes, self.devices = [Gs[0].dtype] * count, [device] * count
        self._token = None      # the layout_token of the last call whose Gs were checked
        self.lists = dict(Ws=Ws, Vs=Vs, Ls=Ls, Rs=Rs, Rgs=Rgs, Ms=Ms)
        self.impl = None
        if self.backend == "triton" and m * n:
            from lowrank_fused.kernels.grouped_adapm_update import GroupedAdapmStep

            if self.lowrank:
                if Bs is None:
                    Bs = [torch.empty((rank, n), dtype=torch.float32, device=device)
                          for _ in range(count)]
                _check_list("Bs", Bs, (rank, n), device, torch.float32)
                if not Bs[0].is_contiguous():
                    raise ValueError("Bs must be contiguous")
            self.impl = GroupedAdapmStep(Ws, Vs, Ls=Ls, Rs=Rs, Rgs=Rgs, Bs=Bs, Ms=Ms, Gs=Gs)

    def __call__(self, Gs, rows, *, precision="ieee", skip=None, layout_token=None):
        """One step: ``Gs`` this step's gradients (the bound layout), ``rows`` the scalar
        table (``ROWS`` entries, each a float for every member or one float per member),
        ``skip`` the on-device flag (None: never skip). ``layout_token``: as
        ``ops_grouped.BoundGroupedProject``'s (the check of ``Gs`` once per token)."""
        shape, stride, dtype, device = self.layout
        if len(Gs) != self.count:
            raise ValueError(f"Gs has {len(Gs)} tensors for a class of {self.count}")
        if layout_token is None or layout_token != self._token:
            if list(map(torch.Tensor.stride, Gs)) != self.strides or \
                    list(map(torch.Tensor.size, Gs)) != self.shapes or \
                    [G.dtype for G in Gs] != self.dtypes or \
                    [G.device for G in Gs] != self.devices:
                _check_list("Gs", Gs, shape, device, dtype)
                raise ValueError(f"Gs must have the bound gradients' strides {stride}")
            self._token = layout_token
        if len(rows) != SCALARS:
            raise ValueError(f"rows must have {SCALARS} entries ({ROWS}), got {len(rows)}")
        if skip is not None:
            ops._check_skip(skip, device)
        if self.impl is not None:
            self.impl(Gs, rows, precision=precision, skip=skip)
        elif self.backend == "triton":      # empty matrices: nothing to write
            return
        else:
            L = self.lists
            grouped_adapm_step_ref(L["Ws"], Gs, L["Vs"], rows, Ls=L["Ls"], Rs=L["Rs"],
                                   Rgs=L["Rgs"], Ms=L["Ms"], precision=precision, skip=skip)


def grouped_adapm_update(Ws, Gs, Ls, Rs, Rgs, Vs, rows, *, precision="ieee", skip=None,
                         backend="auto") -> None:
    """Every low-rank member's step between refits (``adapm_update`` without L0, R0), in
    place on Rs, Vs and Ws."""
    BoundAdapmClass(Ws, Gs, Vs, Ls=Ls, Rs=Rs, Rgs=Rgs, backend=backend)(
        Gs, rows, precision=precision, skip=skip)


def grouped_adapm_dense_update(Ws, Gs, Ms, Vs, rows, *, skip=None, backend="auto") -> None:
    """Every full-momentum (``Ms``) or no-momentum (``Ms=None``) member's step
    (``adapm_dense_update``), in place on Ms, Vs and Ws."""
    BoundAdapmClass(Ws, Gs, Vs, Ms=Ms, backend=backend)(Gs, rows, skip=skip)


__all__ = ["BoundAdapmClass", "adapm_rows", "grouped_adapm_update",
           "grouped_adapm_dense_update", "ROWS", "SCALARS"]
