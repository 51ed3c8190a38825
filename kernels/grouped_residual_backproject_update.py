"""AdaMeM's combined update for a whole group of same-shape matrices in one launch
(docs/methods/adamem.md, update lines 8-9; K3 with the residual term, K5 pass 2).

Per member b, in place: ``W_b = W_b*pre_b - coef_b*(P_b @ N_b)
- res_coef_b*((G_b - P_b @ R_b) * col_scale_b) ; W_b -= post_decay_b*W_b``. As the single
launcher (``residual_backproject_update.py``), the two low-rank products fold into one GEMM
with ``L_b = coef_b*N_b - res_coef_b*R_b*col_scale_b`` (r x n, built with torch, the same
expression, so the same bits), and the grouped K3 kernel's ``HAS_RESIDUAL`` epilogue subtracts
``res_coef_b * G_b * col_scale_b``: one launch for the group, G and W each read once.

``skip`` (a 0-dim bool tensor on the device, docs/conventions.md): the grouped K3 masks its
store of every W_b with it, so the weights keep their bits when it holds True; the folded
factors are formed in the caller's workspaces either way (nothing of the optimizer's state).
"""
import numpy as np

from lowrank_fused import _capture

from ._common import cdiv, config_mode, dot_mode, interpreting, skip_flag
from ._grouped import element_offsets, offsets_table, scalar_table
from ._launch import launch_planned
from .backproject_update import choose_config
from .grouped_backproject_update import (MAX_GRID_Z, _grouped_backproject_update_kernel,
                                         grouped_backproject_update)
from .residual_backproject_update import folded_factor


def grouped_residual_backproject_update(Ws, Gs, Ps, Rs, Ns, col_scales, *, coef, res_coef,
                                        pre_scale, post_decay, precision: str = "ieee",
                                        prepared=None, stacked=None, skip=None,
                                        planned=None) -> None:
    """Same contract as ``lowrank_fused.reference.grouped_residual_backproject_update`` (left
    form, in place on every ``Ws[b]``; the scalars are sequences, one value per member).

    A bound caller's keywords (``ops_grouped.BoundGroupedResidualBackprojectUpdate``):
    ``prepared``: {list name of the grouped K3 ("Ws", "Ps", "Ns", "residuals", "col_scales"):
    its element offsets} for lists whose layout it checked once. ``stacked``: ``(R3, N3,
    CS)``, views of the whole group's ``Rs``, ``Ns`` (count x r x n, fp32, contiguous) and
    ``col_scales`` (count x n, fp32), each member's slice being its tensor: the folded factors
    are then formed in four launches for the group, in place in ``Ns`` (the same expression
    as ``folded_factor``, so the same bits; ``Rs`` and ``Ns`` are overwritten: the caller's
    workspaces), and K3 reads them from ``Ns``, whose offsets ``prepared`` may then hold.
    ``skip``: None or a 0-dim bool tensor on the members' device (never read on the host):
    when it holds True every W_b keeps its bits. ``planned``: a ``PlannedResidualUpdate``
    of these lists at the addresses of these gradients (a bound caller's, which checked the
    layouts and the scalars): the call is then its per-step half only, and only ``Gs[0]``
    is read (the base of the planned residual offsets); the scalars may also be single
    numbers, one for every member."""
    if planned is not None:
        planned(Gs[0], coef=coef, res_coef=res_coef, pre_scale=pre_scale,
                post_decay=post_decay, skip=skip)
        return
    if len(Ws) == 0:
        return
    if stacked is not None:
        R3, N3, CS = stacked
        count = len(Ws)
        table = scalar_table([[float(c) for c in coef], [float(d) for d in res_coef]],
                             N3.device, key=("fold", N3.data_ptr(), count))
        N3.mul_(table[0].view(count, 1, 1))             # coef*N
        R3.mul_(CS.unsqueeze(1))                        # R*cs
        R3.mul_(table[1].view(count, 1, 1))             # res_coef*(R*cs)
        N3.sub_(R3)
        css, Ls = col_scales, Ns
    else:
        css, Ls = zip(*(folded_factor(N, R, cs, c, d)
                        for N, R, cs, c, d in zip(Ns, Rs, col_scales, coef, res_coef)))
        css, Ls = list(css), list(Ls)
        if prepared and "Ns" in prepared:       # the factors are new tensors
            prepared = {k: v for k, v in prepared.items() if k != "Ns"}
    grouped_backproject_update(Ws, Ps, Ls, coef=[1.0] * len(Ws), pre_scale=pre_scale,
                               post_decay=post_decay, precision=precision, residuals=Gs,
                               col_scales=css, res_coef=res_coef, prepared=prepared,
                               skip=skip)


class PlannedResidualUpdate:
    """The host work of the stacked launch, done once for a fixed group (left-form lists
    with ``stacked`` workspaces, see ``grouped_residual_backproject_update``) whose
    gradients sit at fixed addresses: tile choice, offset tables, grid, and two scalar
    tables at fixed addresses (``lowrank_fused._tables``). A call is the per-step half: it
    fills the tables (a single number fills its row for every member), forms the folded
    factors in ``Ns`` (the four in-place launches, the same expressions and so the same bits
    as the unplanned call) and launches the grouped K3 with the ``HAS_RESIDUAL`` epilogue.
    ``Gs`` fixes the residual offsets; a call names only the first gradient (the base of
    those offsets), which must be at the planned address. Every layout is the caller's to
    check (``ops_adamem_grouped.BoundAdamemResidualUpdate``)."""

    def __init__(self, Ws, Gs, Ps, Ns, col_scales, stacked, *, precision="ieee",
                 prepared=None):
        from lowrank_fused._tables import StagedTable

        count = len(Ws)
        if count == 0 or count > MAX_GRID_Z:
            raise ValueError(f"a planned group needs 1 to {MAX_GRID_Z} members, got {count}")
        W0, P0, N0, G0 = Ws[0], Ps[0], Ns[0], Gs[0]
        self.count, self.device = count, W0.device
        self.m, self.n = W0.shape
        rank = P0.shape[1]
        self.empty = self.m == 0 or self.n == 0
        R3, N3, CS = stacked
        self.R3, self.N3, self.cs = R3, N3, CS.unsqueeze(1)
        self.fold = StagedTable(2, count, self.device)    # coef, res_coef
        self.fold_coef = self.fold.table[0].view(count, 1, 1)
        self.fold_res = self.fold.table[1].view(count, 1, 1)
        self.k3 = StagedTable(4, count, self.device)      # 1, pre_scale, post_decay, res_coef
        self.columns = (np.empty((2, 1)), np.empty((4, 1)))   # single numbers: broadcast
        prepared = prepared or {}
        lists = [("Ws", Ws), ("Ps", Ps), ("Ns", Ns), ("residuals", Gs),
                 ("col_scales", col_scales)]
        rows = [prepared.get(name) or element_offsets(name, lst) for name, lst in lists]
        self.offs, aligned = offsets_table(rows, [lst[0].element_size() for _, lst in lists],
                                           self.device)
        cfg = choose_config(self.m, self.n, rank, config_mode(precision, self.device))
        self.grid = (cdiv(self.m, cfg.BLOCK_M), cdiv(self.n, cfg.BLOCK_N), count)
        self.g_ptr = G0.data_ptr()
        self.tensors = (W0, P0, N0)
        self.C0 = col_scales[0]
        self.args = (count, self.m, self.n, rank, W0.stride(0), W0.stride(1), P0.stride(0),
                     P0.stride(1), N0.stride(0), N0.stride(1), G0.stride(0), G0.stride(1))
        self.meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                         DOT_MODE=dot_mode(precision, self.device), INTERPRET=interpreting(),
                         ALIGNED=aligned, HAS_RESIDUAL=True, DIVIDE_N=False,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def __call__(self, G0, *, coef, res_coef, pre_scale, post_decay, skip=None):
        """The step: ``G0`` the first gradient (left form, at the planned address); each
        scalar one number for every member or one per member."""
        if G0.data_ptr() != self.g_ptr:
            raise ValueError("the planned update's gradients moved: plan it again")
        if all(type(x) is float for x in (coef, res_coef, pre_scale, post_decay)):
            fold, k3 = self.columns                     # one broadcast write per table
            fold[:, 0] = (coef, res_coef)
            k3[:, 0] = (1.0, pre_scale, post_decay, res_coef)
        else:
            fold, k3 = [coef, res_coef], [1.0, pre_scale, post_decay, res_coef]
        self.fold.fill(fold)
        self.k3.fill(k3)
        if not self.empty:    # one capture unit: a replayed CUDA graph makes all of it
            _capture.unit(self._launch, G0, skip)

    def _launch(self, G0, skip):
        self.N3.mul_(self.fold_coef)                    # coef*N
        self.R3.mul_(self.cs)                           # R*cs
        self.R3.mul_(self.fold_res)                     # res_coef*(R*cs)
        self.N3.sub_(self.R3)
        W0, P0, N0 = self.tensors
        launch_planned(
            self, _grouped_backproject_update_kernel, self.grid,
            W0, P0, N0, self.offs, self.k3.table, G0, self.C0, skip_flag(skip, self.device),
            W0, *self.args, **self.meta)


def aot_variants():
    """No kernel of its own: ``grouped_backproject_update``'s HAS_RESIDUAL variants are
    compiled there."""
    return iter(())
