"""Batched inverse Cholesky factor of small SPD matrices, the k x k part of a CholeskyQR pass
(``lowrank_fused.subspace``; GHAAdamW's per-step QR): for every matrix b of the batch

    L L^T = Gram_b   (lower Cholesky; only the lower triangle of Gram_b is read)
    Linv_b = L^{-1}  (lower triangular, the upper triangle written as zeros)
    ok_b = 1 when every pivot is finite and > 0 and min L_ii > pivot_ratio_tol * max L_ii;
           else 0 and Linv_b = I

(``reference/small_cholesky_inverse.py``; the compiled extension's ``csrc/small_cholesky.h``
makes the same factorization one thread per matrix, in double).

One program per matrix, the whole k x k matrix in registers (k <= ``MAX_K``, padded to a power
of two): the right-looking factorization by columns, then the in-place triangular inverse by
columns from the last (LAPACK's ``trti2`` order), each column step a masked reduction and a
rank-1 update of the register tile, in fp32. The callers run two CholeskyQR passes, so the
second pass corrects the first's rounding (its Gram is the identity to a few ulps).

Cost on a GPU: k steps of O(k^2) register work per phase, about 2 x 64 x 4K operations per
matrix at k = 64 spread over the program's 256 threads; the matrices of a batch run in
parallel. Larger k take the reference (torch's batched Cholesky and triangular solve).
"""
import torch
import triton
import triton.language as tl

from ._common import check_buffer
from ._launch import PlannedLaunch

# the largest k a program holds in registers (the AOT test compiles every block up to it)
MAX_K = 64
BLOCKS = (16, 32, 64)


def block_for(k: int) -> int:
    for b in BLOCKS:
        if k <= b:
            return b
    raise ValueError(f"small_cholesky_inverse (triton): k must be at most {MAX_K}, got {k}")


def warps_for(block: int) -> int:
    # the register tile is block^2 fp32, 16 values per thread at 64 x 64 and 8 warps (123-176
    # registers under Triton 3.9 and 3.6, no spills: the AOT test); a 128 x 128 tile spills
    # even at 32 warps (the index and select tiles are as large as the matrix)
    return {16: 1, 32: 2, 64: 8}[block]


@triton.jit
def _small_cholesky_inverse_kernel(g_ptr, linv_ptr, ok_ptr, K, tol, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    rows = idx[:, None]
    cols = idx[None, :]
    lower = (rows >= cols) & (rows < K)
    base = b * K * K
    # W: the lower triangle of Gram; the padding's diagonal is 1 (its factor is I, its
    # pivots are left out of the checks)
    W = tl.load(g_ptr + base + rows * K + cols, mask=lower, other=0.0)
    W = tl.where((rows == cols) & (rows >= K), 1.0, W)
    good = K >= 0
    dmax = tl.zeros((), dtype=tl.float32)
    dmin = tl.full((), float("inf"), dtype=tl.float32)
    # factorization: column j of L replaces column j of W; the trailing lower triangle
    # takes the rank-1 update
    for j in range(0, K):
        colj = tl.sum(tl.where(cols == j, W, 0.0), axis=1)
        s = tl.sum(tl.where(idx == j, colj, 0.0), axis=0)
        good = good & (s > 0.0) & (s <= 3.4028234663852886e38)
        d = tl.sqrt_rn(tl.where(s > 0.0, s, 1.0))
        dmax = tl.maximum(dmax, d)
        dmin = tl.minimum(dmin, d)
        lcol = tl.where(idx > j, tl.div_rn(colj, d), 0.0)
        upd = lcol[:, None] * lcol[None, :]
        W = tl.where((rows > j) & (cols > j) & (rows >= cols), W - upd, W)
        W = tl.where(cols == j, tl.where(idx == j, d, lcol)[:, None], W)
    good = good & (dmin > tol * dmax)
    # inverse in place, last column first: X[j, j] = 1/L[j, j];
    # X[j+1:, j] = -X[j, j] * X[j+1:, j+1:] @ L[j+1:, j] (the trailing block already inverted)
    for jj in range(0, K):
        j = K - 1 - jj
        colj = tl.sum(tl.where(cols == j, W, 0.0), axis=1)
        inv = tl.div_rn(1.0, tl.sum(tl.where(idx == j, colj, 0.0), axis=0))
        lj = tl.where(idx > j, colj, 0.0)
        v = tl.sum(tl.where((rows > j) & (cols > j), W, 0.0) * lj[None, :], axis=1)
        newcol = tl.where(idx == j, inv, tl.where(idx > j, -inv * v, 0.0))
        W = tl.where(cols == j, newcol[:, None], W)
    finite = tl.sum(tl.where(tl.abs(W) <= 3.4028234663852886e38, 0, 1), axis=1)
    good = good & (tl.sum(finite, axis=0) == 0)
    eye = tl.where(rows == cols, 1.0, 0.0)
    W = tl.where(good, tl.where(rows >= cols, W, 0.0), eye)
    inside = (rows < K) & (cols < K)
    tl.store(linv_ptr + base + rows * K + cols, W, mask=inside)
    tl.store(ok_ptr + b, good.to(tl.int32))


_FLT_MAX = 3.4028234663852886e38


def _interpreted_twin(grid, g_ptr, linv_ptr, ok_ptr, K, tol, BLOCK, **_meta):
    """``_small_cholesky_inverse_kernel`` under the CPU interpreter, transcribed op for op
    into numpy and batched over its programs (``kernels/_interpreter.py``, ``register_twin``):
    each ``tl`` op is the numpy op the interpreter runs for it (``tl.sum``: ``np.sum`` over
    the last axis; fp32 throughout), so the outputs are the interpreted kernel's bit for bit
    (``tests/test_small_cholesky_inverse.py`` compares the two). The interpreter pays its
    per-op cost for every program and every column step, a few thousand ops per matrix."""
    import numpy as np

    nb, K, f32 = int(grid[0]), int(K), np.float32
    zero, one = f32(0.0), f32(1.0)
    idx = np.arange(BLOCK)
    rows, cols = idx[:, None], idx[None, :]
    lower = (rows >= cols) & (rows < K)
    W = np.zeros((nb, BLOCK, BLOCK), dtype=f32)
    W[:, :K, :K] = g_ptr.detach().cpu().reshape(-1)[:nb * K * K].numpy().reshape(nb, K, K)
    W = np.where(lower, W, zero)
    W = np.where((rows == cols) & (rows >= K), one, W)
    good = np.full(nb, K >= 0)
    dmax = np.zeros(nb, dtype=f32)
    dmin = np.full(nb, np.inf, dtype=f32)
    with np.errstate(all="ignore"):
        for j in range(K):
            colj = np.sum(np.where(cols == j, W, zero), axis=-1)
            s = np.sum(np.where(idx == j, colj, zero), axis=-1)
            good = good & (s > zero) & (s <= f32(_FLT_MAX))
            d = np.sqrt(np.where(s > zero, s, one))
            dmax = np.maximum(dmax, d)
            dmin = np.minimum(dmin, d)
            lcol = np.where(idx > j, colj / d[:, None], zero)
            upd = lcol[:, :, None] * lcol[:, None, :]
            W = np.where((rows > j) & (cols > j) & (rows >= cols), W - upd, W)
            W = np.where(cols == j, np.where(idx == j, d[:, None], lcol)[:, :, None], W)
        good = good & (dmin > f32(tol) * dmax)
        for jj in range(K):
            j = K - 1 - jj
            colj = np.sum(np.where(cols == j, W, zero), axis=-1)
            inv = one / np.sum(np.where(idx == j, colj, zero), axis=-1)
            lj = np.where(idx > j, colj, zero)
            v = np.sum(np.where((rows > j) & (cols > j), W, zero) * lj[:, None, :], axis=-1)
            newcol = np.where(idx == j, inv[:, None],
                              np.where(idx > j, -inv[:, None] * v, zero))
            W = np.where(cols == j, newcol[:, :, None], W)
        finite = np.sum(np.where(np.abs(W) <= f32(_FLT_MAX), 0, 1).astype(np.int32), axis=-1)
    good = good & (np.sum(finite, axis=-1) == 0)
    eye = np.where(rows == cols, one, zero)
    W = np.where(good[:, None, None], np.where(rows >= cols, W, zero), eye)
    with torch.no_grad():
        linv_ptr.view(-1)[:nb * K * K].copy_(torch.from_numpy(
            np.ascontiguousarray(W[:, :K, :K])).reshape(-1))
        ok_ptr.view(-1)[:nb].copy_(torch.from_numpy(good.astype(np.int32)))


def _install_twin():
    from ._common import interpreting

    if interpreting():
        from ._interpreter import register_twin

        register_twin(_small_cholesky_inverse_kernel, _interpreted_twin)


_install_twin()


def _checks(Gram, Linv, ok):
    if not isinstance(Gram, torch.Tensor) or Gram.dim() != 3 or Gram.shape[1] != Gram.shape[2]:
        raise ValueError("small_cholesky_inverse (triton): Gram must be a (B, k, k) tensor, got "
                         f"{tuple(Gram.shape) if isinstance(Gram, torch.Tensor) else Gram!r}")
    B, k, _ = Gram.shape
    dev = Gram.device
    check_buffer("Gram", Gram, (B, k, k), (torch.float32,), dev)
    check_buffer("Linv", Linv, (B, k, k), (torch.float32,), dev)
    check_buffer("ok", ok, (B,), (torch.int32,), dev)
    if B * k and Gram.data_ptr() == Linv.data_ptr():
        raise ValueError("small_cholesky_inverse (triton): Gram and Linv must be distinct")
    block_for(k)
    return B, k


def small_cholesky_inverse(Gram: torch.Tensor, Linv: torch.Tensor, ok: torch.Tensor, *,
                           pivot_ratio_tol: float) -> None:
    """Gram (B, k, k) fp32 contiguous, k <= ``MAX_K``; writes ``Linv`` (B, k, k) fp32 and
    ``ok`` (B,) int32 (see the module docstring)."""
    BoundSmallCholeskyInverse(Gram, Linv, ok, pivot_ratio_tol=pivot_ratio_tol)()


class BoundSmallCholeskyInverse:
    """``small_cholesky_inverse`` on fixed buffers, checked once, launched as a planned launch
    (``kernels/_launch.py``) by every call."""

    def __init__(self, Gram, Linv, ok, *, pivot_ratio_tol: float):
        B, k = _checks(Gram, Linv, ok)
        if not (float(pivot_ratio_tol) >= 0.0):
            raise ValueError(f"pivot_ratio_tol must be >= 0, got {pivot_ratio_tol!r}")
        self.args = (Gram, Linv, ok, k, float(pivot_ratio_tol))
        self.empty = B == 0 or k == 0
        block = block_for(max(k, 1))
        self._launch = PlannedLaunch(_small_cholesky_inverse_kernel, (max(B, 1),),
                                     dict(BLOCK=block, num_warps=warps_for(block)))

    def __call__(self):
        if not self.empty:
            self._launch(*self.args)


def aot_variants():
    """Every block (the power of two holding k, up to ``MAX_K``)."""
    from lowrank_fused.testing.aot import Variant

    for block in BLOCKS:
        yield Variant(_small_cholesky_inverse_kernel,
                      {"g_ptr": "*fp32", "linv_ptr": "*fp32", "ok_ptr": "*i32", "K": "i32",
                       "tol": "fp32"},
                      dict(BLOCK=block), warps_for(block), 1)

