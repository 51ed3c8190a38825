"""AdaMeM's combined update for a whole group of same-shape matrices in one launch
(docs/methods/adamem.md, update lines 8-9; K3 with the residual term, K5 pass 2).

Per member b, in place: ``W_b = W_b*pre_b - coef_b*(P_b @ N_b)
- res_coef_b*((G_b - P_b @ R_b) * col_scale_b) ; W_b -= post_decay_b*W_b``. As the single
launcher (``residual_backproject_update.py``), the two low-rank products fold into one GEMM
with ``L_b = coef_b*N_b - res_coef_b*R_b*col_scale_b`` (r x n, built with torch, the same
expression, so the same bits), and the grouped K3 kernel's ``HAS_RESIDUAL`` epilogue subtracts
``res_coef_b * G_b * col_scale_b``: one launch for the group, G and W each read once.
"""
from .grouped_backproject_update import grouped_backproject_update
from .residual_backproject_update import folded_factor


def grouped_residual_backproject_update(Ws, Gs, Ps, Rs, Ns, col_scales, *, coef, res_coef,
                                        pre_scale, post_decay, precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.grouped_residual_backproject_update`` (left
    form, in place on every ``Ws[b]``; the scalars are sequences, one value per member)."""
    if len(Ws) == 0:
        return
    css, Ls = zip(*(folded_factor(N, R, cs, c, d)
                    for N, R, cs, c, d in zip(Ns, Rs, col_scales, coef, res_coef)))
    css, Ls = list(css), list(Ls)
    grouped_backproject_update(Ws, Ps, Ls, coef=[1.0] * len(Ws), pre_scale=pre_scale,
                               post_decay=post_decay, precision=precision, residuals=Gs,
                               col_scales=css, res_coef=res_coef)


def aot_variants():
    """No kernel of its own: ``grouped_backproject_update``'s HAS_RESIDUAL variants are
    compiled there."""
    return iter(())
