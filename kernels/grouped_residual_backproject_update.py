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
from ._grouped import scalar_table
from .grouped_backproject_update import grouped_backproject_update
from .residual_backproject_update import folded_factor


def grouped_residual_backproject_update(Ws, Gs, Ps, Rs, Ns, col_scales, *, coef, res_coef,
                                        pre_scale, post_decay, precision: str = "ieee",
                                        prepared=None, stacked=None, skip=None) -> None:
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
    when it holds True every W_b keeps its bits."""
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


def aot_variants():
    """No kernel of its own: ``grouped_backproject_update``'s HAS_RESIDUAL variants are
    compiled there."""
    return iter(())
