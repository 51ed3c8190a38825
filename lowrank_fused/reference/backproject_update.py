"""K3 back-projection + weight update + weight decay, eager reference (docs/methods/galore.md;
weight-decay orders in docs/conventions.md; K3 in docs/bytes.md)."""

from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference._precision import matmul


@register("backproject_update", "reference")
def backproject_update_ref(W, P, N, *, coef: float, pre_scale: float, post_decay: float,
                           precision: str = "ieee", skip=None) -> None:
    """Left form, in place on W (m x n), with P (m x r) and N (r x n):

    ``W = W*pre_scale``; ``W = W - coef*(P @ N)``; ``W = W - post_decay*W``.
    WD-pre passes ``pre_scale = 1 - lr*wd, post_decay = 0``; WD-post (GaLore/HF) passes
    ``pre_scale = 1, post_decay = lr*wd``. Math in fp32 (``P @ N`` with the operands of
    ``precision``); W is written back in its own dtype. ``skip`` (optional, 0-dim bool):
    where True, W keeps its bits.
    """
    if skip is not None:
        return run_unless(skip, (W,), backproject_update_ref, W, P, N, coef=coef,
                          pre_scale=pre_scale, post_decay=post_decay, precision=precision)
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - coef * matmul(P, N, precision)
    if post_decay != 0.0:
        w = w - post_decay * w
    W.copy_(w)
