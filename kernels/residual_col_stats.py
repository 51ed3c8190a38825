"""AdaMeM's one-sided (per-column) statistics of the residual ``S = G - P @ R``, fused
(docs/methods/adamem.md, update lines 4 and 7 and the fused identity below them; K5 pass 1
in docs/bytes.md).

``c_os = beta2*c_os + (1-beta2)*(colsum(S^2)/m + eps1)``, ``col_scale = 1/(sqrt(c_os/c2) + eps)``
(n-vectors, on the device, no host read). ``colsum(S^2)`` comes from one of two sources:

* identity form (``explicit=False``): ``colsum(G^2) - colsum(R^2)``, clamped at 0 against
  cancellation (exact for orthonormal P). With ``g_col_sumsq`` (the K1 side output of the
  projection that made R) this is one launch of ``_residual_col_stats_kernel`` over column
  blocks: r x n + n reads, G is not touched. Without it, ``_residual_colsq_kernel`` first
  reads G once for the column sums of ``G^2``.
* explicit form: ``_residual_colsq_kernel`` forms S tile by tile, ``G_tile - P_tile @ R`` with
  the GEMM over the rank in the accumulator (as kernels/backproject_update.py), and sums its
  squares per column: G read once, S never stored.

The column-sum kernel splits the rows of G into slices (split-K, as kernels/project.py), each
program writing its own partial column sums; ``_residual_col_stats_kernel`` adds the partials
in a fixed order (deterministic, no atomics), then applies the EMA and writes ``col_scale``
from the *stored* ``c_os``, as the reference does. All math fp32, IEEE-rounded divisions and
square roots; the GEMM runs fp32 FMA (``DOT_MODE`` ieee: the reference's fp32 ``P @ R``).
"""
import torch
import triton
import triton.language as tl

from ._common import (DOT_IEEE, cdiv, check_left_basis, grid_sm_count, interpreting, mma,
                      to_storage)

# column sums of G^2 or S^2: 64 x 64 tiles, K = 32 over the rank (fp32 FMA, as
# backproject_update's ieee config) with 8 warps: with 4 the explicit form spills on sm_90
# (its G tile and the column-sum accumulator live next to the GEMM's); the statistics pass:
# a block of columns per program
PART_M, PART_N, PART_K, PART_WARPS = 64, 64, 32, 8
VEC_BLOCK, VEC_R, VEC_WARPS = 256, 16, 4


@triton.jit
def _residual_colsq_kernel(
    g_ptr, p_ptr, r_ptr, part_ptr,
    M, N, RANK, ROWS_PER_SPLIT,
    stride_gm, stride_gn, stride_pm, stride_pr, stride_rr, stride_rn, stride_sp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EXPLICIT: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """``part[pid_s, j]`` = the sum over rows ``[pid_s*ROWS_PER_SPLIT, ...)`` of ``S[:, j]^2``
    (``EXPLICIT``: ``S = G - P @ R``) or of ``G[:, j]^2``; axis 0 runs over the column
    blocks, axis 1 over the row slices. The partials are contiguous along n."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    lo = pid_s * ROWS_PER_SPLIT
    hi = tl.minimum(M, lo + ROWS_PER_SPLIT)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    colsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < hi
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if EXPLICIT:   # S tile = G tile - (P @ R) tile, the product only in the accumulator
            p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pr
            r_ptrs = r_ptr + offs_k[:, None] * stride_rr + offs_n[None, :] * stride_rn
            for k in range(0, RANK, BLOCK_K):
                mask_k = (k + offs_k) < RANK
                p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                r = tl.load(r_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = mma(p, r, acc, DOT_MODE)
                p_ptrs += BLOCK_K * stride_pr
                r_ptrs += BLOCK_K * stride_rr
        # the G tile after the GEMM, so that it is not live through the K loop
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if EXPLICIT:
            g = g - acc
        colsq += tl.sum(g * g, axis=0)
    tl.store(part_ptr + pid_s * stride_sp + offs_n, colsq, mask=mask_n)


@triton.jit
def _residual_col_stats_kernel(
    src_ptr, r_ptr, c_ptr, cs_ptr,
    M, N, RANK, PARTS,
    stride_sp, stride_sn, stride_rr, stride_rn, stride_c, stride_cs,
    beta2, one_minus_beta2, eps1, eps, c2,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IDENTITY: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One block of columns: ``s = sum_k src[k, j]`` over the PARTS rows of ``src`` in order
    (column-sum partials, or ``g_col_sumsq`` as one row); ``IDENTITY``: ``s = max(s -
    colsum(R^2), 0)`` (NaN kept); then the EMA of ``c_os`` and ``col_scale``."""
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    s = tl.load(src_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    for k in range(1, PARTS):
        s += tl.load(src_ptr + k * stride_sp + offs_n * stride_sn, mask=mask_n,
                     other=0.0).to(tl.float32)
    if IDENTITY:
        offs_r = tl.arange(0, BLOCK_R)
        rsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k in range(0, RANK, BLOCK_R):
            mask_r = (k + offs_r) < RANK
            rt = tl.load(r_ptr + (k + offs_r)[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            rsq += tl.sum(rt * rt, axis=0)
        d = s - rsq
        s = tl.where(d < 0.0, 0.0, d)     # clamp at 0 like torch.clamp: NaN propagates
    mean_sq = tl.div_rn(s, M.to(tl.float32)) + eps1
    c = tl.load(c_ptr + offs_n * stride_c, mask=mask_n, other=0.0).to(tl.float32)
    c_st = to_storage(c * beta2 + one_minus_beta2 * mean_sq, c_ptr.dtype.element_ty, INTERPRET)
    tl.store(c_ptr + offs_n * stride_c, c_st, mask=mask_n)
    scale = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(c_st.to(tl.float32), c2)) + eps)
    tl.store(cs_ptr + offs_n * stride_cs, to_storage(scale, cs_ptr.dtype.element_ty, INTERPRET),
             mask=mask_n)


def _choose_split(m: int, tiles_n: int, device: torch.device) -> int:
    """Row slices of the column-sum pass: enough programs for every SM of a GPU (the grid
    has only n/PART_N column blocks), each slice at least 4 row tiles; 1 on the interpreter."""
    sms = grid_sm_count(device)
    if sms is None:
        return 1
    want = cdiv(2 * sms, tiles_n)
    return max(1, min(want, m // (4 * PART_M)))


def _check(G, P, R, c_os, col_scale, g_col_sumsq):
    _, n, r = check_left_basis(G, P, "P", "r")
    for name, t, shape in (("R", R, (r, n)), ("c_os", c_os, (n,)),
                           ("col_scale", col_scale, (n,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if g_col_sumsq is not None and tuple(g_col_sumsq.shape) != (n,):
        raise ValueError(f"g_col_sumsq must have shape {(n,)}, got {tuple(g_col_sumsq.shape)}")


def residual_col_stats(G, P, R, c_os, col_scale, *, beta2: float, eps1: float, eps: float,
                       c2: float, explicit: bool = False, g_col_sumsq=None,
                       split: int = None) -> None:
    """Same contract as ``lowrank_fused.reference.residual_col_stats``: left form, G (m x n)
    in its storage dtype, P (m x r), R = P^T G (r x n); updates ``c_os`` (n) in place and
    writes ``col_scale`` (n). ``split`` (tests) fixes the number of row slices of the
    column-sum pass."""
    _check(G, P, R, c_os, col_scale, g_col_sumsq)
    m, n = G.shape
    rank = P.shape[1]
    if m == 0 or n == 0:   # nothing to launch; the reference defines what empty means
        from lowrank_fused.reference.residual_col_stats import residual_col_stats_ref

        residual_col_stats_ref(G, P, R, c_os, col_scale, beta2=beta2, eps1=eps1, eps=eps,
                               c2=c2, explicit=explicit, g_col_sumsq=g_col_sumsq)
        return
    R = R if R.dtype == torch.float32 else R.float()
    if explicit or g_col_sumsq is None:
        P = P if P.dtype == torch.float32 else P.float()
        tiles_n = cdiv(n, PART_N)
        split = split or _choose_split(m, tiles_n, G.device)
        rows = cdiv(cdiv(m, split), PART_M) * PART_M     # whole row tiles per slice
        split = cdiv(m, rows)
        src = torch.empty((split, n), dtype=torch.float32, device=G.device)
        _residual_colsq_kernel[(tiles_n, split)](
            G, P, R, src, m, n, rank, rows,
            G.stride(0), G.stride(1), P.stride(0), P.stride(1), R.stride(0), R.stride(1),
            src.stride(0),
            BLOCK_M=PART_M, BLOCK_N=PART_N, BLOCK_K=PART_K, EXPLICIT=bool(explicit),
            DOT_MODE=DOT_IEEE, num_warps=PART_WARPS,
        )
        parts, stride_sp, stride_sn = split, src.stride(0), 1
    else:
        src = g_col_sumsq if g_col_sumsq.dtype == torch.float32 else g_col_sumsq.float()
        parts, stride_sp, stride_sn = 1, 0, src.stride(0)
    beta2 = float(beta2)
    _residual_col_stats_kernel[(cdiv(n, VEC_BLOCK),)](
        src, R, c_os, col_scale, m, n, rank, parts,
        stride_sp, stride_sn, R.stride(0), R.stride(1), c_os.stride(0), col_scale.stride(0),
        beta2, 1.0 - beta2, float(eps1), float(eps), float(c2),
        BLOCK_N=VEC_BLOCK, BLOCK_R=VEC_R, IDENTITY=not explicit, INTERPRET=interpreting(),
        num_warps=VEC_WARPS,
    )


def aot_variants():
    """Column sums: gradient dtype x form (P, R fp32); statistics: state dtype x form."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "RANK", "ROWS_PER_SPLIT", "stride_gm", "stride_gn",
                               "stride_pm", "stride_pr", "stride_rr", "stride_rn", "stride_sp")}
    for g_t in ("fp32", "bf16", "fp16"):
        for explicit in (False, True):
            yield Variant(_residual_colsq_kernel,
                          {"g_ptr": "*" + g_t, "p_ptr": "*fp32", "r_ptr": "*fp32",
                           "part_ptr": "*fp32", **ints},
                          dict(BLOCK_M=PART_M, BLOCK_N=PART_N, BLOCK_K=PART_K,
                               EXPLICIT=explicit, DOT_MODE=DOT_IEEE), PART_WARPS, 3)
    ints = {a: "i32" for a in ("M", "N", "RANK", "PARTS", "stride_sp", "stride_sn", "stride_rr",
                               "stride_rn", "stride_c", "stride_cs")}
    scalars = {a: "fp32" for a in ("beta2", "one_minus_beta2", "eps1", "eps", "c2")}
    for s_t in ("fp32", "bf16"):
        for identity in (True, False):
            yield Variant(_residual_col_stats_kernel,
                          {"src_ptr": "*fp32", "r_ptr": "*fp32", "c_ptr": "*" + s_t,
                           "cs_ptr": "*" + s_t, **ints, **scalars},
                          dict(BLOCK_N=VEC_BLOCK, BLOCK_R=VEC_R, IDENTITY=identity,
                               INTERPRET=False), VEC_WARPS, 3)
