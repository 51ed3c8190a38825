"""K1 projection ``R = P^T @ G`` (docs/methods/galore.md; K1 in docs/bytes.md).

Left (canonical) form: G is m x n in its storage dtype, P is m x r, R is r x n fp32. A right
projection arrives here as the transposed views (lowrank_fused.ops.project). G is cast in the
GEMM prologue and accumulated in fp32, so no fp32 copy of G is ever made: one read of G.
The output tile spans the rank (BLOCK_R) and a slab of columns; the reduction runs over m.
Programs that share a column slab are adjacent in the grid so the slab is reused from L2.

Side outputs, both computed from data already in registers (no second read):
  ``col_sumsq``  ``colsum(G^2)`` (n) from the G tiles of the reduction (AdaMeM, AdaRankGrad's E).
  ``r_sumsq``    ``||R||_F^2`` (1 element) of the fp32 R: each program writes the sum of
                 squares of its finished output tile into a partials buffer at the fixed index
                 ``pid_r * cdiv(N, BLOCK_N) + pid_n``; ``adam_moments._sum_partials_kernel``
                 (one program) adds the partials in a fixed order: deterministic, no atomics.
With split-K the tiles of one K-slice are partial sums, so their squares mean nothing; then
``_sum_slices_kernel`` (which replaces the eager ``sum(dim=0)`` of the slices) adds the slices
into R and writes the per-program partial sums of squares of the finished R in the same pass,
so R is still not read again for its norm.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (DOT_BF16_EMULATED, DOT_IEEE, DOT_TF32X3, DOT_TF32X3_EMULATED,
                      ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, config_mode, dot_mode,
                      grid_sm_count, interpreter_tiles, mma)
from .adam_moments import SUM_BLOCK, _sum_partials_kernel


@dataclass(frozen=True)
class ProjectConfig:
    BLOCK_R: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Every config the launcher can choose (the AOT test compiles each under Triton 3.6 and 3.9
# and rejects spills; registers per variant: bench/results/aot-sm90.json). The first config
# whose BLOCK_R covers the rank is taken, so up to rank 128 (32 for ieee) one rank tile spans
# the whole rank and G is read once; above that the rank tiles of a column slab are adjacent
# in the grid and re-read G from L2.
# Registers (sm_90, 255 per thread at most): the fp32 accumulator costs BLOCK_R*BLOCK_N /
# (32*num_warps) per thread, and the operand tiles in flight (fp32 after G's cast) as much
# again or more, so tiles grow with the warp count: 8 warps for every tile above 32x64. The
# colsum(G^2) and ||R||^2 side outputs add 20-60 registers, tf32x3 (hi/lo operand halves)
# 30-70 more. Measured: 128x128 at 8 warps reached 230-255 registers with the side outputs
# (tf32 / bf16) and 32x128 at 4 warps spilled under Triton 3.6; 128x64 stays under 190.
# Near 128 registers ptxas may cap a kernel at 128 and spill a few bytes (Triton 3.9's ptxas
# 13: 32x128 fp32 tf32 at 3 stages, 64x64 ieee with bf16 G): those configs were moved.
# ieee (fp32 FMA): ptxas holds each thread's slice of both operand tiles for the whole
# BLOCK_K, hence BLOCK_K=16 (32 spilled at 16x64 with bf16 G; 128x64 reaches 255) and 8
# warps (32x64 at 4 warps spilled under 3.9 with colsum): one 32-row tile, G re-read from
# L2 per further 32 ranks, which costs nothing here (FMA is compute-bound at these ranks).
CONFIGS_FMA = (ProjectConfig(32, 64, 16, 8, 3),)
CONFIGS_MMA = (
    ProjectConfig(32, 128, 32, 8, 4),
    ProjectConfig(64, 128, 32, 8, 3),
    ProjectConfig(128, 64, 32, 8, 3),
)
# tf32x3 splits both operands into TF32 halves in registers: smaller tiles per thread
# (128x128 would spill; 128x64 with BLOCK_K=32 reached 250 registers with colsum)
CONFIGS_TF32X3 = (ProjectConfig(64, 64, 32, 8, 3), ProjectConfig(128, 64, 16, 8, 4))
# every GPU config, for tests that run each of them
GPU_CONFIGS = tuple(dict.fromkeys(CONFIGS_FMA + CONFIGS_MMA + CONFIGS_TF32X3))


def configs_for(mode: int):
    if mode in (DOT_IEEE, DOT_BF16_EMULATED):
        return CONFIGS_FMA
    return CONFIGS_TF32X3 if mode in (DOT_TF32X3, DOT_TF32X3_EMULATED) else CONFIGS_MMA


# CPU interpreter only (never compiled): it runs programs one after another at a fixed cost per
# operation, so fewer, larger tiles are several times faster there
CONFIGS_INTERPRET = (ProjectConfig(64, 128, 64, 4, 1), ProjectConfig(128, 128, 64, 4, 1))


def choose_config(m: int, n: int, rank: int, mode: int) -> ProjectConfig:
    configs = CONFIGS_INTERPRET if interpreter_tiles() else configs_for(mode)
    for cfg in configs:
        if rank <= cfg.BLOCK_R:
            return cfg
    return configs[-1]


@triton.jit
def project_tile(
    g_ptr, p_ptr, r_ptr, cs_ptr, rsq_ptr, pid_r, pid_n, pid_s,
    M, N, RANK, K_PER_SPLIT,
    stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn, stride_cs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, HAS_COLSQ: tl.constexpr, HAS_RSQ: tl.constexpr,
):
    """One program's tile of R (rank tile ``pid_r``, column slab ``pid_n``, K-slice
    ``pid_s``); shared by this kernel and the grouped one (``grouped_project.py``).
    ``HAS_RSQ`` (only without split-K, where the tile is final): ``rsq[pid_r *
    cdiv(N, BLOCK_N) + pid_n] = sum(tile^2)``."""
    # split-K: this program reduces rows [k_lo, k_hi) of G into its own partial-sum slice
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(M, k_lo + K_PER_SPLIT)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k_lo + tl.arange(0, BLOCK_K)
    mask_r = offs_r < RANK
    mask_n = offs_n < N
    # P^T tile (BLOCK_R x BLOCK_K) and G tile (BLOCK_K x BLOCK_N)
    pt_ptrs = p_ptr + offs_r[:, None] * stride_pr + offs_k[None, :].to(tl.int64) * stride_pm
    g_ptrs = g_ptr + offs_k[:, None].to(tl.int64) * stride_gm + offs_n[None, :] * stride_gn
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    colsq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        mask_k = (k - k_lo + offs_k) < k_hi
        pt = tl.load(pt_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(pt, g, acc, DOT_MODE)
        if HAS_COLSQ:   # side output colsum(G^2) from the tile already in registers
            g32 = g.to(tl.float32)
            colsq += tl.sum(g32 * g32, axis=0)
        pt_ptrs += BLOCK_K * stride_pm
        g_ptrs += BLOCK_K * stride_gm
    mask_rn = mask_r[:, None] & mask_n[None, :]
    if HAS_RSQ:   # reduced before R's store: the other order spills on sm_90 (128-row
        # tiles with colsum). Masked: a non-finite operand times a 0 pad would be NaN.
        rsq = tl.sum(tl.sum(tl.where(mask_rn, acc * acc, 0.0), axis=1), axis=0)
    r_ptrs = (r_ptr + pid_s.to(tl.int64) * stride_rs + offs_r[:, None] * stride_rr
              + offs_n[None, :] * stride_rn)
    tl.store(r_ptrs, acc, mask=mask_rn)
    if HAS_RSQ:
        tl.store(rsq_ptr + pid_r * tl.cdiv(N, BLOCK_N) + pid_n, rsq)
    if HAS_COLSQ:
        if pid_r == 0:   # every rank tile saw the same G slab; the first one writes
            tl.store(cs_ptr + pid_s.to(tl.int64) * stride_cs + offs_n, colsq, mask=mask_n)


@triton.jit
def _project_kernel(
    g_ptr, p_ptr, r_ptr, cs_ptr, rsq_ptr,
    M, N, RANK, K_PER_SPLIT,
    stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn, stride_cs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, HAS_COLSQ: tl.constexpr, HAS_RSQ: tl.constexpr,
):
    project_tile(g_ptr, p_ptr, r_ptr, cs_ptr, rsq_ptr, tl.program_id(0),
                 tl.program_id(1).to(tl.int64), tl.program_id(2), M, N, RANK, K_PER_SPLIT,
                 stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn,
                 stride_cs, BLOCK_R, BLOCK_N, BLOCK_K, DOT_MODE, HAS_COLSQ, HAS_RSQ)


@triton.jit
def _sum_slices_kernel(
    slices_ptr, r_ptr, rsq_ptr, numel, SPLIT,
    BLOCK: tl.constexpr, HAS_RSQ: tl.constexpr,
):
    """Split-K epilogue over flat memory: ``R = sum_s slices[s]`` (added in slice order), each
    slice a dense block of ``numel`` laid out as R is; with ``HAS_RSQ`` also
    ``rsq[pid] = sum(R^2)`` over the block, from the sums still in registers."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    src = slices_ptr + offs
    acc = tl.load(src, mask=mask, other=0.0)
    for _ in range(1, SPLIT):
        src += numel
        acc += tl.load(src, mask=mask, other=0.0)
    tl.store(r_ptr + offs, acc, mask=mask)
    if HAS_RSQ:
        tl.store(rsq_ptr + pid, tl.sum(tl.where(mask, acc * acc, 0.0), axis=0))


def choose_split_k(m: int, tiles: int, block_k: int, device: torch.device) -> int:
    """How many slices the reduction over m is cut into. The output grid of a projection is
    small (rank/BLOCK_R x n/BLOCK_N tiles: 32 for 4096x4096 at rank 128), too few programs
    to pull HBM bandwidth on a GPU with 132 SMs; splitting the reduction gives every SM work.
    Each slice keeps at least 8 BLOCK_K steps. Partial sums are added in a fixed order, so the
    result is deterministic. 1 on the CPU interpreter."""
    sms = grid_sm_count(device)
    if sms is None:
        return 1
    want = cdiv(2 * sms, tiles)
    return max(1, min(want, m // (8 * block_k)))


def _check_r_sumsq(r_sumsq):
    if (not isinstance(r_sumsq, torch.Tensor) or r_sumsq.dtype != torch.float32
            or r_sumsq.numel() != 1):
        raise TypeError("r_sumsq must be a 1-element float32 tensor, got "
                        + (f"{r_sumsq.dtype} with {r_sumsq.numel()} elements"
                           if isinstance(r_sumsq, torch.Tensor) else type(r_sumsq).__name__))


def _slices_like(R: torch.Tensor, split: int) -> torch.Tensor:
    """A (split, r, n) fp32 buffer whose every slice has R's strides, when R is dense (row-
    or column-major, as the right-side transposed view is): then the slices and R correspond
    element for element in memory order and the slice sum runs over flat memory."""
    rank, n = R.shape
    if R.is_contiguous():
        return torch.empty((split, rank, n), device=R.device, dtype=torch.float32)
    return torch.empty((split, n, rank), device=R.device, dtype=torch.float32).transpose(1, 2)


def project(G: torch.Tensor, P: torch.Tensor, R: torch.Tensor, precision: str = "ieee",
            config: ProjectConfig = None, split_k: int = None, col_sumsq=None,
            r_sumsq=None) -> None:
    """``R = P^T @ G`` into the fp32 tensor ``R`` (any strides); with ``col_sumsq`` (n, fp32)
    also ``colsum(G^2)`` in the same pass over G (AdaMeM's residual statistics, K1 side
    output); with ``r_sumsq`` (1 element, fp32) also ``||R||_F^2`` of the fp32 R.

    ``r_sumsq`` without split-K: per-tile partial sums of squares from the GEMM epilogue, then
    one fixed-order partial-sum kernel. With split-K a tile holds one slice's partial sum, so
    the norm is taken where R is finished: the slice-sum kernel (``_sum_slices_kernel``, which
    is the split-K epilogue with or without ``r_sumsq``) writes R and the partial sums of
    squares of its blocks in one pass; this keeps R from being read a second time, where an
    eager ``R.square().sum()`` would read it again and launch two more kernels. Deterministic
    (fixed summation orders, no atomics) either way."""
    if r_sumsq is not None:
        _check_r_sumsq(r_sumsq)
    m, n = G.shape
    rank = P.shape[1]
    if m == 0 or n == 0 or rank == 0:
        R.zero_()
        if col_sumsq is not None:
            col_sumsq.copy_(G.float().square().sum(dim=0))
        if r_sumsq is not None:
            r_sumsq.zero_()
        return
    mode = dot_mode(precision, G.device)
    cfg = config or choose_config(m, n, rank, config_mode(precision, G.device))
    tiles = cdiv(rank, cfg.BLOCK_R) * cdiv(n, cfg.BLOCK_N)
    split = split_k or choose_split_k(m, tiles, cfg.BLOCK_K, G.device)
    # each slice spans a whole number of BLOCK_K steps
    k_per_split = cdiv(cdiv(m, split), cfg.BLOCK_K) * cfg.BLOCK_K
    split = cdiv(m, k_per_split)
    has_rsq = r_sumsq is not None
    if split == 1:
        out = R
        stride_s, stride_r, stride_n = 0, R.stride(0), R.stride(1)
    else:
        # the slice sum needs R dense; a general strided R gets a dense stand-in, copied after
        dense = R.is_contiguous() or R.t().is_contiguous()
        R_sum = R if dense else torch.empty((rank, n), device=R.device, dtype=torch.float32)
        out = _slices_like(R_sum, split)
        stride_s, stride_r, stride_n = out.stride()
    has_cs = col_sumsq is not None
    if has_cs and (split > 1 or col_sumsq.stride(0) != 1):
        cs_out = torch.empty((split, n), device=G.device, dtype=torch.float32)
    else:
        cs_out = col_sumsq if has_cs else out
    tile_rsq = has_rsq and split == 1   # with split-K, from the slice sum below
    grid = (cdiv(rank, cfg.BLOCK_R), cdiv(n, cfg.BLOCK_N), split)
    rsq_part = (torch.empty(grid[0] * grid[1], device=G.device, dtype=torch.float32)
                if tile_rsq else out)
    _project_kernel[grid](
        G, P, out, cs_out, rsq_part, m, n, rank, k_per_split,
        G.stride(0), G.stride(1), P.stride(0), P.stride(1), stride_s, stride_r, stride_n,
        cs_out.stride(0) if has_cs and cs_out.dim() == 2 else 0,
        BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_MODE=mode, HAS_COLSQ=has_cs, HAS_RSQ=tile_rsq,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        numel = rank * n
        blocks = cdiv(numel, ELEMENTWISE_BLOCK)
        if has_rsq:
            rsq_part = torch.empty(blocks, device=G.device, dtype=torch.float32)
        _sum_slices_kernel[(blocks,)](
            out, R_sum, rsq_part, numel, split,
            BLOCK=ELEMENTWISE_BLOCK, HAS_RSQ=has_rsq, num_warps=ELEMENTWISE_WARPS,
        )
        if R_sum is not R:
            R.copy_(R_sum)
    if has_rsq:
        _sum_partials_kernel[(1,)](rsq_part, r_sumsq, rsq_part.numel(), BLOCK=SUM_BLOCK,
                                   num_warps=4)
    if has_cs and cs_out is not col_sumsq:
        col_sumsq.copy_(cs_out.sum(dim=0))


def aot_variants():
    """Every (config, precision) compilation of the (dtype, side output) combinations the
    optimizers launch on a GPU, and the split-K slice sum (the partial-sum kernel is
    ``adam_moments.py``'s)."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "RANK", "K_PER_SPLIT", "stride_gm", "stride_gn",
                               "stride_pm", "stride_pr", "stride_rs", "stride_rr", "stride_rn",
                               "stride_cs")}
    # (G, P dtypes, colsum(G^2), ||R||^2 side outputs) of the optimizers: colsum is what AdaMeM
    # and AdaRankGrad's subspace selection ask for, ||R||^2 AdaRankGrad's norm z (fp32 bases)
    pairs = (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"))
    combos = [(g_t, p_t, False, False) for g_t, p_t in pairs]
    combos += [(g_t, "fp32", has_cs, not has_cs) for has_cs in (True, False)
               for g_t in ("fp32", "bf16")]
    for g_t, p_t, has_cs, has_rsq in combos:
        for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
            for cfg in configs_for(mode):
                yield Variant(_project_kernel,
                              {"g_ptr": "*" + g_t, "p_ptr": "*" + p_t, "r_ptr": "*fp32",
                               "cs_ptr": "*fp32", "rsq_ptr": "*fp32", **ints},
                              dict(BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                   DOT_MODE=mode, HAS_COLSQ=has_cs, HAS_RSQ=has_rsq),
                              cfg.num_warps, cfg.num_stages)
    for has_rsq in (False, True):
        yield Variant(_sum_slices_kernel,
                      {"slices_ptr": "*fp32", "r_ptr": "*fp32", "rsq_ptr": "*fp32",
                       "numel": "i32", "SPLIT": "i32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK, HAS_RSQ=has_rsq), ELEMENTWISE_WARPS, 3)
