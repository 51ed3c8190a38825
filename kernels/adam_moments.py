"""K2 low-rank Adam moment update (docs/methods/galore.md; K2 in docs/bytes.md).

One pass over the r x n (or m x r) low-rank tensors: read R, M, V; write M, V and the
normalised step ``N = (M/c1) / (sqrt(V/c2) + eps)``. Per-step scalars are runtime arguments,
so a learning-rate schedule or the step counter never recompiles the kernel. The moments may
be stored in a narrower dtype (``faithful_dtypes``): N is computed from the stored values,
exactly as the reference does.

Optional side output (K2 in docs/bytes.md, the limiter's ``||N||^2``): ``sumsq``, a 1-element fp32
tensor, receives ``sum(N^2)`` of the stored N from the same pass, so the norm-growth limiter
(docs/methods/adaptive_adamw.md) does not read N for its norm. Each program writes the partial sum
of its block; a one-program kernel adds the partials in a fixed order (deterministic, no atomics).

``skip`` (a 0-dim bool tensor on the device, ``lowrank_fused.ops``): every program loads it and
returns before any store when it holds True, so M, V, N (and ``sumsq``) keep their bits; the
host never reads it. Without one the launcher passes a cached False flag (``skip_flag``): one
compiled kernel either way.
"""
import torch
import triton
import triton.language as tl

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, adam_normalized_step, cdiv,
                      interpreting, skip_flag, sum_fp32, to_storage)

SUM_BLOCK = 1024   # the partial-sum reduction: one program, 1024-wide chunks


@triton.jit
def _adam_moments_kernel(
    r_ptr, m_ptr, v_ptr, n_ptr, part_ptr, skip_ptr, numel,
    beta1, beta2, eps, c1, c2,
    BLOCK: tl.constexpr, HAS_SUMSQ: tl.constexpr, INTERPRET: tl.constexpr,
):
    """With ``HAS_SUMSQ``, ``part[pid] = sum(N^2)`` over the block, N as stored. Nothing is
    written when ``skip_ptr`` holds True."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nrm = adam_normalized_step(r, m_ptr, v_ptr, offs, mask, beta1, beta2, eps, c1, c2, INTERPRET)
    n_st = to_storage(nrm, n_ptr.dtype.element_ty, INTERPRET)
    if HAS_SUMSQ:   # reduced before N's store: the other order spills on sm_90 with fp16 N
        n_f = n_st.to(tl.float32)
        part = tl.sum(tl.where(mask, n_f * n_f, 0.0), axis=0)
    tl.store(n_ptr + offs, n_st, mask=mask)
    if HAS_SUMSQ:
        tl.store(part_ptr + pid, part)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """``out[0] = sum(part[0:count])`` (one program)."""
    tl.store(out_ptr, sum_fp32(part_ptr, count, BLOCK))


@triton.jit
def _sum_partials_unless_kernel(part_ptr, out_ptr, skip_ptr, count, BLOCK: tl.constexpr):
    """``_sum_partials_kernel`` unless ``skip_ptr`` holds True (then ``out`` is left alone):
    the second stage of a call with a ``skip`` flag."""
    if tl.load(skip_ptr):
        return
    tl.store(out_ptr, sum_fp32(part_ptr, count, BLOCK))


def _check_sumsq(sumsq):
    if sumsq.dtype != torch.float32 or sumsq.numel() != 1:
        raise TypeError(f"sumsq must be a 1-element float32 tensor, got {sumsq.dtype} with "
                         f"{sumsq.numel()} elements")


def adam_moments(R, M, V, N, *, beta1: float, beta2: float, eps: float, c1: float,
                 c2: float, sumsq=None, skip=None) -> None:
    """In place on M, V; writes N. All four tensors share one shape. ``sumsq`` (optional,
    1-element fp32) receives ``sum(N^2)`` of the stored N. ``skip`` (optional 0-dim bool on
    the device): when True nothing is written (read on the device only)."""
    if sumsq is not None:
        _check_sumsq(sumsq)
    tensors = (R, M, V, N)
    if not all(t.is_contiguous() for t in tensors):
        work = [t.contiguous() for t in tensors]
        adam_moments(*work, beta1=beta1, beta2=beta2, eps=eps, c1=c1, c2=c2, sumsq=sumsq,
                     skip=skip)
        for dst, src in zip((M, V, N), work[1:]):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    numel = R.numel()
    if numel == 0:
        if sumsq is not None:
            if skip is None:
                sumsq.zero_()
            else:   # on the device: 0 unless skipped
                sumsq.masked_fill_(~skip, 0.0)
        return
    blocks = cdiv(numel, ELEMENTWISE_BLOCK)
    has_sumsq = sumsq is not None
    part = torch.empty(blocks, dtype=torch.float32, device=R.device) if has_sumsq else N
    flag = skip_flag(skip, R.device)
    _adam_moments_kernel[(blocks,)](
        R, M, V, N, part, flag, numel, float(beta1), float(beta2), float(eps), float(c1),
        float(c2), BLOCK=ELEMENTWISE_BLOCK, HAS_SUMSQ=has_sumsq, INTERPRET=interpreting(),
        num_warps=ELEMENTWISE_WARPS,
    )
    if has_sumsq:
        if skip is None:
            _sum_partials_kernel[(1,)](part, sumsq, blocks, BLOCK=SUM_BLOCK, num_warps=4)
        else:
            _sum_partials_unless_kernel[(1,)](part, sumsq, skip, blocks, BLOCK=SUM_BLOCK,
                                              num_warps=4)


def aot_variants():
    """State dtype x ``HAS_SUMSQ`` (without it the launcher passes N as the unused ``part``),
    and the partial-sum reduction (with and without a ``skip`` flag)."""
    from lowrank_fused.testing.aot import Variant

    scalars = {a: "fp32" for a in ("beta1", "beta2", "eps", "c1", "c2")}
    for s_t in ("fp32", "bf16", "fp16"):
        for has_sumsq in (False, True):
            yield Variant(_adam_moments_kernel,
                          {"r_ptr": "*fp32", "m_ptr": "*" + s_t, "v_ptr": "*" + s_t,
                           "n_ptr": "*" + s_t, "part_ptr": "*fp32" if has_sumsq else "*" + s_t,
                           "skip_ptr": "*i1", "numel": "i32", **scalars},
                          dict(BLOCK=ELEMENTWISE_BLOCK, HAS_SUMSQ=has_sumsq, INTERPRET=False),
                          ELEMENTWISE_WARPS, 3)
    yield Variant(_sum_partials_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "count": "i32"},
                  dict(BLOCK=SUM_BLOCK), 4, 3)
    yield Variant(_sum_partials_unless_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32",
                                                "skip_ptr": "*i1", "count": "i32"},
                  dict(BLOCK=SUM_BLOCK), 4, 3)
