"""AdaPM / AdaPM-mini steady step for a whole class of same-shape matrices
(docs/methods/adapm.md, update lines 3-7 between refits; AdaPM-mini's block means): what
``adapm_update`` (low-rank blocks) and ``adapm_dense_update`` (full- and no-momentum blocks) do
per matrix, for every member of a class in a few launches instead of a few per member.

The kernels are the single-matrix ones (``kernels/adapm_update.py``,
``kernels/adapm_dense_update.py``) with a member axis added to the grid: the same tiles, the
same configs, the same fp32 arithmetic and the same epilogue helpers, so every member's bits
equal the single launchers'. The members are separate tensors addressed as offsets from the
first (``kernels/_grouped.py``); the per-member scalars (each group's hyperparameters and each
member's bias corrections) come from one fp32 table (``SCALARS`` rows x count, rows named by
``ROWS``). Only the elementwise clip (and ``clip_mode="none"``, a clamp at infinity) is
grouped; the RMS clip needs a per-member reduction between two passes and stays per matrix.

Launches per class and step:

==============================  ===============================================================
low-rank (between refits)       right operand (``R = beta1*R + (1-beta1)*Rg``, the folded
                                ``B``) + the fused GEMM and epilogue (the projection ``Rg`` is
                                the class's grouped K1, ``kernels/grouped_project.py``)
full / no momentum              one elementwise launch
Adam-mini block-mean V          + two launches first: per-row sums of ``g^2``, then the block
                                means, ``V`` and the denominator ``h`` per block
==============================  ===============================================================

The block means are this module's for the single-matrix launchers too
(``adapm_update.block_means_denominator`` runs them on a group of one), so a class and a matrix
alone compute them the same way: the row sums over column tiles in a fixed order, then each
block's sum over its rows, all in fp32 on the device.

``skip`` (a 0-dim bool on the device): every kernel loads it and masks the stores to state and
weights with it (no early return, so register allocation is that of the unskipped kernel), so
a skipped step leaves R, V, M and W bit-identical; only the scratch (B, row sums, h) may be
written. The host never reads it.
"""
import math

import torch
import triton
import triton.language as tl

from lowrank_fused import _capture
from lowrank_fused._tables import StagedTable

from ._common import (DOT_IEEE, cdiv, config_mode, dot_mode, interpreting, load_tile, mma,
                      skip_flag, to_storage)
from ._grouped import check_layout, element_offsets, member_ptr, offsets_table, scalar_table
from ._launch import launch_planned
from .adapm_update import (B_BLOCK_M, B_BLOCK_N, B_WARPS, DTYPE_PAIRS, choose_config,
                           clip_and_apply, configs_for, dummy, elementwise_tiles, normalize)
from .adapm_dense_update import BLOCK_M as DENSE_BLOCK_M, BLOCK_N as DENSE_BLOCK_N, \
    NUM_WARPS as DENSE_WARPS

MAX_GRID = 65535   # CUDA's limit on the grid dimensions that carry the members


def gemm_stages(cfg, mode: int, blocks: bool) -> int:
    """Pipeline stages of the grouped GEMM: the single kernel's, but 2 for block-mean V in
    ieee (FMA) mode, where the member pointers push Triton 3.9's sm_90 build into spills at 3
    (128 registers and 12 bytes; 148 and none at 2). The stages only schedule the loads: the
    arithmetic, and so every bit, is the single kernel's."""
    return 2 if blocks and mode == DOT_IEEE else cfg.num_stages

# the scalar table's rows (one float per member each); the kernels index them by number
ROWS = ("beta1", "c1", "s_coef", "e_coef", "coef_g", "v_keep", "v_add", "eps", "c2",
        "sqrt_c2", "lr", "pre_scale", "clip")
SCALARS = len(ROWS)

ROWSQ_BLOCK_M, ROWSQ_BLOCK_N, ROWSQ_WARPS = 16, 256, 4
BLOCKV_WARPS = 4


# --------------------------------------------------------------------------------------------
# Adam-mini block means

@triton.jit
def _g_row_sumsq_kernel(g_ptr, out_ptr, goffs_ptr, M, N, stride_gm, stride_gn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """``out[b, i] = sum_j G_b[i, j]^2`` for this program's rows of member ``program_id(1)``
    (column tiles accumulated in order, then one sum across the tile)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    g_ptr = member_ptr(g_ptr, goffs_ptr, pid_b, ALIGNED)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, N, BLOCK_N):
        offs_n = k + tl.arange(0, BLOCK_N)
        g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn,
                      mask_m[:, None] & (offs_n < N)[None, :])
        acc += g * g
    tl.store(out_ptr + pid_b.to(tl.int64) * M + offs_m, tl.sum(acc, axis=1), mask=mask_m)


@triton.jit
def _g_block_v_kernel(rowsq_ptr, v_ptr, h_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, M, NB, RPB,
                      denom, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                      INTERPRET: tl.constexpr, ALIGNED: tl.constexpr):
    """Blocks ``[pid*BLOCK_B, ...)`` of member ``program_id(1)``: ``sq = sum of the block's
    RPB row sums / denom``, ``V = v_keep*V + v_add*sq`` (stored unless skipped) and the
    denominator ``h = sqrt(V)/sqrt(c2) + eps`` from the stored V (fp32, scratch)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    v_ptr = member_ptr(v_ptr, offs_ptr, pid_b, ALIGNED)
    v_keep = tl.load(scal_ptr + 5 * GROUP + pid_b)
    v_add = tl.load(scal_ptr + 6 * GROUP + pid_b)
    eps = tl.load(scal_ptr + 7 * GROUP + pid_b)
    sqrt_c2 = tl.load(scal_ptr + 9 * GROUP + pid_b)
    offs_blk = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_blk < NB
    offs_r = tl.arange(0, BLOCK_R)
    base = rowsq_ptr + pid_b.to(tl.int64) * M
    acc = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
    for k in range(0, RPB, BLOCK_R):
        r = k + offs_r
        acc += tl.load(base + offs_blk[:, None] * RPB + r[None, :],
                       mask=mask_b[:, None] & (r < RPB)[None, :], other=0.0)
    sq = tl.div_rn(tl.sum(acc, axis=1), denom)
    v = tl.load(v_ptr + offs_blk, mask=mask_b, other=0.0).to(tl.float32)
    v_st = to_storage(v * v_keep + v_add * sq, v_ptr.dtype.element_ty, INTERPRET)
    tl.store(v_ptr + offs_blk, v_st, mask=tl.where(tl.load(skip_ptr), False, mask_b))
    h = tl.div_rn(tl.sqrt_rn(v_st.to(tl.float32)), sqrt_c2) + eps
    tl.store(h_ptr + pid_b.to(tl.int64) * NB + offs_blk, h, mask=mask_b)


def _block_v_tiles(rpb: int):
    """(BLOCK_B, BLOCK_R) of the block-mean launch: a power of two of rows per step (at most
    64) and enough blocks per program for about 1024 elements."""
    block_r = min(64, triton.next_power_of_2(max(1, rpb)))
    return max(1, 1024 // block_r), block_r


class BlockMeans:
    """Adam-mini's block means of a fixed group: ``Gs`` (m x n, one layout; their addresses may
    change between calls), ``Vs`` (nb, contiguous, one dtype). A call updates every V in place
    (unless ``skip``) and returns the (count, nb) fp32 denominators ``h``, two launches."""

    def __init__(self, Gs, Vs):
        check_layout("Vs", Vs)
        if Vs[0].dim() != 1 or Vs[0].stride(0) != 1:
            raise ValueError("Vs must be contiguous vectors of block means")
        self.count = len(Vs)
        if self.count > MAX_GRID:
            raise ValueError(f"a group of {self.count} matrices exceeds the grid limit "
                             f"{MAX_GRID}: split the group")
        self.m, self.n = Gs[0].shape
        self.nb = Vs[0].numel()
        if self.nb == 0 or self.m % self.nb:
            raise ValueError(f"{self.nb} blocks do not divide the {self.m} rows")
        self.rpb = self.m // self.nb
        self.device = Vs[0].device
        self.Vs = Vs
        self.voffs, self.valigned = offsets_table([element_offsets("Vs", Vs)],
                                                  [Vs[0].element_size()], self.device)
        self.rowsq = torch.empty(self.count * self.m, dtype=torch.float32, device=self.device)
        self.h = torch.empty((self.count, self.nb), dtype=torch.float32, device=self.device)

    def __call__(self, Gs, goffs, galigned, scal, skip):
        bm, bn = elementwise_tiles(ROWSQ_BLOCK_M, ROWSQ_BLOCK_N)
        G0 = Gs[0]
        launch_planned(
            self, _g_row_sumsq_kernel, (cdiv(self.m, bm), self.count),
            G0, self.rowsq, goffs, self.m, self.n, G0.stride(0), G0.stride(1),
            BLOCK_M=bm, BLOCK_N=bn, ALIGNED=galigned, num_warps=ROWSQ_WARPS)
        bb, br = _block_v_tiles(self.rpb)
        launch_planned(
            self, _g_block_v_kernel, (cdiv(self.nb, bb), self.count),
            self.rowsq, self.Vs[0], self.h, self.voffs, scal, skip, self.count, self.m,
            self.nb, self.rpb, float(self.rpb * self.n),
            BLOCK_B=bb, BLOCK_R=br, INTERPRET=interpreting(), ALIGNED=self.valigned,
            num_warps=BLOCKV_WARPS)
        return self.h


def block_means(G, V, *, v_keep: float, v_add: float, eps: float, c2: float) -> torch.Tensor:
    """One matrix's block means (``adapm_update.block_means_denominator``): V in place, the fp32
    denominators returned (nb)."""
    rows = [[0.0]] * SCALARS
    for name, value in (("v_keep", v_keep), ("v_add", v_add), ("eps", eps),
                        ("sqrt_c2", math.sqrt(c2))):
        rows[ROWS.index(name)] = [float(value)]
    scal = scalar_table(rows, V.device)
    goffs, galigned = offsets_table([[0]], [G.element_size()], G.device)
    return BlockMeans([G], [V])([G], goffs, galigned, scal, skip_flag(None, V.device))[0]


# --------------------------------------------------------------------------------------------
# low-rank blocks: the right operand and the fused GEMM + second moment + clip + update

@triton.jit
def _g_right_operand_kernel(x_ptr, y_ptr, b_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, RANK, N,
                            stride_xr, stride_xn, stride_yr, stride_yn,
                            INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``adapm_update``'s right operand between refits for member ``program_id(2)``:
    ``X = beta1*X + (1-beta1)*Y`` in place (R, unless skipped) and ``b = s*X - coef_g*Y``
    from the stored X (b r x n fp32, contiguous)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2)
    x_ptr = member_ptr(x_ptr, offs_ptr, pid_b, ALIGNED)
    y_ptr = member_ptr(y_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    b_ptr = member_ptr(b_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    beta1 = tl.load(scal_ptr + pid_b)
    coef_x = tl.load(scal_ptr + 2 * GROUP + pid_b)
    coef_y = -tl.load(scal_ptr + 4 * GROUP + pid_b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < RANK)[:, None] & (offs_n < N)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xr + offs_n[None, :] * stride_xn
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs_m[:, None] * stride_yr + offs_n[None, :] * stride_yn,
                mask=mask, other=0.0).to(tl.float32)
    x_st = to_storage(x * beta1 + (1.0 - beta1) * y, x_ptr.dtype.element_ty, INTERPRET)
    tl.store(x_ptrs, x_st, mask=tl.where(tl.load(skip_ptr), False, mask))
    b = coef_x * x_st.to(tl.float32) + coef_y * y
    tl.store(b_ptr + offs_m[:, None] * N + offs_n[None, :], b, mask=mask)


@triton.jit
def _g_adapm_update_kernel(
    w_ptr, g_ptr, l_ptr, b_ptr, v_ptr, offs_ptr, goffs_ptr, scal_ptr, skip_ptr,
    GROUP, M, N, RANK, ROWS_PER_BLOCK,
    stride_wm, stride_wn, stride_gm, stride_gn, stride_lm, stride_lr, stride_vm, stride_vn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, V_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr, G_ALIGNED: tl.constexpr,
):
    """``_adapm_update_kernel`` between refits (one K loop, ``L @ B``), clamp pass, for member
    ``program_id(2)``; V_BLOCKS: ``v_ptr`` is the member's row of the block denominators."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2)
    w_ptr = member_ptr(w_ptr, offs_ptr, pid_b, ALIGNED)
    l_ptr = member_ptr(l_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    b_ptr = member_ptr(b_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    v_ptr = member_ptr(v_ptr, offs_ptr + 3 * GROUP, pid_b, ALIGNED)
    g_ptr = member_ptr(g_ptr, goffs_ptr, pid_b, G_ALIGNED)
    coef_g = tl.load(scal_ptr + 4 * GROUP + pid_b)
    v_keep = tl.load(scal_ptr + 5 * GROUP + pid_b)
    v_add = tl.load(scal_ptr + 6 * GROUP + pid_b)
    eps = tl.load(scal_ptr + 7 * GROUP + pid_b)
    c2 = tl.load(scal_ptr + 8 * GROUP + pid_b)
    lr = tl.load(scal_ptr + 10 * GROUP + pid_b)
    pre_scale = tl.load(scal_ptr + 11 * GROUP + pid_b)
    clip_threshold = tl.load(scal_ptr + 12 * GROUP + pid_b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    l_ptrs = l_ptr + offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lr
    b_ptrs = b_ptr + offs_k[:, None] * N + offs_n[None, :]
    for k in range(0, RANK, BLOCK_K):
        mask_k = (k + offs_k) < RANK
        a = tl.load(l_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_MODE)
        l_ptrs += BLOCK_K * stride_lr
        b_ptrs += BLOCK_K * N
    mask = mask_m[:, None] & mask_n[None, :]
    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask,
                other=0.0).to(tl.float32)
    mc = acc + coef_g * g
    # a skipped step stores neither V nor W (the masks of their stores)
    keep = tl.where(tl.load(skip_ptr), False, mask)
    u = normalize(mc, g, v_ptr, offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, keep,
                  v_ptr, offs_m, mask_m, ROWS_PER_BLOCK, v_keep, v_add, eps, c2,
                  V_BLOCKS, True, INTERPRET)
    clip_and_apply(u, keep, w_ptr, offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                   scal_ptr, scal_ptr, lr, pre_scale, clip_threshold, 0, INTERPRET)  # CLAMP


@triton.jit
def _g_adapm_dense_update_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, offs_ptr, goffs_ptr, scal_ptr, skip_ptr,
    GROUP, M, N, ROWS_PER_BLOCK,
    stride_wm, stride_wn, stride_gm, stride_gn, stride_mm, stride_mn, stride_vm, stride_vn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_M: tl.constexpr,
    V_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
    G_ALIGNED: tl.constexpr,
):
    """``_adapm_dense_update_kernel`` (clamp pass) for member ``program_id(2)``; V_BLOCKS:
    ``v_ptr`` is the member's row of the block denominators."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2)
    w_ptr = member_ptr(w_ptr, offs_ptr, pid_b, ALIGNED)
    m_ptr = member_ptr(m_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    v_ptr = member_ptr(v_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    g_ptr = member_ptr(g_ptr, goffs_ptr, pid_b, G_ALIGNED)
    beta1 = tl.load(scal_ptr + pid_b)
    c1 = tl.load(scal_ptr + GROUP + pid_b)
    v_keep = tl.load(scal_ptr + 5 * GROUP + pid_b)
    v_add = tl.load(scal_ptr + 6 * GROUP + pid_b)
    eps = tl.load(scal_ptr + 7 * GROUP + pid_b)
    c2 = tl.load(scal_ptr + 8 * GROUP + pid_b)
    lr = tl.load(scal_ptr + 10 * GROUP + pid_b)
    pre_scale = tl.load(scal_ptr + 11 * GROUP + pid_b)
    clip_threshold = tl.load(scal_ptr + 12 * GROUP + pid_b)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask = mask_m[:, None] & (offs_n < N)[None, :]
    keep = tl.where(tl.load(skip_ptr), False, mask)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    if HAS_M:
        m_ptrs = m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        mom = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        mom = mom * beta1 + (1.0 - beta1) * g
        mom_st = to_storage(mom, m_ptr.dtype.element_ty, INTERPRET)
        tl.store(m_ptrs, mom_st, mask=keep)
        mc = tl.div_rn(mom_st.to(tl.float32), c1)
    else:
        mc = g
    u = normalize(mc, g, v_ptr, offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, keep,
                  v_ptr, offs_m, mask_m, ROWS_PER_BLOCK, v_keep, v_add, eps, c2,
                  V_BLOCKS, True, INTERPRET)
    clip_and_apply(u, keep, w_ptr, offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                   scal_ptr, scal_ptr, lr, pre_scale, clip_threshold, 0, INTERPRET)  # CLAMP


# --------------------------------------------------------------------------------------------
# a class's launches, addressed once

class ScalarTable(StagedTable):
    """The (SCALARS x count) fp32 table of a class (``lowrank_fused._tables.StagedTable``):
    kept at one address and refilled every step (on CUDA from a pinned staging buffer,
    copied without blocking the host, inside the graph when the step is captured; on a
    replay only the staging buffer is written). ``rows``: SCALARS entries, each a float
    (every member) or a sequence of ``count`` floats."""

    def __init__(self, count, device):
        super().__init__(SCALARS, count, device)
        self.count = count

    def fill(self, rows) -> torch.Tensor:
        if len(rows) != SCALARS:
            raise ValueError(f"rows must have {SCALARS} entries ({ROWS}), got {len(rows)}")
        return super().fill(list(rows))   # (a number is written along its row)


class GroupedAdapmStep:
    """The Triton launches of one class's steady step, the fixed lists checked and addressed
    once (``lowrank_fused.ops_adapm_grouped`` validates them first). Left-form lists: ``Ws``
    (m x n), ``Vs`` (m x n, or nb block means), for low-rank blocks ``Ls`` (m x r), ``Rs``
    (r x n), ``Rgs`` (r x n fp32, the projections) and ``Bs`` (r x n fp32, contiguous scratch),
    for full-momentum blocks ``Ms`` (m x n). A call takes the step's gradients (their
    addresses may change), the scalar table rows, the precision and the skip flag."""

    def __init__(self, Ws, Vs, *, Ls=None, Rs=None, Rgs=None, Bs=None, Ms=None, Gs=None):
        self.count = len(Ws)
        if self.count > MAX_GRID:
            raise ValueError(f"a group of {self.count} matrices exceeds the grid limit "
                             f"{MAX_GRID}: split the group")
        self.lowrank = Ls is not None
        self.device = Ws[0].device
        self.m, self.n = Ws[0].shape
        self.blocks = Vs[0].shape != Ws[0].shape
        self.means = BlockMeans(Gs if Gs is not None else Ws, Vs) if self.blocks else None
        if self.blocks:
            h = self.means.h
            vlist = [h[b] for b in range(self.count)]
            self.rpb = self.m // Vs[0].numel()
        else:
            vlist, self.rpb = Vs, 1
        self.vlist = vlist
        fp32 = dummy(self.device)
        if self.lowrank:
            lists = (("Ws", Ws), ("Ls", Ls), ("Bs", Bs), ("Vs", vlist))
            for name, lst in lists:
                check_layout(name, lst)
            self.right = [element_offsets(n_, lst) for n_, lst in
                          (("Rs", Rs), ("Rgs", Rgs), ("Bs", Bs))]
            self.roffs, self.raligned = offsets_table(
                self.right, [Rs[0].element_size(), 4, 4], self.device)
            self.Rs, self.Rgs, self.Bs, self.Ls = Rs, Rgs, Bs, Ls
            self.rank = Ls[0].shape[1]
        else:
            self.Ms = Ms
            mlist = Ms if Ms is not None else [fp32] * self.count
            lists = (("Ws", Ws), ("Ms", mlist), ("Vs", vlist))
            for name, lst in lists:
                if name != "Ms" or Ms is not None:
                    check_layout(name, lst)
        rows = [element_offsets(name, lst) if not (name == "Ms" and Ms is None)
                else [0] * self.count for name, lst in lists]
        self.offs, self.aligned = offsets_table(rows, [lst[0].element_size()
                                                       for _, lst in lists], self.device)
        self.lists = dict(lists)
        self.Ws, self.Vs = Ws, Vs
        V0, W0 = vlist[0], Ws[0]
        self.wstrides = (W0.stride(0), W0.stride(1))
        if self.lowrank:
            R0, Y0, L0 = Rs[0], Rgs[0], Ls[0]
            self.rstrides = (R0.stride(0), R0.stride(1), Y0.stride(0), Y0.stride(1))
            self.lvstrides = (L0.stride(0), L0.stride(1), V0.stride(0), V0.stride(-1))
        else:
            M0 = self.lists["Ms"][0]
            self.lvstrides = (M0.stride(0), M0.stride(-1), V0.stride(0), V0.stride(-1))
        self._settings = {}
        self.scalars = ScalarTable(self.count, self.device)
        self._gptrs, self._goffs = None, None

    def _launches(self, precision):
        """The per-precision launch settings (resolved at the first call with ``precision``)."""
        device, m, n, count = self.device, self.m, self.n, self.count
        interp = interpreting()
        out = {}
        if self.lowrank:
            rank = self.rank
            bm, bn = elementwise_tiles(B_BLOCK_M, B_BLOCK_N)
            out["right"] = ((cdiv(rank, bm), cdiv(n, bn), count), dict(
                INTERPRET=interp, ALIGNED=self.raligned, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=B_WARPS)) if rank * n else None
            cmode = config_mode(precision, device)
            cfg = choose_config(m, n, rank, cmode)
            out["update"] = ((cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N), count), dict(
                BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                DOT_MODE=dot_mode(precision, device), V_BLOCKS=self.blocks, INTERPRET=interp,
                ALIGNED=self.aligned, num_warps=cfg.num_warps,
                num_stages=gemm_stages(cfg, cmode, self.blocks)))
        else:
            bm, bn = elementwise_tiles(DENSE_BLOCK_M, DENSE_BLOCK_N)
            out["update"] = ((cdiv(m, bm), cdiv(n, bn), count), dict(
                BLOCK_M=bm, BLOCK_N=bn, HAS_M=self.Ms is not None, V_BLOCKS=self.blocks,
                INTERPRET=interp, ALIGNED=self.aligned, num_warps=DENSE_WARPS))
        self._settings[precision] = out
        return out

    def __call__(self, Gs, rows, *, precision="ieee", skip=None):
        device = self.device
        if skip is None:
            skip = skip_flag(None, device)
        scal = self.scalars.fill(rows)
        if _capture.replaying():          # a replayed CUDA graph makes the launches (the
            return                        # gradients sit where they did: the capture key)
        G0 = Gs[0]
        ptrs = list(map(torch.Tensor.data_ptr, Gs))
        if ptrs != self._gptrs:           # the gradients moved: their offsets again
            self._goffs = offsets_table([element_offsets("Gs", Gs)], [G0.element_size()],
                                        device)
            self._gptrs = ptrs
        goffs, galigned = self._goffs
        launch = self._settings.get(precision) or self._launches(precision)
        m, n, count = self.m, self.n, self.count
        if self.blocks:
            self.means(Gs, goffs, galigned, scal, skip)
        V0, W0 = self.vlist[0], self.Ws[0]
        grid, kw = launch["update"]
        if self.lowrank:
            R0, Y0, B0, L0 = self.Rs[0], self.Rgs[0], self.Bs[0], self.Ls[0]
            if launch["right"] is not None:
                rgrid, rkw = launch["right"]
                launch_planned(
                    self, _g_right_operand_kernel, rgrid,
                    R0, Y0, B0, self.roffs, scal, skip, count, self.rank, n, *self.rstrides,
                    **rkw)
            launch_planned(
                self, _g_adapm_update_kernel, grid,
                W0, G0, L0, B0, V0, self.offs, goffs, scal, skip, count, m, n, self.rank,
                self.rpb, *self.wstrides, G0.stride(0), G0.stride(1), *self.lvstrides,
                G_ALIGNED=galigned, **kw)
        else:
            M0 = self.lists["Ms"][0]
            launch_planned(
                self, _g_adapm_dense_update_kernel, grid,
                W0, G0, M0, V0, self.offs, goffs, scal, skip, count, m, n, self.rpb,
                *self.wstrides, G0.stride(0), G0.stride(1), *self.lvstrides,
                G_ALIGNED=galigned, **kw)


# --------------------------------------------------------------------------------------------

def aot_variants():
    """Every compilation a class's step can launch on a GPU: (W/G, state) dtypes x (elementwise
    V, block-mean V) x precision x config for the GEMM; x (full / no momentum) for the dense
    kernel; the right operand per state dtype; the block-mean kernels per dtype."""
    from lowrank_fused.testing.aot import Variant

    scal = {"offs_ptr": "*i64", "goffs_ptr": "*i64", "scal_ptr": "*fp32", "skip_ptr": "*i1"}
    for w_t, s_t in DTYPE_PAIRS:
        for blocks in (False, True):
            v_t = "fp32" if blocks else s_t
            for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
                for cfg in configs_for(mode):
                    ints = {a: "i32" for a in (
                        "GROUP", "M", "N", "RANK", "ROWS_PER_BLOCK", "stride_wm", "stride_wn",
                        "stride_gm", "stride_gn", "stride_lm", "stride_lr", "stride_vm",
                        "stride_vn")}
                    yield Variant(_g_adapm_update_kernel,
                                  {"w_ptr": "*" + w_t, "g_ptr": "*" + w_t, "l_ptr": "*" + s_t,
                                   "b_ptr": "*fp32", "v_ptr": "*" + v_t, **scal, **ints},
                                  dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                       BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, V_BLOCKS=blocks,
                                       INTERPRET=False, ALIGNED=True, G_ALIGNED=True),
                                  cfg.num_warps, gemm_stages(cfg, mode, blocks))
            for has_m in (True, False):
                m_t = s_t if has_m else "fp32"
                ints = {a: "i32" for a in (
                    "GROUP", "M", "N", "ROWS_PER_BLOCK", "stride_wm", "stride_wn", "stride_gm",
                    "stride_gn", "stride_mm", "stride_mn", "stride_vm", "stride_vn")}
                yield Variant(_g_adapm_dense_update_kernel,
                              {"w_ptr": "*" + w_t, "g_ptr": "*" + w_t, "m_ptr": "*" + m_t,
                               "v_ptr": "*" + v_t, **scal, **ints},
                              dict(BLOCK_M=DENSE_BLOCK_M, BLOCK_N=DENSE_BLOCK_N, HAS_M=has_m,
                                   V_BLOCKS=blocks, INTERPRET=False, ALIGNED=True,
                                   G_ALIGNED=True),
                              DENSE_WARPS, 3)
    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_g_right_operand_kernel,
                      {"x_ptr": "*" + s_t, "y_ptr": "*fp32", "b_ptr": "*fp32", "offs_ptr": "*i64",
                       "scal_ptr": "*fp32", "skip_ptr": "*i1", "GROUP": "i32", "RANK": "i32",
                       "N": "i32", "stride_xr": "i32", "stride_xn": "i32", "stride_yr": "i32",
                       "stride_yn": "i32"},
                      dict(INTERPRET=False, ALIGNED=True, BLOCK_M=B_BLOCK_M, BLOCK_N=B_BLOCK_N),
                      B_WARPS, 3)
        yield Variant(_g_row_sumsq_kernel,
                      {"g_ptr": "*" + s_t, "out_ptr": "*fp32", "goffs_ptr": "*i64", "M": "i32",
                       "N": "i32", "stride_gm": "i32", "stride_gn": "i32"},
                      dict(BLOCK_M=ROWSQ_BLOCK_M, BLOCK_N=ROWSQ_BLOCK_N, ALIGNED=True),
                      ROWSQ_WARPS, 3)
        for rpb in (1, 64):
            bb, br = _block_v_tiles(rpb)
            yield Variant(_g_block_v_kernel,
                          {"rowsq_ptr": "*fp32", "v_ptr": "*" + s_t, "h_ptr": "*fp32",
                           "offs_ptr": "*i64", "scal_ptr": "*fp32", "skip_ptr": "*i1",
                           "GROUP": "i32", "M": "i32", "NB": "i32", "RPB": "i32",
                           "denom": "fp32"},
                          dict(BLOCK_B=bb, BLOCK_R=br, INTERPRET=False, ALIGNED=True),
                          BLOCKV_WARPS, 3)
