"""Batched GEMM ``C[b] = A[b] @ B[b]`` for the batched subspace refresh (K7 of
docs/bytes.md): the two products of a power-iteration step ``Y = G (G^T Q)`` over a stack of
same-shape layers. A (batch, M, K) is read in its storage dtype (fp32/bf16/fp16, any strides:
``G^T`` is a transposed view) and cast in the prologue; B (batch or 1, K, N) fp32 (a batch
stride of 0 broadcasts one sketch); C (batch, M, N) fp32, fp32 accumulation.

Grid: (M tiles, N tiles, batch). N is the sketch width k or the rank (up to a few hundred):
one N tile covers it up to 256, so every program streams its rows of A once.

Two forms for GHA's moment transport (``kernels/gha_batch.py``), each tile the same code:
``_batched_matmul_square_kernel`` also stores ``C * C`` (its ``C = P_new^T P``), and
``_batched_matmul_pair_kernel`` makes two products of one shape in one launch (``C M`` and
``(C*C) V``: the batch axis of the grid runs over both).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (DOT_BF16_EMULATED, DOT_IEEE, DOT_TF32X3, DOT_TF32X3_EMULATED, cdiv,
                      config_mode, dot_mode, interpreter_tiles, mma)
from ._launch import PlannedLaunch, launch_planned


@dataclass(frozen=True)
class BmmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Every config the launcher can choose (the AOT test compiles each under Triton 3.6 and 3.9
# and rejects spills). The first whose BLOCK_N covers N (the rank or sketch width) is taken,
# so up to N = 256 one N tile spans it and every program streams its rows of A once (A is
# the m x n operand; a further N tile would read it again, from DRAM, since the N tiles of a
# row block are far apart in the grid). Registers, sm_90: the 64 x 256 fp32 accumulator is
# 64 per thread at 8 warps, the operand tiles as much again; tf32x3's hi/lo halves need a
# smaller tile for the same N (64 x 256 spilled under Triton 3.6 at BLOCK_K 16 and 32, and
# 32 x 256 at BLOCK_K 32; 32 x 256 x 16 at 4 stages holds 163-188 under both).
CONFIGS_FMA = (BmmConfig(32, 32, 32, 4, 2),)
CONFIGS_MMA = (BmmConfig(64, 32, 32, 4, 3), BmmConfig(64, 64, 32, 4, 3),
               BmmConfig(64, 128, 32, 8, 3), BmmConfig(64, 256, 32, 8, 3))
CONFIGS_TF32X3 = (BmmConfig(64, 32, 32, 4, 3), BmmConfig(64, 64, 32, 4, 3),
                  BmmConfig(64, 128, 32, 8, 3), BmmConfig(32, 256, 16, 8, 4))


def configs_for(mode: int):
    if mode in (DOT_IEEE, DOT_BF16_EMULATED):
        return CONFIGS_FMA
    return CONFIGS_TF32X3 if mode in (DOT_TF32X3, DOT_TF32X3_EMULATED) else CONFIGS_MMA


# CPU interpreter only (never compiled): fewer, larger tiles (see project.CONFIGS_INTERPRET)
CONFIG_INTERPRET = BmmConfig(128, 64, 64, 4, 1)


def choose_config(n: int, mode: int) -> BmmConfig:
    if interpreter_tiles():
        return CONFIG_INTERPRET
    cfgs = configs_for(mode)
    for cfg in cfgs:
        if n <= cfg.BLOCK_N:
            return cfg
    return cfgs[-1]


@triton.jit
def _bmm_tile(a_ptr, b_ptr, c_ptr, c2_ptr, pid_m, pid_n, pid_b, M, N, K,
              stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
              stride_cb, stride_cm, stride_cn,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              DOT_MODE: tl.constexpr, STORE_SQUARE: tl.constexpr):
    """Tile ``(pid_m, pid_n)`` of ``C[pid_b] = float32(A[pid_b]) @ B[pid_b]``; with
    ``STORE_SQUARE`` also ``C2 = C * C`` (fp32, C2 laid out as C). (A runtime choice inside
    the loop, e.g. squaring B as it is loaded for one of two products, more than doubled the
    FMA tiles' registers: the operands are loaded straight into the dot's layout only when
    nothing stands between the load and the dot.)"""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = (a_ptr + pid_b * stride_ab + offs_m[:, None].to(tl.int64) * stride_am
              + offs_k[None, :].to(tl.int64) * stride_ak)
    b_ptrs = (b_ptr + pid_b * stride_bb + offs_k[:, None].to(tl.int64) * stride_bk
              + offs_n[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = (k + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_MODE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    at = pid_b * stride_cb + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(c_ptr + at, acc, mask=mask)
    if STORE_SQUARE:
        tl.store(c2_ptr + at, acc * acc, mask=mask)


@triton.jit
def _batched_matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    _bmm_tile(a_ptr, b_ptr, c_ptr, c_ptr, tl.program_id(0), tl.program_id(1),
              tl.program_id(2).to(tl.int64), M, N, K,
              stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
              stride_cb, stride_cm, stride_cn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE, False)


@triton.jit
def _batched_matmul_square_kernel(
    a_ptr, b_ptr, c_ptr, c2_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """``_batched_matmul_kernel`` that also stores ``C2 = C * C`` (C2 laid out as C)."""
    _bmm_tile(a_ptr, b_ptr, c_ptr, c2_ptr, tl.program_id(0), tl.program_id(1),
              tl.program_id(2).to(tl.int64), M, N, K,
              stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn,
              stride_cb, stride_cm, stride_cn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE, True)


@triton.jit
def _batched_matmul_pair_kernel(
    a_ptr, b_ptr, c_ptr, a2_ptr, b2_ptr, c2_ptr,
    NB, M, N, K,
    stride_ab, stride_am, stride_ak, stride_a2b, stride_a2m, stride_a2k,
    stride_bb, stride_bk, stride_bn, stride_cb, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr,
):
    """Two products of one shape in one launch: ``C = A @ B`` for ``program_id(2) < NB``,
    ``C2 = A2 @ B2`` for the next NB (A and A2 one dtype, any strides each; B and B2 one
    layout, C and C2 one layout)."""
    z = tl.program_id(2)
    # the operands chosen before the tile (one loop for both); the strides by value (either
    # may be specialized to a constant 1 at a launch)
    second = z >= NB
    if second:
        a_base, b_base, c_base = a2_ptr, b2_ptr, c2_ptr
    else:
        a_base, b_base, c_base = a_ptr, b_ptr, c_ptr
    pid_b = tl.where(second, z - NB, z).to(tl.int64)
    s_ab = tl.where(second, stride_a2b, stride_ab)
    s_am = tl.where(second, stride_a2m, stride_am)
    s_ak = tl.where(second, stride_a2k, stride_ak)
    _bmm_tile(a_base, b_base, c_base, c_base, tl.program_id(0), tl.program_id(1), pid_b,
              M, N, K, s_ab, s_am, s_ak, stride_bb, stride_bk, stride_bn, stride_cb,
              stride_cm, stride_cn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE, False)


def batched_matmul(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
                   precision: str = "ieee", config: BmmConfig = None, owner=None) -> None:
    """``C[b] = float32(A[b]) @ B[b]`` into fp32 ``C`` (batch, M, N); B's batch may be 1.
    ``owner``: an object of a caller that makes this product on the same tensors every call
    (the launch is then planned and kept there: ``kernels/_launch.py``)."""
    nb, m, kk = A.shape
    n = B.shape[-1]
    if nb == 0 or m == 0 or n == 0:
        return
    if kk == 0:
        C.zero_()
        return
    mode = dot_mode(precision, A.device)
    cfg = config or choose_config(n, config_mode(precision, A.device))
    stride_bb = 0 if B.shape[0] == 1 else B.stride(0)
    grid = (cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N), nb)
    args = (A, B, C, m, n, kk, A.stride(0), A.stride(1), A.stride(2), stride_bb, B.stride(1),
            B.stride(2), C.stride(0), C.stride(1), C.stride(2))
    meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if owner is not None:
        launch_planned(owner, _batched_matmul_kernel, grid, *args, **meta)
    else:
        _batched_matmul_kernel[grid](*args, **meta)


def _check_product(A, B, C, *, broadcast_b: bool):
    """``(nb, m, k, n)`` of ``C = A @ B`` after checking the three tensors (``broadcast_b``: B's
    batch may be 1)."""
    for name, t in (("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor")
    nb, m, kk = A.shape
    n = B.shape[-1]
    if B.shape[1] != kk or B.shape[0] not in ((1, nb) if broadcast_b else (nb,)):
        batch = f"{nb} or 1" if broadcast_b else f"{nb}"
        raise ValueError(f"B must have shape ({batch}, {kk}, N), got {tuple(B.shape)}")
    if tuple(C.shape) != (nb, m, n):
        raise ValueError(f"C must have shape {(nb, m, n)}, got {tuple(C.shape)}")
    if B.dtype != torch.float32 or C.dtype != torch.float32:
        raise TypeError(f"B and C must be float32, got {B.dtype} and {C.dtype}")
    if not (A.device == B.device == C.device):
        raise ValueError(f"A, B and C must be on one device, got {A.device}, {B.device}, "
                         f"{C.device}")
    return nb, m, kk, n


def _check_like(name, t, C, ref="C"):
    """``t``: an fp32 tensor of ``C``'s (named ``ref``) shape, layout and device (addressed
    with C's strides)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(C.shape) or \
            t.dtype != torch.float32 or t.device != C.device:
        got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{name} must be float32 of shape {tuple(C.shape)} on {C.device}, "
                         f"got {got}")
    if t.stride() != C.stride():
        raise ValueError(f"{name} must have {ref}'s layout (strides {C.stride()}), got "
                         f"{t.stride()}")


class _BoundProducts:
    """A planned launch of fixed products (``kernels/_launch.py``): nothing when a product is
    empty, zeros into every output when its inner dimension is 0."""

    def _plan(self, kernel, args, outs, nb, m, kk, n, batches, precision, device):
        self.outs = outs
        self.empty = nb == 0 or m == 0 or n == 0
        self.zero = not self.empty and kk == 0
        self.args = args
        cfg = choose_config(n, config_mode(precision, device))
        self._launch = PlannedLaunch(
            kernel, (cdiv(max(m, 1), cfg.BLOCK_M), cdiv(max(n, 1), cfg.BLOCK_N), batches),
            dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                 DOT_MODE=dot_mode(precision, device), num_warps=cfg.num_warps,
                 num_stages=cfg.num_stages))

    def __call__(self):
        if self.empty:
            return
        if self.zero:
            for out in self.outs:
                out.zero_()
            return
        self._launch(*self.args)


class BoundBatchedMatmul(_BoundProducts):
    """``batched_matmul(A, B, C, precision=...)`` on fixed tensors (any strides, ``C`` too):
    shapes checked, tiles chosen and arguments laid out once; every call is one planned
    launch (``kernels/_launch.py``). For a plan's products that run every step.
    ``square_out``: an fp32 tensor laid out as ``C`` that receives ``C * C`` from the same
    launch (``_batched_matmul_square_kernel``)."""

    def __init__(self, A, B, C, *, precision: str = "ieee", square_out=None):
        nb, m, kk, n = _check_product(A, B, C, broadcast_b=True)
        if square_out is not None:
            _check_like("square_out", square_out, C)
        self.C, self.C2 = C, square_out
        stride_bb = 0 if B.shape[0] == 1 else B.stride(0)
        outs = (C,) if square_out is None else (C, square_out)
        args = (A, B, *outs, m, n, kk, A.stride(0), A.stride(1), A.stride(2), stride_bb,
                B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2))
        self._plan(_batched_matmul_kernel if square_out is None else
                   _batched_matmul_square_kernel, args, outs, nb, m, kk, n, max(nb, 1),
                   precision, A.device)


class BoundBatchedMatmulPair(_BoundProducts):
    """``C = float32(A) @ B`` and ``C2 = float32(A2) @ B2`` on fixed tensors, one planned
    launch for both (``_batched_matmul_pair_kernel``): two products of one shape, as a
    moment transport's ``C M`` and ``(C*C) V``. ``A`` and ``A2`` one shape and dtype (any
    strides each); ``B`` fp32 (any strides) with the batch of A, ``B2`` fp32 laid out as
    ``B``; ``C`` and ``C2`` fp32 of one layout. Each tile is the one ``batched_matmul`` makes
    (the same code, tiles and summation), so the same bits as two calls."""

    def __init__(self, A, B, C, A2, B2, C2, *, precision: str = "ieee"):
        for name, t in (("A2", A2), ("B2", B2), ("C2", C2)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"{name} must be a 3-D tensor")
        nb, m, kk, n = _check_product(A, B, C, broadcast_b=False)
        if tuple(A2.shape) != tuple(A.shape) or A2.dtype != A.dtype or A2.device != A.device:
            raise ValueError(f"A2 must be like A {tuple(A.shape)} {A.dtype} on {A.device}, "
                             f"got {tuple(A2.shape)} {A2.dtype} on {A2.device}")
        _check_like("B2", B2, B, "B")
        _check_like("C2", C2, C)
        self.C, self.C2 = C, C2
        args = (A, B, C, A2, B2, C2, nb, m, n, kk, A.stride(0), A.stride(1), A.stride(2),
                A2.stride(0), A2.stride(1), A2.stride(2), B.stride(0), B.stride(1),
                B.stride(2), C.stride(0), C.stride(1), C.stride(2))
        self._plan(_batched_matmul_pair_kernel, args, (C, C2), nb, m, kk, n, 2 * max(nb, 1),
                   precision, A.device)


def aot_variants():
    """Every (dtype, config, precision) compilation ``batched_matmul`` can launch on a GPU."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("M", "N", "K", "stride_ab", "stride_am", "stride_ak",
                               "stride_bb", "stride_bk", "stride_bn", "stride_cb", "stride_cm",
                               "stride_cn")}
    for a_t in ("fp32", "bf16", "fp16"):
        for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
            for cfg in configs_for(mode):
                yield Variant(_batched_matmul_kernel,
                              {"a_ptr": "*" + a_t, "b_ptr": "*fp32", "c_ptr": "*fp32", **ints},
                              dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                   BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode),
                              cfg.num_warps, cfg.num_stages)
    # GHA's moment transport: C = Pnf^T P with C * C (fp32 operands), then C M and (C*C) V
    # as a pair (the moments' stored dtype as A), in the modes it runs in (ieee, tf32x3)
    for mode in (0, 4):
        for cfg in configs_for(mode):
            yield Variant(_batched_matmul_square_kernel,
                          {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32",
                           "c2_ptr": "*fp32", **ints},
                          dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
                               DOT_MODE=mode), cfg.num_warps, cfg.num_stages)
    pair_ints = {a: "i32" for a in ("NB", "M", "N", "K", "stride_ab", "stride_am", "stride_ak",
                                    "stride_a2b", "stride_a2m", "stride_a2k", "stride_bb",
                                    "stride_bk", "stride_bn", "stride_cb", "stride_cm",
                                    "stride_cn")}
    for a_t in ("fp32", "bf16", "fp16"):
        for mode in (0, 4):
            for cfg in configs_for(mode):
                yield Variant(_batched_matmul_pair_kernel,
                              {"a_ptr": "*" + a_t, "b_ptr": "*fp32", "c_ptr": "*fp32",
                               "a2_ptr": "*" + a_t, "b2_ptr": "*fp32", "c2_ptr": "*fp32",
                               **pair_ints},
                              dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                   BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode),
                              cfg.num_warps, cfg.num_stages)
