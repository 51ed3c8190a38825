"""K1 projection, eager reference (docs/methods/galore.md; K1 in docs/bytes.md)."""
import torch

from lowrank_fused.dispatch import register


@register("project", "reference")
def project_ref(G: torch.Tensor, P: torch.Tensor, R: torch.Tensor, precision: str = "ieee",
                col_sumsq=None, r_sumsq=None) -> None:
    """Left form: ``R = P^T @ G`` with G (m x n) in its storage dtype, P (m x r), R (r x n) fp32.
    With ``col_sumsq`` (n, fp32) also writes ``colsum(G^2)``; with ``r_sumsq`` (1 element,
    fp32) also ``||R||_F^2`` of the fp32 R.

    G and P are cast to fp32 before the product (the reference ignores ``precision``: its
    GEMM is whatever torch's fp32 matmul is on the device).
    """
    g = G.float()
    R.copy_(P.float().t() @ g)
    if col_sumsq is not None:
        col_sumsq.copy_((g * g).sum(dim=0))
    if r_sumsq is not None:
        r_sumsq.copy_(R.square().sum().reshape(1))
