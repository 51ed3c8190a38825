"""Bias-corrected Adafactor with a fixed beta2, no momentum, no clip and no relative step:
AdaMeM's optimizer for its non-low-rank parameters (docs/methods/adamem.md, "Routing";
K6 of docs/bytes.md without the RMS clip), fused.

Factored (``adafactor_bc_factored_step``, W and G m x n, any strides), two passes over G:

  1. ``row_col_sums`` (the Adafactor stats pass of ``adafactor_step``): row and column sums
     of ``g^2 + eps1`` into small partial buffers; torch adds them in a fixed order and updates
     ``row``, ``col`` and ``mean(row)`` (m-, n-vectors and a 0-d tensor: no host read).
  2. ``_adafactor_bc_apply_kernel``: ``vhat = row_i*col_j/mean(row)/c2`` in registers;
     ``W = W*pre_scale - lr*g/(sqrt(vhat)+eps)``; ``W -= post_decay*W``.

  Bytes per element (bf16 G and W): 2 reads of G + W read and write = 8; no m x n temporary.

Unfactored (``adafactor_bc_unfactored_step``, flat W, G, V): one elementwise pass, like the
dense AdamW step without the first moment: G read, V read and write, W read and write
(14 bytes per element with bf16 G/W and fp32 V).

All math fp32, IEEE-rounded divisions and square roots; W stored in its own dtype.
"""
import torch
import triton
import triton.language as tl

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, interpreting, load_tile,
                      tile_offsets, to_storage)
from .adafactor_step import TILE_M, TILE_N, TILE_WARPS, _tile, row_col_sums


@triton.jit
def _adafactor_bc_apply_kernel(
    w_ptr, g_ptr, row_ptr, col_ptr, mean_ptr, M, N,
    stride_wm, stride_wn, stride_gm, stride_gn,
    lr, eps, c2, pre_scale, post_decay,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Pass 2 (factored): one tile of W from the updated ``row`` (M), ``col`` (N), both
    contiguous fp32, and ``mean(row)`` (a 1-element buffer)."""
    _, pid_m, pid_n = _tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(row_ptr + offs_m, mask=mask_m, other=1.0)
    c = tl.load(col_ptr + offs_n, mask=mask_n, other=1.0)
    mean = tl.load(mean_ptr)
    vhat = tl.div_rn(tl.div_rn(r[:, None] * c[None, :], mean), c2)
    nrm = tl.div_rn(g, tl.sqrt_rn(vhat) + eps)
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * nrm
    if post_decay != 0.0:
        w = w - post_decay * w
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


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
    M, N = W.shape
    if M == 0 or N == 0:   # nothing to launch; the reference defines what empty means
        from lowrank_fused.reference.adafactor_bc_factored_step import (
            adafactor_bc_factored_step_ref)

        adafactor_bc_factored_step_ref(W, G, row, col, lr=lr, beta2=beta2, eps1=eps1, eps=eps,
                                       c2=c2, pre_scale=pre_scale, post_decay=post_decay)
        return
    beta2 = float(beta2)
    rowsum, colsum = row_col_sums(G.unsqueeze(0), float(eps1))
    new_row = row * beta2 + (1.0 - beta2) * rowsum[0].div_(N)
    new_col = col * beta2 + (1.0 - beta2) * colsum[0].div_(M)
    row.copy_(new_row)
    col.copy_(new_col)
    mean = new_row.mean()
    tiles = cdiv(M, TILE_M) * cdiv(N, TILE_N)
    _adafactor_bc_apply_kernel[(tiles,)](
        W, G, new_row, new_col, mean, M, N, *W.stride(), *G.stride(),
        float(lr), float(eps), float(c2), float(pre_scale), float(post_decay),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=interpreting(), num_warps=TILE_WARPS,
    )


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
    """W/G dtype (the parameter dtypes AdaMeM accepts) for both kernels; the factored stats
    pass is ``adafactor_step``'s ``_adafactor_stats_kernel``, compiled there."""
    from lowrank_fused.testing.aot import Variant

    scalars = {a: "fp32" for a in ("lr", "eps", "c2", "pre_scale", "post_decay")}
    for x in ("fp32", "bf16", "fp16"):
        p = "*" + x
        yield Variant(_adafactor_bc_apply_kernel,
                      {"w_ptr": p, "g_ptr": p, "row_ptr": "*fp32", "col_ptr": "*fp32",
                       "mean_ptr": "*fp32", "M": "i32", "N": "i32", "stride_wm": "i32",
                       "stride_wn": "i32", "stride_gm": "i32", "stride_gn": "i32", **scalars},
                      dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=False), TILE_WARPS, 3)
        yield Variant(_adafactor_bc_vec_kernel,
                      {"w_ptr": p, "g_ptr": p, "v_ptr": "*fp32", "numel": "i32",
                       "beta2": "fp32", "one_minus_beta2": "fp32", "eps1": "fp32", **scalars},
                      dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
