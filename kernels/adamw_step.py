"""Dense AdamW step for the non-projected parameters (docs/methods/adamw.md).

One pass: read G, read/write M, V and W (22 bytes per element with bf16 G/W and fp32 states).
``W = W*pre_scale``; Adam moments; ``W -= lr*(M/c1)/(sqrt(V/c2)+eps)``; ``W -= post_decay*W``.
With a ``skip`` flag (0-dim bool on the device) holding True every program returns before any
store (W, M, V keep their bits); without one the launcher passes a cached False flag.
"""
import triton
import triton.language as tl

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, adam_normalized_step, cdiv,
                      interpreting, skip_flag, to_storage)


@triton.jit
def _adamw_step_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr, skip_ptr, numel,
    lr, beta1, beta2, eps, c1, c2, pre_scale, post_decay,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    if tl.load(skip_ptr):   # the step is skipped: nothing is written
        return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nrm = adam_normalized_step(g, m_ptr, v_ptr, offs, mask, beta1, beta2, eps, c1, c2, INTERPRET)
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * nrm
    if post_decay != 0.0:
        w = w - post_decay * w
    tl.store(w_ptr + offs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def adamw_step(W, G, M, V, *, lr, beta1, beta2, eps, c1, c2, pre_scale, post_decay,
               skip=None) -> None:
    tensors = (W, G, M, V)
    if not all(t.is_contiguous() for t in tensors):
        work = [t.contiguous() for t in tensors]
        adamw_step(*work, lr=lr, beta1=beta1, beta2=beta2, eps=eps, c1=c1, c2=c2,
                   pre_scale=pre_scale, post_decay=post_decay, skip=skip)
        for dst, src in zip((W, M, V), (work[0], work[2], work[3])):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    numel = W.numel()
    if numel == 0:
        return
    _adamw_step_kernel[(cdiv(numel, ELEMENTWISE_BLOCK),)](
        W, G, M, V, skip_flag(skip, W.device), numel, float(lr), float(beta1), float(beta2),
        float(eps), float(c1), float(c2), float(pre_scale), float(post_decay),
        BLOCK=ELEMENTWISE_BLOCK, INTERPRET=interpreting(), num_warps=ELEMENTWISE_WARPS,
    )


def aot_variants():
    from lowrank_fused.testing.aot import Variant

    scalars = {a: "fp32" for a in ("lr", "beta1", "beta2", "eps", "c1", "c2", "pre_scale",
                                   "post_decay")}
    for w_t in ("fp32", "bf16", "fp16"):
        for s_t in sorted({"fp32", w_t}):
            yield Variant(_adamw_step_kernel,
                          {"w_ptr": "*" + w_t, "g_ptr": "*" + w_t, "m_ptr": "*" + s_t,
                           "v_ptr": "*" + s_t, "skip_ptr": "*i1", "numel": "i32", **scalars},
                          dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
