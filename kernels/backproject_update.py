"""K3 back-projection fused with the weight update and weight decay (docs/methods/galore.md;
decay orders in docs/conventions.md; K3 in docs/bytes.md).

Left (canonical) form, in place: ``W = W*pre_scale; W -= coef*(P @ N); W -= post_decay*W``
with W m x n in its storage dtype, P m x r, N r x n. The product ``P @ N`` lives only in the
GEMM accumulator: the epilogue reads the W tile, applies the update and both weight-decay
orders, and writes W once (round-to-nearest in W's dtype). No m x n temporary exists.

``skip`` (a 0-dim bool tensor on the device, ``lowrank_fused.ops``): every program loads it in the
epilogue and masks its store of W with it, so a skipped step leaves W's bits; the host never
reads it. A masked store rather than an early return: ptxas then allocates the registers of
the kernel without the flag (an early return raised some variants by up to 69 registers under
Triton 3.9; the store mask changes them by +27 at most and none on average), and a skipped
step, rare, may run its GEMM for nothing. Without a flag the launcher passes a cached False
one (``skip_flag``): one compiled kernel either way.
"""
from dataclasses import dataclass

import triton
import triton.language as tl

from ._common import (DOT_BF16_EMULATED, DOT_IEEE, DOT_TF32X3, DOT_TF32X3_EMULATED, cdiv,
                      config_mode, dot_mode, interpreter_tiles, interpreting, mma, skip_flag,
                      to_storage)


@dataclass(frozen=True)
class BackprojectConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Every config the launcher can choose (the AOT test compiles each under Triton 3.6 and 3.9
# and rejects spills; registers per variant: bench/results/aot-sm90.json). The epilogue holds
# the accumulator, the W tile and its pointers at once (and with the residual the G tile), so
# 128x128 tiles spill on sm_90; 128x64 with 8 warps does not (up to ~245 registers with the
# residual: the largest). ieee (FMA): 64x64 at 4 warps spilled under Triton 3.6 (255
# registers: ptxas holds each thread's slice of both operand tiles over BLOCK_K); at 8 warps
# the accumulator is 16 registers per thread and the kernel takes ~130-160. tf32x3 splits the
# operands into TF32 halves in registers: 64x64 at 8 warps only.
CONFIGS_FMA = (BackprojectConfig(64, 64, 32, 8, 3),)
CONFIGS_MMA = (BackprojectConfig(64, 64, 32, 8, 3), BackprojectConfig(128, 64, 32, 8, 3))
CONFIGS_TF32X3 = (BackprojectConfig(64, 64, 32, 8, 3),)
# the grouped K3 that also divides N by the class limiter's factors (``DIVIDE_N``), ieee:
# the division's temporaries made 64x64x32 spill under Triton 3.9 (28 stores); a 16-deep K
# slice holds half the N tile. The FMA dot adds k in order across the K slices, so the bits
# are those of BLOCK_K 32.
CONFIG_FMA_DIVIDE = BackprojectConfig(64, 64, 16, 8, 3)
# every GPU config, for tests that run each of them
GPU_CONFIGS = tuple(dict.fromkeys(CONFIGS_FMA + CONFIGS_MMA + CONFIGS_TF32X3))


def configs_for(mode: int):
    if mode in (DOT_IEEE, DOT_BF16_EMULATED):
        return CONFIGS_FMA
    return CONFIGS_TF32X3 if mode in (DOT_TF32X3, DOT_TF32X3_EMULATED) else CONFIGS_MMA


# CPU interpreter only (never compiled): fewer, larger tiles (see project.CONFIGS_INTERPRET)
CONFIG_INTERPRET = BackprojectConfig(128, 128, 64, 4, 1)


def choose_config(m: int, n: int, rank: int, mode: int) -> BackprojectConfig:
    if interpreter_tiles():
        return CONFIG_INTERPRET
    configs = configs_for(mode)
    return configs[0] if m * n <= 1 << 20 else configs[-1]


@triton.jit
def pn_tile(p_ptr, n_ptr, offs_m, offs_n, mask_m, mask_n, RANK,
            stride_pm, stride_pr, stride_nr, stride_nn,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            DOT_MODE: tl.constexpr, divisor=1.0, DIVIDE_N: tl.constexpr = False,
            INTERPRET: tl.constexpr = False):
    """The (BLOCK_M x BLOCK_N) tile of ``P @ N`` in fp32 (K = the rank, runtime): the GEMM
    part of this kernel and of the grouped one (``grouped_backproject_update.py``). With
    ``DIVIDE_N`` the operand is ``N / divisor``, each element divided (IEEE) and rounded to
    N's dtype as it is loaded: the bits of ``N`` divided in place by the norm-growth
    limiter's scale kernel and then read (its grouped form, fused into the back-projection)."""
    offs_k = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :] * stride_pr
    n_ptrs = n_ptr + offs_k[:, None] * stride_nr + offs_n[None, :] * stride_nn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, RANK, BLOCK_K):
        mask_k = (k + offs_k) < RANK
        p = tl.load(p_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        nn = tl.load(n_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DIVIDE_N:
            nn = to_storage(tl.div_rn(nn.to(tl.float32), divisor), n_ptr.dtype.element_ty,
                            INTERPRET)
        acc = mma(p, nn, acc, DOT_MODE)
        p_ptrs += BLOCK_K * stride_pr
        n_ptrs += BLOCK_K * stride_nr
    return acc


@triton.jit
def _backproject_update_kernel(
    w_ptr, x_ptr, p_ptr, n_ptr, g_ptr, cs_ptr, skip_ptr,
    M, N, RANK,
    stride_wm, stride_wn, stride_xm, stride_xn, stride_pm, stride_pr, stride_nr, stride_nn,
    stride_gm, stride_gn,
    coef, pre_scale, post_decay, res_coef,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = pn_tile(p_ptr, n_ptr, offs_m, offs_n, mask_m, mask_n, RANK, stride_pm, stride_pr,
                  stride_nr, stride_nn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
    mask = mask_m[:, None] & mask_n[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn
    w = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - coef * acc
    if HAS_RESIDUAL:   # - res_coef * G * col_scale: G read once, in its storage dtype
        g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        cs = tl.load(cs_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        w = w - res_coef * (g * cs[None, :])
    if post_decay != 0.0:
        w = w - post_decay * w
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    mask = tl.where(tl.load(skip_ptr), False, mask)   # a skipped step does not write W
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def backproject_update(W, P, N, *, coef: float, pre_scale: float, post_decay: float,
                       precision: str = "ieee", config: BackprojectConfig = None,
                       source=None, residual=None, col_scale=None, res_coef: float = 0.0,
                       skip=None) -> None:
    """In place on W, or ``W = source*pre_scale - coef*(P @ N) ...`` when ``source`` (same
    shape, any dtype and strides) is given: the GEMM-with-subtract-epilogue that LDAdam's error
    feedback and AdaMeM's residual update are made of. With ``residual`` (m x n, e.g. the
    gradient) and ``col_scale`` (n), the epilogue also subtracts
    ``res_coef * residual * col_scale[None, :]`` (before the post-update decay). ``skip``
    (optional 0-dim bool on the device): when True, W is not written (read on the device)."""
    X = W if source is None else source
    has_res = residual is not None
    Gr = residual if has_res else W
    cs = col_scale if has_res else W
    m, n = W.shape
    rank = P.shape[1]
    if m == 0 or n == 0:
        return
    mode = dot_mode(precision, W.device)
    cfg = config or choose_config(m, n, rank, config_mode(precision, W.device))
    grid = (cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N))
    _backproject_update_kernel[grid](
        W, X, P, N, Gr, cs, skip_flag(skip, W.device), m, n, rank,
        W.stride(0), W.stride(1), X.stride(0), X.stride(1), P.stride(0), P.stride(1),
        N.stride(0), N.stride(1), Gr.stride(0), Gr.stride(1),
        float(coef), float(pre_scale), float(post_decay), float(res_coef),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_MODE=mode, HAS_RESIDUAL=has_res, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def aot_variants():
    """Every (dtype, config, precision) compilation ``backproject_update`` can launch on a GPU."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "RANK", "stride_wm", "stride_wn", "stride_xm",
                               "stride_xn", "stride_pm", "stride_pr", "stride_nr", "stride_nn",
                               "stride_gm", "stride_gn")}
    scalars = {a: "fp32" for a in ("coef", "pre_scale", "post_decay", "res_coef")}
    # (W, source) dtypes: in place (same), or an fp32 source into a bf16 buffer and back;
    # with a residual term (AdaMeM): the gradient in the weight's dtype, fp32 column scales
    combos = [(w_t, x_t, s_t, False) for w_t, x_t, s_t in (
        ("fp32", "fp32", "fp32"), ("bf16", "bf16", "fp32"), ("bf16", "bf16", "bf16"),
        ("fp16", "fp16", "fp32"), ("bf16", "fp32", "fp32"), ("fp32", "bf16", "fp32"))]
    combos += [("fp32", "fp32", "fp32", True), ("bf16", "bf16", "fp32", True)]
    for w_t, x_t, s_t, has_res in combos:
        g_t, c_t = (w_t, "fp32") if has_res else (w_t, w_t)
        for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
            for cfg in configs_for(mode):
                yield Variant(_backproject_update_kernel,
                              {"w_ptr": "*" + w_t, "x_ptr": "*" + x_t, "p_ptr": "*" + s_t,
                               "n_ptr": "*" + s_t, "g_ptr": "*" + g_t, "cs_ptr": "*" + c_t,
                               "skip_ptr": "*i1", **ints, **scalars},
                              dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                                   DOT_MODE=mode, HAS_RESIDUAL=has_res, INTERPRET=False),
                              cfg.num_warps, cfg.num_stages)
