"""RSAdamW's random subspace drift (docs/methods/adaptive_adamw.md), left (canonical) form:

    P_new = orth(sqrt(1 - sigma^2) * P_old + sigma * Z)        (P_old given)
    P_new = orth(Z)                                             (first refresh)

``_subspace_drift_mix_kernel`` forms the mix in one pass over the two m x r operands (P_old in
its storage dtype and any strides: a right-projected basis arrives as a transposed view; Z
fp32), writing the fp32 ``Y``; ``orth`` is CholeskyQR2 (``lowrank_fused.subspace.cholesky_qr2``:
sign-canonical like the reference's Householder ``linalg.orth``, Householder fallback for an
ill-conditioned Y), so the bases agree to rounding. ``sign_canon=False`` asks for the QR
library's own signs, which only the reference reproduces: those calls run it.
"""
import math

import torch
import triton
import triton.language as tl

from ._common import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv


@triton.jit
def _subspace_drift_mix_kernel(p_ptr, z_ptr, y_ptr, numel, cols, stride_pm, stride_pr,
                               stride_zm, stride_zr, keep, mix, BLOCK: tl.constexpr):
    """``Y = keep*P + mix*Z`` over one block of the flat (row-major) m x r index space; fp32
    math, Y contiguous fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // cols
    col = offs % cols
    p = tl.load(p_ptr + row * stride_pm + col * stride_pr, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * stride_zm + col * stride_zr, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, keep * p + mix * z, mask=mask)


def subspace_drift(P_old, Z: torch.Tensor, *, sigma: float, sign_canon: bool = True):
    """Same contract as ``lowrank_fused.reference.subspace_drift.subspace_drift_ref``: returns
    the new fp32 m x r basis."""
    m, r = Z.shape
    if P_old is not None and tuple(P_old.shape) != (m, r):
        raise ValueError(f"P_old must have the shape of Z {(m, r)}, got {tuple(P_old.shape)}")
    if not sign_canon or r > m or m * r == 0:
        from lowrank_fused.reference.subspace_drift import subspace_drift_ref

        return subspace_drift_ref(P_old, Z, sigma=sigma, sign_canon=sign_canon)
    from lowrank_fused.subspace import cholesky_qr2

    if P_old is None:
        Y = Z.float()
    else:
        Y = torch.empty(m, r, dtype=torch.float32, device=Z.device)
        numel = m * r
        _subspace_drift_mix_kernel[(cdiv(numel, ELEMENTWISE_BLOCK),)](
            P_old, Z, Y, numel, r, P_old.stride(0), P_old.stride(1), Z.stride(0), Z.stride(1),
            math.sqrt(1.0 - float(sigma) ** 2), float(sigma),
            BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
    return cholesky_qr2(Y)


def aot_variants():
    """P_old in every state dtype (fp32 / bf16 / fp16); Z is the fp32 draw."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("numel", "cols", "stride_pm", "stride_pr", "stride_zm",
                               "stride_zr")}
    for p_t in ("fp32", "bf16", "fp16"):
        yield Variant(_subspace_drift_mix_kernel,
                      {"p_ptr": "*" + p_t, "z_ptr": "*fp32", "y_ptr": "*fp32", **ints,
                       "keep": "fp32", "mix": "fp32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK), ELEMENTWISE_WARPS, 3)
