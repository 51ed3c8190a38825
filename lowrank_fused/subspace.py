"""Batched subspace estimation for the refreshes of every low-rank method (issue 5;
ALGORITHMS.md 6.3, 7.5, 10 K7, 10.3).

Everything here works on a batch of same-shape matrices ``(B, m, n)`` (a single ``(m, n)``
matrix is a batch of one) and computes in fp32 whatever the storage dtype of the input:

* ``cholesky_qr2``: tall-skinny QR by CholeskyQR2 (Gram, Cholesky, triangular solve, twice),
  with rank-deficiency detection (Cholesky failure, tiny pivots, or a loss of orthogonality
  after the second pass) and a per-matrix Householder fallback
  (``householder_complete``: empty columns completed by a seeded orthonormal
  complement). The output is sign-canonical (``diag(R) >= 0``), so it equals
  ``linalg.orth`` up to rounding.
* ``power_iteration``: ``Y = G (G^T Q)`` from a warm start ``Q``, re-orthonormalised.
* ``range_finder``: seeded Gaussian sketch + ``q`` power iterations (QR at every half step).
* ``randomized_svd``: range finder with oversampling + small SVD of ``Q^T G``: top-r singular
  values and vectors, sign-canonical like ``linalg.canonical_svd_basis``.
* ``randomized_basis`` / ``batched_basis``: drop-ins for ``canonical_svd_basis`` over a list of
  same-shape gradients (grouped by shape by ``refresh_bases``).

Flat spectra: a randomized range finder captures the top-r energy exactly only when the
spectrum decays past r; on a flat spectrum (s_i all equal) every r-dimensional subspace of the
dominant space is as good, the captured energy is still ~r/min(m,n) of the total, matching the
SVD's own, but the basis itself is arbitrary (tests/test_subspace.py documents this).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

import torch

from lowrank_fused.reference.range_finder import orth_complete

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_EPS32 = torch.finfo(torch.float32).eps

# CholeskyQR2 is accurate while cond(Y) <~ eps^-1/2; the ratio of the Cholesky pivots is a
# lower bound of cond(Y), and a loss of orthogonality after the second pass catches the rest.
PIVOT_RATIO_TOL = 1e-3
ORTHO_TOL = 1e-5


def _batched(X: torch.Tensor):
    if X.dim() == 2:
        return X.unsqueeze(0), True
    if X.dim() != 3:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(X.shape)}")
    return X, False


def small_cholesky_solve(Y: torch.Tensor, Gram: torch.Tensor):
    """One CholeskyQR pass on a batch: ``L = chol(Gram)``, ``Q = Y L^{-T}``.

    Returns ``(Q, R, ok)``, ``R = L^T`` upper-triangular (positive diagonal where ok) and
    ``ok`` (B,) bool: the factorization succeeded and its pivots are not tiny."""
    L, info = torch.linalg.cholesky_ex(Gram)
    d = torch.diagonal(L, dim1=-2, dim2=-1)
    dmax = d.amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    ok = (info == 0) & torch.isfinite(d).all(dim=-1) & (d.amin(dim=-1) > PIVOT_RATIO_TOL * dmax)
    # solve Q L^T = Y  <=>  L Q^T = Y^T
    safe = torch.where(ok[:, None, None], L, torch.eye(L.shape[-1], dtype=L.dtype,
                                                          device=L.device).expand_as(L))
    Q = torch.linalg.solve_triangular(safe, Y.transpose(-1, -2), upper=False).transpose(-1, -2)
    return Q, safe.transpose(-1, -2), ok


def householder_complete(Y: torch.Tensor, *, fill_seed: int = 0) -> torch.Tensor:
    """Fallback of ``cholesky_qr2`` for one matrix: sign-canonical Householder QR whose columns
    that carry nothing of ``Y`` are replaced by a seeded orthonormal complement.

    Unlike ``reference.range_finder.orth_complete`` (which looks at ``|R_ii|`` only), a column
    counts as empty when its whole row of R is below the tolerance: after a zero pivot,
    Householder's arbitrary direction ``Q_i`` can still carry later columns of Y (``R_ij != 0``
    for j > i), and replacing it would break ``Q R = Y``. The completion itself is
    ``orth_complete``'s (seeded CPU generator, projected out twice, sign-canonical QR)."""
    A = Y.float()
    Q, R = torch.linalg.qr(A)
    d = torch.diagonal(R)
    sign = torch.where(d < 0, -1.0, 1.0).to(Q.dtype)
    Q = Q * sign.unsqueeze(0)
    R = R * sign.unsqueeze(1)
    rown = R.abs().amax(dim=1)
    tol = rown.max() * max(A.shape) * _EPS32
    empty = rown <= tol
    n_def = int(empty.sum())
    if n_def == 0:
        return Q
    keep = Q[:, ~empty]
    gen = torch.Generator(device="cpu").manual_seed(int(fill_seed))
    X = torch.randn(A.shape[0], n_def, generator=gen, dtype=torch.float32).to(A.device)
    for _ in range(2):
        X = X - keep @ (keep.t() @ X)
    Qx = orth_complete(X, sign_canon=True, fill_seed=int(fill_seed) ^ 1)
    Q = Q.clone()
    Q[:, empty] = Qx
    return Q


def cholesky_qr2(Y: torch.Tensor, *, fill_seed: int = 0, return_r: bool = False,
                 return_fallback: bool = False):
    """Sign-canonical thin QR of a batch of tall-skinny matrices ``Y`` (B, m, k), m >= k.

    Fast path CholeskyQR2 in fp32; matrices whose Cholesky fails, whose pivots are tiny
    (``min/max < PIVOT_RATIO_TOL``) or whose result is not orthonormal to ``ORTHO_TOL`` go
    through Householder QR with seeded completion of deficient columns (``orth_complete``,
    seed derived from ``fill_seed`` and the batch index). ``diag(R) >= 0``."""
    Yb, squeeze = _batched(Y)
    A = Yb.float()
    B, m, k = A.shape
    if m < k:
        raise ValueError(f"cholesky_qr2 needs m >= k, got {m} x {k}")
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    finite = torch.isfinite(A).flatten(1).all(dim=1)
    A0 = torch.where(finite[:, None, None], A, torch.zeros((), dtype=A.dtype, device=A.device))
    Q1, R1, ok1 = small_cholesky_solve(A0, A0.transpose(-1, -2) @ A0)
    Q, R2, ok2 = small_cholesky_solve(Q1, Q1.transpose(-1, -2) @ Q1)
    ok = ok1 & ok2 & finite
    err = (Q.transpose(-1, -2) @ Q - eye).abs().flatten(1).amax(dim=1)
    ok = ok & (err < ORTHO_TOL)
    R = R2 @ R1 if return_r else None
    bad = (~ok).nonzero().flatten().tolist()
    if bad:
        Q = Q.clone()
        if R is not None:
            R = R.clone()
        for b in bad:
            seed = (int(fill_seed) + _GOLDEN * (b + 1)) & _MASK64
            Qb = householder_complete(A[b], fill_seed=seed)
            Q[b] = Qb
            if R is not None:
                R[b] = torch.triu(Qb.t() @ A[b])
    if squeeze:
        Q = Q[0]
        R = R[0] if R is not None else None
    out = (Q,)
    if return_r:
        out += (R,)
    if return_fallback:
        out += (torch.tensor([b in bad for b in range(B)], dtype=torch.bool),)
    return out[0] if len(out) == 1 else out


def power_iteration(G: torch.Tensor, Q: torch.Tensor, *, iters: int = 1,
                    fill_seed: int = 0) -> torch.Tensor:
    """Warm-started subspace iteration on a batch: ``Q <- qr(G (G^T Q))`` ``iters`` times.

    G (B, m, n) in its storage dtype (cast to fp32 once), Q (B, m, k); fp32 result."""
    Gb, squeeze = _batched(G)
    Qb, _ = _batched(Q)
    A = Gb.float()
    Qb = Qb.float()
    for i in range(int(iters)):
        Y = A @ (A.transpose(-1, -2) @ Qb)
        Qb = cholesky_qr2(Y, fill_seed=(int(fill_seed) + _GOLDEN * (i + 1)) & _MASK64)
    return Qb[0] if squeeze else Qb


def gaussian_sketch(batch: int, n: int, k: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """Seeded (B, n, k) fp32 Gaussian test matrix, drawn on the CPU so every device agrees."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & _MASK64 if seed >= 0 else 0)
    return torch.randn(batch, n, k, generator=gen, dtype=torch.float32).to(device)


def range_finder(G: torch.Tensor, k: int, *, power_iters: int = 2, seed: int = 0,
                 warm_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Orthonormal (B, m, k) basis of the dominant range of G (B, m, n).

    ``Q = qr(G Omega)`` (Omega seeded Gaussian; with ``warm_start`` (B, m, k') its columns
    replace the first k' sketch directions through ``Q = qr([warm, G Omega'])``), then
    ``power_iters`` times ``Z = qr(G^T Q); Q = qr(G Z)`` (QR at every half step keeps the
    conditioning of each QR input at cond(G), not its square)."""
    Gb, squeeze = _batched(G)
    A = Gb.float()
    B, m, n = A.shape
    k = int(k)
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in [1, min(m, n)] = [1, {min(m, n)}], got {k}")
    stage = [0]

    def qr(Y):
        stage[0] += 1
        return cholesky_qr2(Y, fill_seed=(int(seed) + _GOLDEN * stage[0]) & _MASK64)

    if warm_start is not None:
        W, _ = _batched(warm_start)
        W = W.float()[..., :k]
        kw = W.shape[-1]
        if kw < k:
            Om = gaussian_sketch(B, n, k - kw, seed=seed, device=A.device)
            Y = torch.cat([A @ (A.transpose(-1, -2) @ W), A @ Om], dim=-1)
        else:
            Y = A @ (A.transpose(-1, -2) @ W)
    else:
        Y = A @ gaussian_sketch(B, n, k, seed=seed, device=A.device)
    Q = qr(Y)
    At = A.transpose(-1, -2)
    for _ in range(int(power_iters)):
        Z = qr(At @ Q)
        Q = qr(A @ Z)
    return Q[0] if squeeze else Q


def _sign_canon_cols(U: torch.Tensor) -> torch.Tensor:
    """(B, m, r): flip columns so each one's largest-magnitude entry is positive (4.6)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    return torch.where(U.gather(-2, idx) < 0, -1.0, 1.0).to(U.dtype)


def randomized_svd(G: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   seed: int = 0, warm_start: Optional[torch.Tensor] = None,
                   sign_canon: bool = True):
    """Top-``rank`` singular triplets of every matrix of G (B, m, n): ``(U, S, V)`` with U
    (B, m, r), S (B, r) descending, V (B, n, r); fp32. Range finder with ``k = rank +
    oversample`` (clipped to min(m, n)) and ``power_iters`` iterations, then the SVD of the
    small ``Q^T G`` (k x n). With ``sign_canon`` each left vector's largest-magnitude entry is
    positive (V flipped with it)."""
    Gb, squeeze = _batched(G)
    A = Gb.float()
    B, m, n = A.shape
    r = int(rank)
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    k = min(r + max(int(oversample), 0), min(m, n))
    Q = range_finder(A, k, power_iters=power_iters, seed=seed, warm_start=warm_start)
    Ub, S, Vh = torch.linalg.svd(Q.transpose(-1, -2) @ A, full_matrices=False)
    U = Q @ Ub[..., :r]
    S = S[..., :r]
    V = Vh[..., :r, :].transpose(-1, -2)
    if sign_canon:
        s = _sign_canon_cols(U)
        U, V = U * s, V * s
    if squeeze:
        return U[0], S[0], V[0]
    return U, S, V


def randomized_basis(Gs: torch.Tensor, rank: int, side: str, *, sign_canon: bool = True,
                     oversample: int = 8, power_iters: int = 2, seed: int = 0) -> torch.Tensor:
    """Batched stand-in for ``canonical_svd_basis``: Gs (B, m, n) -> left (B, m, r) or right
    (B, r, n) bases, each vector sign-canonical on its own side. A right basis is the left
    basis of ``G^T``."""
    if not torch.isfinite(Gs).all():
        raise FloatingPointError(
            "gradient has non-finite entries; cannot compute its SVD for the subspace refresh")
    A = Gs if side == "left" else Gs.transpose(-1, -2)
    U, _, _ = randomized_svd(A, rank, oversample=oversample, power_iters=power_iters,
                             seed=seed, sign_canon=sign_canon)
    U = U.contiguous()
    return U if side == "left" else U.transpose(-1, -2).contiguous()


def exact_basis(Gs: torch.Tensor, rank: int, side: str, *, sign_canon: bool = True):
    """``canonical_svd_basis`` over a batch, through one batched ``torch.linalg.svd``."""
    A = Gs.float()
    if not torch.isfinite(A).all():
        raise FloatingPointError(
            "gradient has non-finite entries; cannot compute its SVD for the subspace refresh")
    U, _, Vh = torch.linalg.svd(A, full_matrices=False)
    Bm = U[..., :rank] if side == "left" else Vh[..., :rank, :].transpose(-1, -2)
    if sign_canon:
        Bm = Bm * _sign_canon_cols(Bm)
    Bm = Bm.contiguous()
    return Bm if side == "left" else Bm.transpose(-1, -2).contiguous()


def refresh_bases(items: Sequence, *, projector: str = "randomized", sign_canon: bool = True,
                  oversample: int = 8, power_iters: int = 2, seed: int = 0) -> List:
    """Bases for many matrices at once. ``items``: (G, rank, side) triples; matrices with the
    same (shape, dtype, device, rank, side) are stacked and refreshed in one batched call.
    Returns fp32 bases in the order of ``items``."""
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for i, (G, rank, side) in enumerate(items):
        groups.setdefault((tuple(G.shape), G.dtype, G.device, int(rank), side), []).append(i)
    out: List = [None] * len(items)
    for (shape, _, _, rank, side), idx in groups.items():
        Gs = torch.stack([items[i][0] for i in idx]).float()
        if projector == "randomized":
            Bs = randomized_basis(Gs, rank, side, sign_canon=sign_canon, oversample=oversample,
                                  power_iters=power_iters, seed=seed)
        elif projector == "svd":
            Bs = exact_basis(Gs, rank, side, sign_canon=sign_canon)
        else:
            raise ValueError(f"projector must be 'svd' or 'randomized', got {projector!r}")
        for j, i in enumerate(idx):
            out[i] = Bs[j]
    return out


def captured_energy(G: torch.Tensor, P: torch.Tensor, side: str = "left") -> torch.Tensor:
    """``||P^T G||_F^2 / ||G||_F^2`` per matrix (left P: (.., m, r); right P: (.., r, n))."""
    A = G.float()
    proj = P.transpose(-1, -2) @ A if side == "left" else A @ P.transpose(-1, -2)
    num = proj.pow(2).sum(dim=(-2, -1))
    den = A.pow(2).sum(dim=(-2, -1)).clamp_min(torch.finfo(torch.float32).tiny)
    return num / den
