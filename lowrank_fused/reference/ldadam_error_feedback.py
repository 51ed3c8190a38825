"""LDAdam's generalised error feedback (docs/methods/ldadam.md, update lines 3 and 5 and the
fused form; K4 in docs/bytes.md), eager reference."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("ldadam_error_feedback", "reference")
def ldadam_error_feedback_ref(A, P_new, P_old, Rg, M, M_tr, E, *, c: float,
                              explicit: bool = False, precision: str = "ieee") -> None:
    """Left (canonical) form, written into ``E`` (m x n; may alias ``A``)::

        E = A - P_new @ Rg + c * (P_old @ M) - c * (P_new @ M_tr)

    A = E_prev + G (m x n), P_new, P_old (m x r), Rg = P_new^T A, M the old momentum and
    ``M_tr = (P_new^T P_old) @ M`` (all r x n), ``c = beta1/(1-beta1)``. E holds the
    gradient-compression error plus the part of the old momentum the new subspace cannot
    represent.

    ``explicit=False`` (the fused form of docs/methods/ldadam.md, which the kernels implement):
    one GEMM with K = 2r and a subtract epilogue,
    ``E = A - hcat(P_new, P_old) @ vcat(Rg + c*M_tr, -c*M)``.
    ``explicit=True``: the three in-place updates of ``ldadamw_torch`` in order, each result
    stored in E's dtype (reproduces the official rounding of a bf16 error buffer).
    Math in fp32, the products with the operands of ``precision``; A is read in its storage
    dtype.
    """
    Pn, Po = P_new.float(), P_old.float()
    if explicit:
        E.copy_(A.float() - matmul(Pn, Rg, precision))
        E.copy_(E.float() + c * matmul(Po, M, precision))
        E.copy_(E.float() - c * matmul(Pn, M_tr, precision))
        return
    K = torch.cat([Pn, Po], dim=1)
    L = torch.cat([Rg.float() + c * M_tr.float(), -c * M.float()], dim=0)
    E.copy_(A.float() - matmul(K, L, precision))
