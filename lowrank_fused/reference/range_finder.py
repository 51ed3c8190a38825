"""K7 randomized range finder with power iterations (SSRF), eager reference
(docs/methods/adarankgrad.md ``SSRF``; K7 and the QR robustness notes in docs/bytes.md)."""
from __future__ import annotations

import torch

from lowrank_fused.dispatch import register

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def orth_complete(Y: torch.Tensor, *, sign_canon: bool = True, fill_seed: int = 0) -> torch.Tensor:
    """Orthonormal basis of ``Y`` (m x k, m >= k) with exactly k columns, even when ``Y`` is
    rank-deficient (docs/bytes.md, "Kernel-design notes").

    Householder QR (``torch.linalg.qr``) in fp32; with ``sign_canon`` each column's sign is
    flipped so that ``diag(R) >= 0`` (``lowrank_fused.linalg.orth``). A column whose
    ``|R_ii| <= max|R_jj| * max(m, k) * eps_fp32`` (the numpy ``matrix_rank`` tolerance; every
    column when ``Y == 0``) carries no information from ``Y``: QR fills it with a direction
    that depends on rounding and on the library. Such columns are replaced by a seeded random
    orthonormal complement of the kept columns (a CPU ``torch.Generator`` seeded with
    ``fill_seed``, so every device and backend gets the same directions).
    """
    A = Y.float()
    Q, R = torch.linalg.qr(A)
    d = torch.diagonal(R)
    if sign_canon:
        Q = Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(0)
    mag = d.abs()
    tol = mag.max() * max(A.shape) * torch.finfo(torch.float32).eps
    deficient = mag <= tol
    n_def = int(deficient.sum())
    if n_def == 0:
        return Q
    keep = Q[:, ~deficient]
    gen = torch.Generator(device="cpu").manual_seed(int(fill_seed))
    X = torch.randn(A.shape[0], n_def, generator=gen, dtype=torch.float32).to(A.device)
    for _ in range(2):                        # twice is enough (Gram-Schmidt, "twice is enough")
        X = X - keep @ (keep.t() @ X)
    Qx, Rx = torch.linalg.qr(X)
    if sign_canon:
        Qx = Qx * torch.where(torch.diagonal(Rx) < 0, -1.0, 1.0).to(Qx.dtype).unsqueeze(0)
    Q = Q.clone()
    Q[:, deficient] = Qx
    return Q


def staged_orth(*, sign_canon: bool = True, fill_seed: int = 0):
    """The ``orth`` of the range finder's successive QRs: ``orth_complete``, each call with
    its own fill seed derived from ``fill_seed`` and the call's index (what
    ``range_finder_ref`` applies, and what a sharded run applies to the same whole thin
    matrices)."""
    stage = [0]

    def orth(Y):
        seed = (int(fill_seed) + _GOLDEN * stage[0]) & _MASK64
        stage[0] += 1
        return orth_complete(Y, sign_canon=sign_canon, fill_seed=seed)

    return orth


@register("range_finder", "reference")
def range_finder_ref(G: torch.Tensor, Omega: torch.Tensor, Qb: torch.Tensor, *,
                     power_iters: int, sign_canon: bool = True, fill_seed: int = 0,
                     precision: str = "ieee") -> None:
    """Left form: orthonormal basis ``Qb`` (m x k, fp32, written in place) of the range of
    G (m x n, storage dtype) sketched by ``Omega`` (n x k, fp32)::

        Qb = orth(G @ Omega)
        repeat power_iters times:  Z = orth(G^T @ Qb) ;  Qb = orth(G @ Z)

    Every ``orth`` is ``orth_complete`` (sign-canonical QR; rank-deficient columns replaced
    by a seeded orthonormal complement, seeds derived from ``fill_seed``). QR and the power
    iteration preserve column prefixes, so ``Qb[:, :r]`` spans what the same call with
    ``Omega[:, :r]`` returns (invariant 7 of docs/conventions.md). All math in fp32; the reference
    ignores ``precision``. A right-projected matrix passes ``G^T``.
    """
    A = G.float()
    _orth = staged_orth(sign_canon=sign_canon, fill_seed=fill_seed)
    Q = _orth(A @ Omega.float())
    for _ in range(int(power_iters)):
        Z = _orth(A.t() @ Q)
        Q = _orth(A @ Z)
    Qb.copy_(Q)
