"""IASS rank selection (docs/methods/adarankgrad.md: ``IASS`` and the ``ritz`` option).

The op's only m x n work is the gradient energy ``E = ||G||^2``. When the caller passes ``E``
(AdaRankGrad does: ``sum(colsum(G^2))`` from the side output of the projection that made
``B = Qb^T G``, K1), G is not read here at all. Otherwise ``_iass_sumsq_kernel``
reads G once in its storage dtype, fp32 accumulation: each program squares and sums one tile
into its own partial, then ``adam_moments._sum_partials_kernel`` (one program) adds the
partials in a fixed order (deterministic, no atomics).

The rest is small-matrix work and runs on torch, exactly as the reference
(``lowrank_fused.reference.iass_select.prefix_energies``): ``prefix``, the squared row norms
of B (k x n) and their cumulative sums; ``ritz``, the SVD of B (``torch.linalg.svd``), the
rotation ``Qb @ U_B`` in place and its sign canonicalisation. The selected rank is a Python
int, so the op reads E and then the k cumulative energies from the device (the reference's
two host reads; E first, so a non-finite or zero gradient leaves Qb untouched).
"""
import torch
import triton
import triton.language as tl

from lowrank_fused.reference.iass_select import (IASS_MODES, check_energy, given_energy,
                                                 prefix_energies, smallest_sufficient_rank)

from ._common import cdiv, check_left_basis, load_tile, tile_offsets
from .adam_moments import SUM_BLOCK, _sum_partials_kernel

# one tile per program: BLOCK_N spans the contiguous dimension
TILE_M, TILE_N, TILE_WARPS = 16, 256, 4


@triton.jit
def _iass_sumsq_kernel(
    g_ptr, part_ptr, M, N, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``part[pid] = sum(G_tile^2)`` of one (BLOCK_M x BLOCK_N) tile; axis 0 runs over the
    n-tiles, axis 1 over the m-tiles."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_m, offs_n, _, _, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    tile_sum = tl.sum(tl.sum(g * g, axis=1), axis=0)
    tl.store(part_ptr + pid_m * tl.num_programs(0) + pid_n, tile_sum)


def grad_sumsq(G: torch.Tensor) -> torch.Tensor:
    """``||G||^2`` as a 1-element fp32 tensor on G's device: one read of G (any strides, its
    storage dtype), fp32 accumulation, deterministic."""
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D, got shape {tuple(G.shape)}")
    out = torch.empty(1, dtype=torch.float32, device=G.device)
    if G.numel() == 0:
        return out.zero_()
    if G.stride(1) != 1 and G.stride(0) == 1:
        G = G.t()                     # the sum is transpose-invariant: tile the contiguous dim
    m, n = G.shape
    grid = (cdiv(n, TILE_N), cdiv(m, TILE_M))
    partials = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=G.device)
    _iass_sumsq_kernel[grid](G, partials, m, n, G.stride(0), G.stride(1),
                        BLOCK_M=TILE_M, BLOCK_N=TILE_N, num_warps=TILE_WARPS)
    _sum_partials_kernel[(1,)](partials, out, partials.numel(), BLOCK=SUM_BLOCK,
                               num_warps=4)
    return out


def _check(G, Qb, B):
    _, n, k = check_left_basis(G, Qb, "Qb", "k")
    if tuple(B.shape) != (k, n):
        raise ValueError(f"B must have shape {(k, n)}, got {tuple(B.shape)}")


def iass_select(G: torch.Tensor, Qb: torch.Tensor, B: torch.Tensor, *, eta_th: float,
                r_max: int, mode: str = "prefix", sign_canon: bool = True, E=None) -> int:
    """Same contract as ``lowrank_fused.reference.iass_select``: returns the selected rank
    (0 for a zero gradient), rotates Qb in place in ``ritz`` mode, raises FloatingPointError
    when ``||G||^2`` is not finite. With ``E`` given, G is not read."""
    if mode not in IASS_MODES:
        raise ValueError(f"mode must be one of {IASS_MODES}, got {mode!r}")
    _check(G, Qb, B)
    E = float(grad_sumsq(G)) if E is None else given_energy(E)     # host read 1
    check_energy(E)
    if E == 0.0:
        return 0
    e = prefix_energies(Qb, B, mode, sign_canon)
    c = torch.cumsum(e, dim=0).tolist()                             # host read 2
    return smallest_sufficient_rank(c, float(eta_th) * E, min(int(r_max), Qb.shape[1]))


def aot_variants():
    """``_iass_sumsq_kernel`` for each gradient dtype (the fixed-order sum of the partials is
    ``adam_moments.py``'s ``_sum_partials_kernel``, compiled there)."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "stride_gm", "stride_gn")}
    for g_t in ("fp32", "bf16", "fp16"):
        yield Variant(_iass_sumsq_kernel, {"g_ptr": "*" + g_t, "part_ptr": "*fp32", **ints},
                      dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N), TILE_WARPS, 3)
