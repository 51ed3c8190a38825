"""AdaMeM's K2: low-rank momentum and factored (Adafactor) preconditioner on the r x n
projection, fused (docs/methods/adamem.md, update lines 5-6; K2 in docs/bytes.md).

``M = beta1*M + (1-beta1)*R``; ``Mhat = M/c1``; ``X = Mhat`` (``stats_from_momentum``) or R;
``row = beta2*row + (1-beta2)*rowmean(X^2 + eps1)``, ``col`` likewise with column means;
``N = Mhat / (sqrt(outer(row, col)/mean(row)/c2) + eps)``. The row and column statistics are
reductions over the whole matrix that N needs, so three launches (the structure of
``adafactor_step``'s factored statistics, on the low-rank tensors), no host read:

  1. ``_adamem_stats_kernel``, per (m-tile, n-tile): the momentum update (M read and written),
     ``Mhat`` from the stored M, and the row and column sums of ``X^2 + eps1`` of the tile into
     small partial-sum buffers ``(n/BLOCK_N, r)`` and ``(r/BLOCK_M, n)``.
  2. ``_adamem_ema_kernel`` (tiny): each program adds the partials of a block of rows or of
     columns in a fixed order (deterministic, no atomics), applies the EMA and stores ``row`` /
     ``col``; a row program also writes the sum of its stored rows, one partial of
     ``mean(row)`` per row block.
  3. ``_adamem_apply_kernel``, per tile: ``mean(row)`` from those partials, then
     ``vhat = row_i*col_j/mean(row)/c2`` in registers and N from the stored M.

Bytes (fp32 R, state dtype s for M, N; ``bench/bytes.py: adamem_moments_bytes``): R read (4S),
M read and written, read again, N written (4sS): ``(4 + 4s)S``, the floor of two passes (a
second pass over an r x n tensor is unavoidable: N needs statistics of the whole matrix), plus
the r- and n-vectors and the partial sums (``S/BLOCK_N + S/BLOCK_M`` floats, written once and
read once).

As in the reference, everything derived from a state uses its stored value (M, row, col may be
bf16 with ``faithful_dtypes``). All math fp32, IEEE-rounded divisions and square roots.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, sum_fp32, tile_offsets, to_storage

# r x n tiles: one configuration for every shape (BLOCK_N spans the contiguous dimension)
TILE_M, TILE_N, TILE_WARPS = 32, 128, 8
VEC_BLOCK, VEC_WARPS = 256, 4   # pass 2: rows or columns per program
MEAN_BLOCK = 16                 # pass 3: chunk over the per-row-block partials of mean(row)


@triton.jit
def _program_tile(R, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(m-tile id, n-tile id, offs_m, offs_n, mask_m, mask_n, mask) of the program: axis 0
    runs over the n-tiles, axis 1 over the m-tiles."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, R, N, BLOCK_M, BLOCK_N)
    return pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, mask


@triton.jit
def _adamem_stats_kernel(
    r_ptr, m_ptr, rowp_ptr, colp_ptr, R, N,
    stride_rm, stride_rn, stride_mm, stride_mn,
    beta1, one_minus_beta1, eps1, c1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FROM_MOMENTUM: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Pass 1: M update in place; ``rowp[pid_n, i]`` and ``colp[pid_m, j]`` = the tile's row
    and column sums of ``X^2 + eps1`` (contiguous fp32)."""
    pid_m, pid_n, offs_m, offs_n, mask_m, mask_n, mask = _program_tile(R, N, BLOCK_M, BLOCK_N)
    r = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                mask=mask, other=0.0).to(tl.float32)
    m_ptrs = m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    m_st = to_storage(m * beta1 + one_minus_beta1 * r, m_ptr.dtype.element_ty, INTERPRET)
    tl.store(m_ptrs, m_st, mask=mask)
    if FROM_MOMENTUM:
        x = tl.div_rn(m_st.to(tl.float32), c1)
    else:
        x = r
    q = tl.where(mask, x * x + eps1, 0.0)
    tl.store(rowp_ptr + pid_n * R + offs_m, tl.sum(q, axis=1), mask=mask_m)
    tl.store(colp_ptr + pid_m * N + offs_n, tl.sum(q, axis=0), mask=mask_n)


@triton.jit
def _adamem_ema_kernel(
    rowp_ptr, colp_ptr, row_ptr, col_ptr, meanp_ptr, R, N, TILES_M, TILES_N, ROW_BLOCKS,
    beta2, one_minus_beta2,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 2: programs ``0 .. ROW_BLOCKS-1`` update a block of ``row`` from its TILES_N
    partials (and write ``meanp[pid]``, the sum of the stored block); the others update a
    block of ``col`` from its TILES_M partials. row and col are contiguous."""
    pid = tl.program_id(0)
    if pid < ROW_BLOCKS:
        row_st, mask_r = _ema_block(rowp_ptr, row_ptr, pid, R, TILES_N, N, beta2,
                                    one_minus_beta2, BLOCK, INTERPRET)
        tl.store(meanp_ptr + pid, tl.sum(tl.where(mask_r, row_st.to(tl.float32), 0.0), axis=0))
    else:
        _ema_block(colp_ptr, col_ptr, pid - ROW_BLOCKS, N, TILES_M, R, beta2, one_minus_beta2,
                   BLOCK, INTERPRET)


@triton.jit
def _ema_block(part_ptr, state_ptr, blk, COUNT, TILES, DIV, beta2, one_minus_beta2,
               BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """Block ``blk`` of a statistics vector (``row`` or ``col``, COUNT long): the sum of its
    TILES partials (``part[k, i]`` at ``k*COUNT + i``) divided by DIV, into the EMA in place;
    returns the stored block and its mask."""
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < COUNT
    s = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for k in range(1, TILES):
        s += tl.load(part_ptr + k * COUNT + offs, mask=mask, other=0.0)
    v = tl.load(state_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    st = to_storage(v * beta2 + one_minus_beta2 * tl.div_rn(s, DIV.to(tl.float32)),
                    state_ptr.dtype.element_ty, INTERPRET)
    tl.store(state_ptr + offs, st, mask=mask)
    return st, mask


@triton.jit
def _adamem_apply_kernel(
    m_ptr, n_ptr, row_ptr, col_ptr, meanp_ptr, R, N, ROW_BLOCKS,
    stride_mm, stride_mn, stride_nm, stride_nn,
    eps, c1, c2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MEAN_BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Pass 3: ``N = (M/c1) / (sqrt(row_i*col_j/mean(row)/c2) + eps)`` of one tile."""
    _, _, offs_m, offs_n, mask_m, mask_n, mask = _program_tile(R, N, BLOCK_M, BLOCK_N)
    m = tl.load(m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(row_ptr + offs_m, mask=mask_m, other=1.0).to(tl.float32)
    cv = tl.load(col_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    # mean(row) after the loads are issued (before them, ptxas spills the fp32 variant)
    mean = tl.div_rn(sum_fp32(meanp_ptr, ROW_BLOCKS, MEAN_BLOCK), R.to(tl.float32))
    vhat = tl.div_rn(tl.div_rn(rv[:, None] * cv[None, :], mean), c2)
    nrm = tl.div_rn(tl.div_rn(m, c1), tl.sqrt_rn(vhat) + eps)
    tl.store(n_ptr + offs_m[:, None] * stride_nm + offs_n[None, :] * stride_nn,
             to_storage(nrm, n_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check(R, M, row, col, N):
    if R.dim() != 2:
        raise ValueError(f"R must be 2-D (r x n), got shape {tuple(R.shape)}")
    r, n = R.shape
    for name, t, shape in (("M", M, (r, n)), ("N", N, (r, n)), ("row", row, (r,)),
                           ("col", col, (n,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def adamem_moments(R, M, row, col, N, *, beta1: float, beta2: float, eps: float, eps1: float,
                   c1: float, c2: float, stats_from_momentum: bool) -> None:
    """Same contract as ``lowrank_fused.reference.adamem_moments``: left form, in place on
    M (r x n, any strides), row (r) and col (n); the normalised step into N (r x n)."""
    _check(R, M, row, col, N)
    kw = dict(beta1=beta1, beta2=beta2, eps=eps, eps1=eps1, c1=c1, c2=c2,
              stats_from_momentum=stats_from_momentum)
    r, n = R.shape
    if r == 0 or n == 0:   # nothing to launch; the reference defines what empty means
        from lowrank_fused.reference.adamem_moments import adamem_moments_ref

        adamem_moments_ref(R, M, row, col, N, **kw)
        return
    if not (row.is_contiguous() and col.is_contiguous()):
        row_c, col_c = row.contiguous(), col.contiguous()
        adamem_moments(R, M, row_c, col_c, N, **kw)
        row.copy_(row_c)
        col.copy_(col_c)
        return
    tiles_m, tiles_n = cdiv(r, TILE_M), cdiv(n, TILE_N)
    row_blocks, col_blocks = cdiv(r, VEC_BLOCK), cdiv(n, VEC_BLOCK)
    # one scratch allocation: row partials (tiles_n, r), column partials (tiles_m, n), and
    # the per-row-block partials of mean(row)
    scratch = torch.empty(tiles_n * r + tiles_m * n + row_blocks, dtype=torch.float32,
                          device=R.device)
    rowp = scratch[:tiles_n * r]
    colp = scratch[tiles_n * r:tiles_n * r + tiles_m * n]
    meanp = scratch[tiles_n * r + tiles_m * n:]
    interpret = interpreting()
    beta1, beta2 = float(beta1), float(beta2)
    _adamem_stats_kernel[(tiles_n, tiles_m)](
        R, M, rowp, colp, r, n, *R.stride(), *M.stride(),
        beta1, 1.0 - beta1, float(eps1), float(c1),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, FROM_MOMENTUM=bool(stats_from_momentum),
        INTERPRET=interpret, num_warps=TILE_WARPS,
    )
    _adamem_ema_kernel[(row_blocks + col_blocks,)](
        rowp, colp, row, col, meanp, r, n, tiles_m, tiles_n, row_blocks, beta2, 1.0 - beta2,
        BLOCK=VEC_BLOCK, INTERPRET=interpret, num_warps=VEC_WARPS,
    )
    _adamem_apply_kernel[(tiles_n, tiles_m)](
        M, N, row, col, meanp, r, n, row_blocks, *M.stride(), *N.stride(),
        float(eps), float(c1), float(c2),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, MEAN_BLOCK=MEAN_BLOCK, INTERPRET=interpret,
        num_warps=TILE_WARPS,
    )


STATE_DTYPES = ("fp32", "bf16", "fp16")   # M, row, col, N (fp32, or faithful_dtypes)


def aot_variants():
    """State dtype x ``FROM_MOMENTUM`` (pass 1), state dtype (passes 2 and 3); R is fp32."""
    from lowrank_fused.testing.aot import Variant

    tile = dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=False)
    st2 = lambda t: {f"stride_{t}{d}": "i32" for d in "mn"}   # noqa: E731
    for s_t in STATE_DTYPES:
        p = "*" + s_t
        for from_momentum in (False, True):
            yield Variant(_adamem_stats_kernel,
                          {"r_ptr": "*fp32", "m_ptr": p, "rowp_ptr": "*fp32",
                           "colp_ptr": "*fp32", "R": "i32", "N": "i32", **st2("r"), **st2("m"),
                           "beta1": "fp32", "one_minus_beta1": "fp32", "eps1": "fp32",
                           "c1": "fp32"},
                          dict(tile, FROM_MOMENTUM=from_momentum), TILE_WARPS, 3)
        yield Variant(_adamem_ema_kernel,
                      {"rowp_ptr": "*fp32", "colp_ptr": "*fp32", "row_ptr": p, "col_ptr": p,
                       "meanp_ptr": "*fp32", "R": "i32", "N": "i32", "TILES_M": "i32",
                       "TILES_N": "i32", "ROW_BLOCKS": "i32", "beta2": "fp32",
                       "one_minus_beta2": "fp32"},
                      dict(BLOCK=VEC_BLOCK, INTERPRET=False), VEC_WARPS, 3)
        yield Variant(_adamem_apply_kernel,
                      {"m_ptr": p, "n_ptr": p, "row_ptr": p, "col_ptr": p, "meanp_ptr": "*fp32",
                       "R": "i32", "N": "i32", "ROW_BLOCKS": "i32", **st2("m"), **st2("n"),
                       "eps": "fp32", "c1": "fp32", "c2": "fp32"},
                      dict(tile, MEAN_BLOCK=MEAN_BLOCK), TILE_WARPS, 3)
