"""K8 moment transport between subspaces (docs/methods/adaptive_adamw.md A4,
docs/methods/ldadam.md lines 4 and 6; K8 in docs/bytes.md), for the three transports of the
dispatch table:

    moment_transport         (C @ M, (C*C) @ V)          AdaptiveAdamW, AdaMeM, AdaRankGrad "cc"
    moment_transport_linear  (C @ M, C @ V)              AdaRankGrad ``v_transport="linear"``
    ldadam_moment_transport  M_tr = C @ M,  V <- abs(((C*C) @ w + M_tr^2/bc1^2) * bc2),
                             w = V/bc2 - M^2/bc1^2       LDAdam's variance-aware form

with ``C = P_new^T @ P_old`` (r_new x r_old), left (canonical) form: P are m x r, the moments
r x n (a right-projected matrix passes ``Q^T`` and the transposed moments, as views).

Two launches:

1. ``C``: an m-long reduction, the K1 projection kernel (``project.py``) with ``G := P_old``
   and ``P := P_new``: both bases cast in the prologue, fp32 accumulation, split over m on a
   GPU (``project.choose_split_k``). C is the only temporary (r_new x r_old fp32).
2. ``_moment_transport_kernel``: the K = 2 r_old GEMM ``[C, C*C] @ [M ; w]`` as one K loop
   with two accumulators. Each step loads one C tile and forms ``C*C`` from it in registers
   (never stored), loads the M and V tiles once, builds w in the prologue (LDAdam) and feeds
   both products; the epilogue adds back ``M_tr^2/bc1^2`` and applies ``*bc2``, ``abs``
   (LDAdam) and stores in the moments' dtypes. M and V are read once per r_new tile (once in
   all when one tile covers r_new; the r tiles of a column slab are adjacent in the grid, so
   further reads come from L2): ``16S + 8C`` bytes at fp32 (row K8 of docs/bytes.md).

A program reads the rows of its column slab of V and writes rows of the same slab, so
LDAdam's in-place V is safe when one tile covers r_new; otherwise the new V goes through a
temporary of V's size. M and V may have different column counts (AdaMeM transports its r x 1
row statistics with M).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (DOT_BF16_EMULATED, DOT_IEEE, DOT_TF32X3, DOT_TF32X3_EMULATED, cdiv,
                      config_mode, dot_mode, interpreter_tiles, interpreting, mma, to_storage)
from .project import ProjectConfig, project

# the second product's right operand and epilogue (the V_FORM constexpr)
V_SQUARED, V_LINEAR, V_LDADAM = 0, 1, 2
_TORCH_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TransportConfig:
    BLOCK_R: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# Every config the launcher can choose (the AOT test compiles each and rejects spills).
# Two accumulators and, for LDAdam, w built in registers: 8 warps everywhere (4 warps spill
# on sm_90). fp32 FMA (ieee) holds a K slice per thread, so BLOCK_K = 16 (32 spills);
# tensor-core modes cover r_new <= 128 with one tile, so M and V are read once.
CONFIGS_FMA = (TransportConfig(32, 64, 16, 8, 3),)
CONFIGS_MMA = (TransportConfig(64, 64, 32, 8, 3), TransportConfig(128, 64, 32, 8, 3))
# tf32x3 holds TF32 halves of both operands in registers: both tiles above spilled under
# Triton 3.9 (8-68 bytes); 64x64 with BLOCK_K=16 takes ~155-180 registers under 3.6 and 3.9
CONFIGS_TF32X3 = (TransportConfig(64, 64, 16, 8, 3),)
# Under the interpreter (a few ms per program whatever its size) C comes from larger tiles
GRAM_CONFIG_INTERPRET = ProjectConfig(64, 128, 64, 4, 1)
# (P_old, P_new) dtypes the projection kernel is compiled for (project.aot_variants);
# other pairs are cast to fp32 first (m x r, once)
_GRAM_DTYPES = {(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)}


def configs_for(mode: int):
    if mode in (DOT_IEEE, DOT_BF16_EMULATED):
        return CONFIGS_FMA
    return CONFIGS_TF32X3 if mode in (DOT_TF32X3, DOT_TF32X3_EMULATED) else CONFIGS_MMA


def choose_config(r_new: int, mode: int) -> TransportConfig:
    configs = configs_for(mode)
    for cfg in configs:
        if r_new <= cfg.BLOCK_R:
            return cfg
    return configs[-1]


@triton.jit
def _moment_transport_kernel(
    c_ptr, m_ptr, v_ptr, mo_ptr, vo_ptr,
    R_NEW, R_OLD, N_M, N_V,
    stride_cr, stride_ck, stride_mk, stride_mn, stride_vk, stride_vn,
    stride_mor, stride_mon, stride_vor, stride_von,
    bc1_sq, bc2,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, V_FORM: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < R_NEW
    mask_nm = offs_n < N_M
    mask_nv = offs_n < N_V
    c_ptrs = c_ptr + offs_r[:, None] * stride_cr + offs_k[None, :] * stride_ck
    m_ptrs = m_ptr + offs_k[:, None].to(tl.int64) * stride_mk + offs_n[None, :] * stride_mn
    v_ptrs = v_ptr + offs_k[:, None].to(tl.int64) * stride_vk + offs_n[None, :] * stride_vn
    acc_m = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k in range(0, R_OLD, BLOCK_K):
        mask_k = (k + offs_k) < R_OLD
        c = tl.load(c_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        m = tl.load(m_ptrs, mask=mask_k[:, None] & mask_nm[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask_k[:, None] & mask_nv[None, :], other=0.0).to(tl.float32)
        if V_FORM == 2:     # LDAdam: the variance part of the old statistics (0 where masked)
            v = tl.div_rn(v, bc2) - tl.div_rn(m * m, bc1_sq)
        acc_m = mma(c, m, acc_m, DOT_MODE)
        if V_FORM == 1:     # linear
            acc_v = mma(c, v, acc_v, DOT_MODE)
        else:               # squared coefficients, formed here and never stored
            acc_v = mma(c * c, v, acc_v, DOT_MODE)
        c_ptrs += BLOCK_K * stride_ck
        m_ptrs += BLOCK_K * stride_mk
        v_ptrs += BLOCK_K * stride_vk
    if V_FORM == 2:         # add back the squared transported mean; abs, not a clamp
        acc_v = tl.abs((acc_v + tl.div_rn(acc_m * acc_m, bc1_sq)) * bc2)
    mo_ptrs = mo_ptr + offs_r[:, None].to(tl.int64) * stride_mor + offs_n[None, :] * stride_mon
    vo_ptrs = vo_ptr + offs_r[:, None].to(tl.int64) * stride_vor + offs_n[None, :] * stride_von
    tl.store(mo_ptrs, to_storage(acc_m, mo_ptr.dtype.element_ty, INTERPRET),
             mask=mask_r[:, None] & mask_nm[None, :])
    tl.store(vo_ptrs, to_storage(acc_v, vo_ptr.dtype.element_ty, INTERPRET),
             mask=mask_r[:, None] & mask_nv[None, :])


# --------------------------------------------------------------------------------------------
# argument checks (the transports are looked up directly by the optimizers: no ops.py layer)

def _check_matrix(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a matrix (2-D), got shape {tuple(t.shape)}")


def _check_args(P_new, P_old, M, V, **outs):
    """(m, r_new, r_old) after checking every tensor's type, shape and device."""
    named = dict(P_new=P_new, P_old=P_old, M=M, V=V, **outs)
    for name, t in named.items():
        _check_matrix(name, t)
    m, r_new = P_new.shape
    r_old = P_old.shape[1]
    if P_old.shape[0] != m:
        raise ValueError(f"P_old must have P_new's {m} rows (m x r_old), got shape "
                         f"{tuple(P_old.shape)}")
    for name, t in (("M", M), ("V", V)):
        if t.shape[0] != r_old:
            raise ValueError(f"{name} must have r_old = P_old.shape[1] = {r_old} rows, got "
                             f"shape {tuple(t.shape)}")
    devices = {t.device for t in named.values()}
    if len(devices) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{k}: {t.device}" for k, t in named.items()))
    return m, r_new, r_old


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _gram(P_new, P_old, precision):
    """``C = P_new^T @ P_old`` (r_new x r_old fp32) on the K1 projection kernel."""
    if (P_old.dtype, P_new.dtype) not in _GRAM_DTYPES:
        P_new, P_old = P_new.float(), P_old.float()
    C = torch.empty((P_new.shape[1], P_old.shape[1]), dtype=torch.float32,
                    device=P_new.device)
    project(P_old, P_new, C, precision=precision,
            config=GRAM_CONFIG_INTERPRET if interpreter_tiles() else None)
    return C


def _launch(C, M, V, M_out, V_out, *, v_form, precision, bc1=1.0, bc2=1.0, config=None):
    r_new, r_old = C.shape
    n_m, n_v = M.shape[1], V.shape[1]
    mode = dot_mode(precision, C.device)
    cfg = config or choose_config(r_new, config_mode(precision, C.device))
    grid = (cdiv(r_new, cfg.BLOCK_R), cdiv(max(n_m, n_v), cfg.BLOCK_N))
    _moment_transport_kernel[grid](
        C, M, V, M_out, V_out, r_new, r_old, n_m, n_v,
        C.stride(0), C.stride(1), M.stride(0), M.stride(1), V.stride(0), V.stride(1),
        M_out.stride(0), M_out.stride(1), V_out.stride(0), V_out.stride(1),
        float(bc1) * float(bc1), float(bc2),
        BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode,
        V_FORM=v_form, INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _transport(P_new, P_old, M, V, v_form, config):
    m, r_new, r_old = _check_args(P_new, P_old, M, V)
    M_out = torch.empty((r_new, M.shape[1]), dtype=M.dtype, device=M.device)
    V_out = torch.empty((r_new, V.shape[1]), dtype=V.dtype, device=V.device)
    if M_out.numel() + V_out.numel() == 0:
        return M_out, V_out
    if m == 0 or r_old == 0:        # C is empty or zero: so are the products
        return M_out.zero_(), V_out.zero_()
    # no precision argument (the reference's signature): torch's fp32 matmul setting decides,
    # as it does for the reference's matmuls
    precision = _TORCH_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")
    C = _gram(P_new, P_old, precision)
    _launch(C, M, V, M_out, V_out, v_form=v_form, precision=precision, config=config)
    return M_out, V_out


def moment_transport(P_new: torch.Tensor, P_old: torch.Tensor, M: torch.Tensor,
                     V: torch.Tensor, *, config: TransportConfig = None):
    """Same contract as ``lowrank_fused.reference.moment_transport``: new tensors
    ``(C @ M, (C*C) @ V)`` (r_new x n, contiguous, in the moments' dtypes) with
    ``C = P_new^T @ P_old``. Any strides; M and V may have different column counts. The GEMMs
    run at torch's fp32 matmul precision (``torch.get_float32_matmul_precision()``: "highest"
    is fp32 FMA)."""
    return _transport(P_new, P_old, M, V, V_SQUARED, config)


def moment_transport_linear(P_new: torch.Tensor, P_old: torch.Tensor, M: torch.Tensor,
                            V: torch.Tensor, *, config: TransportConfig = None):
    """Same contract as ``lowrank_fused.reference.moment_transport_linear``: new tensors
    ``(C @ M, C @ V)``; otherwise as ``moment_transport``."""
    return _transport(P_new, P_old, M, V, V_LINEAR, config)


def ldadam_moment_transport(P_new, P_old, M, V, M_tr, *, bc1: float, bc2: float,
                            precision: str = "ieee", config: TransportConfig = None) -> None:
    """Same contract as ``lowrank_fused.reference.ldadam_moment_transport``: ``M_tr = C @ M``
    and ``V <- abs(((C*C) @ (V/bc2 - M^2/bc1^2) + M_tr^2/bc1^2) * bc2)`` in place, M untouched,
    every tensor keeping its dtype. The rank is LDAdam's fixed r (V is overwritten in place,
    so r_new == r_old). ``precision`` is the GEMMs' operand precision."""
    m, r_new, r_old = _check_args(P_new, P_old, M, V, M_tr=M_tr)
    if r_new != r_old:
        raise ValueError(f"P_new must have r_old = P_old.shape[1] = {r_old} columns (V is "
                         f"transported in place), got shape {tuple(P_new.shape)}")
    if V.shape != M.shape:
        raise ValueError(f"V must have M's shape {tuple(M.shape)}, got {tuple(V.shape)}")
    if M_tr.shape != M.shape:
        raise ValueError(f"M_tr must have M's shape {tuple(M.shape)}, got "
                         f"{tuple(M_tr.shape)}")
    if M.numel() == 0:
        return
    if m == 0:      # C = 0: M_tr = 0 and V = abs(0 * bc2)
        M_tr.zero_()
        V.zero_()
        return
    C = _gram(P_new, P_old, precision)
    mode = dot_mode(precision, C.device)
    cfg = config or choose_config(r_new, config_mode(precision, C.device))
    one_tile = r_new <= cfg.BLOCK_R
    # each program reads every row of its column slab: in place only when no other program
    # writes rows of that slab, and never into an output that shares memory with M
    V_out = V if one_tile else torch.empty_like(V)
    M_out = M_tr if not _shares_memory(M_tr, M) and not _shares_memory(M_tr, V) else \
        torch.empty_like(M_tr)
    _launch(C, M, V, M_out, V_out, v_form=V_LDADAM, precision=precision, bc1=bc1, bc2=bc2,
            config=cfg)
    if V_out is not V:
        V.copy_(V_out)
    if M_out is not M_tr:
        M_tr.copy_(M_out)


def aot_variants():
    """Every (dtype, config, precision, form) compilation the launchers can ask for on a GPU.
    C's GEMM is ``project.py``'s kernel, whose variants are compiled there."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("R_NEW", "R_OLD", "N_M", "N_V", "stride_cr", "stride_ck",
                               "stride_mk", "stride_mn", "stride_vk", "stride_vn",
                               "stride_mor", "stride_mon", "stride_vor", "stride_von")}
    floats = {"bc1_sq": "fp32", "bc2": "fp32"}
    for s_t in ("fp32", "bf16", "fp16"):            # M and V (and their outputs) dtype
        for v_form in (V_SQUARED, V_LINEAR, V_LDADAM):
            for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
                for cfg in configs_for(mode):
                    yield Variant(_moment_transport_kernel,
                                  {"c_ptr": "*fp32", "m_ptr": "*" + s_t, "v_ptr": "*" + s_t,
                                   "mo_ptr": "*" + s_t, "vo_ptr": "*" + s_t, **ints, **floats},
                                  dict(BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N,
                                       BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, V_FORM=v_form,
                                       INTERPRET=False),
                                  cfg.num_warps, cfg.num_stages)
