"""K1 projection of a whole group of same-shape matrices in one launch
(docs/methods/galore.md; K1 in docs/bytes.md): ``R_b = P_b^T @ G_b`` for every member b.

Left (canonical) form, as ``kernels/project.py``: G_b m x n in its storage dtype, P_b m x r,
R_b r x n fp32; the members are separate tensors addressed as offsets from the first
(``kernels/_grouped.py``), sharing one shape, dtype and set of strides. The tiling is the
single-matrix kernel's (its ``choose_config``), so each member's tiles run exactly as they would
alone; the group adds a grid axis. The grid is (rank tiles, column slabs, member x K-slice):
programs sharing a column slab of one member are adjacent, as in the single kernel.

Side outputs, as the single kernel's: ``||R_b||^2`` (tile partials, one per-member fixed-order
sum) and ``colsum(G_b^2)`` (n per member, AdaMeM's residual statistics): member b's colsum
lands in row b of one (count, n) fp32 tensor, written by the rank-tile-0 programs of its
column slabs, exactly the single kernel's values (same tiles, same order).

Split-K (the reduction over m cut into slices, summed in a fixed order afterwards) is used only
when the whole group's output grid is too small to fill the GPU, which for a LLaMA group (tens
of members) it never is; then the partial sums go to one (count, split, r, n) buffer and a
torch sum reduces them into the members' R (where they are one stacked block, else into a
held stack copied out; the colsum slices likewise, from a (count, split, n) buffer). Those
buffers are the plan's, allocated once: about
``count * split * r * n * 4`` bytes held while the bound call lives (split-K is chosen only
for small groups, so this is a few member-sized R at most), and a call allocates nothing.
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture

from ._common import cdiv, config_mode, dot_mode, sum_fp32
from ._grouped import (check_layout, element_offsets, member_ptr, offsets_table,
                       regular_offsets)
from ._launch import PlannedLaunch
from .adam_moments import SUM_BLOCK
from .project import choose_config, choose_split_k, configs_for, project_tile

MAX_GRID_Z = 65535   # CUDA's limit on the third grid dimension (members x K-slices)


@triton.jit
def _grouped_project_kernel(
    g_ptr, p_ptr, r_ptr, offs_ptr, rsq_ptr, cs_ptr,
    GROUP, SPLIT, M, N, RANK, K_PER_SPLIT,
    stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr, stride_rn,
    stride_cb, stride_cs,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, ALIGNED: tl.constexpr, HAS_RSQ: tl.constexpr,
    HAS_COLSQ: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_z = tl.program_id(2)
    pid_b = pid_z // SPLIT
    pid_s = pid_z - pid_b * SPLIT
    g_ptr = member_ptr(g_ptr, offs_ptr, pid_b, ALIGNED)
    p_ptr = member_ptr(p_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    r_ptr = member_ptr(r_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    # ||R_b||^2 (split-K off): member b's tile partials at b * tiles, laid out as the single
    # kernel's, so their fixed-order sum (_sum_rows_kernel) is the single path's bit for bit
    rsq_ptr += pid_b.to(tl.int64) * (tl.cdiv(RANK, BLOCK_R) * tl.cdiv(N, BLOCK_N))
    # colsum(G_b^2): member b's row of the (count, [split,] n) output (slice rows stride_cs)
    cs_ptr += pid_b.to(tl.int64) * stride_cb
    # the single-matrix kernel's tile
    project_tile(g_ptr, p_ptr, r_ptr, cs_ptr, rsq_ptr, pid_r, pid_n, pid_s, M, N, RANK,
                 K_PER_SPLIT, stride_gm, stride_gn, stride_pm, stride_pr, stride_rs, stride_rr,
                 stride_rn, stride_cs, BLOCK_R, BLOCK_N, BLOCK_K, DOT_MODE, HAS_COLSQ,
                 HAS_RSQ)


@triton.jit
def _sum_rows_kernel(part_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """``out[b] = sum(part[b*count:(b+1)*count])`` (one program per member; the same
    fixed-order sum as ``adam_moments._sum_partials_kernel``)."""
    pid = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + pid, sum_fp32(part_ptr + pid * count, count, BLOCK))


def grouped_project(Gs, Ps, Rs, precision: str = "ieee", config=None, split_k: int = None,
                    r_sumsq=None, col_sumsq=None, prepared=None):
    """``Rs[b] = Ps[b]^T @ Gs[b]`` for every b, in one kernel launch (plus, with split-K, one
    reduction and one multi-tensor copy). Lists of left-form tensors; each list shares one
    shape, dtype and strides; the Rs are fp32. ``r_sumsq`` (fp32, one element per member):
    ``||R_b||^2``, from the tiles in the epilogue and one per-member partial sum, equal to the
    single kernel's; with split-K (only on a GPU, where the group's split differs from a
    single matrix's anyway) from one multi-tensor norm of the finished Rs. ``col_sumsq``
    (fp32, (count, n), any strides): ``colsum(Gs[b]^2)`` in row b, from the G tiles of the
    same pass, equal to the single kernel's; with split-K the per-slice partials are summed
    by one torch reduction. ``prepared`` (a bound caller's): {list name: its element
    offsets} for lists whose layout the caller checked once; those are not re-checked."""
    if not len(Gs):
        return
    launch = plan_grouped_project(Gs, Ps, Rs, precision, config, split_k, r_sumsq, col_sumsq,
                                  prepared)
    if launch is None:
        _empty_project(Gs, Rs, r_sumsq, col_sumsq)
    else:
        launch(Gs[0])


def _empty_project(Gs, Rs, r_sumsq, col_sumsq):
    """Nothing to launch (an empty dimension): the single launcher's empty case, per member."""
    torch._foreach_zero_(list(Rs))
    if r_sumsq is not None:
        r_sumsq.zero_()
    if col_sumsq is not None:
        col_sumsq.copy_(torch.stack([G.float().square().sum(dim=0) for G in Gs]))


def plan_grouped_project(Gs, Ps, Rs, precision: str = "ieee", config=None, split_k=None,
                         r_sumsq=None, col_sumsq=None, prepared=None):
    """Everything ``grouped_project`` does on the host before its launches, done once:
    returns ``launch(G0)``, which makes exactly those launches (the same kernels, arguments
    and tables every call) with ``G0`` the first member's gradient (the base the offsets of
    the others are counted from: a call for gradients at the same addresses as the ones
    planned). The closure holds no gradient. None when an empty dimension leaves nothing to
    launch. What a bound caller keeps while the gradients stay at their addresses."""
    count = len(Gs)
    prepared = prepared or {}
    for name, lst in (("Gs", Gs), ("Ps", Ps), ("Rs", Rs)):
        if name not in prepared:
            check_layout(name, lst)
    G0, P0, R0 = Gs[0], Ps[0], Rs[0]
    m, n = G0.shape
    rank = P0.shape[1]
    has_rsq = r_sumsq is not None
    has_cs = col_sumsq is not None
    if m == 0 or n == 0 or rank == 0:
        return None
    device = G0.device
    mode = dot_mode(precision, device)
    cfg = config or choose_config(m, n, rank, config_mode(precision, device))
    tiles = cdiv(rank, cfg.BLOCK_R) * cdiv(n, cfg.BLOCK_N)
    split = split_k or choose_split_k(m, count * tiles, cfg.BLOCK_K, device)
    k_per_split = cdiv(cdiv(m, split), cfg.BLOCK_K) * cfg.BLOCK_K
    split = cdiv(m, k_per_split)
    if count * split > MAX_GRID_Z:
        raise ValueError(f"a group of {count} matrices x {split} K-slices exceeds the grid "
                         f"limit {MAX_GRID_Z}: split the group")
    if split == 1:
        r_offs = prepared.get("Rs") or element_offsets("Rs", Rs)
        stride_s, stride_r, stride_n = 0, R0.stride(0), R0.stride(1)
    else:
        r_offs = regular_offsets(count, split * rank * n)
        stride_s, stride_r, stride_n = rank * n, n, 1             # (count, split, rank, n)
    offs, aligned = offsets_table(
        [prepared.get("Gs") or element_offsets("Gs", Gs),
         prepared.get("Ps") or element_offsets("Ps", Ps), r_offs],
        [G0.element_size(), P0.element_size(), 4], device)
    grid = (cdiv(rank, cfg.BLOCK_R), cdiv(n, cfg.BLOCK_N), count * split)
    tile_rsq = has_rsq and split == 1
    # colsum rows: straight into col_sumsq when it has unit column stride and K is not split,
    # else one (count, split, n) buffer of per-slice partials, reduced below
    cs_partials = has_cs and (split > 1 or (n > 1 and col_sumsq.stride(1) != 1))
    if cs_partials:
        stride_cb, stride_cs = split * n, n
    elif has_cs:
        stride_cb, stride_cs = col_sumsq.stride(0), 0
    else:
        stride_cb, stride_cs = 0, 0
    strides = (G0.stride(0), G0.stride(1), P0.stride(0), P0.stride(1), stride_s, stride_r,
               stride_n, stride_cb, stride_cs)
    meta = dict(BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode,
                ALIGNED=aligned, HAS_RSQ=tile_rsq, HAS_COLSQ=has_cs, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    Rs = list(Rs)
    # ||R||^2 partials: one buffer per plan (held: the plan's launches reuse it)
    rsq_part = torch.empty(count * tiles, device=device, dtype=torch.float32) \
        if tile_rsq else None
    dense = None
    if tile_rsq:
        dense = r_sumsq if r_sumsq.is_contiguous() else torch.empty(
            count, device=device, dtype=torch.float32)

    # split-K's partial sums and their reductions: buffers held by the plan (a call allocates
    # nothing), the sums written straight into the members' R where they are consecutive
    # slices of one buffer (the engine's workspace), else into a held stack copied out
    f32 = dict(device=device, dtype=torch.float32)
    out = R0 if split == 1 else torch.empty((count, split, rank, n), **f32)
    cs_out = torch.empty((count, split, n), **f32) if cs_partials else (
        col_sumsq if has_cs else out)
    cs_sum = None
    if cs_partials:
        cs_sum = col_sumsq if col_sumsq.is_contiguous() else torch.empty((count, n), **f32)
    r_sum = r_list = norms = None
    if split > 1:
        from lowrank_fused.ops_grouped import stacked_view   # lazy, as the op layer loads us

        r_sum = stacked_view(Rs)
        if r_sum is None:
            r_sum = torch.empty((count, rank, n), **f32)
            r_list = list(r_sum.unbind(0))
        if has_rsq:
            norms = torch.empty(count, **f32)

    k1 = PlannedLaunch(_grouped_project_kernel, grid, meta)
    sum_rows = PlannedLaunch(_sum_rows_kernel, (count,), dict(BLOCK=SUM_BLOCK, num_warps=4))
    rsq_out = rsq_part if tile_rsq else out

    def launch(G):
        if _capture.replaying():       # a replayed CUDA graph makes these launches
            return
        k1(G, P0, out, offs, rsq_out, cs_out, count, split, m, n, rank, k_per_split, *strides)
        if cs_partials:
            torch.sum(cs_out, dim=1, out=cs_sum)
            if cs_sum is not col_sumsq:
                col_sumsq.copy_(cs_sum)
        if split > 1:
            torch.sum(out, dim=1, out=r_sum)
            if r_list is not None:
                torch._foreach_copy_(Rs, r_list)
            if has_rsq:
                torch.linalg.vector_norm(r_sum, dim=(1, 2), out=norms)
                torch.mul(norms, norms, out=r_sumsq.view(-1))
        elif tile_rsq:
            sum_rows(rsq_part, dense, tiles)
            if dense is not r_sumsq:
                r_sumsq.copy_(dense)
    return launch


def aot_variants():
    """Every (dtype, config, precision, alignment) compilation ``grouped_project`` can launch
    on a GPU: the single kernel's dtype pairs and configs, ``||R||^2`` (AdaRankGrad) and
    ``colsum(G^2)`` (AdaMeM) for the optimizers' pairs (fp32 bases), and the per-member
    partial sum."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("GROUP", "SPLIT", "M", "N", "RANK", "K_PER_SPLIT", "stride_gm",
                               "stride_gn", "stride_pm", "stride_pr", "stride_rs", "stride_rr",
                               "stride_rn", "stride_cb", "stride_cs")}
    combos = [(g_t, p_t, False, False) for g_t, p_t in (("fp32", "fp32"), ("bf16", "fp32"),
                                                        ("bf16", "bf16"), ("fp16", "fp32"))]
    combos += [(g_t, "fp32", not has_cs, has_cs) for has_cs in (False, True)
               for g_t in ("fp32", "bf16")]
    for g_t, p_t, has_rsq, has_cs in combos:
        for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
            for cfg in configs_for(mode):
                for aligned in (True, False):
                    yield Variant(_grouped_project_kernel,
                                  {"g_ptr": "*" + g_t, "p_ptr": "*" + p_t, "r_ptr": "*fp32",
                                   "offs_ptr": "*i64", "rsq_ptr": "*fp32",
                                   "cs_ptr": "*fp32", **ints},
                                  dict(BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N,
                                       BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, ALIGNED=aligned,
                                       HAS_RSQ=has_rsq, HAS_COLSQ=has_cs),
                                  cfg.num_warps, cfg.num_stages)
    yield Variant(_sum_rows_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "count": "i32"},
                  dict(BLOCK=SUM_BLOCK), 4, 3)
