"""AdaMeM combined update: back-projected low-rank step plus the column-scaled residual, with
decoupled weight decay, eager reference (docs/methods/adamem.md, update lines 8-9; K3 with
the residual term, K5 pass 2, in docs/bytes.md)."""

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("residual_backproject_update", "reference")
def residual_backproject_update_ref(W, G, P, R, N, col_scale, *, coef: float, res_coef: float,
                                    pre_scale: float, post_decay: float,
                                    precision: str = "ieee") -> None:
    """Left form, in place on W (m x n), with G (m x n), P (m x r), R = P^T G and N (r x n),
    col_scale (n):

    ``W = W*pre_scale``;
    ``W = W - coef*(P @ N) - res_coef*((G - P @ R) * col_scale[None, :])``;
    ``W = W - post_decay*W``.
    AdaMeM passes ``coef = lr``, ``res_coef = lr*delta``, WD-pre (``pre_scale = 1 - lr*wd``).
    Math in fp32, the two products with the operands of ``precision``; W is written once, in
    its own dtype.
    """
    p = P.float()
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    residual = G.float() - matmul(p, R, precision)
    w = w - (coef * matmul(p, N, precision) + res_coef * (residual * col_scale.float()))
    if post_decay != 0.0:
        w = w - post_decay * w
    W.copy_(w)
