"""LDAdam's power-iteration input ``b`` (docs/methods/ldadam.md, update line 1), eager reference."""

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("ldadam_momentum_mix", "reference")
def ldadam_momentum_mix_ref(A, P_old, M, B, *, coef_m: float, coef_a: float,
                            precision: str = "ieee") -> None:
    """Left (canonical) form, written into ``B`` (m x n)::

        B = coef_m * (P_old @ M) + coef_a * A

    with A (m x n, the accumulated gradient ``E + G``), P_old (m x r) and M (r x n).
    LDAdam passes ``coef_m = rho/bc1(t)`` and ``coef_a = 1 - rho``: ``b`` interpolates the
    bias-corrected back-projected momentum with the fresh gradient. Math in fp32 (``P_old @ M``
    with the operands of ``precision``); ``B`` keeps
    its own dtype (fp32, or the parameter dtype to reproduce the official bf16 ``b``).
    A right-projected matrix passes ``A^T, Q_old^T, M^T, B^T``.
    """
    B.copy_(coef_m * matmul(P_old, M, precision) + coef_a * A.float())
