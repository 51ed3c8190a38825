"""K1 projection, eager reference (docs/methods/galore.md; K1 in docs/bytes.md)."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("project", "reference")
def project_ref(G: torch.Tensor, P: torch.Tensor, R: torch.Tensor, precision: str = "ieee",
                col_sumsq=None, r_sumsq=None) -> None:
    """Left form: ``R = P^T @ G`` with G (m x n) in its storage dtype, P (m x r), R (r x n) fp32.
    With ``col_sumsq`` (n, fp32) also writes ``colsum(G^2)``; with ``r_sumsq`` (1 element,
    fp32) also ``||R||_F^2`` of the fp32 R.

    G and P are cast to fp32 before the product, whose operands are rounded as the fused
    GEMM's ``precision`` rounds them (``reference._precision``).
    """
    g = G.float()
    R.copy_(matmul(P.t(), g, precision))
    if col_sumsq is not None:
        col_sumsq.copy_((g * g).sum(dim=0))
    if r_sumsq is not None:
        r_sumsq.copy_(R.square().sum().reshape(1))
