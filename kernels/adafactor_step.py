"""Adafactor step, HF version (docs/methods/adafactor.md; K6 in docs/bytes.md), fused, for one
tensor or a whole group of same-layout tensors in one set of launches.

``GroupedAdafactorStep`` runs the step of a group (the optimizer's step engine binds one per
class of same-shape parameters); the single-tensor op ``adafactor_step`` is a group of one, so
a member's bits are the same in either. Members are separate tensors addressed as element
offsets from the first (``kernels/_grouped.py``); a grid axis runs over members (times the
batch B of a >2-D parameter).

Factored form, W and G (B, m, n) in their storage dtypes (any strides), five launches:

  1. ``_af_stats_kernel``: per (m-tile, n-tile), the row and column sums of
     ``q = g^2 + eps1`` into per-member partial-sum buffers ``(n/BLOCK_N, B, m)`` and
     ``(m/BLOCK_M, B, n)`` (deterministic: no atomics);
  2. ``_af_ema_kernel``: the partials added in tile order, the row and column EMAs written to
     the state, the new row (and its block sums) and ``cf = 1/sqrt(col)`` to the scratch;
  3. ``_af_sumsq_kernel``: per tile, ``sum(U^2)`` with ``U = rf*cf*g``,
     ``rf = 1/sqrt(row/mean(row))``, and with ``scale_parameter`` ``sum(W^2)`` (W before this
     step);
  4. ``_af_scalars_kernel``: per member, ``clip = max(1, RMS(U)/d)``,
     ``a = rho*max(eps2, RMS(W))`` (or rho) and ``-weight_decay*a`` into the scratch: nothing
     is read back to the host;
  5. ``_af_apply_kernel``: ``U = a*(rf*cf*g)/clip``; momentum ``exp_avg``; weight decay;
     ``W -= U``, W stored in its own dtype.

Bytes per element (bf16 G and W): 3 reads of G (6) + W read and write (4) = 10; plus a read of
W for RMS(W) with ``scale_parameter`` (12); plus 8 with momentum (fp32 ``exp_avg`` read and
write). No m x n temporary: the scratch holds the partial sums (about
``B*(m*n/BLOCK_N + m*n/BLOCK_M)`` floats per member), the new row, the column factors and the
scalars.

Unfactored form (contiguous W, G, V of one shape), three launches: ``_af_vec_stats_kernel``
updates V and writes per-block partials of ``sum(U^2)`` (and ``sum(W^2)``), the scalars
kernel, and ``_af_vec_apply_kernel`` recomputes ``U = rsqrt(V)*g`` from the stored V and
applies. Bytes per element: G read twice (4), fp32 V read, written, read again (12), W read
for RMS(W) and read/written (6): 22 with ``scale_parameter`` (20 without), plus 8 with
momentum.

``skip`` (a 0-dim bool tensor on the device, ``lowrank_fused.ops``): the kernels that write
state or weights (the EMA, the unfactored stats and both apply passes) return before any
store when it holds True; the host never reads it.

Statistics (row, col, V) and exp_avg must be fp32 (as the optimizers keep them); the launcher
raises ``TypeError`` otherwise. All math fp32; every division and square root is IEEE-rounded
(``div_rn``, ``sqrt_rn``), so the GPU result agrees with the eager reference to fp32 rounding.

``_adafactor_stats_kernel`` and ``row_col_sums`` (pass 1 of a single matrix, partials summed
by torch) serve AdaMeM's bias-corrected Adafactor (``kernels/adafactor_bc_step.py``).
"""
import math

import torch
import triton
import triton.language as tl

from lowrank_fused import _capture
from ._common import (cdiv, interpreting, load_tile, skip_flag, sum_fp32, tile_offsets,
                      to_storage)
from ._grouped import (ALIGN_BYTES, KeptTables, element_offsets, member_ptr, offsets_table,
                       scalar_table)
from ._launch import launch_planned

# factored tiles: one configuration for every shape (BLOCK_N spans the contiguous dimension)
TILE_M, TILE_N, TILE_WARPS = 32, 128, 8


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(matrix, m-tile, n-tile) of a flat program id; n-tiles of one row slab are adjacent."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_n = pid % tiles_n
    rest = pid // tiles_n
    return rest // tiles_m, rest % tiles_m, pid_n


@triton.jit
def _adafactor_stats_kernel(
    g_ptr, rowp_ptr, colp_ptr, B, M, N, stride_gb, stride_gm, stride_gn, eps1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1: row and column partial sums of ``g^2 + eps1`` of one tile.
    ``rowp[pid_n, b, i]`` and ``colp[pid_m, b, j]`` (contiguous fp32)."""
    pid = tl.program_id(0).to(tl.int64)
    b, pid_m, pid_n = _tile(pid, M, N, BLOCK_M, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr + b * stride_gb, offs_m, offs_n, stride_gm, stride_gn, mask)
    q = tl.where(mask, g * g + eps1, 0.0)
    tl.store(rowp_ptr + (pid_n * B + b) * M + offs_m, tl.sum(q, axis=1), mask=mask_m)
    tl.store(colp_ptr + (pid_m * B + b) * N + offs_n, tl.sum(q, axis=0), mask=mask_n)


def row_col_sums(G: torch.Tensor, eps1: float):
    """Row and column sums of ``g^2 + eps1`` of a (B, m, n) G (any strides, storage dtype):
    ``(rowsum (B, m), colsum (B, n))`` fp32, from pass 1's partials added in a fixed order."""
    B, M, N = G.shape
    tiles_m, tiles_n = cdiv(M, TILE_M), cdiv(N, TILE_N)
    f32 = dict(dtype=torch.float32, device=G.device)
    rowp = torch.empty((tiles_n, B, M), **f32)
    colp = torch.empty((tiles_m, B, N), **f32)
    _adafactor_stats_kernel[(B * tiles_m * tiles_n,)](
        G, rowp, colp, B, M, N, G.stride(0), G.stride(1), G.stride(2), float(eps1),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, num_warps=TILE_WARPS,
    )
    return (rowp[0] if tiles_n == 1 else rowp.sum(dim=0),
            colp[0] if tiles_m == 1 else colp.sum(dim=0))


# ---------------------------------------------------------------------------------------------
# The step itself, for a group of same-layout tensors in one set of launches (a group of one is
# the single-tensor op). Members are separate tensors addressed as element offsets from the
# first (kernels/_grouped.py); each member's scalars come from a small fp32 table of scalar
# sets (``NS`` values each) and a per-member index into it (the last row of the offsets table),
# so a class whose members share their group and step counter sends 9 floats per step.

NS = 9            # rho, beta2t, 1 - beta2t, eps1, eps2, clip_threshold, beta1, 1 - beta1, wd
VEC_BLOCK, VEC_WARPS = 1024, 4      # the row / column EMA and the unfactored passes
MEAN_BLOCK = 16                     # sum of the per-block partial sums of the new row
SUM_BLOCK = 1024                    # the per-member sums of the per-tile partials
# the int64 table's rows: member offsets of W, G, exp_avg, row (or V), col; the scalar set


@triton.jit
def _member_slot(pid_s, B):
    """(member, matrix within the member) of a grid slot over members x batch."""
    return pid_s // B, (pid_s % B).to(tl.int64)


@triton.jit
def _scalar(scal_ptr, offs_ptr, GROUP, k, j):
    """Scalar ``j`` of member ``k``'s set (sets of ``NS`` = 9 values)."""
    sel = tl.load(offs_ptr + 5 * GROUP + k)
    return tl.load(scal_ptr + sel * 9 + j)


@triton.jit
def _af_stats_kernel(
    g_ptr, scratch_ptr, offs_ptr, scal_ptr, GROUP, SCRATCH, COLP, B, M, N,
    stride_gb, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Factored pass 1, tile (pid_n, pid_m) of matrix b of member k: row and column partial
    sums of ``g^2 + eps1`` into the member's scratch, ``rowp[pid_n, b, i]`` at 0 and
    ``colp[pid_m, b, j]`` at COLP. Writes no state."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    k, b = _member_slot(tl.program_id(2), B)
    g_ptr = member_ptr(g_ptr, offs_ptr + GROUP, k, ALIGNED) + b * stride_gb
    eps1 = _scalar(scal_ptr, offs_ptr, GROUP, k, 3)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    q = tl.where(mask, g * g + eps1, 0.0)
    tl.store(base + (pid_n * B + b) * M + offs_m, tl.sum(q, axis=1), mask=mask_m)
    tl.store(base + COLP + (pid_m * B + b) * N + offs_n, tl.sum(q, axis=0), mask=mask_n)


@triton.jit
def _af_ema_kernel(
    row_ptr, col_ptr, scratch_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH, COLP, RNEW,
    CF, MEANP, B, M, N, TILES_M, TILES_N, ROW_BLOCKS,
    stride_rb, stride_rm, stride_cb, stride_cn,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Factored pass 2, block ``pid`` of the row (pid < ROW_BLOCKS) or column vector of
    matrix b of member k: the partials added in tile order, ``/N`` (``/M``), the EMA
    ``beta2t*x + (1-beta2t)*mean`` stored in the state and, for the row, in the scratch
    (``RNEW``, with the block's sum at ``MEANP``), for the column ``cf = 1/sqrt(col)`` at
    ``CF``. Nothing is written when ``skip_ptr`` holds True (the apply pass then writes
    nothing either, so the scratch is not needed)."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0)
    k, b = _member_slot(tl.program_id(1), B)
    beta2t = _scalar(scal_ptr, offs_ptr, GROUP, k, 1)
    one_minus_beta2t = _scalar(scal_ptr, offs_ptr, GROUP, k, 2)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    if pid < ROW_BLOCKS:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        acc = tl.load(base + b * M + offs, mask=mask, other=0.0)
        for t in range(1, TILES_N):
            acc += tl.load(base + (t * B + b) * M + offs, mask=mask, other=0.0)
        r_ptrs = member_ptr(row_ptr, offs_ptr + 3 * GROUP, k, ALIGNED) + b * stride_rb \
            + offs * stride_rm
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        r = r * beta2t + one_minus_beta2t * tl.div_rn(acc, N.to(tl.float32))
        tl.store(r_ptrs, r, mask=mask)
        tl.store(base + RNEW + b * M + offs, r, mask=mask)
        tl.store(base + MEANP + b * ROW_BLOCKS + pid, tl.sum(tl.where(mask, r, 0.0), axis=0))
    else:
        offs = (pid - ROW_BLOCKS) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        acc = tl.load(base + COLP + b * N + offs, mask=mask, other=0.0)
        for t in range(1, TILES_M):
            acc += tl.load(base + COLP + (t * B + b) * N + offs, mask=mask, other=0.0)
        c_ptrs = member_ptr(col_ptr, offs_ptr + 4 * GROUP, k, ALIGNED) + b * stride_cb \
            + offs * stride_cn
        c = tl.load(c_ptrs, mask=mask, other=1.0)
        c = c * beta2t + one_minus_beta2t * tl.div_rn(acc, M.to(tl.float32))
        tl.store(c_ptrs, c, mask=mask)
        c = tl.where(mask, c, 1.0)              # no 1/0 in the masked lanes
        tl.store(base + CF + b * N + offs, tl.div_rn(1.0, tl.sqrt_rn(c)), mask=mask)


@triton.jit
def _af_update_tile(g_ptr, base, b, pid_m, pid_n, B, M, N, RNEW, CF, MEANP, ROW_BLOCKS,
                    stride_gm, stride_gn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MEAN_BLOCK: tl.constexpr):
    """The unclipped fp32 update ``U = rf*cf*g`` of a tile, ``rf = 1/sqrt(row/mean(row))``
    from the new row in the scratch; also returns the tile's offsets and masks."""
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    mean = tl.div_rn(sum_fp32(base + MEANP + b * ROW_BLOCKS, ROW_BLOCKS, MEAN_BLOCK),
                     M.to(tl.float32))
    r = tl.load(base + RNEW + b * M + offs_m, mask=mask_m, other=1.0)
    rf = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(r, mean)))
    cf = tl.load(base + CF + b * N + offs_n, mask=mask_n, other=0.0)
    return (rf[:, None] * cf[None, :]) * g, offs_m, offs_n, mask


@triton.jit
def _af_sumsq_kernel(
    g_ptr, w_ptr, scratch_ptr, offs_ptr, GROUP, SCRATCH, RNEW, CF, MEANP, PART, NUM_TILES,
    B, M, N, TILES_M, TILES_N, ROW_BLOCKS,
    stride_gb, stride_gm, stride_gn, stride_wb, stride_wm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MEAN_BLOCK: tl.constexpr,
    SCALED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Factored pass 3: the tile's ``sum(U^2)`` at ``PART + tile`` and, with ``SCALED``, its
    ``sum(W^2)`` (W before this step) at ``PART + NUM_TILES + tile``. Writes no state."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    k, b = _member_slot(tl.program_id(2), B)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    g_ptr = member_ptr(g_ptr, offs_ptr + GROUP, k, ALIGNED) + b * stride_gb
    u, offs_m, offs_n, mask = _af_update_tile(g_ptr, base, b, pid_m, pid_n, B, M, N, RNEW, CF,
                                              MEANP, ROW_BLOCKS, stride_gm, stride_gn,
                                              BLOCK_M, BLOCK_N, MEAN_BLOCK)
    tile = (b * TILES_M + pid_m) * TILES_N + pid_n
    tl.store(base + PART + tile, tl.sum(tl.sum(u * u, axis=1), axis=0))
    if SCALED:
        w_ptr = member_ptr(w_ptr, offs_ptr, k, ALIGNED) + b * stride_wb
        w = load_tile(w_ptr, offs_m, offs_n, stride_wm, stride_wn, mask)
        tl.store(base + PART + NUM_TILES + tile, tl.sum(tl.sum(w * w, axis=1), axis=0))


@triton.jit
def _af_scalars_kernel(
    scratch_ptr, offs_ptr, scal_ptr, GROUP, SCRATCH, PART, SCAL, NUM_PARTS, root,
    BLOCK: tl.constexpr, SCALED: tl.constexpr,
):
    """Member k's step scalars from its partial sums, in a fixed order, at ``SCAL``:
    ``clip = max(1, RMS(U)/d)``, ``a = rho*max(eps2, RMS(W))`` (or rho) and ``-wd*a``.
    Writes only the scratch: on the device, never read back to the host."""
    k = tl.program_id(0)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    rho = _scalar(scal_ptr, offs_ptr, GROUP, k, 0)
    d = _scalar(scal_ptr, offs_ptr, GROUP, k, 5)
    wd = _scalar(scal_ptr, offs_ptr, GROUP, k, 8)
    rms_u = tl.div_rn(tl.sqrt_rn(sum_fp32(base + PART, NUM_PARTS, BLOCK)), root)
    c = tl.div_rn(rms_u, d)
    clip = tl.where(c < 1.0, 1.0, c)          # max(1, c), NaN kept (as torch.clamp)
    if SCALED:
        eps2 = _scalar(scal_ptr, offs_ptr, GROUP, k, 4)
        rms_w = tl.div_rn(tl.sqrt_rn(sum_fp32(base + PART + NUM_PARTS, NUM_PARTS, BLOCK)),
                          root)
        a = tl.where(rms_w < eps2, eps2, rms_w) * rho
    else:
        a = rho
    tl.store(base + SCAL, clip)
    tl.store(base + SCAL + 1, a)
    tl.store(base + SCAL + 2, -(wd * a))


@triton.jit
def _af_finish(u, w, e_ptrs, mask, base, SCAL, scal_ptr, offs_ptr, GROUP, k,
               HAS_MOMENTUM: tl.constexpr):
    """``U = U/clip*a``; the momentum EMA of U (stored); weight decay; the new fp32 W."""
    clip = tl.load(base + SCAL)
    a = tl.load(base + SCAL + 1)
    u = tl.div_rn(u, clip) * a
    if HAS_MOMENTUM:
        beta1 = _scalar(scal_ptr, offs_ptr, GROUP, k, 6)
        one_minus_beta1 = _scalar(scal_ptr, offs_ptr, GROUP, k, 7)
        e = tl.load(e_ptrs, mask=mask, other=0.0)
        e = e * beta1 + one_minus_beta1 * u
        tl.store(e_ptrs, e, mask=mask)
        u = e
    if _scalar(scal_ptr, offs_ptr, GROUP, k, 8) != 0.0:
        w = w + w * tl.load(base + SCAL + 2)
    return w - u


@triton.jit
def _af_apply_kernel(
    w_ptr, g_ptr, e_ptr, scratch_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH, RNEW, CF,
    MEANP, SCAL, B, M, N, ROW_BLOCKS,
    stride_wb, stride_wm, stride_wn, stride_gb, stride_gm, stride_gn,
    stride_eb, stride_em, stride_en,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MEAN_BLOCK: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Factored pass 5: read G, W (and exp_avg), write W (and exp_avg); nothing when
    ``skip_ptr`` holds True."""
    if tl.load(skip_ptr):
        return
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    k, b = _member_slot(tl.program_id(2), B)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    g_ptr = member_ptr(g_ptr, offs_ptr + GROUP, k, ALIGNED) + b * stride_gb
    u, offs_m, offs_n, mask = _af_update_tile(g_ptr, base, b, pid_m, pid_n, B, M, N, RNEW, CF,
                                              MEANP, ROW_BLOCKS, stride_gm, stride_gn,
                                              BLOCK_M, BLOCK_N, MEAN_BLOCK)
    w_ptr = member_ptr(w_ptr, offs_ptr, k, ALIGNED) + b * stride_wb
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    e_ptrs = member_ptr(e_ptr, offs_ptr + 2 * GROUP, k, ALIGNED) + b * stride_eb \
        + offs_m[:, None] * stride_em + offs_n[None, :] * stride_en
    w = _af_finish(u, w, e_ptrs, mask, base, SCAL, scal_ptr, offs_ptr, GROUP, k, HAS_MOMENTUM)
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _af_vec_stats_kernel(
    w_ptr, g_ptr, v_ptr, scratch_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH, PART,
    NUM_BLOCKS, numel,
    BLOCK: tl.constexpr, SCALED: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Unfactored pass 1 (contiguous W, G, V): ``V = beta2t*V + (1-beta2t)*(g^2+eps1)`` in
    place; ``sum((rsqrt(V)*g)^2)`` of the block at ``PART + pid`` and, with ``SCALED``,
    ``sum(W^2)`` at ``PART + NUM_BLOCKS + pid``. Nothing is written when ``skip_ptr`` holds
    True."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    beta2t = _scalar(scal_ptr, offs_ptr, GROUP, k, 1)
    one_minus_beta2t = _scalar(scal_ptr, offs_ptr, GROUP, k, 2)
    eps1 = _scalar(scal_ptr, offs_ptr, GROUP, k, 3)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(member_ptr(g_ptr, offs_ptr + GROUP, k, ALIGNED) + offs, mask=mask,
                other=0.0).to(tl.float32)
    v_ptrs = member_ptr(v_ptr, offs_ptr + 3 * GROUP, k, ALIGNED) + offs
    v = tl.load(v_ptrs, mask=mask, other=1.0)
    v = v * beta2t + one_minus_beta2t * (g * g + eps1)
    tl.store(v_ptrs, v, mask=mask)
    u = tl.div_rn(1.0, tl.sqrt_rn(v)) * g
    tl.store(base + PART + pid, tl.sum(tl.where(mask, u * u, 0.0), axis=0))
    if SCALED:
        w = tl.load(member_ptr(w_ptr, offs_ptr, k, ALIGNED) + offs, mask=mask,
                    other=0.0).to(tl.float32)
        tl.store(base + PART + NUM_BLOCKS + pid, tl.sum(w * w, axis=0))


@triton.jit
def _af_vec_apply_kernel(
    w_ptr, g_ptr, v_ptr, e_ptr, scratch_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, SCRATCH,
    SCAL, numel,
    BLOCK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Unfactored pass 2: ``U = rsqrt(V)*g`` from the stored V, then clip, scale, momentum,
    weight decay; nothing when ``skip_ptr`` holds True."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    base = scratch_ptr + k.to(tl.int64) * SCRATCH
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(member_ptr(g_ptr, offs_ptr + GROUP, k, ALIGNED) + offs, mask=mask,
                other=0.0).to(tl.float32)
    v = tl.load(member_ptr(v_ptr, offs_ptr + 3 * GROUP, k, ALIGNED) + offs, mask=mask,
                other=1.0)
    w_ptrs = member_ptr(w_ptr, offs_ptr, k, ALIGNED) + offs
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.div_rn(1.0, tl.sqrt_rn(v)) * g
    e_ptrs = member_ptr(e_ptr, offs_ptr + 2 * GROUP, k, ALIGNED) + offs
    w = _af_finish(u, w, e_ptrs, mask, base, SCAL, scal_ptr, offs_ptr, GROUP, k, HAS_MOMENTUM)
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _strides3(t, shape):
    """(stride_b, stride_m, stride_n) of ``t`` seen as the (B, M, N) ``shape``: a 3-D tensor's
    own, a 2-D one's with stride_b 0 (B = 1), else those of its view (which must exist)."""
    if t.dim() == 3:
        return t.stride()
    if t.dim() == 2 and shape[0] == 1:
        return (0,) + t.stride()
    return t.view(shape).stride()


def _check_list(name, ts, numel, device, dtype=None):
    like = ts[0]
    for i, t in enumerate(ts):
        if t.numel() != numel or t.device != device or t.dtype != like.dtype \
                or t.stride() != like.stride() or t.shape != like.shape:
            raise ValueError(f"{name}[{i}] ({tuple(t.shape)}, strides {t.stride()}, {t.dtype}, "
                             f"{t.device}) differs from {name}[0] ({tuple(like.shape)}, strides "
                             f"{like.stride()}, {like.dtype}) or does not hold {numel} elements "
                             f"on {device}: a group shares one layout")
        if dtype is not None and t.dtype != dtype:
            raise TypeError(f"adafactor_step (triton) keeps fp32 statistics; {name}[{i}] is "
                            f"{t.dtype}")


def _scalar_rows(scalars):
    """The fp32 table rows (``NS`` values per set) of ``(rho, beta2t, eps1, eps2,
    clip_threshold, beta1, weight_decay)`` sets (beta1 None: no momentum, 0 in the table)."""
    rows = []
    for rho, beta2t, eps1, eps2, d, beta1, wd in scalars:
        b1 = 0.0 if beta1 is None else float(beta1)
        rows.append([float(rho), float(beta2t), 1.0 - float(beta2t), float(eps1), float(eps2),
                     float(d), b1, 1.0 - b1, float(wd)])
    assert all(len(r) == NS for r in rows)
    return rows


class GroupedAdafactorStep:
    """The Adafactor step of a fixed group of same-layout tensors, checked and addressed
    once, here; a call takes the step's gradients, the scalar sets and the per-member index
    into them, and launches five kernels (factored) or three (unfactored) for the whole group.

    Factored: ``Ws`` (B, M, N) (a 2-D tensor is B = 1) in one storage dtype and strides,
    ``rows`` (B, M) and ``cols`` (B, N) fp32 (a 1-D vector is B = 1), ``Vs`` None.
    Unfactored: ``Ws`` and ``Vs`` contiguous with one number of elements, rows/cols None.
    ``exp_avgs``: fp32, W's layout, or None (no momentum). ``scale_parameter``: ``a`` from
    RMS(W). Every member's bits are those of a group of one: the same tiles, partial sums
    and reduction orders per member. ``persistent``: the scalar table is kept and refilled
    in place at every call (a bound call of the step engine); False for a one-off call."""

    def __init__(self, Ws, rows, cols, Vs, exp_avgs, *, shape, scale_parameter: bool,
                 persistent: bool = True):
        count = len(Ws)
        if count == 0:
            raise ValueError("a group needs at least one member")
        self.count, self.device = count, Ws[0].device
        self.factored = rows is not None
        self.momentum = exp_avgs is not None
        self.scaled = bool(scale_parameter)
        self.shape = tuple(int(s) for s in shape)
        numel = math.prod(self.shape)
        self.numel = numel
        _check_list("Ws", Ws, numel, self.device)
        self.w_dtype = Ws[0].dtype
        Es = exp_avgs if self.momentum else Ws     # a placeholder without momentum (never read)
        if self.momentum:
            _check_list("exp_avgs", Es, numel, self.device, torch.float32)
        if self.factored:
            B, M, N = self.shape
            _check_list("rows", rows, B * M, self.device, torch.float32)
            _check_list("cols", cols, B * N, self.device, torch.float32)
            self.w_strides = _strides3(Ws[0], self.shape)
            self.e_strides = _strides3(Es[0], self.shape)
            rs, cs = rows[0].view(B, M).stride(), cols[0].view(B, N).stride()
            self.vec_strides = rs + cs
            Rs, Cs = rows, cols
            self.tiles_m, self.tiles_n = cdiv(M, TILE_M), cdiv(N, TILE_N)
            self.row_blocks, self.col_blocks = cdiv(M, VEC_BLOCK), cdiv(N, VEC_BLOCK)
            self.num_tiles = B * self.tiles_m * self.tiles_n
            self.colp = self.tiles_n * B * M
            self.rnew = self.colp + self.tiles_m * B * N
            self.cf = self.rnew + B * M
            self.meanp = self.cf + B * N
            self.part = self.meanp + B * self.row_blocks
            self.scal = self.part + 2 * self.num_tiles
        else:
            _check_list("Vs", Vs, numel, self.device, torch.float32)
            for name, lst in (("Ws", Ws), ("Vs", Vs), ("exp_avgs", Es)):
                if not lst[0].is_contiguous():
                    raise ValueError(f"{name}[0] must be contiguous (the unfactored form)")
            Rs = Cs = Vs
            self.blocks = cdiv(numel, VEC_BLOCK)
            self.part = 0
            self.scal = 2 * self.blocks
        self.per = self.scal + 3
        self.scratch = torch.empty(count * self.per, dtype=torch.float32, device=self.device)
        self.bases = (Ws[0], Es[0], Rs[0], Cs[0])
        self.lists = (list(Ws), list(Es), list(Rs), list(Cs))   # kept alive: addressed by offset
        self.static = [element_offsets("Ws", Ws), element_offsets("exp_avgs", Es),
                       element_offsets("rows" if self.factored else "Vs", Rs),
                       element_offsets("cols" if self.factored else "Vs", Cs)]
        self.sizes = [Ws[0].element_size(), Es[0].element_size(), 4, 4]
        self._table_key = None
        self._g_layout = None
        # a persistent group's tables, kept at their addresses (a captured graph reads them)
        self._tables = KeptTables(self.device) if persistent else None

    def _check_grads(self, Gs):
        like = self._g_layout
        if like is not None and len(Gs) == self.count and all(
                G.shape == like[0] and G.stride() == like[1] and G.dtype == like[2]
                for G in Gs):
            return like[3]
        if len(Gs) != self.count:
            raise ValueError(f"Gs has {len(Gs)} tensors, the group {self.count}")
        _check_list("Gs", Gs, self.numel, self.device)
        G = Gs[0]
        if self.factored:
            strides = _strides3(G, self.shape)
        else:
            if not G.is_contiguous():
                raise ValueError("Gs[0] must be contiguous (the unfactored form)")
            strides = ()
        self._g_layout = (G.shape, G.stride(), G.dtype, strides)
        return strides

    def takes(self, Gs) -> bool:
        """Whether ``Gs`` fit the group (one gradient per member, sharing one layout of the
        members' shape on their device): a caller with another fallback asks first."""
        try:
            self._taken = (Gs, self._check_grads(Gs))
        except (ValueError, RuntimeError):
            return False
        return True

    def __call__(self, Gs, scalars, sel=None, *, skip=None):
        """``scalars``: ``(rho, beta2t, eps1, eps2, clip_threshold, beta1, weight_decay)``
        sets; ``sel``: the set of each member (None: every member takes set 0); ``skip``: the
        on-device non-finite flag (None or a 0-dim bool tensor): when it holds True nothing
        is written."""
        taken = self.__dict__.pop("_taken", None)   # takes() just checked this very list
        g_strides = taken[1] if taken is not None and taken[0] is Gs else self._check_grads(Gs)
        count = self.count
        if sel is None:
            sel = [0] * count
        elif len(sel) != count:
            raise ValueError(f"sel has {len(sel)} entries, the group {count} members")
        g_offs = element_offsets("Gs", Gs)
        key = (tuple(g_offs), tuple(sel), Gs[0].element_size())
        if key != self._table_key:
            w, e, r, c = self.static
            # the scalar-set index rides in the table as a 16-byte "element" (always aligned)
            self._table, self._aligned = offsets_table(
                [w, g_offs, e, r, c, list(sel)],
                [self.sizes[0], Gs[0].element_size()] + self.sizes[1:] + [ALIGN_BYTES],
                self.device)
            self._table_key = key
        offs, aligned = self._table, self._aligned
        rows = _scalar_rows(scalars)
        scal = (scalar_table(rows, self.device) if self._tables is None
                else self._tables.fill(rows))
        if _capture.replaying() and self._tables is not None:
            return          # a replayed CUDA graph makes these launches (the table refilled)
        flag = skip_flag(skip, self.device)
        W0, E0, R0, C0 = self.bases
        G0 = Gs[0]
        interpret = interpreting()
        if self.factored:
            B, M, N = self.shape
            grid3 = (self.tiles_n, self.tiles_m, count * B)
            launch_planned(
                self, _af_stats_kernel, grid3,
                G0, self.scratch, offs, scal, count, self.per, self.colp, B, M, N, *g_strides,
                BLOCK_M=TILE_M, BLOCK_N=TILE_N, ALIGNED=aligned, num_warps=TILE_WARPS)
            launch_planned(
                self, _af_ema_kernel, (self.row_blocks + self.col_blocks, count * B),
                R0, C0, self.scratch, offs, scal, flag, count, self.per, self.colp, self.rnew,
                self.cf, self.meanp, B, M, N, self.tiles_m, self.tiles_n, self.row_blocks,
                *self.vec_strides,
                BLOCK=VEC_BLOCK, ALIGNED=aligned, num_warps=VEC_WARPS)
            launch_planned(
                self, _af_sumsq_kernel, grid3,
                G0, W0, self.scratch, offs, count, self.per, self.rnew, self.cf, self.meanp,
                self.part, self.num_tiles, B, M, N, self.tiles_m, self.tiles_n,
                self.row_blocks, *g_strides, *self.w_strides,
                BLOCK_M=TILE_M, BLOCK_N=TILE_N, MEAN_BLOCK=MEAN_BLOCK, SCALED=self.scaled,
                ALIGNED=aligned, num_warps=TILE_WARPS)
            parts = self.num_tiles
        else:
            launch_planned(
                self, _af_vec_stats_kernel, (self.blocks, count),
                W0, G0, R0, self.scratch, offs, scal, flag, count, self.per, self.part,
                self.blocks, self.numel,
                BLOCK=VEC_BLOCK, SCALED=self.scaled, ALIGNED=aligned, num_warps=VEC_WARPS)
            parts = self.blocks
        launch_planned(
            self, _af_scalars_kernel, (count,),
            self.scratch, offs, scal, count, self.per, self.part, self.scal, parts,
            float(self.numel) ** 0.5,
            BLOCK=SUM_BLOCK, SCALED=self.scaled, num_warps=VEC_WARPS)
        if self.factored:
            launch_planned(
                self, _af_apply_kernel, grid3,
                W0, G0, E0, self.scratch, offs, scal, flag, count, self.per, self.rnew,
                self.cf, self.meanp, self.scal, B, M, N, self.row_blocks, *self.w_strides,
                *g_strides, *self.e_strides,
                BLOCK_M=TILE_M, BLOCK_N=TILE_N, MEAN_BLOCK=MEAN_BLOCK,
                HAS_MOMENTUM=self.momentum, INTERPRET=interpret, ALIGNED=aligned,
                num_warps=TILE_WARPS)
        else:
            launch_planned(
                self, _af_vec_apply_kernel, (self.blocks, count),
                W0, G0, R0, E0, self.scratch, offs, scal, flag, count, self.per, self.scal,
                self.numel,
                BLOCK=VEC_BLOCK, HAS_MOMENTUM=self.momentum, INTERPRET=interpret,
                ALIGNED=aligned, num_warps=VEC_WARPS)


def _check_states(*states):
    for t in states:
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"adafactor_step (triton) keeps fp32 statistics; got {t.dtype}")


def adafactor_step(W, G, row, col, V, exp_avg, *, rho, beta2t, eps1, eps2, clip_threshold,
                   scale_parameter, beta1, weight_decay, skip=None) -> None:
    """Same contract as ``lowrank_fused.reference.adafactor_step``: in place on W, the
    statistics (``row``/``col`` or ``V``) and ``exp_avg``; a group of one of
    ``GroupedAdafactorStep``."""
    kw = dict(rho=rho, beta2t=beta2t, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold,
              scale_parameter=scale_parameter, beta1=beta1, weight_decay=weight_decay)
    _check_states(row, col, V, exp_avg)
    momentum = beta1 is not None
    E = exp_avg if momentum else None
    if W.numel() == 0:   # nothing to launch; the reference defines what empty means
        from lowrank_fused.reference.adafactor_step import adafactor_step_ref

        adafactor_step_ref(W, G, row, col, V, exp_avg, skip=skip, **kw)
        return
    if row is None:
        tensors = (W, G, V) + ((E,) if momentum else ())
        if not all(t.is_contiguous() for t in tensors):
            work = [t.contiguous() for t in tensors]
            adafactor_step(work[0], work[1], None, None, work[2], work[3] if momentum else None,
                           skip=skip, **kw)
            for i, dst in enumerate(tensors):
                if i != 1 and dst.data_ptr() != work[i].data_ptr():   # all but G are updated
                    dst.copy_(work[i])
            return
    step = GroupedAdafactorStep([W], None if row is None else [row],
                                None if col is None else [col], None if V is None else [V],
                                None if E is None else [E], shape=W.shape,
                                scale_parameter=scale_parameter, persistent=False)
    step([G], [(rho, beta2t, eps1, eps2, clip_threshold, beta1, weight_decay)], skip=skip)


DTYPES = ("fp32", "bf16", "fp16", "fp64")   # W and G; fp64: Adafactor accepts fp64 parameters


def aot_variants():
    """Every compilation the launchers can ask for: W/G dtype x (SCALED | HAS_MOMENTUM) x
    ALIGNED, and the single-matrix stats pass of ``row_col_sums``."""
    from lowrank_fused.testing.aot import Variant

    tile = dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N)
    s3 = lambda t: {f"stride_{t}{d}": "i32" for d in "bmn"}   # noqa: E731
    ints = lambda *names: {a: "i32" for a in names}           # noqa: E731
    common = {"scratch_ptr": "*fp32", "offs_ptr": "*i64", "scal_ptr": "*fp32"}
    for x in DTYPES:
        p = "*" + x
        yield Variant(_adafactor_stats_kernel,
                      {"g_ptr": p, "rowp_ptr": "*fp32", "colp_ptr": "*fp32", "B": "i32",
                       "M": "i32", "N": "i32", **s3("g"), "eps1": "fp32"},
                      dict(tile), TILE_WARPS, 3)
        for aligned in (True, False):
            yield Variant(_af_stats_kernel,
                          {"g_ptr": p, **common,
                           **ints("GROUP", "SCRATCH", "COLP", "B", "M", "N"), **s3("g")},
                          dict(tile, ALIGNED=aligned), TILE_WARPS, 3)
            for scaled in (False, True):
                yield Variant(_af_sumsq_kernel,
                              {"g_ptr": p, "w_ptr": p, "scratch_ptr": "*fp32",
                               "offs_ptr": "*i64",
                               **ints("GROUP", "SCRATCH", "RNEW", "CF", "MEANP", "PART",
                                      "NUM_TILES", "B", "M", "N", "TILES_M", "TILES_N",
                                      "ROW_BLOCKS"), **s3("g"), **s3("w")},
                              dict(tile, MEAN_BLOCK=MEAN_BLOCK, SCALED=scaled, ALIGNED=aligned),
                              TILE_WARPS, 3)
                yield Variant(_af_vec_stats_kernel,
                              {"w_ptr": p, "g_ptr": p, "v_ptr": "*fp32", **common,
                               "skip_ptr": "*i1",
                               **ints("GROUP", "SCRATCH", "PART", "NUM_BLOCKS", "numel")},
                              dict(BLOCK=VEC_BLOCK, SCALED=scaled, ALIGNED=aligned),
                              VEC_WARPS, 3)
            for momentum in (False, True):
                e = "*fp32" if momentum else p   # without momentum the launcher passes W
                yield Variant(_af_apply_kernel,
                              {"w_ptr": p, "g_ptr": p, "e_ptr": e, **common, "skip_ptr": "*i1",
                               **ints("GROUP", "SCRATCH", "RNEW", "CF", "MEANP", "SCAL", "B",
                                      "M", "N", "ROW_BLOCKS"), **s3("w"), **s3("g"), **s3("e")},
                              dict(tile, MEAN_BLOCK=MEAN_BLOCK, HAS_MOMENTUM=momentum,
                                   INTERPRET=False, ALIGNED=aligned), TILE_WARPS, 3)
                yield Variant(_af_vec_apply_kernel,
                              {"w_ptr": p, "g_ptr": p, "v_ptr": "*fp32", "e_ptr": e, **common,
                               "skip_ptr": "*i1", **ints("GROUP", "SCRATCH", "SCAL", "numel")},
                              dict(BLOCK=VEC_BLOCK, HAS_MOMENTUM=momentum, INTERPRET=False,
                                   ALIGNED=aligned), VEC_WARPS, 3)
    for aligned in (True, False):
        yield Variant(_af_ema_kernel,
                      {"row_ptr": "*fp32", "col_ptr": "*fp32", **common, "skip_ptr": "*i1",
                       **ints("GROUP", "SCRATCH", "COLP", "RNEW", "CF", "MEANP", "B", "M", "N",
                              "TILES_M", "TILES_N", "ROW_BLOCKS", "stride_rb", "stride_rm",
                              "stride_cb", "stride_cn")},
                      dict(BLOCK=VEC_BLOCK, ALIGNED=aligned), VEC_WARPS, 3)
    for scaled in (False, True):
        yield Variant(_af_scalars_kernel,
                      {"scratch_ptr": "*fp32", "offs_ptr": "*i64", "scal_ptr": "*fp32",
                       **ints("GROUP", "SCRATCH", "PART", "SCAL", "NUM_PARTS"), "root": "fp32"},
                      dict(BLOCK=SUM_BLOCK, SCALED=scaled), VEC_WARPS, 3)
