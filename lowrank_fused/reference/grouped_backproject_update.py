"""K3 back-projection + weight update + weight decay of a group of same-shape matrices
(one launch), eager reference: a loop over the single-matrix reference ``backproject_update_ref``
(docs/methods/galore.md; K3 in docs/bytes.md)."""
from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference.backproject_update import backproject_update_ref


@register("grouped_backproject_update", "reference")
def grouped_backproject_update_ref(Ws, Ps, Ns, *, coef, pre_scale, post_decay,
                                   precision: str = "ieee", skip=None) -> None:
    """Left form, in place on every ``Ws[b]`` with the b-th scalars (``coef``, ``pre_scale``,
    ``post_decay`` are sequences, one value per matrix): ``backproject_update_ref``.
    ``skip`` (optional, 0-dim bool): where True, every ``Ws[b]`` keeps its bits."""
    if skip is not None:
        return run_unless(skip, Ws, grouped_backproject_update_ref, Ws, Ps, Ns, coef=coef,
                          pre_scale=pre_scale, post_decay=post_decay, precision=precision)
    for b, (W, P, N) in enumerate(zip(Ws, Ps, Ns)):
        backproject_update_ref(W, P, N, coef=float(coef[b]), pre_scale=float(pre_scale[b]),
                               post_decay=float(post_decay[b]), precision=precision)
