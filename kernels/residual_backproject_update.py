"""AdaMeM's combined update, fused (docs/methods/adamem.md, update lines 8-9; K3 with the
residual term, K5 pass 2, in docs/bytes.md).

``W = W*pre - coef*(P @ N) - res_coef*((G - P @ R) * col_scale) ; W -= post_decay*W``.
Because ``col_scale`` is per column, ``(P @ R) * col_scale = P @ (R * col_scale)``, so the two
low-rank products fold into one GEMM with ``L = coef*N - res_coef*R*col_scale`` (r x n, built
with torch) and the epilogue subtracts ``res_coef * G * col_scale``: G and W are each read
once and W written once; the residual ``G - P R`` never exists.
"""
from .backproject_update import backproject_update


def folded_factor(N, R, col_scale, coef: float, res_coef: float):
    """``(col_scale, L)``: the fp32 contiguous column scales and the GEMM's right factor
    ``L = coef*N - res_coef*R*col_scale`` (the single and the grouped launcher build it with
    this one expression, so their results agree bit for bit)."""
    cs = col_scale.float().contiguous()
    return cs, float(coef) * N.float() - float(res_coef) * (R.float() * cs[None, :])


def residual_backproject_update(W, G, P, R, N, col_scale, *, coef: float, res_coef: float,
                                pre_scale: float, post_decay: float,
                                precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.residual_backproject_update`` (left form,
    in place on W)."""
    cs, L = folded_factor(N, R, col_scale, coef, res_coef)
    backproject_update(W, P, L, coef=1.0, pre_scale=pre_scale, post_decay=post_decay,
                       precision=precision, residual=G, col_scale=cs, res_coef=res_coef)


def aot_variants():
    """No kernel of its own: ``backproject_update``'s HAS_RESIDUAL variants are compiled there."""
    return iter(())
