"""LDAdam's projection-aware (variance-aware) moment transport between consecutive subspaces
(docs/methods/ldadam.md, update lines 4 and 6; K8 in docs/bytes.md), eager reference."""

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("ldadam_moment_transport", "reference")
def ldadam_moment_transport_ref(P_new, P_old, M, V, M_tr, *, bc1: float, bc2: float,
                                precision: str = "ieee") -> None:
    """Left (canonical) form, bases P_new, P_old (m x r), moments M, V (r x n) of the old
    subspace, ``bc1 = 1 - beta1^t``, ``bc2 = 1 - beta2^t`` at the step count ``t >= 1`` that
    produced them. With ``C = P_new^T @ P_old`` (r x r)::

        M_tr = C @ M                                  # written into M_tr; M is left untouched
        V    = abs(((C*C) @ (V/bc2 - M^2/bc1^2) + M_tr^2/bc1^2) * bc2)    # in place

    The variance part of the old statistics is transported with squared coefficients and the
    squared transported mean is added back; ``abs`` (not a clamp) is part of the algorithm,
    because ``V/bc2 - M^2/bc1^2`` can be negative. M is kept so the caller can still use it
    (LDAdam's error feedback needs both M and M_tr); the caller then sets ``M = M_tr``.
    Math in fp32 (the three products with the operands of ``precision``); outputs keep their
    dtypes. A right-projected matrix passes ``Q^T`` bases and
    ``M^T, V^T, M_tr^T`` (then ``C`` is the transpose of ``Q_old @ Q_new^T``,
    docs/methods/ldadam.md).
    """
    C = matmul(P_new.t(), P_old, precision)
    m = M.float()
    m_tr = matmul(C, m, precision)
    w = V.float() / bc2 - (m * m) / (bc1 * bc1)
    w = matmul(C * C, w, precision)
    w = w + (m_tr * m_tr) / (bc1 * bc1)
    M_tr.copy_(m_tr)
    V.copy_((w * bc2).abs())
