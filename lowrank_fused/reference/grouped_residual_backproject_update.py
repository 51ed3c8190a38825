"""AdaMeM's combined update of a group of same-shape matrices, eager reference: a
loop over the single-matrix reference ``residual_backproject_update_ref``
(docs/methods/adamem.md, update lines 8-9; K3 with the residual term, K5 pass 2)."""
from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference.residual_backproject_update import residual_backproject_update_ref


@register("grouped_residual_backproject_update", "reference")
def grouped_residual_backproject_update_ref(Ws, Gs, Ps, Rs, Ns, col_scales, *, coef, res_coef,
                                            pre_scale, post_decay,
                                            precision: str = "ieee", skip=None) -> None:
    """Left form, in place on every ``Ws[b]`` with the b-th scalars (``coef``, ``res_coef``,
    ``pre_scale``, ``post_decay`` are sequences, one value per matrix):
    ``residual_backproject_update_ref``. ``skip`` (a 0-dim bool tensor, never read on the
    host): when it holds True every ``Ws[b]`` keeps its bits."""
    if skip is not None:
        run_unless(skip, list(Ws), grouped_residual_backproject_update_ref, Ws, Gs, Ps, Rs, Ns,
                   col_scales, coef=coef, res_coef=res_coef, pre_scale=pre_scale,
                   post_decay=post_decay, precision=precision)
        return
    for b, (W, G, P, R, N, cs) in enumerate(zip(Ws, Gs, Ps, Rs, Ns, col_scales)):
        residual_backproject_update_ref(W, G, P, R, N, cs, coef=float(coef[b]),
                                        res_coef=float(res_coef[b]),
                                        pre_scale=float(pre_scale[b]),
                                        post_decay=float(post_decay[b]), precision=precision)
