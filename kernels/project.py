"""K1 projection ``R = P^T @ G`` (ALGORITHMS.md section 4.3 line 3, section 10 K1).

Left (canonical) form: G is m x n in its storage dtype, P is m x r, R is r x n fp32. A right
projection arrives here as the transposed views (lowrank_fused.ops.project). G is cast in the
GEMM prologue and accumulated in fp32, so no fp32 copy of G is ever made: one read of G.
The output tile spans the rank (BLOCK_R) and a slab of columns; the reduction runs over m.
Programs that share a column slab are adjacent in the grid so the slab is reused from L2.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DOT_BF16_EMULATED, DOT_IEEE, cdiv, dot_mode, mma, sm_count


@dataclass(frozen=True)
class ProjectConfig:
    BLOCK_R: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Every config the launcher can choose (the AOT test compiles each and rejects spills).
# ieee (fp32 FMA, no tensor cores) needs small tiles: larger ones spill on sm_90, worst with
# bf16 G. Tensor-core modes cover the rank with one tile up to 128 so G is read once
# (twice at rank 256, the second time from L2: the r-tiles of a column slab are adjacent).
CONFIGS_FMA = (ProjectConfig(16, 64, 32, 4, 3),)
CONFIGS_MMA = (
    ProjectConfig(16, 64, 32, 4, 3),
    ProjectConfig(32, 128, 32, 4, 3),
    ProjectConfig(64, 128, 32, 8, 3),
    ProjectConfig(128, 128, 32, 8, 3),
)


def configs_for(mode: int):
    return CONFIGS_FMA if mode in (DOT_IEEE, DOT_BF16_EMULATED) else CONFIGS_MMA


def choose_config(m: int, n: int, rank: int, mode: int) -> ProjectConfig:
    configs = configs_for(mode)
    for cfg in configs:
        if rank <= cfg.BLOCK_R:
            return cfg
    return configs[-1]


@triton.jit
def project_tile(
    g_ptr, p_ptr, r_ptr, cs_ptr, pid_r, pid_n, pid_s,
    M, N, RANK, K_PER_SPLIT,
    stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn, stride_cs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, HAS_COLSQ: tl.constexpr,
):
    """One program's tile of R (rank tile ``pid_r``, column slab ``pid_n``, K-slice
    ``pid_s``); shared by this kernel and the grouped one (``grouped_project.py``)."""
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
    r_ptrs = (r_ptr + pid_s.to(tl.int64) * stride_rs + offs_r[:, None] * stride_rr
              + offs_n[None, :] * stride_rn)
    tl.store(r_ptrs, acc, mask=mask_r[:, None] & mask_n[None, :])
    if HAS_COLSQ:
        if pid_r == 0:   # every rank tile saw the same G slab; the first one writes
            tl.store(cs_ptr + pid_s.to(tl.int64) * stride_cs + offs_n, colsq, mask=mask_n)


@triton.jit
def _project_kernel(
    g_ptr, p_ptr, r_ptr, cs_ptr,
    M, N, RANK, K_PER_SPLIT,
    stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn, stride_cs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, HAS_COLSQ: tl.constexpr,
):
    project_tile(g_ptr, p_ptr, r_ptr, cs_ptr, tl.program_id(0),
                 tl.program_id(1).to(tl.int64), tl.program_id(2), M, N, RANK, K_PER_SPLIT,
                 stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn,
                 stride_cs, BLOCK_R, BLOCK_N, BLOCK_K, DOT_MODE, HAS_COLSQ)


def choose_split_k(m: int, tiles: int, block_k: int, device: torch.device) -> int:
    """How many slices the reduction over m is cut into. The output grid of a projection is
    small (rank/BLOCK_R x n/BLOCK_N tiles: 32 for 4096x4096 at rank 128), too few programs
    to pull HBM bandwidth on a GPU with 132 SMs; splitting the reduction gives every SM work.
    Each slice keeps at least 8 BLOCK_K steps. Partial sums are added in a fixed order, so the
    result is deterministic. 1 on the CPU interpreter."""
    if device.type != "cuda":
        return 1
    want = cdiv(2 * sm_count(device), tiles)
    return max(1, min(want, m // (8 * block_k)))


def project(G: torch.Tensor, P: torch.Tensor, R: torch.Tensor, precision: str = "ieee",
            config: ProjectConfig = None, split_k: int = None, col_sumsq=None) -> None:
    """``R = P^T @ G`` into the fp32 tensor ``R`` (any strides); with ``col_sumsq`` (n, fp32)
    also ``colsum(G^2)`` in the same pass over G (AdaMeM's residual statistics, K1 side
    output)."""
    m, n = G.shape
    rank = P.shape[1]
    if m == 0 or n == 0 or rank == 0:
        R.zero_()
        if col_sumsq is not None:
            col_sumsq.copy_(G.float().square().sum(dim=0))
        return
    mode = dot_mode(precision, G.device)
    cfg = config or choose_config(m, n, rank, mode)
    tiles = cdiv(rank, cfg.BLOCK_R) * cdiv(n, cfg.BLOCK_N)
    split = split_k or choose_split_k(m, tiles, cfg.BLOCK_K, G.device)
    # each slice spans a whole number of BLOCK_K steps
    k_per_split = cdiv(cdiv(m, split), cfg.BLOCK_K) * cfg.BLOCK_K
    split = cdiv(m, k_per_split)
    out = R if split == 1 else torch.empty((split, rank, n), device=R.device, dtype=torch.float32)
    stride_s, stride_r, stride_n = ((0, R.stride(0), R.stride(1)) if split == 1
                                    else out.stride())
    has_cs = col_sumsq is not None
    if has_cs and (split > 1 or col_sumsq.stride(0) != 1):
        cs_out = torch.empty((split, n), device=G.device, dtype=torch.float32)
    else:
        cs_out = col_sumsq if has_cs else out
    grid = (cdiv(rank, cfg.BLOCK_R), cdiv(n, cfg.BLOCK_N), split)
    _project_kernel[grid](
        G, P, out, cs_out, m, n, rank, k_per_split,
        G.stride(0), G.stride(1), P.stride(0), P.stride(1), stride_s, stride_r, stride_n,
        cs_out.stride(0) if has_cs and cs_out.dim() == 2 else 0,
        BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_MODE=mode, HAS_COLSQ=has_cs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        torch.sum(out, dim=0, out=R) if R.is_contiguous() else R.copy_(out.sum(dim=0))
    if has_cs and cs_out is not col_sumsq:
        col_sumsq.copy_(cs_out.sum(dim=0))


def aot_variants():
    """Every (dtype, config, precision) compilation ``project`` can launch on a GPU."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "RANK", "K_PER_SPLIT", "stride_gm", "stride_gn",
                               "stride_pm", "stride_pr", "stride_rs", "stride_rr", "stride_rn",
                               "stride_cs")}
    # (G, P dtypes, colsum(G^2) side output): the side output is what AdaMeM asks for
    combos = [(g_t, p_t, False) for g_t, p_t in (("fp32", "fp32"), ("bf16", "fp32"),
                                                  ("bf16", "bf16"), ("fp16", "fp32"))]
    combos += [("fp32", "fp32", True), ("bf16", "fp32", True)]
    for g_t, p_t, has_cs in combos:
        for mode in (0, 1, 2):
            for cfg in configs_for(mode):
                yield Variant(_project_kernel,
                              {"g_ptr": "*" + g_t, "p_ptr": "*" + p_t, "r_ptr": "*fp32",
                               "cs_ptr": "*fp32", **ints},
                              dict(BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                   DOT_MODE=mode, HAS_COLSQ=has_cs),
                              cfg.num_warps, cfg.num_stages)
