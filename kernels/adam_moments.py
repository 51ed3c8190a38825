"""K2 low-rank Adam moment update (ALGORITHMS.md section 4.3 lines 6-10, section 10 K2).

One pass over the r x n (or m x r) low-rank tensors: read R, M, V; write M, V and the
normalised step ``N = (M/c1) / (sqrt(V/c2) + eps)``. Per-step scalars are runtime arguments,
so a learning-rate schedule or the step counter never recompiles the kernel. The moments may
be stored in a narrower dtype (``faithful_dtypes``): N is computed from the stored values,
exactly as the reference does.
"""
import triton
import triton.language as tl

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, adam_normalized_step, cdiv,
                      interpreting, to_storage)


@triton.jit
def _adam_moments_kernel(
    r_ptr, m_ptr, v_ptr, n_ptr, numel,
    beta1, beta2, eps, c1, c2,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nrm = adam_normalized_step(r, m_ptr, v_ptr, offs, mask, beta1, beta2, eps, c1, c2, INTERPRET)
    tl.store(n_ptr + offs, to_storage(nrm, n_ptr.dtype.element_ty, INTERPRET), mask=mask)


def adam_moments(R, M, V, N, *, beta1: float, beta2: float, eps: float, c1: float,
                 c2: float) -> None:
    """In place on M, V; writes N. All four tensors share one shape."""
    tensors = (R, M, V, N)
    if not all(t.is_contiguous() for t in tensors):
        work = [t.contiguous() for t in tensors]
        adam_moments(*work, beta1=beta1, beta2=beta2, eps=eps, c1=c1, c2=c2)
        for dst, src in zip((M, V, N), work[1:]):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    numel = R.numel()
    if numel == 0:
        return
    _adam_moments_kernel[(cdiv(numel, ELEMENTWISE_BLOCK),)](
        R, M, V, N, numel, float(beta1), float(beta2), float(eps), float(c1), float(c2),
        BLOCK=ELEMENTWISE_BLOCK, INTERPRET=interpreting(), num_warps=ELEMENTWISE_WARPS,
    )


def aot_variants():
    from lowrank_fused.testing.aot import Variant

    scalars = {a: "fp32" for a in ("beta1", "beta2", "eps", "c1", "c2")}
    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_adam_moments_kernel,
                      {"r_ptr": "*fp32", "m_ptr": "*" + s_t, "v_ptr": "*" + s_t,
                       "n_ptr": "*" + s_t, "numel": "i32", **scalars},
                      dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
