"""Small dense linear algebra shared by every method: sign-canonical QR and SVD bases.

Signs of QR and SVD factors are library-dependent; canonicalising them (ALGORITHMS.md
conventions, 4.6) makes two implementations, or two machines, produce the same basis.
"""
import torch


def orth(Y: torch.Tensor) -> torch.Tensor:
    """Reduced QR factor of ``Y`` (m x k, m >= k) with each column's sign flipped so that
    ``diag(R) >= 0`` (ALGORITHMS.md: ``orth``). Computed in fp32 (or fp64 if given)."""
    A = Y if Y.dtype in (torch.float32, torch.float64) else Y.float()
    Q, R = torch.linalg.qr(A)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign.unsqueeze(-2)


def canonical_svd_basis(G: torch.Tensor, rank: int, side: str, sign_canon: bool = True):
    """Top-``rank`` singular basis of ``float32(G)`` (galore_projector.py#L72-L99).

    left: P = U[:, :rank] (m x rank); right: Q = Vh[:rank, :] (rank x n). With ``sign_canon``
    each singular vector is flipped so its largest-magnitude entry is positive (ALGORITHMS.md
    4.6), which makes refreshes reproducible across LAPACK/cuSOLVER. Returns fp32.
    """
    A = G.float()
    if not torch.isfinite(A).all():
        raise FloatingPointError(
            "gradient has non-finite entries; cannot compute its SVD for the subspace refresh")
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    B = U[:, :rank] if side == "left" else Vh[:rank, :].t()   # columns are singular vectors
    if sign_canon:
        idx = B.abs().argmax(dim=0, keepdim=True)
        sign = torch.where(B.gather(0, idx) < 0, -1.0, 1.0)
        B = B * sign
    B = B.contiguous()
    return B if side == "left" else B.t().contiguous()
