"""K3 back-projection + weight update + weight decay, eager reference (docs/methods/galore.md;
weight-decay orders in docs/conventions.md; K3 in docs/bytes.md)."""

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("backproject_update", "reference")
def backproject_update_ref(W, P, N, *, coef: float, pre_scale: float, post_decay: float,
                           precision: str = "ieee") -> None:
    """Left form, in place on W (m x n), with P (m x r) and N (r x n):

    ``W = W*pre_scale``; ``W = W - coef*(P @ N)``; ``W = W - post_decay*W``.
    WD-pre passes ``pre_scale = 1 - lr*wd, post_decay = 0``; WD-post (GaLore/HF) passes
    ``pre_scale = 1, post_decay = lr*wd``. Math in fp32 (``P @ N`` with the operands of
    ``precision``); W is written back in its own dtype.
    """
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - coef * matmul(P, N, precision)
    if post_decay != 0.0:
        w = w - post_decay * w
    W.copy_(w)
