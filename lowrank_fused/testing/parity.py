"""One reviewed tolerance table and the parity assertion every test uses.

Errors are normwise: ``max|actual - expected| / max|expected|``, so entries near zero do not
make a relative test meaningless. The budget comes from the dtype of the compared output and
the GEMM operand precision:

* fp32 output, ieee GEMM: 1e-5. fp32 rounding is 6e-8; a length-k reduction in another order
  differs by about sqrt(k) ulps, and Adam's division by sqrt(v)+eps can amplify that where
  v is tiny, so 1e-5 leaves two orders of margin while a wrong formula (1e-3 and up) fails.
* tf32x3 GEMM: each product is off by at most ~2^-21 relative (the dropped lo*lo term
  and the rounding of the lo parts), below the reorder budget above: as ieee.
* tf32 GEMM: operands rounded to 10 mantissa bits (4.9e-4 each): 3e-3.
* bf16 GEMM operands or a bf16 output: 1 bf16 ulp is 2^-8..2^-7 (3.9e-3..7.8e-3): 1e-2.
* trajectories of bf16 parameters: each step can flip the last bit of W, so 2e-2.

Loosening any entry shows up in a diff of this file; nothing is relaxed elsewhere.
"""
from __future__ import annotations

import torch

TOLERANCES = {
    # (what, dtype) -> normwise relative tolerance
    ("op", torch.float32): 1e-5,
    ("op", torch.bfloat16): 1e-2,
    ("op", torch.float16): 2e-3,
    ("trajectory", torch.float32): 1e-5,
    ("trajectory", torch.bfloat16): 2e-2,
    ("trajectory", torch.float16): 4e-3,
}
PRECISION_TOLERANCE = {"ieee": 0.0, "tf32x3": 0.0, "tf32": 3e-3, "bf16": 1e-2}


def tolerance(dtype: torch.dtype, kind: str = "op", precision: str = "ieee") -> float:
    return max(TOLERANCES[(kind, dtype)], PRECISION_TOLERANCE[precision])


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN so that any element a kernel fails to write is caught."""
    return t.fill_(float("nan"))


def assert_parity(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, name: str = "output"):
    """Normwise parity; NaN/inf in ``actual`` where ``expected`` is finite always fails."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    bad = torch.isfinite(e) & ~torch.isfinite(a)
    if bad.any():
        raise AssertionError(f"{name}: {int(bad.sum())} non-finite elements where the reference "
                             f"is finite (unwritten or overflowed), first at "
                             f"{tuple(bad.nonzero()[0].tolist())}")
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    rel = err / scale if scale > 0 else err
    if not rel <= rtol:
        raise AssertionError(f"{name}: normwise relative error {rel:.3e} > {rtol:.1e} "
                             f"(max abs err {err:.3e}, max |ref| {scale:.3e})")
    return rel
