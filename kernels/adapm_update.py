"""AdaPM / AdaPM-mini low-rank step, fused (docs/methods/adapm.md, update lines 3-7 and
AdaPM-mini; docs/bytes.md, "Kernel-design notes": L@Rg, and L0@R0 on refit steps).

Left form, in place on R (between refits), V and W; W, G m x n in their storage dtypes.

The momentum estimate ``mc = s*(L@R) + e_coef*e`` is one GEMM over a concatenated K whose
per-accumulator coefficients are folded into the small right operands (r x n, fp32, written by
one elementwise launch over R, Rg / R0 before the GEMM):

* between refits: ``mc = L @ B + e_coef*(1-beta1)*G`` with
  ``B = s*R - e_coef*(1-beta1)*Rg`` (K = r: both products share the left factor L). The same
  small launch first updates ``R = beta1*R + (1-beta1)*Rg`` in place and builds B from the
  stored R;
* on a refit step: ``mc = L @ B + L0 @ B0 + e_coef*(1-beta1)*G`` with ``B = (s - e_coef)*R``,
  ``B0 = e_coef*beta1*R0`` (K = 2r: a second K loop over (L0, B0)).

Loads feed the dots directly (scaling a tile between its load and the dot keeps the pipeliner
from staging it through shared memory and costs registers). The accumulator never leaves the
program: the epilogue reads the G, V and W tiles, updates V, normalises, clips and writes W once
(round-to-nearest in each tensor's dtype). No m x n temporary exists. Passes per call:

========================================  ==========================================  ===========
configuration                             m x n passes                                bytes / el.
========================================  ==========================================  ===========
elementwise V, clip elementwise / none    apply (read G, V, W; write V, W)            2+8+4 = 14
elementwise V, clip rms                   stats (read G, V) + apply                   6+14 = 20
block-mean V (Adam-mini), clip elem/none  row sums of G^2 (read G) + apply (G, W)     2+6 = 8
block-mean V, clip rms                    row sums + stats (read G) + apply           2+2+6 = 10
========================================  ==========================================  ===========

(bf16 G and W, fp32 V; plus O((m + n) r) for L, L0, B, B0, R, Rg, which come from L2.) The
reductions the apply pass needs first are computed on the device in a fixed order and handed to
the next launch through a pointer (no host synchronisation, no float atomics): the RMS of u over
the whole block from per-program partial sums reduced by torch; Adam-mini's per-block mean of
g^2 by the two block-mean launches of ``kernels/grouped_adapm_update.py`` (row sums, then block
sums with V and the denominator), shared with the step engine's grouped form.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ._common import (DOT_BF16_EMULATED, DOT_IEEE, cdiv, config_mode, dot_mode,
                      interpreter_tiles, interpreting, mma, to_storage)

CLIP_MODES = ("elementwise", "rms", "none")

# CLIP constexpr: the pass a launch performs
CLAMP = 0        # apply pass, u clamped to [-threshold, threshold] (inf for clip_mode="none")
RMS_STATS = 1    # statistics pass: per-program sum(u^2), nothing else written
RMS_APPLY = 2    # apply pass, u divided by the scale max(1, rms(u)/threshold) read from memory

_DUMMIES = {}


def as_fp32(x) -> float:
    """``x`` rounded to fp32 (as a Python float). A launcher passes ``beta1`` so: the kernel
    computes ``1 - beta1`` from it, which the Triton interpreter evaluates in Python (double)
    arithmetic on a float argument; from the fp32 value that difference is the fp32 one a
    compiled kernel computes (and that the grouped kernels compute from their fp32 table)."""
    return float(np.float32(x))


def dummy(device) -> torch.Tensor:
    """A one-element fp32 tensor for pointer arguments a variant never touches (cached per
    device, so a launch allocates nothing for them)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=torch.float32, device=device)
    return _DUMMIES[key]


# --------------------------------------------------------------------------------------------
# shared epilogue pieces (also used by adapm_dense_update)

@triton.jit
def normalize(mc, g, v_ptr, v_offs, mask, h_ptr, rows, mask_m, rows_per_block,
              v_keep, v_add, eps, c2, V_BLOCKS: tl.constexpr, STORE_V: tl.constexpr,
              INTERPRET: tl.constexpr):
    """``u = mc / denominator`` (docs/methods/adapm.md lines 5-6): elementwise V is updated
    (``v_keep*V + v_add*g^2``, stored when STORE_V) and the denominator is computed from the
    *stored* value, ``sqrt(V/c2) + eps``; block-mean V reads the per-row denominator ``h``
    (``sqrt(V)/sqrt(c2) + eps``, one per block of ``rows_per_block`` rows)."""
    if V_BLOCKS:
        h = tl.load(h_ptr + rows // rows_per_block, mask=mask_m, other=1.0)
        u = tl.div_rn(mc, h[:, None])
    else:
        v = tl.load(v_ptr + v_offs, mask=mask, other=0.0).to(tl.float32)
        v = v * v_keep + v_add * (g * g)
        v_st = to_storage(v, v_ptr.dtype.element_ty, INTERPRET)
        if STORE_V:
            tl.store(v_ptr + v_offs, v_st, mask=mask)
        v = v_st.to(tl.float32)
        u = tl.div_rn(mc, tl.sqrt_rn(tl.div_rn(v, c2)) + eps)
    return u


@triton.jit
def clip_and_apply(u, mask, w_ptr, w_offs, part_ptr, scale_ptr, lr, pre_scale, clip_threshold,
                   CLIP: tl.constexpr, INTERPRET: tl.constexpr):
    """RMS_STATS: store this program's ``sum(u^2)``. Otherwise clip u (clamp, or divide by the
    precomputed RMS scale) and write ``W = W*pre_scale - lr*u``."""
    if CLIP == 1:
        uu = tl.where(mask, u * u, 0.0)
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(part_ptr + pid, tl.sum(tl.sum(uu, axis=1), axis=0))
    else:
        if CLIP == 2:
            u = tl.div_rn(u, tl.load(scale_ptr))
        else:
            u = tl.minimum(tl.maximum(u, -clip_threshold, propagate_nan=tl.PropagateNan.ALL),
                           clip_threshold, propagate_nan=tl.PropagateNan.ALL)
        w = tl.load(w_ptr + w_offs, mask=mask, other=0.0).to(tl.float32)
        if pre_scale != 1.0:
            w = w * pre_scale
        w = w - lr * u
        tl.store(w_ptr + w_offs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def elementwise_tiles(gpu_m: int, gpu_n: int):
    """The (BLOCK_M, BLOCK_N) of an elementwise launch: the GPU tile, or a large one on the CPU
    interpreter (never compiled), which runs programs one after another at a fixed cost per
    operation, so that fewer, larger tiles are several times faster there."""
    return (128, 256) if interpreter_tiles() else (gpu_m, gpu_n)


def block_means_denominator(G, V, *, v_keep: float, v_add: float, eps: float,
                            c2: float) -> torch.Tensor:
    """Adam-mini (docs/methods/adapm.md): ``V = v_keep*V + v_add*mean_block(g^2)`` in place on the
    ``nb``-vector V, and the fp32 per-block denominator ``sqrt(V)/sqrt(c2) + eps`` (nb), all on
    the device: the two launches of ``kernels/grouped_adapm_update.py`` on a group of one (row
    sums of g^2, then each block's sum, V and h), so a matrix alone and the step engine's class
    compute them the same way."""
    m, n = G.shape
    nb = V.numel()
    rpb = m // nb
    if m * n:
        from .grouped_adapm_update import block_means

        return block_means(G, V, v_keep=v_keep, v_add=v_add, eps=eps, c2=c2)
    rowsq = torch.zeros(m, dtype=torch.float32, device=G.device)
    sq = rowsq.view(nb, rpb).sum(dim=1) / float(rpb * n)
    V.copy_(V.float() * v_keep + v_add * sq)
    return torch.sqrt(V.float()) / math.sqrt(c2) + eps


def rms_scale(part: torch.Tensor, numel: int, clip_threshold: float) -> torch.Tensor:
    """``max(1, rms(u)/threshold)`` from the per-program partial sums of u^2 (1 element)."""
    rms = torch.sqrt(part.sum() / float(numel))
    return torch.clamp(rms / clip_threshold, min=1.0).reshape(1)


def clip_setup(clip_mode: str, clip_threshold: float):
    """(passes, clamp threshold) for ``clip_mode``: the launch sequence of the CLIP constexpr."""
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    if clip_mode == "rms":
        return (RMS_STATS, RMS_APPLY), float(clip_threshold)
    return (CLAMP,), float(clip_threshold) if clip_mode == "elementwise" else math.inf


# --------------------------------------------------------------------------------------------
# the small right operands: R = beta1*R + (1-beta1)*Rg (between refits) and B = cx*X + cy*Y

@triton.jit
def _right_operand_kernel(x_ptr, y_ptr, b_ptr, RANK, N, stride_xr, stride_xn, stride_yr,
                          stride_yn, beta1, coef_x, coef_y, UPDATE_X: tl.constexpr,
                          INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """UPDATE_X (between refits): ``X = beta1*X + (1-beta1)*Y`` in place (the exact
    least-squares R for the fixed L), then ``b = coef_x*X + coef_y*Y`` from the *stored* X (as
    the reference's ``L @ R.float()``). Otherwise ``b = coef_x*X`` (Y unread). b is r x n fp32,
    contiguous."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < RANK)[:, None] & (offs_n < N)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xr + offs_n[None, :] * stride_xn
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if UPDATE_X:
        y = tl.load(y_ptr + offs_m[:, None] * stride_yr + offs_n[None, :] * stride_yn,
                    mask=mask, other=0.0).to(tl.float32)
        x_st = to_storage(x * beta1 + (1.0 - beta1) * y, x_ptr.dtype.element_ty, INTERPRET)
        tl.store(x_ptrs, x_st, mask=mask)
        b = coef_x * x_st.to(tl.float32) + coef_y * y
    else:
        b = coef_x * x
    tl.store(b_ptr + offs_m[:, None] * N + offs_n[None, :], b, mask=mask)


B_BLOCK_M, B_BLOCK_N, B_WARPS = 8, 128, 4


def _right_operand(X, Y, out, *, coef_x: float, coef_y: float, beta1: float = 0.0,
                   update_x: bool = False) -> None:
    rank, n = X.shape
    if rank * n == 0:
        return
    bm, bn = elementwise_tiles(B_BLOCK_M, B_BLOCK_N)
    grid = (cdiv(rank, bm), cdiv(n, bn))
    _right_operand_kernel[grid](X, Y, out, rank, n, X.stride(0), X.stride(1), Y.stride(0),
                                Y.stride(1), as_fp32(beta1), float(coef_x), float(coef_y),
                                UPDATE_X=update_x, INTERPRET=interpreting(), BLOCK_M=bm,
                                BLOCK_N=bn, num_warps=B_WARPS)


# --------------------------------------------------------------------------------------------
# the fused GEMM + second moment + clip + update

@dataclass(frozen=True)
class AdapmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Every config the launcher can choose (the AOT test compiles each and rejects spills). The
# epilogue holds the accumulator and the G, V and W tiles at once: with 4 warps a 64x64 tile
# needs all 255 registers on sm_90 (and spills in ieee/FMA mode); 8 warps use 130-180.
CONFIGS_FMA = (AdapmConfig(64, 64, 32, 8, 3),)
CONFIGS_MMA = (AdapmConfig(64, 64, 32, 8, 3),)


def configs_for(mode: int):
    return CONFIGS_FMA if mode in (DOT_IEEE, DOT_BF16_EMULATED) else CONFIGS_MMA


# CPU interpreter only (never compiled): fewer, larger tiles (see elementwise_tiles)
CONFIG_INTERPRET = AdapmConfig(128, 128, 64, 4, 1)


def choose_config(m: int, n: int, rank: int, mode: int) -> AdapmConfig:
    if interpreter_tiles():
        return CONFIG_INTERPRET
    return configs_for(mode)[0]


@triton.jit
def _adapm_update_kernel(
    w_ptr, g_ptr, l_ptr, b_ptr, l0_ptr, b0_ptr, v_ptr, h_ptr, scale_ptr, part_ptr,
    M, N, RANK, RANK0, ROWS_PER_BLOCK,
    stride_wm, stride_wn, stride_gm, stride_gn, stride_lm, stride_lr, stride_l0m, stride_l0r,
    stride_vm, stride_vn,
    coef_g, v_keep, v_add, eps, c2, lr, pre_scale, clip_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, V_BLOCKS: tl.constexpr, CLIP: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K loop 1: L @ B (B = s*R - e_coef*(1-beta1)*Rg between refits, (s - e_coef)*R on one)
    l_ptrs = l_ptr + offs_m[:, None] * stride_lm + offs_k[None, :] * stride_lr
    b_ptrs = b_ptr + offs_k[:, None] * N + offs_n[None, :]
    for k in range(0, RANK, BLOCK_K):
        mask_k = (k + offs_k) < RANK
        a = tl.load(l_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_MODE)
        l_ptrs += BLOCK_K * stride_lr
        b_ptrs += BLOCK_K * N
    # K loop 2 (refit steps: RANK0 = r, else 0): + L0 @ B0 (B0 = e_coef*beta1*R0)
    l0_ptrs = l0_ptr + offs_m[:, None] * stride_l0m + offs_k[None, :] * stride_l0r
    b0_ptrs = b0_ptr + offs_k[:, None] * N + offs_n[None, :]
    for k in range(0, RANK0, BLOCK_K):
        mask_k = (k + offs_k) < RANK0
        a = tl.load(l0_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b0_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_MODE)
        l0_ptrs += BLOCK_K * stride_l0r
        b0_ptrs += BLOCK_K * N
    # epilogue: mc = acc + e_coef*(1-beta1)*G; second moment, normalise, clip, update W
    mask = mask_m[:, None] & mask_n[None, :]
    g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask,
                other=0.0).to(tl.float32)
    mc = acc + coef_g * g
    u = normalize(mc, g, v_ptr, offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, mask,
                  h_ptr, offs_m, mask_m, ROWS_PER_BLOCK, v_keep, v_add, eps, c2,
                  V_BLOCKS, CLIP != 1, INTERPRET)
    clip_and_apply(u, mask, w_ptr, offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                   part_ptr, scale_ptr, lr, pre_scale, clip_threshold, CLIP, INTERPRET)


def adapm_update(W, G, L, R, Rg, V, L0=None, R0=None, *, beta1: float, s_coef: float,
                 e_coef: float, v_keep: float, v_add: float, eps: float, c2: float, lr: float,
                 pre_scale: float, clip_mode: str = "elementwise", clip_threshold: float = 1.0,
                 precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.adapm_update`` (left form, in place on R
    between refits, V and W). Any strides; math in fp32; every tensor keeps its dtype."""
    passes, clamp = clip_setup(clip_mode, clip_threshold)
    m, n = W.shape
    rank = L.shape[1]
    beta1 = float(beta1)
    refit = L0 is not None
    if m * n == 0:   # nothing to fuse: the reference's (empty) operations, same results
        from lowrank_fused.reference.adapm_update import adapm_update_ref

        adapm_update_ref(W, G, L, R, Rg, V, L0, R0, beta1=beta1, s_coef=s_coef, e_coef=e_coef,
                         v_keep=v_keep, v_add=v_add, eps=eps, c2=c2, lr=lr,
                         pre_scale=pre_scale, clip_mode=clip_mode,
                         clip_threshold=clip_threshold)
        return
    s_coef, e_coef = float(s_coef), float(e_coef)
    coef_g = e_coef * (1.0 - beta1)
    # the right operands with their per-accumulator coefficients folded in (r x n, fp32)
    if refit:
        B = torch.empty((2, rank, n), dtype=torch.float32, device=W.device)
        B1, B0 = B[0], B[1]
        _right_operand(R, R, B1, coef_x=s_coef - e_coef, coef_y=0.0)
        _right_operand(R0, R0, B0, coef_x=e_coef * beta1, coef_y=0.0)
    else:
        B1 = B0 = torch.empty((rank, n), dtype=torch.float32, device=W.device)
        _right_operand(R, Rg, B1, coef_x=s_coef, coef_y=-coef_g, beta1=beta1, update_x=True)
        L0 = L
    blocks = V.shape != W.shape
    fp32 = dummy(W.device)
    if blocks:
        h = block_means_denominator(G, V, v_keep=v_keep, v_add=v_add, eps=eps, c2=c2)
        rpb, Vk = m // V.numel(), fp32
    else:
        h, rpb, Vk = fp32, 1, V
    mode = dot_mode(precision, W.device)
    cfg = choose_config(m, n, rank, config_mode(precision, W.device))
    grid = (cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N))
    part = scale = fp32
    if passes[0] == RMS_STATS:
        part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=W.device)
    for clip in passes:
        if clip == RMS_APPLY:
            scale = rms_scale(part, m * n, clip_threshold)
        _adapm_update_kernel[grid](
            W, G, L, B1, L0, B0, Vk, h, scale, part,
            m, n, rank, rank if refit else 0, rpb,
            W.stride(0), W.stride(1), G.stride(0), G.stride(1), L.stride(0), L.stride(1),
            L0.stride(0), L0.stride(1), Vk.stride(0), Vk.stride(-1),
            coef_g, float(v_keep), float(v_add), float(eps), float(c2), float(lr),
            float(pre_scale), clamp,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode,
            V_BLOCKS=blocks, CLIP=clip, INTERPRET=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


# --------------------------------------------------------------------------------------------

# (W and G dtype, state dtype: L, R, L0, R0, V): fp32 states, or faithful_dtypes
DTYPE_PAIRS = (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32"),
               ("fp16", "fp16"))


def aot_variants():
    """Every compilation ``adapm_update`` can launch on a GPU: (W/G, state) dtypes x
    (elementwise V, block-mean V) x pass (clamp apply, rms stats, rms apply) x precision x
    config, plus the right-operand helper (the block-mean kernels are listed by
    ``grouped_adapm_update``)."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in (
        "M", "N", "RANK", "RANK0", "ROWS_PER_BLOCK", "stride_wm", "stride_wn", "stride_gm",
        "stride_gn", "stride_lm", "stride_lr", "stride_l0m", "stride_l0r", "stride_vm",
        "stride_vn")}
    scalars = {a: "fp32" for a in ("coef_g", "v_keep", "v_add", "eps", "c2", "lr", "pre_scale",
                                   "clip_threshold")}
    for w_t, s_t in DTYPE_PAIRS:
        for blocks in (False, True):
            for clip in (CLAMP, RMS_STATS, RMS_APPLY):
                for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
                    for cfg in configs_for(mode):
                        types = {"w_ptr": "*" + w_t, "g_ptr": "*" + w_t, "l_ptr": "*" + s_t,
                                 "b_ptr": "*fp32", "l0_ptr": "*" + s_t, "b0_ptr": "*fp32",
                                 "v_ptr": "*fp32" if blocks else "*" + s_t, "h_ptr": "*fp32",
                                 "scale_ptr": "*fp32", "part_ptr": "*fp32", **ints, **scalars}
                        yield Variant(_adapm_update_kernel, types,
                                      dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                           BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, V_BLOCKS=blocks,
                                           CLIP=clip, INTERPRET=False),
                                      cfg.num_warps, cfg.num_stages)
    for s_t in ("fp32", "bf16", "fp16"):
        for update in (True, False):
            yield Variant(_right_operand_kernel,
                          {"x_ptr": "*" + s_t, "y_ptr": "*fp32" if update else "*" + s_t,
                           "b_ptr": "*fp32", "RANK": "i32", "N": "i32", "stride_xr": "i32",
                           "stride_xn": "i32", "stride_yr": "i32", "stride_yn": "i32",
                           "beta1": "fp32", "coef_x": "fp32", "coef_y": "fp32"},
                          dict(UPDATE_X=update, INTERPRET=False, BLOCK_M=B_BLOCK_M,
                               BLOCK_N=B_BLOCK_N), B_WARPS, 3)
