"""Batched subspace estimation for the refreshes of every low-rank method (K7 and the
kernel-design notes of docs/bytes.md; docs/methods/adarankgrad.md, docs/methods/ldadam.md).

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


def _all_finite(X: torch.Tensor) -> bool:
    """No NaN/inf in X: two reductions (NaN propagates through amax/amin), no temporaries."""
    if X.numel() == 0:
        return True
    return bool(torch.isfinite(X.amax()) & torch.isfinite(X.amin()))


def _batched(X: torch.Tensor):
    if X.dim() == 2:
        return X.unsqueeze(0), True
    if X.dim() != 3:
        raise ValueError(f"expected a matrix or a batch of matrices, got shape {tuple(X.shape)}")
    return X, False


def small_cholesky_inverse(Gram: torch.Tensor, *, backend: str = "auto"):
    """Batched ``Linv = chol(Gram)^{-1}`` of small SPD k x k matrices (B, k, k), fp32, plus
    ``ok`` (B,): the factorization succeeded with finite pivots not below
    ``PIVOT_RATIO_TOL * max pivot`` (``Linv`` is the identity where not ok).

    Runs the ``small_cholesky_inverse`` op (``reference``: torch; ``cpu``/``cuda``: the
    batched kernel of ``csrc``), resolved per device like every op (``auto`` on the CPU takes
    the C++ twin when built: ``dispatch.AUTO_ON_CPU``)."""
    from lowrank_fused.dispatch import implementation

    G = Gram.float().contiguous()
    Linv = torch.empty_like(G)
    ok = torch.empty(G.shape[0], dtype=torch.int32, device=G.device)
    implementation("small_cholesky_inverse", backend, G.device)(
        G, Linv, ok, pivot_ratio_tol=PIVOT_RATIO_TOL)
    return Linv, ok.bool()


def _cholqr_pass(Y: torch.Tensor, backend: str = "auto"):
    """One CholeskyQR pass: ``Q = Y L^{-T}`` with ``L L^T = Y^T Y``; returns (Q, Linv, ok)."""
    Linv, ok = small_cholesky_inverse(Y.transpose(-1, -2) @ Y, backend=backend)
    return Y @ Linv.transpose(-1, -2), Linv, ok


class BoundCholeskyQR2:
    """CholeskyQR2 of a fixed batch ``X`` (count, m, k), m >= k, any strides, into ``Q``
    (count, m, k) fp32, as launches on Triton with every buffer laid out once: the steady-step
    QR of GHA's basis update, whose input is well conditioned (docs/methods/adaptive_adamw.md;
    not LDAdam's power iteration, whose ``cond(Y)`` grows as the square of the gradient's
    and leaves CholeskyQR2's fp32 range). A call::

        W = X^T X ; L1 = chol(W)^-1 ; Q1 = X L1^T ; W = Q1^T Q1 ; L2 = chol(W)^-1 ; Q = Q1 L2^T

    four bound ``batched_matmul`` products and two ``small_cholesky_inverse`` (the Triton
    register-tile kernel up to k = 64, the reference above), no host read and no loop over
    the matrices. ``ok1``/``ok2`` (count,) int32 are the factorizations' flags: a matrix with
    either 0 (a Gram that cannot be factored in fp32: condition above about 3e3, or not
    finite) has an undefined ``Q``, which the caller replaces on the device (unlike
    ``cholesky_qr2``, whose Householder fallback reads the flags on the host). Where both are
    1, ``Q`` is the sign-canonical factor (``diag(R) > 0``, ``R = (C1 C2)^T``).

    ``scratch``: a dict with ``W``, ``L1``, ``L2`` (count, k, k), ``Q1`` (count, m, k) fp32
    contiguous and ``ok1``, ``ok2`` (count,) int32 (a caller's workspace views); missing
    ones are allocated. The products take ``ieee`` where ``precision`` is ``ieee``, else
    ``tf32x3`` (the Gram must be fp32-accurate), bound per mode at its first use."""

    def __init__(self, X: torch.Tensor, Q: torch.Tensor, scratch: Optional[dict] = None):
        if X.dim() != 3 or X.shape[1] < X.shape[2]:
            raise ValueError(f"X must be (count, m, k) with m >= k, got {tuple(X.shape)}")
        if tuple(Q.shape) != tuple(X.shape) or Q.dtype != torch.float32:
            raise ValueError(f"Q must be float32 of X's shape {tuple(X.shape)}, got "
                             f"{Q.dtype} {tuple(Q.shape)}")
        count, m, k = X.shape
        dev = X.device
        scratch = dict(scratch or {})
        for name, shape, dt in (("W", (count, k, k), torch.float32),
                                ("L1", (count, k, k), torch.float32),
                                ("L2", (count, k, k), torch.float32),
                                ("Q1", (count, m, k), torch.float32),
                                ("ok1", (count,), torch.int32), ("ok2", (count,), torch.int32)):
            t = scratch.get(name)
            if t is None:
                t = scratch[name] = torch.empty(shape, dtype=dt, device=dev)
            elif tuple(t.shape) != shape or t.dtype != dt or not t.is_contiguous():
                raise ValueError(f"scratch {name} must be a contiguous {dt} {shape} tensor, "
                                 f"got {t.dtype} {tuple(t.shape)}")
        self.X, self.Q = X, Q
        self.W, self.L1, self.L2, self.Q1 = (scratch[k_] for k_ in ("W", "L1", "L2", "Q1"))
        self.ok1, self.ok2 = scratch["ok1"], scratch["ok2"]
        self.empty = count == 0 or m * k == 0
        self._chol = None if self.empty else [self._factorization(self.W, L, ok) for L, ok in
                                              ((self.L1, self.ok1), (self.L2, self.ok2))]
        self._products = {}

    @staticmethod
    def _factorization(W, L, ok):
        """The ``small_cholesky_inverse`` that ``auto`` runs on these buffers (its guard: the
        Triton kernel up to its register tile, the reference above), bound: the Triton
        kernel as a planned launch."""
        from lowrank_fused.dispatch import resolve_call

        chosen, impl = resolve_call("small_cholesky_inverse", "auto", W.device, W, L, ok)
        if chosen == "triton":
            from lowrank_fused.kernels.small_cholesky_inverse import BoundSmallCholeskyInverse

            return BoundSmallCholeskyInverse(W, L, ok, pivot_ratio_tol=PIVOT_RATIO_TOL)
        return lambda: impl(W, L, ok, pivot_ratio_tol=PIVOT_RATIO_TOL)

    def _bound(self, precision: str):
        mode = "ieee" if precision == "ieee" else "tf32x3"
        got = self._products.get(mode)
        if got is None:
            from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmul as B

            X, Q1 = self.X, self.Q1
            got = self._products[mode] = (
                B(X.transpose(1, 2), X, self.W, precision=mode),
                B(X, self.L1.transpose(1, 2), Q1, precision=mode),
                B(Q1.transpose(1, 2), Q1, self.W, precision=mode),
                B(Q1, self.L2.transpose(1, 2), self.Q, precision=mode))
        return got

    def __call__(self, precision: str = "ieee") -> None:
        if self.empty:
            return
        gram1, q1, gram2, q = self._bound(precision)
        gram1()
        self._chol[0]()
        q1()
        gram2()
        self._chol[1]()
        q()


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
                 return_fallback: bool = False, backend: str = "auto"):
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
    # a NaN/inf in A[b] reaches its Gram matrix, whose Cholesky then fails (non-finite
    # pivots): A[b] takes the fallback below, and bmm keeps it from its neighbours
    Q1, L1inv, ok1 = _cholqr_pass(A, backend)
    Q, L2inv, ok2 = _cholqr_pass(Q1, backend)
    err = (Q.transpose(-1, -2) @ Q - eye).abs().flatten(1).amax(dim=1)
    ok = ok1 & ok2 & (err < ORTHO_TOL)          # NaN err compares False
    R = None
    if return_r:
        R = torch.triu(Q.transpose(-1, -2) @ A)
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


def _orth_fast(Y: torch.Tensor) -> torch.Tensor:
    """Re-normalisation between power-iteration half steps: one CholeskyQR pass, Householder
    (``torch.linalg.qr``) for the matrices whose Cholesky fails. Only conditions the next
    product; the final basis always comes from ``cholesky_qr2``, which also handles non-finite
    input (the callers check G once; a NaN here fails the Cholesky pivots and only reaches the
    final pass, so no per-half-step finiteness check is needed)."""
    Q, _, ok = _cholqr_pass(Y)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        Q = Q.clone()
        Q[bad] = torch.linalg.qr(Y[bad])[0]
    return Q


def batched_matmul(A: torch.Tensor, B: torch.Tensor, *, backend: str = "auto",
                   precision: str = "ieee") -> torch.Tensor:
    """``float32(A[b]) @ B[b]`` through the ``batched_matmul`` op (reference: torch; triton:
    ``kernels/batched_matmul.py``, A read in its storage dtype, cast in the prologue)."""
    from lowrank_fused.dispatch import implementation

    C = torch.empty(A.shape[0], A.shape[1], B.shape[-1], dtype=torch.float32, device=A.device)
    implementation("batched_matmul", backend, A.device)(A, B.float(), C, precision=precision)
    return C


def _operand(G: torch.Tensor) -> torch.Tensor:
    """The refresh's view of a gradient batch: on CUDA its storage dtype (the GEMM kernel
    casts in its prologue, so bf16 gradients are read at 2 bytes), elsewhere fp32 (CPU
    matmul in bf16 is slow and the cast is one pass)."""
    return G if G.is_cuda and G.dtype in (torch.float32, torch.bfloat16, torch.float16) \
        else G.float()


def _gemm(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``float32(A) @ X`` for the m x n products of the refresh (A batched, any strides; X
    fp32, batch B or 1): the ``batched_matmul`` op on CUDA (Triton when available), torch's
    matmul elsewhere (A is fp32 there, see ``_operand``)."""
    if A.is_cuda:
        return batched_matmul(A, X)
    return A @ X


def power_iteration(G: torch.Tensor, Q: torch.Tensor, *, iters: int = 1,
                    fill_seed: int = 0, backend: str = "auto",
                    precision: str = "ieee") -> torch.Tensor:
    """Warm-started subspace iteration on a batch: ``Q <- qr(G (G^T Q))`` ``iters`` times.

    G (B, m, n) read in its storage dtype by the ``batched_matmul`` op (fp32 accumulate),
    Q (B, m, k); fp32 result."""
    Gb, squeeze = _batched(G)
    Qb, _ = _batched(Q)
    Qb = Qb.float()
    for i in range(int(iters)):
        Z = batched_matmul(Gb.transpose(-1, -2), Qb, backend=backend, precision=precision)
        Y = batched_matmul(Gb, Z, backend=backend, precision=precision)
        Qb = cholesky_qr2(Y, fill_seed=(int(fill_seed) + _GOLDEN * (i + 1)) & _MASK64)
    return Qb[0] if squeeze else Qb


def sketched_range(G: torch.Tensor, Omega: torch.Tensor, *, power_iters: int,
                   fill_seed: int = 0, backend: str = "auto",
                   precision: str = "ieee") -> torch.Tensor:
    """SSRF on the batched primitives (docs/methods/adarankgrad.md): the contract of the
    ``range_finder`` op (``reference/range_finder.py``) for sign-canonical bases::

        Q = orth(G @ Omega);  power_iters times:  Z = orth(G^T @ Q);  Q = orth(G @ Z)

    G (m, n) or (B, m, n) is read in its storage dtype by the ``batched_matmul`` op (cast in
    the prologue, fp32 accumulate; ``backend`` picks its implementation), Omega (n, k) fp32.
    Every ``orth`` is ``cholesky_qr2`` (sign-canonical like the reference's Householder QR,
    seeded completion of rank-deficient columns), so the result equals the reference's up to
    rounding on full-rank input. Returns the fp32 (m, k) (or (B, m, k)) basis."""
    Gb, squeeze = _batched(G)
    Om = Omega.float().unsqueeze(0) if Omega.dim() == 2 else Omega.float()
    Gt = Gb.transpose(-1, -2)
    stage = [0]

    def orth(Y):
        seed = (int(fill_seed) + _GOLDEN * stage[0]) & _MASK64
        stage[0] += 1
        return cholesky_qr2(Y, fill_seed=seed)

    def mm(A, B):
        return batched_matmul(A, B, backend=backend, precision=precision)

    Q = orth(mm(Gb, Om))
    for _ in range(int(power_iters)):
        Q = orth(mm(Gb, orth(mm(Gt, Q))))
    return Q[0] if squeeze else Q


def gaussian_sketch(batch: int, n: int, k: int, *, seed: int = 0, device=None) -> torch.Tensor:
    """Seeded (B, n, k) fp32 Gaussian test matrix, drawn on the CPU so every device agrees."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed) & _MASK64 if seed >= 0 else 0)
    return torch.randn(batch, n, k, generator=gen, dtype=torch.float32).to(device)


def range_finder(G: torch.Tensor, k: int, *, power_iters: int = 2, seed: int = 0,
                 warm_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Orthonormal (B, m, k) basis of the dominant range of G (B, m, n).

    ``Q = qr(G Omega)`` (Omega seeded Gaussian; with ``warm_start`` (B, m, k') its columns
    replace the first k' sketch directions through ``Q = qr([warm, G Omega'])``), then
    ``power_iters`` times ``Z = qr(G^T Q); Q = qr(G Z)`` (a normalisation at every half step
    keeps the conditioning of each QR input at cond(G), not its square: one CholeskyQR pass in
    between, the full ``cholesky_qr2`` for the returned basis)."""
    Gb, squeeze = _batched(G)
    Y, _, qr = _iterate(_operand(Gb), k, power_iters, seed, warm_start)
    Q = qr(Y)
    return Q[0] if squeeze else Q


def _iterate(A: torch.Tensor, k: int, power_iters: int, seed: int,
             warm_start: Optional[torch.Tensor], check_finite: bool = False):
    """The sketch and power iterations of ``range_finder`` up to its last QR: returns
    ``(Y, Z, qr)`` with ``Y`` the last un-normalised product (B, m, k), ``Z`` the orthonormal
    (B, n, k) right factor with ``Y = A Z`` (None when ``power_iters == 0``: then Y is the
    sketch product) and ``qr`` the seeded final QR. ``check_finite``: raise
    ``FloatingPointError`` when A holds a NaN or an infinity, read off the sketch product
    (a non-finite entry of A reaches its row of ``A Omega`` with probability 1: m x k to
    scan instead of two passes over A)."""
    B, m, n = A.shape
    k = int(k)
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in [1, min(m, n)] = [1, {min(m, n)}], got {k}")
    At = A.transpose(-1, -2)
    stage = [0]

    def qr(Y, **kw):
        stage[0] += 1
        return cholesky_qr2(Y, fill_seed=(int(seed) + _GOLDEN * stage[0]) & _MASK64, **kw)

    if warm_start is not None:
        W, _ = _batched(warm_start)
        W = W.float()[..., :k]
        kw = W.shape[-1]
        if kw < k:
            Om = gaussian_sketch(1, n, k - kw, seed=seed, device=A.device)
            Y = torch.cat([_gemm(A, _gemm(At, W)), _gemm(A, Om)], dim=-1)
        else:
            Y = _gemm(A, _gemm(At, W))
    else:
        # one sketch shared by the batch (each matrix is independent of it all the same)
        Y = _gemm(A, gaussian_sketch(1, n, k, seed=seed, device=A.device))
    if check_finite and not _all_finite(Y):
        raise FloatingPointError(
            "gradient has non-finite entries; cannot compute its SVD for the subspace refresh")
    Z = None
    for _ in range(int(power_iters)):
        Z = _orth_fast(_gemm(At, _orth_fast(Y)))
        Y = _gemm(A, Z)
    return Y, Z, qr


def _sign_canon_cols(U: torch.Tensor) -> torch.Tensor:
    """(B, m, r): flip columns so each one's largest-magnitude entry is positive
    (docs/conventions.md)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    return torch.where(U.gather(-2, idx) < 0, -1.0, 1.0).to(U.dtype)


def randomized_svd(G: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 2,
                   seed: int = 0, warm_start: Optional[torch.Tensor] = None,
                   sign_canon: bool = True, compute_v: bool = True,
                   check_finite: bool = False):
    """Top-``rank`` singular triplets of every matrix of G (B, m, n): ``(U, S, V)`` with U
    (B, m, r), S (B, r) descending, V (B, n, r); fp32. Range finder with ``k = rank +
    oversample`` (clipped to min(m, n)) and ``power_iters`` iterations, then Rayleigh-Ritz:
    the SVD of the small ``R`` of the last product ``G Z = Q R`` (k x k; with no iteration, of
    ``Q^T G``, k x n). With ``sign_canon`` each left vector's largest-magnitude entry is
    positive (V flipped with it). ``compute_v=False`` skips V (returned as None).
    ``check_finite``: ``FloatingPointError`` for a G with NaN/inf entries."""
    Gb, squeeze = _batched(G)
    A = _operand(Gb)
    B, m, n = A.shape
    r = int(rank)
    if not 1 <= r <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    k = min(r + max(int(oversample), 0), min(m, n))
    Y, Z, qr = _iterate(A, k, power_iters, seed, warm_start, check_finite)
    if Z is None:
        # no iteration: Rayleigh-Ritz in the sketched range, A ~ Q Q^T A (one more pass)
        Q = qr(Y)
        C = _gemm(A.transpose(-1, -2), Q).transpose(-1, -2).double()   # (B, k, n)
    else:
        # Rayleigh-Ritz in the last right subspace, A ~ A Z Z^T = Q R Z^T: the small SVD is
        # R's, with no further pass over A (captures what Q Q^T A does to 1e-4 on real and
        # decaying spectra; bench/bench_refresh.py). U = Q U_R, V = Z W_R.
        Q, R = qr(Y, return_r=True)
        C = R.double()                                               # (B, k, k)
    # small SVD of C through its k x k Gram in fp64 (eigenvalues s^2 accurate to ~1e-16 s1^2,
    # i.e. s down to ~1e-8 s1: better than an fp32 SVD, and ~3x faster on the CPU)
    w, Wv = torch.linalg.eigh(C @ C.transpose(-1, -2))
    w, Wv = w.flip(-1)[..., :r], Wv.flip(-1)[..., :r]
    Sd = w.clamp_min(0).sqrt()
    U = Q @ Wv.float()
    S = Sd.float()
    V = None
    if compute_v:
        Vd = C.transpose(-1, -2) @ Wv
        V = (Vd / torch.where(Sd > 0, Sd, 1.0).unsqueeze(-2)).float()
        if Z is not None:
            V = Z @ V
    if sign_canon:
        s = _sign_canon_cols(U)
        U = U * s
        V = V * s if V is not None else None
    if squeeze:
        return U[0], S[0], (V[0] if V is not None else None)
    return U, S, V


def randomized_basis(Gs: torch.Tensor, rank: int, side: str, *, sign_canon: bool = True,
                     oversample: int = 8, power_iters: int = 2, seed: int = 0) -> torch.Tensor:
    """Batched stand-in for ``canonical_svd_basis``: Gs (B, m, n) -> left (B, m, r) or right
    (B, r, n) bases, each vector sign-canonical on its own side. A right basis is the left
    basis of ``G^T``."""
    A = Gs if side == "left" else Gs.transpose(-1, -2)
    U, _, _ = randomized_svd(A, rank, oversample=oversample, power_iters=power_iters,
                             seed=seed, sign_canon=sign_canon, compute_v=False,
                             check_finite=True)
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
    if projector not in ("svd", "randomized"):
        raise ValueError(f"projector must be 'svd' or 'randomized', got {projector!r}")
    # A right basis of G is the left basis of G^T, so matrices are grouped by their shape in
    # the left (canonical) orientation: a LLaMA's (d, f) left-projected and (f, d)
    # right-projected MLP matrices share one batch.
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for i, (G, rank, side) in enumerate(items):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        shape = tuple(G.shape) if side == "left" else tuple(G.shape)[::-1]
        # CUDA batches keep the storage dtype (the GEMM kernel casts in its prologue)
        dtype = G.dtype if G.is_cuda else torch.float32
        groups.setdefault((shape, G.device, dtype, int(rank)), []).append(i)
    out: List = [None] * len(items)
    for (shape, device, dtype, rank), idx in groups.items():
        # stack in the orientation most members have (a transposed copy costs ~10x a plain
        # one on the CPU) and hand the batch over as a view in the canonical orientation;
        # the GEMMs take transposed operands as they are
        flip = sum(items[i][2] == "right" for i in idx) * 2 > len(idx)
        Gs = torch.empty((len(idx),) + (shape[::-1] if flip else shape), dtype=dtype,
                         device=device)
        for j, i in enumerate(idx):                # (cast while) stacking: one copy
            G, _, side = items[i]
            Gs[j].copy_(G if (side == "right") == flip else G.t())
        if flip:
            Gs = Gs.transpose(-1, -2)
        if projector == "randomized":
            Bs = randomized_basis(Gs, rank, "left", sign_canon=sign_canon,
                                  oversample=oversample, power_iters=power_iters, seed=seed)
        else:
            Bs = exact_basis(Gs, rank, "left", sign_canon=sign_canon)
        for j, i in enumerate(idx):
            out[i] = Bs[j] if items[i][2] == "left" else Bs[j].t().contiguous()
    return out


def grouped_refresh(requests, *, sign_canon: bool = True) -> dict:
    """Refresh many layers at once: ``requests`` are ``(key, (oversample, power_iters, seed),
    (G, rank, side))``; layers sharing the settings go through one ``refresh_bases`` call
    (which stacks same-shape matrices into one batched randomized SVD). Returns
    ``{key: basis}``. What the optimizers' ``_before_updates`` hooks call."""
    batches = {}
    for key, settings, item in requests:
        batches.setdefault(tuple(settings), []).append((key, item))
    out = {}
    for (over, iters, seed), entries in batches.items():
        bases = refresh_bases([it for _, it in entries], projector="randomized",
                              sign_canon=sign_canon, oversample=over, power_iters=iters,
                              seed=seed)
        out.update(zip((k for k, _ in entries), bases))
    return out


def captured_energy(G: torch.Tensor, P: torch.Tensor, side: str = "left") -> torch.Tensor:
    """``||P^T G||_F^2 / ||G||_F^2`` per matrix (left P: (.., m, r); right P: (.., r, n))."""
    A = G.float()
    proj = P.transpose(-1, -2) @ A if side == "left" else A @ P.transpose(-1, -2)
    num = proj.pow(2).sum(dim=(-2, -1))
    den = A.pow(2).sum(dim=(-2, -1)).clamp_min(torch.finfo(torch.float32).tiny)
    return num / den
