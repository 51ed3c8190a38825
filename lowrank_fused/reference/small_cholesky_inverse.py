"""Batched inverse Cholesky factor of small SPD matrices (the k x k part of CholeskyQR2;
docs/bytes.md, "Kernel-design notes"), eager reference."""
import torch

from lowrank_fused.dispatch import register


@register("small_cholesky_inverse", "reference")
def small_cholesky_inverse_ref(Gram: torch.Tensor, Linv: torch.Tensor, ok: torch.Tensor, *,
                               pivot_ratio_tol: float) -> None:
    """Gram (B, k, k) fp32 symmetric; writes ``Linv = L^{-1}`` (lower triangular, L L^T =
    Gram) into ``Linv`` (B, k, k) fp32 and into ``ok`` (B,) int32 1 where the factorization
    succeeded with finite pivots ``min L_ii > pivot_ratio_tol * max L_ii``, else 0 and
    ``Linv = I``. Only the lower triangle of Gram is read."""
    G = Gram.float()
    L, info = torch.linalg.cholesky_ex(G)
    d = torch.diagonal(L, dim1=-2, dim2=-1)
    dmax = d.amax(dim=-1)
    good = ((info == 0) & torch.isfinite(L).flatten(1).all(dim=1)
            & (d.amin(dim=-1) > pivot_ratio_tol * dmax) & (dmax > 0))
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(G)
    L = torch.where(good[:, None, None], L, eye)
    Linv.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
    ok.copy_(good.to(ok.dtype))
