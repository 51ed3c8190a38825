"""Small dense linear algebra shared by every method: sign-canonical QR and SVD bases.

Signs of QR and SVD factors are library-dependent; canonicalising them
(docs/conventions.md, "Sign canonicalisation") makes two implementations, or two machines,
produce the same basis.
"""
import torch


def orth(Y: torch.Tensor) -> torch.Tensor:
    """Reduced QR factor of ``Y`` (m x k, m >= k) with each column's sign flipped so that
    ``diag(R) >= 0`` (``orth`` in docs/conventions.md). Computed in fp32 (or fp64 if given)."""
    A = Y if Y.dtype in (torch.float32, torch.float64) else Y.float()
    Q, R = torch.linalg.qr(A)
    sign = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign.unsqueeze(-2)


class RefreshFallbackWarning(RuntimeWarning):
    """A subspace refresh's decomposition failed and a fallback basis was used."""


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _sign_canonical(B: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive (docs/conventions.md)."""
    idx = B.abs().argmax(dim=0, keepdim=True)
    return B * torch.where(B.gather(0, idx) < 0, -1.0, 1.0)


def canonical_svd_basis(G: torch.Tensor, rank: int, side: str, sign_canon: bool = True, *,
                        label=None, previous=None):
    """Top-``rank`` singular basis of ``float32(G)`` (galore_projector.py#L72-L99).

    left: P = U[:, :rank] (m x rank); right: Q = Vh[:rank, :] (rank x n). With ``sign_canon``
    each singular vector is flipped so its largest-magnitude entry is positive
    (docs/conventions.md), which makes refreshes reproducible across LAPACK/cuSOLVER. Returns fp32.

    A non-finite ``G`` raises ``FloatingPointError`` (the optimizer's ``nonfinite`` policy
    handles gradients). When the SVD itself fails or returns non-finite values, the basis
    comes from ``fallback_basis`` (randomized range finder, else ``previous``, else a fixed
    orthonormal basis) with one ``RefreshFallbackWarning`` naming ``label``.
    """
    A = G.float()
    if not torch.isfinite(A).all():
        raise FloatingPointError(
            f"gradient{' of ' + label if label else ''} has non-finite entries; cannot compute "
            "its SVD for the subspace refresh")
    try:
        U, _, Vh = torch.linalg.svd(A, full_matrices=False)
        reason = None if _finite(U, Vh) else "torch.linalg.svd returned non-finite values"
    except RuntimeError as e:                     # torch.linalg.LinAlgError is a RuntimeError
        reason = f"torch.linalg.svd failed ({str(e).splitlines()[0][:120]})"
    if reason is not None:
        return fallback_basis(A, rank, side, sign_canon, label=label, previous=previous,
                              reason=reason)
    B = U[:, :rank] if side == "left" else Vh[:rank, :].t()   # columns are singular vectors
    if sign_canon:
        B = _sign_canonical(B)
    B = B.contiguous()
    return B if side == "left" else B.t().contiguous()


def fallback_basis(A: torch.Tensor, rank: int, side: str, sign_canon: bool = True, *,
                   label=None, previous=None, reason="the decomposition failed"):
    """A valid orthonormal basis when a refresh's decomposition failed, in this order: the
    randomized SVD (``subspace.randomized_svd``: Gaussian sketch, QR, and an eigh of a small
    fp64 Gram; no ``torch.linalg.svd``), the ``previous`` basis if it is finite and of the
    right shape, else the first ``rank`` coordinate vectors. Emits one
    ``RefreshFallbackWarning`` naming ``label`` and what was used. Returns fp32 in the stored
    layout (left m x rank, right rank x n)."""
    import warnings

    from lowrank_fused.subspace import randomized_svd   # lazy: subspace builds on this module

    who = label or "a parameter"
    X = A.float() if side == "left" else A.float().t()
    try:
        U, _, _ = randomized_svd(X, rank, oversample=8, power_iters=2, seed=0,
                                 sign_canon=sign_canon, compute_v=False)
        ok = _finite(U)
    except (RuntimeError, ValueError):
        ok = False
    if ok:
        used = "the randomized SVD"
        B = U.contiguous()
    else:
        want = (X.shape[0], rank) if side == "left" else (rank, X.shape[0])
        if previous is not None and tuple(previous.shape) == want and _finite(previous):
            used = "the previous basis"
            B = previous.float().clone() if side == "left" else previous.float().t().clone()
        else:
            used = "a fixed orthonormal basis (the first coordinate vectors)"
            B = torch.eye(X.shape[0], rank, dtype=torch.float32, device=X.device)
    warnings.warn(f"subspace refresh of {who}: {reason}; using {used}",
                  RefreshFallbackWarning, stacklevel=3)
    B = B.contiguous()
    return B if side == "left" else B.t().contiguous()
