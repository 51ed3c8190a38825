"""AdaMeM's middle step (docs/methods/adamem.md, update lines 4-7) for a whole class of
same-shape matrices: ``adamem_moments`` (K2: momentum, factored statistics, N1) and the
identity form of ``residual_col_stats`` (the residual's column statistics from the K1 side
output ``colsum(G^2)``) of every member in four launches instead of four per member.

The kernels are those of ``kernels/adamem_moments.py`` (its three passes) and
``kernels/residual_col_stats.py`` (``_residual_col_stats_kernel`` with one partial row, the
``g_col_sumsq`` case) with a member axis added to the grid: the same tiles, the same
reduction orders and the same fp32 arithmetic per member, so every member's bits equal the
single-matrix launchers'. The members are separate tensors addressed as offsets from the first
(``kernels/_grouped.py``); the per-member scalars (each group's hyperparameters and each
member's bias corrections) come from one fp32 table (8 x count: beta1, 1 - beta1, eps1, c1,
beta2, 1 - beta2, eps, c2), the partial sums from one scratch buffer with a slice per member.
Left form, fp32 throughout (AdaMeM's state is fp32; R is the fp32 projection).

``skip`` (a 0-dim bool tensor on the device, docs/conventions.md): every program of the four
kernels loads it and returns before any store when it holds True, so M, the factored
statistics and the residual's statistics keep their bits (N1 and the column scales, the
caller's workspaces, are then left unwritten; the combined update that reads them is skipped
with the same flag). Without one the launcher passes a cached False flag: one compiled kernel
either way. The host never reads it.
"""
import numpy as np
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture

from ._common import cdiv, interpreting, skip_flag, sum_fp32, tile_offsets, to_storage
from ._grouped import element_offsets, member_ptr, offsets_table
from ._launch import launch_planned
from .adamem_moments import MEAN_BLOCK, TILE_M, TILE_N, TILE_WARPS, VEC_BLOCK, VEC_WARPS, \
    _ema_block
from .residual_col_stats import VEC_BLOCK as CS_BLOCK, VEC_R, VEC_WARPS as CS_WARPS

# the offsets table's rows (one list each)
LISTS = ("Rs", "Ms", "rows", "cols", "Ns", "c_os", "col_scales", "sumsq")
SCALARS = 8


@triton.jit
def _g_stats_kernel(
    r_ptr, m_ptr, scratch_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH, COLP, R, N,
    stride_rm, stride_rn, stride_mm, stride_mn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FROM_MOMENTUM: tl.constexpr,
    INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``adamem_moments`` pass 1 of member ``program_id(2)``."""
    if tl.load(skip_ptr):
        return
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2)
    r_ptr = member_ptr(r_ptr, offs_ptr, pid_b, ALIGNED)
    m_ptr = member_ptr(m_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    rowp_ptr = scratch_ptr + pid_b.to(tl.int64) * SCRATCH
    colp_ptr = rowp_ptr + COLP
    beta1 = tl.load(scal_ptr + pid_b)
    one_minus_beta1 = tl.load(scal_ptr + GROUP + pid_b)
    eps1 = tl.load(scal_ptr + 2 * GROUP + pid_b)
    c1 = tl.load(scal_ptr + 3 * GROUP + pid_b)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, R, N, BLOCK_M, BLOCK_N)
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
def _g_ema_kernel(
    scratch_ptr, row_ptr, col_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH, COLP, MEANP,
    R, N, TILES_M, TILES_N, ROW_BLOCKS,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``adamem_moments`` pass 2 of member ``program_id(1)``."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0)
    pid_b = tl.program_id(1)
    rowp_ptr = scratch_ptr + pid_b.to(tl.int64) * SCRATCH
    colp_ptr = rowp_ptr + COLP
    meanp_ptr = rowp_ptr + MEANP
    beta2 = tl.load(scal_ptr + 4 * GROUP + pid_b)
    one_minus_beta2 = tl.load(scal_ptr + 5 * GROUP + pid_b)
    if pid < ROW_BLOCKS:
        row_ptr = member_ptr(row_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
        row_st, mask_r = _ema_block(rowp_ptr, row_ptr, pid, R, TILES_N, N, beta2,
                                    one_minus_beta2, BLOCK, INTERPRET)
        tl.store(meanp_ptr + pid, tl.sum(tl.where(mask_r, row_st.to(tl.float32), 0.0), axis=0))
    else:
        col_ptr = member_ptr(col_ptr, offs_ptr + 3 * GROUP, pid_b, ALIGNED)
        _ema_block(colp_ptr, col_ptr, pid - ROW_BLOCKS, N, TILES_M, R, beta2, one_minus_beta2,
                   BLOCK, INTERPRET)


@triton.jit
def _g_apply_kernel(
    m_ptr, n_ptr, row_ptr, col_ptr, scratch_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH,
    MEANP, R, N, ROW_BLOCKS, stride_mm, stride_mn, stride_nm, stride_nn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MEAN_BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``adamem_moments`` pass 3 of member ``program_id(2)``."""
    if tl.load(skip_ptr):
        return
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2)
    m_ptr = member_ptr(m_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    row_ptr = member_ptr(row_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    col_ptr = member_ptr(col_ptr, offs_ptr + 3 * GROUP, pid_b, ALIGNED)
    n_ptr = member_ptr(n_ptr, offs_ptr + 4 * GROUP, pid_b, ALIGNED)
    meanp_ptr = scratch_ptr + pid_b.to(tl.int64) * SCRATCH + MEANP
    c1 = tl.load(scal_ptr + 3 * GROUP + pid_b)
    eps = tl.load(scal_ptr + 6 * GROUP + pid_b)
    c2 = tl.load(scal_ptr + 7 * GROUP + pid_b)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, R, N, BLOCK_M, BLOCK_N)
    m = tl.load(m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                mask=mask, other=0.0).to(tl.float32)
    rv = tl.load(row_ptr + offs_m, mask=mask_m, other=1.0).to(tl.float32)
    cv = tl.load(col_ptr + offs_n, mask=mask_n, other=1.0).to(tl.float32)
    mean = tl.div_rn(sum_fp32(meanp_ptr, ROW_BLOCKS, MEAN_BLOCK), R.to(tl.float32))
    vhat = tl.div_rn(tl.div_rn(rv[:, None] * cv[None, :], mean), c2)
    nrm = tl.div_rn(tl.div_rn(m, c1), tl.sqrt_rn(vhat) + eps)
    tl.store(n_ptr + offs_m[:, None] * stride_nm + offs_n[None, :] * stride_nn,
             to_storage(nrm, n_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _g_col_stats_kernel(
    src_ptr, r_ptr, c_ptr, cs_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, M, N, RANK,
    stride_rr, stride_rn,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``_residual_col_stats_kernel`` (identity form, one partial row: ``g_col_sumsq``) of
    member ``program_id(1)``; c_os, col_scale and the column sums contiguous."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    r_ptr = member_ptr(r_ptr, offs_ptr, pid_b, ALIGNED)
    c_ptr = member_ptr(c_ptr, offs_ptr + 5 * GROUP, pid_b, ALIGNED)
    cs_ptr = member_ptr(cs_ptr, offs_ptr + 6 * GROUP, pid_b, ALIGNED)
    src_ptr = member_ptr(src_ptr, offs_ptr + 7 * GROUP, pid_b, ALIGNED)
    eps1 = tl.load(scal_ptr + 2 * GROUP + pid_b)
    beta2 = tl.load(scal_ptr + 4 * GROUP + pid_b)
    one_minus_beta2 = tl.load(scal_ptr + 5 * GROUP + pid_b)
    eps = tl.load(scal_ptr + 6 * GROUP + pid_b)
    c2 = tl.load(scal_ptr + 7 * GROUP + pid_b)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    s = tl.load(src_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
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
    c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    c_st = to_storage(c * beta2 + one_minus_beta2 * mean_sq, c_ptr.dtype.element_ty, INTERPRET)
    tl.store(c_ptr + offs_n, c_st, mask=mask_n)
    scale = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(c_st.to(tl.float32), c2)) + eps)
    tl.store(cs_ptr + offs_n, to_storage(scale, cs_ptr.dtype.element_ty, INTERPRET),
             mask=mask_n)


class GroupedAdamemMiddle:
    """The middle step of a fixed class (the step engine's): lists of left-form fp32 tensors
    ``Rs`` (r x n, the projections), ``Ms`` (r x n), ``rows`` (r), ``cols`` (n), ``Ns``
    (r x n, the output N1), ``c_os`` (n), ``col_scales`` (n, output) and ``sumsq`` (n, the K1
    side output ``colsum(G^2)``), each list one shape and set of strides (the vectors
    contiguous); ``m``: the rows of the canonical G. Checked and addressed once, here; a
    call takes the per-member scalars (and the step's ``skip`` flag) and launches four
    kernels."""

    def __init__(self, m, Rs, Ms, rows, cols, Ns, c_os, col_scales, sumsq, *,
                 stats_from_momentum: bool):
        lists = (Rs, Ms, rows, cols, Ns, c_os, col_scales, sumsq)
        count = len(Rs)
        if count == 0 or any(len(lst) != count for lst in lists):
            raise ValueError("every list needs one tensor per member (and at least one)")
        r, n = Rs[0].shape
        shapes = ((r, n), (r, n), (r,), (n,), (r, n), (n,), (n,), (n,))
        for name, lst, shape in zip(LISTS, lists, shapes):
            for i, t in enumerate(lst):
                if tuple(t.shape) != shape or t.dtype != torch.float32 or \
                        t.stride() != lst[0].stride() or t.device != Rs[0].device:
                    raise ValueError(f"{name}[{i}] must be fp32 of shape {shape} on "
                                     f"{Rs[0].device} with {name}[0]'s strides, got "
                                     f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
                if t.dim() == 1 and t.stride(0) != 1:
                    raise ValueError(f"{name}[{i}] must be contiguous")
        self.m, self.r, self.n, self.count = int(m), r, n, count
        self.device = Rs[0].device
        self.from_momentum = bool(stats_from_momentum)
        self.lists = lists
        self.tiles_m, self.tiles_n = cdiv(r, TILE_M), cdiv(n, TILE_N)
        self.row_blocks, self.col_blocks = cdiv(r, VEC_BLOCK), cdiv(n, VEC_BLOCK)
        self.colp = self.tiles_n * r
        self.meanp = self.colp + self.tiles_m * n
        self.per = self.meanp + self.row_blocks
        self.scratch = torch.empty(count * self.per, dtype=torch.float32, device=self.device)
        rows_ = [element_offsets(name, lst) for name, lst in zip(LISTS, lists)]
        self.offs, self.aligned = offsets_table(rows_, [4] * len(LISTS), self.device)
        from lowrank_fused._tables import StagedTable

        # the per-member scalars: one table at one address for the life of the class
        self.table = StagedTable(SCALARS, count, self.device)
        self.column = np.empty((SCALARS, 1))   # one number per row: one broadcast write

    def __call__(self, scalars, skip=None):
        """``scalars``: one ``(beta1, beta2, eps, eps1, c1, c2)`` per member; ``skip``: None
        or a 0-dim bool tensor on the class's device (never read on the host)."""
        if len(scalars) != self.count:
            raise ValueError(f"scalars has {len(scalars)} rows, the class {self.count} members")
        if skip is not None:
            from lowrank_fused.ops import _check_skip

            _check_skip(skip, self.device)
        if scalars.count(scalars[0]) == len(scalars):     # one set: each row one number
            b1, b2, eps, eps1, c1, c2 = (float(x) for x in scalars[0])
            self.column[:, 0] = (b1, 1.0 - b1, eps1, c1, b2, 1.0 - b2, eps, c2)
            table = self.column
        else:
            table = [[float(s[0]) for s in scalars], [1.0 - float(s[0]) for s in scalars],
                     [float(s[3]) for s in scalars], [float(s[4]) for s in scalars],
                     [float(s[1]) for s in scalars], [1.0 - float(s[1]) for s in scalars],
                     [float(s[2]) for s in scalars], [float(s[5]) for s in scalars]]
        Rs, Ms, rows, cols, Ns, c_os, css, sumsq = self.lists
        scal = self.table.fill(table)
        r, n, count = self.r, self.n, self.count
        if r == 0 or n == 0 or _capture.replaying():   # (a replayed graph makes the launches)
            return
        interpret = interpreting()
        flag = skip_flag(skip, self.device)
        R0, M0, N0 = Rs[0], Ms[0], Ns[0]
        launch_planned(
            self, _g_stats_kernel, (self.tiles_n, self.tiles_m, count),
            R0, M0, self.scratch, self.offs, scal, flag, count, self.per, self.colp, r, n,
            *R0.stride(), *M0.stride(),
            BLOCK_M=TILE_M, BLOCK_N=TILE_N, FROM_MOMENTUM=self.from_momentum,
            INTERPRET=interpret, ALIGNED=self.aligned, num_warps=TILE_WARPS,
        )
        launch_planned(
            self, _g_ema_kernel, (self.row_blocks + self.col_blocks, count),
            self.scratch, rows[0], cols[0], self.offs, scal, flag, count, self.per, self.colp,
            self.meanp, r, n, self.tiles_m, self.tiles_n, self.row_blocks,
            BLOCK=VEC_BLOCK, INTERPRET=interpret, ALIGNED=self.aligned, num_warps=VEC_WARPS,
        )
        launch_planned(
            self, _g_apply_kernel, (self.tiles_n, self.tiles_m, count),
            M0, N0, rows[0], cols[0], self.scratch, self.offs, scal, flag, count, self.per,
            self.meanp, r, n, self.row_blocks, *M0.stride(), *N0.stride(),
            BLOCK_M=TILE_M, BLOCK_N=TILE_N, MEAN_BLOCK=MEAN_BLOCK, INTERPRET=interpret,
            ALIGNED=self.aligned, num_warps=TILE_WARPS,
        )
        launch_planned(
            self, _g_col_stats_kernel, (cdiv(n, CS_BLOCK), count),
            sumsq[0], R0, c_os[0], css[0], self.offs, scal, flag, count, self.m, n, r,
            *R0.stride(),
            BLOCK_N=CS_BLOCK, BLOCK_R=VEC_R, INTERPRET=interpret, ALIGNED=self.aligned,
            num_warps=CS_WARPS,
        )


def aot_variants():
    """The four kernels, fp32 state (AdaMeM's), both statistics sources, both alignments."""
    from lowrank_fused.testing.aot import Variant

    ints = lambda *names: {a: "i32" for a in names}   # noqa: E731
    tile = dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=False)
    for aligned in (True, False):
        for from_momentum in (False, True):
            yield Variant(_g_stats_kernel,
                          {"r_ptr": "*fp32", "m_ptr": "*fp32", "scratch_ptr": "*fp32",
                           "offs_ptr": "*i64", "scal_ptr": "*fp32", "skip_ptr": "*i1",
                           **ints("GROUP", "SCRATCH", "COLP", "R", "N", "stride_rm",
                                  "stride_rn", "stride_mm", "stride_mn")},
                          dict(tile, FROM_MOMENTUM=from_momentum, ALIGNED=aligned),
                          TILE_WARPS, 3)
        yield Variant(_g_ema_kernel,
                      {"scratch_ptr": "*fp32", "row_ptr": "*fp32", "col_ptr": "*fp32",
                       "offs_ptr": "*i64", "scal_ptr": "*fp32", "skip_ptr": "*i1",
                       **ints("GROUP", "SCRATCH", "COLP", "MEANP", "R", "N", "TILES_M",
                              "TILES_N", "ROW_BLOCKS")},
                      dict(BLOCK=VEC_BLOCK, INTERPRET=False, ALIGNED=aligned), VEC_WARPS, 3)
        yield Variant(_g_apply_kernel,
                      {"m_ptr": "*fp32", "n_ptr": "*fp32", "row_ptr": "*fp32",
                       "col_ptr": "*fp32", "scratch_ptr": "*fp32", "offs_ptr": "*i64",
                       "scal_ptr": "*fp32", "skip_ptr": "*i1",
                       **ints("GROUP", "SCRATCH", "MEANP", "R", "N", "ROW_BLOCKS", "stride_mm",
                              "stride_mn", "stride_nm", "stride_nn")},
                      dict(tile, MEAN_BLOCK=MEAN_BLOCK, ALIGNED=aligned), TILE_WARPS, 3)
        yield Variant(_g_col_stats_kernel,
                      {"src_ptr": "*fp32", "r_ptr": "*fp32", "c_ptr": "*fp32",
                       "cs_ptr": "*fp32", "offs_ptr": "*i64", "scal_ptr": "*fp32",
                       "skip_ptr": "*i1",
                       **ints("GROUP", "M", "N", "RANK", "stride_rr", "stride_rn")},
                      dict(BLOCK_N=CS_BLOCK, BLOCK_R=VEC_R, INTERPRET=False, ALIGNED=aligned),
                      CS_WARPS, 3)
