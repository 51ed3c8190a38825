"""AdaPM / AdaPM-mini full-momentum and no-momentum blocks, fused (docs/methods/adapm.md:
the full- and no-momentum blocks; AdaPM-mini for block means).

In place on M, V and W (W, G, M m x n, any strides; V m x n or Adam-mini block means). One
elementwise tile loop with the same epilogue as ``adapm_update``: ``M = beta1*M + (1-beta1)*G``
and ``mc = M/c1`` (full momentum; ``mc = G`` without M), the second moment, clip and
``W = W*pre_scale - lr*u``. Passes and bytes per element (bf16 G and W, fp32 M and V):

========================================  =====================================  ==============
configuration                             m x n passes                           bytes / el.
========================================  =====================================  ==============
full momentum, elementwise V, clamp/none  apply (read G, M, V, W; write M V W)   22
full momentum, elementwise V, rms         stats (read G, M, V) + apply           10+22
no momentum, elementwise V, clamp/none    apply (read G, V, W; write V, W)       14
no momentum, elementwise V, rms           stats (read G, V) + apply              6+14
block-mean V (Adam-mini), clamp/none      row sums of G^2 (read G) + apply       2+14 / 2+6
block-mean V, rms                         row sums + stats (read G, M) + apply   2+6+14 / 2+2+6
========================================  =====================================  ==============

(Block-mean rows: with / without M.) The RMS of u and the block means are per-program partial
sums reduced by torch on the device (``adapm_update``'s helpers); no m x n temporary exists.
"""
import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, load_tile, tile_offsets, to_storage
from .adapm_update import (CLAMP, DTYPE_PAIRS, RMS_APPLY, RMS_STATS, as_fp32,
                           block_means_denominator, clip_and_apply, clip_setup, dummy,
                           elementwise_tiles, normalize, rms_scale)

# GPU tile: every variant compiles for sm_90 without spills on Triton 3.6 and 3.9 (with 8x256
# tiles, or 4 warps, ptxas spills 4-8 bytes in some rms statistics passes)
BLOCK_M, BLOCK_N, NUM_WARPS = 16, 128, 8


@triton.jit
def _adapm_dense_update_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, h_ptr, scale_ptr, part_ptr,
    M, N, ROWS_PER_BLOCK,
    stride_wm, stride_wn, stride_gm, stride_gn, stride_mm, stride_mn, stride_vm, stride_vn,
    beta1, c1, v_keep, v_add, eps, c2, lr, pre_scale, clip_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_M: tl.constexpr,
    V_BLOCKS: tl.constexpr, CLIP: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m, offs_n, mask_m, _, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    if HAS_M:
        m_ptrs = m_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        mom = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
        mom = mom * beta1 + (1.0 - beta1) * g
        mom_st = to_storage(mom, m_ptr.dtype.element_ty, INTERPRET)
        if CLIP != 1:
            tl.store(m_ptrs, mom_st, mask=mask)
        mc = tl.div_rn(mom_st.to(tl.float32), c1)
    else:
        mc = g
    u = normalize(mc, g, v_ptr, offs_m[:, None] * stride_vm + offs_n[None, :] * stride_vn, mask,
                  h_ptr, offs_m, mask_m, ROWS_PER_BLOCK, v_keep, v_add, eps, c2,
                  V_BLOCKS, CLIP != 1, INTERPRET)
    clip_and_apply(u, mask, w_ptr, offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn,
                   part_ptr, scale_ptr, lr, pre_scale, clip_threshold, CLIP, INTERPRET)


def adapm_dense_update(W, G, M, V, *, beta1: float, c1: float, v_keep: float, v_add: float,
                       eps: float, c2: float, lr: float, pre_scale: float,
                       clip_mode: str = "elementwise", clip_threshold: float = 1.0) -> None:
    """Same contract as ``lowrank_fused.reference.adapm_dense_update`` (in place on M, V, W)."""
    passes, clamp = clip_setup(clip_mode, clip_threshold)
    m, n = W.shape
    if m * n == 0:   # nothing to fuse: the reference's (empty) operations, same results
        from lowrank_fused.reference.adapm_dense_update import adapm_dense_update_ref

        adapm_dense_update_ref(W, G, M, V, beta1=beta1, c1=c1, v_keep=v_keep, v_add=v_add,
                               eps=eps, c2=c2, lr=lr, pre_scale=pre_scale, clip_mode=clip_mode,
                               clip_threshold=clip_threshold)
        return
    fp32 = dummy(W.device)
    has_m = M is not None
    Mk = M if has_m else fp32
    blocks = V.shape != W.shape
    if blocks:
        h = block_means_denominator(G, V, v_keep=v_keep, v_add=v_add, eps=eps, c2=c2)
        rpb, Vk = m // V.numel(), fp32
    else:
        h, rpb, Vk = fp32, 1, V
    bm, bn = elementwise_tiles(BLOCK_M, BLOCK_N)
    grid = (cdiv(m, bm), cdiv(n, bn))
    part = scale = fp32
    if passes[0] == RMS_STATS:
        part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=W.device)
    for clip in passes:
        if clip == RMS_APPLY:
            scale = rms_scale(part, m * n, clip_threshold)
        _adapm_dense_update_kernel[grid](
            W, G, Mk, Vk, h, scale, part, m, n, rpb,
            W.stride(0), W.stride(1), G.stride(0), G.stride(1), Mk.stride(0), Mk.stride(-1),
            Vk.stride(0), Vk.stride(-1),
            as_fp32(beta1), float(c1), float(v_keep), float(v_add), float(eps), float(c2),
            float(lr), float(pre_scale), clamp,
            BLOCK_M=bm, BLOCK_N=bn, HAS_M=has_m, V_BLOCKS=blocks, CLIP=clip,
            INTERPRET=interpreting(), num_warps=NUM_WARPS,
        )


def aot_variants():
    """Every compilation ``adapm_dense_update`` can launch on a GPU: (W/G, state) dtypes x
    (full / no momentum) x (elementwise / block-mean V) x pass (clamp, rms stats, rms apply).
    The block-mean kernels are listed by ``grouped_adapm_update``."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "ROWS_PER_BLOCK", "stride_wm", "stride_wn",
                               "stride_gm", "stride_gn", "stride_mm", "stride_mn", "stride_vm",
                               "stride_vn")}
    scalars = {a: "fp32" for a in ("beta1", "c1", "v_keep", "v_add", "eps", "c2", "lr",
                                   "pre_scale", "clip_threshold")}
    seen = set()
    for w_t, s_t in DTYPE_PAIRS:
        for has_m in (True, False):
            for blocks in (False, True):
                m_t = s_t if has_m else "fp32"
                v_t = "fp32" if blocks else s_t
                if (w_t, m_t, v_t, has_m, blocks) in seen:
                    continue
                seen.add((w_t, m_t, v_t, has_m, blocks))
                for clip in (CLAMP, RMS_STATS, RMS_APPLY):
                    yield Variant(_adapm_dense_update_kernel,
                                  {"w_ptr": "*" + w_t, "g_ptr": "*" + w_t, "m_ptr": "*" + m_t,
                                   "v_ptr": "*" + v_t, "h_ptr": "*fp32", "scale_ptr": "*fp32",
                                   "part_ptr": "*fp32", **ints, **scalars},
                                  dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_M=has_m,
                                       V_BLOCKS=blocks, CLIP=clip, INTERPRET=False),
                                  NUM_WARPS, 3)
