"""The fused GEMMs' operand precisions, eagerly: what the reference's GEMM ops compute for a
``precision`` (docs/precision.md).

Every mode accumulates in fp32; only the operands differ:

* ``ieee``: the fp32 operands as they are;
* ``tf32``: each operand rounded to TF32 (10 mantissa bits, round-to-nearest-even);
* ``bf16``: each operand rounded to bf16 (round-to-nearest-even);
* ``tf32x3``: each operand split, ``a = a_hi + a_lo`` with ``a_hi = tf32(a)`` and
  ``a_lo = tf32(a - a_hi)``, and ``a @ b = (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi`` (the
  ``a_lo @ b_lo`` term, below 2^-22 relative, is dropped), the order the kernels use.

A product of two TF32 (or bf16) values has at most 22 significant bits, so it is exact in
fp32 and the rounded operands give the same products on any fp32 matmul, TF32 tensor cores
included; the sums may still be added in another order than the kernels' (fp32 rounding).

On the CPU (whose fp32 matmul is always exact fp32) the rounding is emulated as above. On CUDA
the GPU's own arithmetic is used where torch has it: ``ieee`` runs torch's matmul at
"highest", ``tf32`` at "high" (TF32 tensor cores, which take the operands as the fused kernels'
TF32 dots do), ``bf16`` and ``tf32x3`` round or split the operands and multiply them at
"high" (exact products, as above), so an eager baseline pays no emulation it does not need.
"""
import contextlib

import torch

from lowrank_fused.ops import PRECISIONS


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 tensor of the nearest-even TF32 values of ``x`` (any float dtype); NaN stays NaN,
    values past the largest TF32 number become inf."""
    x = x.float().contiguous()
    bits = x.view(torch.int32)
    # int32 arithmetic wraps like the kernels' uint32; bit 13 is the last one kept
    bits = (bits + (0xFFF + ((bits >> 13) & 1))) & -0x2000
    return torch.where(torch.isnan(x), x, bits.view(torch.float32))


def round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` in fp32 rounded to the operand precision of ``tf32`` or ``bf16`` (as is for
    ``ieee``)."""
    if precision == "tf32":
        return round_tf32(x)
    if precision == "bf16":
        return x.to(torch.bfloat16).float()
    if precision in ("ieee", "tf32x3"):
        return x.float()
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@contextlib.contextmanager
def _torch_matmul_precision(setting: str):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def matmul(a: torch.Tensor, b: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """``a @ b`` (fp32, any float inputs, batched as torch.matmul) with the operands of the
    fused GEMMs' ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if a.device.type != "cuda":
        return _emulated(a, b, precision)
    if precision in ("ieee", "tf32"):
        with _torch_matmul_precision("highest" if precision == "ieee" else "high"):
            return torch.matmul(a.float(), b.float())
    with _torch_matmul_precision("high"):   # TF32 tensor cores, exact on these operands
        return _emulated(a, b, precision)


def _emulated(a, b, precision):
    if precision != "tf32x3":
        return torch.matmul(round_operand(a, precision), round_operand(b, precision))
    a = a.float()
    b = b.float()
    a_hi, b_hi = round_tf32(a), round_tf32(b)
    a_lo, b_lo = round_tf32(a - a_hi), round_tf32(b - b_hi)
    small = torch.matmul(a_lo, b_hi) + torch.matmul(a_hi, b_lo)
    # the kernels' order: the small products first; a NaN there (inf - inf in a_lo) is 0
    small = torch.nan_to_num(small, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    return torch.matmul(a_hi, b_hi) + small
