"""Adafactor step, HF version (docs/methods/adafactor.md; K6 in docs/bytes.md), fused.

Factored form, W and G (B, m, n) in their storage dtypes (any strides), three passes over G:

  1. ``_adafactor_stats_kernel``: per (m-tile, n-tile) of each matrix, the row and column
     sums of ``q = g^2 + eps1`` into small partial-sum buffers, ``(n/BLOCK_N, B, m)`` and
     ``(m/BLOCK_M, B, n)``. Torch adds the partials in a fixed order (deterministic, no atomics)
     and updates ``row``, ``col`` and the factors ``rf = rsqrt(row/mean(row))``,
     ``cf = rsqrt(col)`` on those (B, m) and (B, n) vectors.
  2. ``_adafactor_sumsq_kernel``: per tile, ``sum(U^2)`` with ``U = rf*cf*g`` and, with
     ``scale_parameter``, ``sum(W^2)`` (W before this step) into one partial per program.
     Torch turns them into the device scalars ``clip = max(1, RMS(U)/d)``,
     ``a = rho*max(eps2, RMS(W))`` (or rho) and ``-weight_decay*a``: a 3-element buffer the
     last pass reads, so nothing is read back to the host.
  3. ``_adafactor_apply_kernel``: ``U = a*(rf*cf*g)/clip``; momentum ``exp_avg``; weight decay;
     ``W -= U``, W stored in its own dtype.

Bytes per element (bf16 G and W): 3 reads of G (6) + W read and write (4) = 10; plus a read of
W for RMS(W) with ``scale_parameter`` (12); plus 8 with momentum (fp32 ``exp_avg`` read and
write). No m x n temporary: the launcher allocates only the partial sums (about
``B*(m*n/BLOCK_N + m*n/BLOCK_M)`` floats), the (B, m) and (B, n) factors, and scalars.

Unfactored form (flat W, G, V of one shape), two passes: ``_adafactor_vec_stats_kernel``
updates V and writes per-program partials of ``sum(U^2)`` (and ``sum(W^2)``);
``_adafactor_vec_apply_kernel`` recomputes ``U = rsqrt(V)*g`` from the stored V and applies.
Bytes per element: G read twice (4), fp32 V read, written, read again (12), W read for
RMS(W) and read/written (6): 22 with ``scale_parameter`` (20 without), plus 8 with momentum.

Statistics (row, col, V) and exp_avg must be fp32 (as the optimizers keep them); the launcher
raises ``TypeError`` otherwise.

All math fp32; every division and square root is IEEE-rounded (``div_rn``, ``sqrt_rn``), so the
GPU result agrees with the eager reference to fp32 rounding.
"""
import torch
import triton
import triton.language as tl

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, interpreting, load_tile,
                      tile_offsets, to_storage)

# factored tiles: one configuration for every shape (BLOCK_N spans the contiguous dimension)
TILE_M, TILE_N, TILE_WARPS = 32, 128, 8


@triton.jit
def _tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(matrix, m-tile, n-tile) of a flat program id; n-tiles of one row slab are adjacent."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_m = tl.cdiv(M, BLOCK_M)
    pid_n = pid % tiles_n
    rest = pid // tiles_n
    return rest // tiles_m, rest % tiles_m, pid_n


@triton.jit
def _adafactor_stats_kernel(
    g_ptr, rowp_ptr, colp_ptr, B, M, N, stride_gb, stride_gm, stride_gn, eps1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pass 1: row and column partial sums of ``g^2 + eps1`` of one tile.
    ``rowp[pid_n, b, i]`` and ``colp[pid_m, b, j]`` (contiguous fp32)."""
    pid = tl.program_id(0).to(tl.int64)
    b, pid_m, pid_n = _tile(pid, M, N, BLOCK_M, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr + b * stride_gb, offs_m, offs_n, stride_gm, stride_gn, mask)
    q = tl.where(mask, g * g + eps1, 0.0)
    tl.store(rowp_ptr + (pid_n * B + b) * M + offs_m, tl.sum(q, axis=1), mask=mask_m)
    tl.store(colp_ptr + (pid_m * B + b) * N + offs_n, tl.sum(q, axis=0), mask=mask_n)


@triton.jit
def _adafactor_sumsq_kernel(
    g_ptr, w_ptr, rf_ptr, cf_ptr, part_ptr, M, N, NUM_TILES,
    stride_gb, stride_gm, stride_gn, stride_wb, stride_wm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALED: tl.constexpr,
):
    """Pass 2: ``part[pid] = sum(U^2)`` over the tile, ``U = (rf*cf)*g``; with ``SCALED`` also
    ``part[NUM_TILES + pid] = sum(W^2)``. ``rf`` (B, M) and ``cf`` (B, N) are contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    b, pid_m, pid_n = _tile(pid, M, N, BLOCK_M, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr + b * stride_gb, offs_m, offs_n, stride_gm, stride_gn, mask)
    rf = tl.load(rf_ptr + b * M + offs_m, mask=mask_m, other=0.0)
    cf = tl.load(cf_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    u = (rf[:, None] * cf[None, :]) * g
    tl.store(part_ptr + pid, tl.sum(tl.sum(u * u, axis=1), axis=0))
    if SCALED:
        w = tl.load(w_ptr + b * stride_wb + offs_m[:, None] * stride_wm
                    + offs_n[None, :] * stride_wn, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + NUM_TILES + pid, tl.sum(tl.sum(w * w, axis=1), axis=0))


@triton.jit
def _finish_update(u, w, e_ptrs, mask, scal_ptr, beta1, one_minus_beta1, weight_decay,
                   HAS_MOMENTUM: tl.constexpr):
    """Lines 7-11 from the unclipped fp32 ``U``: ``U = U/clip*a``; momentum; weight decay;
    returns the new fp32 W. ``scal = [clip, a, -weight_decay*a]`` on the device."""
    clip = tl.load(scal_ptr)
    a = tl.load(scal_ptr + 1)
    u = tl.div_rn(u, clip) * a
    if HAS_MOMENTUM:
        e = tl.load(e_ptrs, mask=mask, other=0.0)
        e = e * beta1 + one_minus_beta1 * u
        tl.store(e_ptrs, e, mask=mask)
        u = e
    if weight_decay != 0.0:
        w = w + w * tl.load(scal_ptr + 2)
    return w - u


@triton.jit
def _adafactor_apply_kernel(
    w_ptr, g_ptr, e_ptr, rf_ptr, cf_ptr, scal_ptr, M, N,
    stride_wb, stride_wm, stride_wn, stride_gb, stride_gm, stride_gn,
    stride_eb, stride_em, stride_en, beta1, one_minus_beta1, weight_decay,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Pass 3 (factored): read G, W (and exp_avg), write W (and exp_avg)."""
    pid = tl.program_id(0).to(tl.int64)
    b, pid_m, pid_n = _tile(pid, M, N, BLOCK_M, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr + b * stride_gb, offs_m, offs_n, stride_gm, stride_gn, mask)
    w_ptrs = w_ptr + b * stride_wb + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    rf = tl.load(rf_ptr + b * M + offs_m, mask=mask_m, other=0.0)
    cf = tl.load(cf_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    u = (rf[:, None] * cf[None, :]) * g
    e_ptrs = e_ptr + b * stride_eb + offs_m[:, None] * stride_em + offs_n[None, :] * stride_en
    w = _finish_update(u, w, e_ptrs, mask, scal_ptr, beta1, one_minus_beta1, weight_decay,
                       HAS_MOMENTUM)
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _adafactor_vec_stats_kernel(
    w_ptr, g_ptr, v_ptr, part_ptr, numel, NUM_BLOCKS, beta2t, one_minus_beta2t, eps1,
    BLOCK: tl.constexpr, SCALED: tl.constexpr,
):
    """Unfactored pass 1: ``V = beta2t*V + (1-beta2t)*(g^2+eps1)`` in place;
    ``part[pid] = sum((rsqrt(V)*g)^2)``; with ``SCALED`` ``part[NUM_BLOCKS+pid] = sum(W^2)``."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    v = v * beta2t + one_minus_beta2t * (g * g + eps1)
    tl.store(v_ptr + offs, v, mask=mask)
    u = tl.div_rn(1.0, tl.sqrt_rn(v)) * g
    tl.store(part_ptr + pid, tl.sum(tl.where(mask, u * u, 0.0), axis=0))
    if SCALED:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + NUM_BLOCKS + pid, tl.sum(w * w, axis=0))


@triton.jit
def _adafactor_vec_apply_kernel(
    w_ptr, g_ptr, v_ptr, e_ptr, scal_ptr, numel, beta1, one_minus_beta1, weight_decay,
    BLOCK: tl.constexpr, HAS_MOMENTUM: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Unfactored pass 2: ``U = rsqrt(V)*g`` from the stored V, then lines 7-11."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.div_rn(1.0, tl.sqrt_rn(v)) * g
    w = _finish_update(u, w, e_ptr + offs, mask, scal_ptr, beta1, one_minus_beta1, weight_decay,
                       HAS_MOMENTUM)
    tl.store(w_ptr + offs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def row_col_sums(G: torch.Tensor, eps1: float):
    """Row and column sums of ``g^2 + eps1`` of a (B, m, n) G (any strides, storage dtype):
    ``(rowsum (B, m), colsum (B, n))`` fp32, from pass 1's partials added in a fixed order."""
    B, M, N = G.shape
    tiles_m, tiles_n = cdiv(M, TILE_M), cdiv(N, TILE_N)
    f32 = dict(dtype=torch.float32, device=G.device)
    rowp = torch.empty((tiles_n, B, M), **f32)
    colp = torch.empty((tiles_m, B, N), **f32)
    _adafactor_stats_kernel[(B * tiles_m * tiles_n,)](
        G, rowp, colp, B, M, N, G.stride(0), G.stride(1), G.stride(2), float(eps1),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, num_warps=TILE_WARPS,
    )
    return (rowp[0] if tiles_n == 1 else rowp.sum(dim=0),
            colp[0] if tiles_m == 1 else colp.sum(dim=0))


def _scalars(part, numel, *, rho, eps2, clip_threshold, scale_parameter, weight_decay):
    """``[clip, a, -weight_decay*a]`` on the device from the per-program partial sums
    ``part`` (one row ``sum(U^2)``, a second ``sum(W^2)`` when ``scale_parameter``)."""
    sums = part.sum(dim=1)
    root = numel ** 0.5
    scal = torch.empty(3, dtype=torch.float32, device=part.device)
    torch.clamp((sums[0].sqrt() / root) / clip_threshold, min=1.0, out=scal[0])
    if scale_parameter:
        a = (sums[1].sqrt() / root).clamp(min=eps2) * rho
        scal[1].copy_(a)
        torch.mul(a, -weight_decay, out=scal[2])
    else:
        scal[1].fill_(rho)
        scal[2].fill_(-weight_decay * rho)
    return scal


def _check_states(*states):
    for t in states:
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"adafactor_step (triton) keeps fp32 statistics; got {t.dtype}")


def adafactor_step(W, G, row, col, V, exp_avg, *, rho, beta2t, eps1, eps2, clip_threshold,
                   scale_parameter, beta1, weight_decay) -> None:
    """Same contract as ``lowrank_fused.reference.adafactor_step``: in place on W, the
    statistics (``row``/``col`` or ``V``) and ``exp_avg``."""
    kw = dict(rho=rho, beta2t=beta2t, eps1=eps1, eps2=eps2, clip_threshold=clip_threshold,
              scale_parameter=scale_parameter, beta1=beta1, weight_decay=weight_decay)
    _check_states(row, col, V, exp_avg)
    if W.numel() == 0:   # nothing to launch; the reference defines what empty means
        from lowrank_fused.reference.adafactor_step import adafactor_step_ref

        adafactor_step_ref(W, G, row, col, V, exp_avg, **kw)
        return
    momentum = beta1 is not None
    b1 = float(beta1) if momentum else 0.0
    scal_kw = dict(rho=float(rho), eps2=float(eps2), clip_threshold=float(clip_threshold),
                   scale_parameter=bool(scale_parameter), weight_decay=float(weight_decay))
    if row is not None:
        _factored(W, G, row, col, exp_avg, b1, momentum, float(beta2t), float(eps1), scal_kw)
    else:
        _unfactored(W, G, V, exp_avg, b1, momentum, float(beta2t), float(eps1), scal_kw)


def _factored(W, G, row, col, exp_avg, beta1, momentum, beta2t, eps1, scal_kw):
    B, M, N = W.shape
    rowsum, colsum = row_col_sums(G, eps1)
    row.mul_(beta2t).add_(rowsum.div_(N), alpha=1.0 - beta2t)
    col.mul_(beta2t).add_(colsum.div_(M), alpha=1.0 - beta2t)
    rf = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().contiguous()
    cf = col.rsqrt().contiguous()
    tiles = B * cdiv(M, TILE_M) * cdiv(N, TILE_N)
    scaled = scal_kw["scale_parameter"]
    part = torch.empty((2 if scaled else 1, tiles), dtype=torch.float32, device=W.device)
    _adafactor_sumsq_kernel[(tiles,)](
        G, W, rf, cf, part, M, N, tiles, *G.stride(), *W.stride(),
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, SCALED=scaled, num_warps=TILE_WARPS,
    )
    scal = _scalars(part, W.numel(), **scal_kw)
    E = exp_avg if momentum else W   # a placeholder pointer without momentum (never read)
    _adafactor_apply_kernel[(tiles,)](
        W, G, E, rf, cf, scal, M, N, *W.stride(), *G.stride(), *E.stride(),
        beta1, 1.0 - beta1, scal_kw["weight_decay"],
        BLOCK_M=TILE_M, BLOCK_N=TILE_N, HAS_MOMENTUM=momentum, INTERPRET=interpreting(),
        num_warps=TILE_WARPS,
    )


def _unfactored(W, G, V, exp_avg, beta1, momentum, beta2t, eps1, scal_kw):
    tensors = (W, G, V) + ((exp_avg,) if momentum else ())
    if not all(t.is_contiguous() for t in tensors):
        work = [t.contiguous() for t in tensors]
        _unfactored(work[0], work[1], work[2], work[3] if momentum else None, beta1, momentum,
                    beta2t, eps1, scal_kw)
        for i, dst in enumerate(tensors):
            if i != 1 and dst.data_ptr() != work[i].data_ptr():   # all but G are updated
                dst.copy_(work[i])
        return
    numel = W.numel()
    blocks = cdiv(numel, ELEMENTWISE_BLOCK)
    scaled = scal_kw["scale_parameter"]
    part = torch.empty((2 if scaled else 1, blocks), dtype=torch.float32, device=W.device)
    _adafactor_vec_stats_kernel[(blocks,)](
        W, G, V, part, numel, blocks, beta2t, 1.0 - beta2t, eps1,
        BLOCK=ELEMENTWISE_BLOCK, SCALED=scaled, num_warps=ELEMENTWISE_WARPS,
    )
    scal = _scalars(part, numel, **scal_kw)
    _adafactor_vec_apply_kernel[(blocks,)](
        W, G, V, exp_avg if momentum else V, scal, numel, beta1, 1.0 - beta1,
        scal_kw["weight_decay"],
        BLOCK=ELEMENTWISE_BLOCK, HAS_MOMENTUM=momentum, INTERPRET=interpreting(),
        num_warps=ELEMENTWISE_WARPS,
    )


DTYPES = ("fp32", "bf16", "fp16", "fp64")   # W and G; fp64: Adafactor accepts fp64 parameters


def aot_variants():
    """Every compilation the launchers can ask for: W/G dtype x (SCALED | HAS_MOMENTUM)."""
    from lowrank_fused.testing.aot import Variant

    tile = dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N)
    s3 = lambda t: {f"stride_{t}{d}": "i32" for d in "bmn"}   # noqa: E731
    for x in DTYPES:
        p = "*" + x
        yield Variant(_adafactor_stats_kernel,
                      {"g_ptr": p, "rowp_ptr": "*fp32", "colp_ptr": "*fp32", "B": "i32",
                       "M": "i32", "N": "i32", **s3("g"), "eps1": "fp32"},
                      dict(tile), TILE_WARPS, 3)
        for scaled in (False, True):
            yield Variant(_adafactor_sumsq_kernel,
                          {"g_ptr": p, "w_ptr": p, "rf_ptr": "*fp32", "cf_ptr": "*fp32",
                           "part_ptr": "*fp32", "M": "i32", "N": "i32", "NUM_TILES": "i32",
                           **s3("g"), **s3("w")},
                          dict(tile, SCALED=scaled), TILE_WARPS, 3)
            yield Variant(_adafactor_vec_stats_kernel,
                          {"w_ptr": p, "g_ptr": p, "v_ptr": "*fp32", "part_ptr": "*fp32",
                           "numel": "i32", "NUM_BLOCKS": "i32", "beta2t": "fp32",
                           "one_minus_beta2t": "fp32", "eps1": "fp32"},
                          dict(BLOCK=ELEMENTWISE_BLOCK, SCALED=scaled), ELEMENTWISE_WARPS, 3)
        scalars = {"beta1": "fp32", "one_minus_beta1": "fp32", "weight_decay": "fp32"}
        for momentum in (False, True):
            e = "*fp32" if momentum else p   # without momentum the launcher passes W (or V)
            yield Variant(_adafactor_apply_kernel,
                          {"w_ptr": p, "g_ptr": p, "e_ptr": e, "rf_ptr": "*fp32",
                           "cf_ptr": "*fp32", "scal_ptr": "*fp32", "M": "i32", "N": "i32",
                           **s3("w"), **s3("g"), **s3("e"), **scalars},
                          dict(tile, HAS_MOMENTUM=momentum, INTERPRET=False), TILE_WARPS, 3)
            yield Variant(_adafactor_vec_apply_kernel,
                          {"w_ptr": p, "g_ptr": p, "v_ptr": "*fp32", "e_ptr": "*fp32",
                           "scal_ptr": "*fp32", "numel": "i32", **scalars},
                          dict(BLOCK=ELEMENTWISE_BLOCK, HAS_MOMENTUM=momentum, INTERPRET=False),
                          ELEMENTWISE_WARPS, 3)
