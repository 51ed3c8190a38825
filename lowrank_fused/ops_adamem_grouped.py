"""AdaMeM's combined update (docs/methods/adamem.md, update lines 8-9) for a class of
same-shape matrices, as the optimizer's step engine calls it once per class and step.

``BoundAdamemResidualUpdate`` is ``ops_grouped.BoundGroupedResidualBackprojectUpdate`` (every
check of the op made once, at binding; ``Rs`` and ``Ns`` the caller's workspaces, overwritten)
with the Triton launcher's host work planned once per (precision, gradient addresses)
instead of per call (``kernels/grouped_residual_backproject_update.PlannedResidualUpdate``):
a steady call checks the gradients' layout and addresses (one cheap pass), fills two scalar
tables at fixed addresses and makes the same launches with the same arguments as the last
step. The scalars may be single numbers (one for every member, the common case: the table
row is filled with it) or one per member. Bound on the class's gradients as the step has
them: ``side="right"`` (a tall matrix run on its transpose) takes the gradients untransposed
and forms the transposes only when it plans. Other backends, and workspaces that are not
consecutive slices of one buffer, take the unplanned bound call with the same bits.
"""
from __future__ import annotations

import torch

from lowrank_fused import ops, ops_grouped

_PTR = torch.Tensor.data_ptr


def _left(Gs, side):
    return Gs if side == "left" else [G.t() for G in Gs]


class BoundAdamemResidualUpdate:
    """The combined update of a fixed class: ``Ws``, ``Ps``, ``Rs``, ``Ns`` and
    ``col_scales`` in the left (canonical) form, ``Gs`` the gradients as a call passes them
    (their transposes are the left form with ``side="right"``). A call: ``(Gs, *, coef,
    res_coef, pre_scale, post_decay, precision, skip)``, as
    ``ops_grouped.grouped_residual_backproject_update``."""

    def __init__(self, Ws, Gs, Ps, Rs, Ns, col_scales, *, side="left", backend="auto"):
        ops._check_side(side)
        self.side = side
        left = _left(list(Gs), side)
        self.inner = ops_grouped.BoundGroupedResidualBackprojectUpdate(
            Ws, left, Ps, Rs, Ns, col_scales, backend=backend, scratch=True)
        self.count, self.device = self.inner.count, self.inner.device
        self.stacked = self.inner.kw.get("stacked")      # the Triton launcher's fast path
        self.layout = ops_grouped._Layout(Gs[0], self.count)
        self._plans = {}              # precision -> (gradient addresses, planned launch)
        self._scalars_key = None      # the last call's scalars, checked once per distinct values
        self._scalars = None

    def _checked_scalars(self, coef, res_coef, pre_scale, post_decay):
        key = (coef, res_coef, pre_scale, post_decay)
        if key != self._scalars_key:
            named = dict(coef=coef, res_coef=res_coef, pre_scale=pre_scale,
                         post_decay=post_decay)
            checked = ops_grouped._finite_scalars(self.count, **named)
            # a number stays one number (one table row filled with it)
            self._scalars = {k: (float(v) if isinstance(v, (int, float)) else tuple(checked[k]))
                             for k, v in named.items()}
            self._scalars_key = key
        return self._scalars

    def __call__(self, Gs, *, coef, res_coef, pre_scale=1.0, post_decay=0.0,
                 precision="ieee", skip=None, checked=None):
        """``checked``: an ``ops_grouped._Layout`` that ``Gs`` (this very list) has just
        been checked against, by the class's bound K1 in the same step: when it describes
        the layout bound here, the per-member check is not repeated."""
        if checked is not None and (checked.count, checked.shape, checked.stride,
                                    checked.dtype, checked.device) == (
                self.count, self.layout.shape, self.layout.stride, self.layout.dtype,
                self.layout.device):
            pass
        elif not self.layout.matches(Gs):
            left = _left(list(Gs), self.side)
            ops_grouped._lists(Gs=left, Ws=self.inner.lists[0])
            ops_grouped._check_members("Gs", left, self.inner.layout.shape, self.device,
                                       "the bound Gs[0]", dtype=self.inner.layout.dtype)
            self.layout = ops_grouped._Layout(Gs[0], self.count)   # other strides: re-plan
            self._plans.clear()
        scalars = self._checked_scalars(coef, res_coef, pre_scale, post_decay)
        if skip is not None:
            ops._check_skip(skip, self.device)
        if self.stacked is None:                 # the unplanned bound call, per member scalars
            per = {k: (v,) * self.count if isinstance(v, float) else v
                   for k, v in scalars.items()}
            self.inner(_left(Gs, self.side), precision=precision, skip=skip, **per)
            return
        ptrs = tuple(map(_PTR, Gs))
        known = self._plans.get(precision)
        if known is None or known[0] != ptrs:
            ops._check_precision(precision)
            from lowrank_fused.kernels._grouped import element_offsets
            from lowrank_fused.kernels.grouped_residual_backproject_update import (
                PlannedResidualUpdate)

            left = _left(list(Gs), self.side)
            Ws, Ps, _, Ns, css = self.inner.lists
            prepared = dict(self.inner.kw["prepared"], residuals=element_offsets("Gs", left))
            known = self._plans[precision] = (ptrs, PlannedResidualUpdate(
                Ws, left, Ps, Ns, css, self.stacked, precision=precision, prepared=prepared))
        Ws, Ps, Rs, Ns, css = self.inner.lists
        # the dispatched launcher (what a test counts), its per-step half only: it reads
        # the first gradient alone (the base of the planned offsets)
        G0 = Gs[0] if self.side == "left" else Gs[0].t()
        self.inner.impl(Ws, (G0,), Ps, Rs, Ns, css, precision=precision, planned=known[1],
                        skip=skip, **scalars)
