"""Bias-corrected Adafactor with a fixed beta2, no momentum, no clip and no relative step:
AdaMeM's optimizer for its non-low-rank parameters (docs/methods/adamem.md, "Routing";
K6 of docs/bytes.md without the RMS clip), fused.

Factored (``adafactor_bc_factored_step``, W and G m x n, any strides): AdaMeM's factored step
(``kernels/adamem_factored_step.py``) without a ``skip`` flag: the stats pass over G, the row
and column EMA pass (O(m + n)), the apply pass over G and W; no torch op in between.

  Bytes per element (bf16 G and W): 2 reads of G + W read and write = 8; no m x n temporary.

Unfactored (``adafactor_bc_unfactored_step``, flat W, G, V): one elementwise pass, like the
dense AdamW step without the first moment: G read, V read and write, W read and write
(14 bytes per element with bf16 G/W and fp32 V).

All math fp32, IEEE-rounded divisions and square roots; W stored in its own dtype.
"""
import torch
import triton
import triton.language as tl

from ._common import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, interpreting, to_storage
from .adamem_factored_step import adamem_factored_step


@triton.jit
def _adafactor_bc_vec_kernel(
    w_ptr, g_ptr, v_ptr, numel, lr, beta2, one_minus_beta2, eps1, eps, c2, pre_scale,
    post_decay, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Unfactored: ``V = beta2*V + (1-beta2)*(g^2+eps1)``; ``W = W*pre_scale``;
    ``W -= lr*g/(sqrt(V/c2)+eps)``; ``W -= post_decay*W``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    v = v * beta2 + one_minus_beta2 * (g * g + eps1)
    tl.store(v_ptr + offs, v, mask=mask)
    nrm = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, c2)) + eps)
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * nrm
    if post_decay != 0.0:
        w = w - post_decay * w
    tl.store(w_ptr + offs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check_states(*states):
    for t in states:
        if t.dtype != torch.float32:
            raise TypeError(f"adafactor_bc (triton) keeps fp32 statistics; got {t.dtype}")


def adafactor_bc_factored_step(W, G, row, col, *, lr: float, beta2: float, eps1: float,
                               eps: float, c2: float, pre_scale: float,
                               post_decay: float) -> None:
    """Same contract as ``lowrank_fused.reference.adafactor_bc_factored_step``: in place on
    W (m x n), row (m) and col (n)."""
    _check_states(row, col)
    adamem_factored_step(W, G, row, col, lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2,
                         pre_scale=pre_scale, post_decay=post_decay)


def adafactor_bc_unfactored_step(W, G, V, *, lr: float, beta2: float, eps1: float, eps: float,
                                 c2: float, pre_scale: float, post_decay: float) -> None:
    """Same contract as ``lowrank_fused.reference.adafactor_bc_unfactored_step``: in place on
    W and V (same shape as G)."""
    _check_states(V)
    kw = dict(lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2, pre_scale=pre_scale,
              post_decay=post_decay)
    if not all(t.is_contiguous() for t in (W, G, V)):
        work = [t.contiguous() for t in (W, G, V)]
        adafactor_bc_unfactored_step(*work, **kw)
        for dst, src in ((W, work[0]), (V, work[2])):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        return
    numel = W.numel()
    if numel == 0:
        return
    _adafactor_bc_vec_kernel[(cdiv(numel, ELEMENTWISE_BLOCK),)](
        W, G, V, numel, float(lr), float(beta2), 1.0 - float(beta2), float(eps1), float(eps),
        float(c2), float(pre_scale), float(post_decay),
        BLOCK=ELEMENTWISE_BLOCK, INTERPRET=interpreting(), num_warps=ELEMENTWISE_WARPS,
    )


def aot_variants():
    """W/G dtype (the parameter dtypes AdaMeM accepts) for the unfactored kernel; the factored
    step's are ``adamem_factored_step``'s, compiled there."""
    from lowrank_fused.testing.aot import Variant

    scalars = {a: "fp32" for a in ("lr", "eps", "c2", "pre_scale", "post_decay")}
    for x in ("fp32", "bf16", "fp16"):
        p = "*" + x
        yield Variant(_adafactor_bc_vec_kernel,
                      {"w_ptr": p, "g_ptr": p, "v_ptr": "*fp32", "numel": "i32",
                       "beta2": "fp32", "one_minus_beta2": "fp32", "eps1": "fp32", **scalars},
                      dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
