"""AdaMeM's factored Adafactor step (its matrices on Adafactor: the first and last layers,
docs/methods/adamem.md, "Routing"): the bias-corrected Adafactor with a fixed beta2, no
momentum, no clip, with the on-device ``skip`` flag (every write keeps its bits when it holds
True, without a host read). ``adafactor_bc_factored_step`` (``kernels/adafactor_bc_step.py``)
is this step without a flag.

Three launches, no torch op in between:

1. ``_adafactor_stats_kernel`` (the Adafactor stats pass): per tile, the row and column
   partial sums of ``g^2 + eps1`` into small partial buffers (``tiles_n x m`` and
   ``tiles_m x n`` fp32).
2. ``_adamem_factored_ema_kernel``: per block of the row (then column) vector, the partials
   added in tile order, ``/n`` (``/m``) and the EMA ``x*beta2 + (1-beta2)*mean`` into the
   new vectors (and the state, unless skipped); each row block also writes the sum of its new
   entries, so ``mean(row)`` needs no pass of its own.
3. ``_adamem_factored_apply_kernel``: ``mean(row)`` from those block sums (a fixed order),
   ``vhat = row_i*col_j/mean/c2`` in registers, ``W = W*pre_scale - lr*g/(sqrt(vhat)+eps)``,
   ``W -= post_decay*W``; no store when skipped.

Bytes per element (bf16 G and W): 2 reads of G + W read and write = 8; the vectors and the
partials are O(m + n).
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture

from ._common import cdiv, interpreting, load_tile, skip_flag, sum_fp32, tile_offsets, \
    to_storage
from ._grouped import KeptTables, scalar_table
from ._launch import launch_planned
from .adafactor_step import TILE_M, TILE_N, TILE_WARPS, _adafactor_stats_kernel, _tile

EMA_BLOCK, EMA_WARPS = 1024, 4       # the row / column EMA pass
MEAN_BLOCK = 16                      # the apply pass's sum of the row blocks' sums


@triton.jit
def _ema_block(x_ptr, part_ptr, new_ptr, offs, mask, TILES, LEN, COUNT, beta2,
               one_minus_beta2, skipped):
    """One block of a statistics vector ``x`` (row or column): its partials ``part[t, i]``
    (TILES rows of LEN, contiguous fp32) added in tile order, divided by COUNT,
    ``x*beta2 + (1-beta2)*mean`` stored at ``new_ptr`` and, unless ``skipped``, in ``x``;
    returns the new values."""
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for t in range(1, TILES):
        acc += tl.load(part_ptr + t * LEN + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x = x * beta2 + one_minus_beta2 * tl.div_rn(acc, COUNT.to(tl.float32))
    tl.store(new_ptr + offs, x, mask=mask)
    tl.store(x_ptr + offs, x, mask=tl.where(skipped, False, mask))
    return x


@triton.jit
def _adamem_factored_ema_kernel(
    row_ptr, col_ptr, rowp_ptr, colp_ptr, new_ptr, meanp_ptr, skip_ptr,
    M, N, TILES_M, TILES_N, ROW_BLOCKS, beta2, one_minus_beta2,
    BLOCK: tl.constexpr,
):
    """Block ``pid`` of the row (pid < ROW_BLOCKS) or the column vector: ``_ema_block`` with
    the row's partials ``rowp`` (TILES_N x M, divided by N) or the column's ``colp`` (TILES_M
    x N, divided by M), the new values at ``new_ptr`` (row at 0, column at M); a row block
    also stores the sum of its new entries at ``meanp_ptr + pid``."""
    pid = tl.program_id(0)
    skipped = tl.load(skip_ptr)
    if pid < ROW_BLOCKS:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        r = _ema_block(row_ptr, rowp_ptr, new_ptr, offs, mask, TILES_N, M, N, beta2,
                       one_minus_beta2, skipped)
        tl.store(meanp_ptr + pid, tl.sum(tl.where(mask, r, 0.0), axis=0))
    else:
        offs = (pid - ROW_BLOCKS) * BLOCK + tl.arange(0, BLOCK)
        _ema_block(col_ptr, colp_ptr, new_ptr + M, offs, offs < N, TILES_M, N, M, beta2,
                   one_minus_beta2, skipped)


@triton.jit
def _adamem_factored_apply_kernel(
    w_ptr, g_ptr, row_ptr, col_ptr, meanp_ptr, skip_ptr, scal_ptr, M, N, ROW_BLOCKS,
    stride_wm, stride_wn, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MEAN_BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One tile of W from the new ``row`` (M), ``col`` (N), both contiguous fp32, and
    ``mean(row)`` (the sum of the ROW_BLOCKS block sums at ``meanp_ptr``, / M); no store when
    ``skip_ptr`` holds True (a mask, not an early return: the GEMM-free tile kernel keeps its
    register allocation either way). The step's scalars (lr, eps, c2, pre_scale, post_decay)
    come from the fp32 table at ``scal_ptr`` (kept at one address by the bound call: what a
    CUDA-graph replay needs)."""
    lr = tl.load(scal_ptr)
    eps = tl.load(scal_ptr + 1)
    c2 = tl.load(scal_ptr + 2)
    pre_scale = tl.load(scal_ptr + 3)
    post_decay = tl.load(scal_ptr + 4)
    _, pid_m, pid_n = _tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N)
    offs_m, offs_n, mask_m, mask_n, mask = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    g = load_tile(g_ptr, offs_m, offs_n, stride_gm, stride_gn, mask)
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(row_ptr + offs_m, mask=mask_m, other=1.0)
    c = tl.load(col_ptr + offs_n, mask=mask_n, other=1.0)
    mean = tl.div_rn(sum_fp32(meanp_ptr, ROW_BLOCKS, MEAN_BLOCK), M.to(tl.float32))
    vhat = tl.div_rn(tl.div_rn(r[:, None] * c[None, :], mean), c2)
    nrm = tl.div_rn(g, tl.sqrt_rn(vhat) + eps)
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * nrm
    if post_decay != 0.0:
        w = w - post_decay * w
    mask = tl.where(tl.load(skip_ptr), False, mask)       # a skipped step writes no W
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _scalar_rows(lr, eps, c2, pre_scale, post_decay):
    """The apply kernel's scalar table rows (5 x 1 fp32)."""
    return [[float(lr)], [float(eps)], [float(c2)], [float(pre_scale)], [float(post_decay)]]


class _Buffers:
    """The step's O(m + n) fp32 buffers for an m x n matrix, in one allocation: the stats
    pass's partials (``rowp`` tiles_n x 1 x m, ``colp`` tiles_m x 1 x n), the new row and
    column side by side (``new``: m + n) and the row blocks' sums (``meanp``)."""

    def __init__(self, M, N, device):
        self.tiles_m, self.tiles_n = cdiv(M, TILE_M), cdiv(N, TILE_N)
        self.row_blocks = cdiv(M, EMA_BLOCK)
        self.blocks = self.row_blocks + cdiv(N, EMA_BLOCK)
        self.tiles = self.tiles_m * self.tiles_n
        sizes = (self.tiles_n * M, self.tiles_m * N, M + N, self.row_blocks)
        buf = torch.empty(sum(sizes), dtype=torch.float32, device=device)
        rowp, colp, new, meanp = buf.split(sizes)
        self.rowp, self.colp = rowp.view(self.tiles_n, 1, M), colp.view(self.tiles_m, 1, N)
        self.new, self.meanp = new, meanp
        self.new_row, self.new_col = new[:M], new[M:]


def _launch(buf, W, G, row, col, scal, beta2, eps1, skip, M, N, launch):
    """The three launches, through ``launch(kernel, grid, *args, **meta)``."""
    launch(_adafactor_stats_kernel, (buf.tiles,),
           G, buf.rowp, buf.colp, 1, M, N, M * G.stride(0), G.stride(0), G.stride(1),
           float(eps1), BLOCK_M=TILE_M, BLOCK_N=TILE_N, num_warps=TILE_WARPS)
    beta2 = float(beta2)
    flag = skip_flag(skip, W.device)
    launch(_adamem_factored_ema_kernel, (buf.blocks,),
           row, col, buf.rowp, buf.colp, buf.new, buf.meanp, flag, M, N, buf.tiles_m,
           buf.tiles_n, buf.row_blocks, beta2, 1.0 - beta2, BLOCK=EMA_BLOCK,
           num_warps=EMA_WARPS)
    launch(_adamem_factored_apply_kernel, (buf.tiles,),
           W, G, buf.new_row, buf.new_col, buf.meanp, flag, scal, M, N, buf.row_blocks,
           *W.stride(), *G.stride(), BLOCK_M=TILE_M, BLOCK_N=TILE_N, MEAN_BLOCK=MEAN_BLOCK,
           INTERPRET=interpreting(), num_warps=TILE_WARPS)


def _plain_launch(kernel, grid, *args, **meta):
    kernel[grid](*args, **meta)


def adamem_factored_step(W, G, row, col, *, lr: float, beta2: float, eps1: float, eps: float,
                         c2: float, pre_scale: float, post_decay: float, skip=None) -> None:
    """The factored step (in place on W (m x n, any strides), row (m) and col (n), fp32
    statistics) with ``skip``: None or a 0-dim bool tensor on W's device, never read on the
    host; when it holds True W, row and col keep their bits."""
    from lowrank_fused.ops import _check_skip

    _check_skip(skip, W.device)
    for name, t in (("row", row), ("col", col)):
        if t.dtype != torch.float32:
            raise TypeError(f"adamem_factored_step keeps fp32 statistics; {name} is {t.dtype}")
    M, N = W.shape
    if M == 0 or N == 0:
        from lowrank_fused.reference.adamem_factored_step import adamem_factored_step_ref

        adamem_factored_step_ref(W, G, row, col, lr=lr, beta2=beta2, eps1=eps1, eps=eps,
                                 c2=c2, pre_scale=pre_scale, post_decay=post_decay, skip=skip)
        return
    if not (row.is_contiguous() and col.is_contiguous()):
        work = [row.contiguous(), col.contiguous()]
        adamem_factored_step(W, G, *work, lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2,
                             pre_scale=pre_scale, post_decay=post_decay, skip=skip)
        row.copy_(work[0])
        col.copy_(work[1])
        return
    scal = scalar_table(_scalar_rows(lr, eps, c2, pre_scale, post_decay), W.device)
    _launch(_Buffers(M, N, W.device), W, G, row, col, scal, beta2, eps1, skip, M, N,
            _plain_launch)


class BoundAdamemFactoredStep:
    """``adamem_factored_step`` for a fixed matrix ``W`` (m x n) and its statistics ``row``
    (m) and ``col`` (n), checked once, here, with the partial sums and the new statistics
    in buffers kept from call to call: a call is the same three launches on them (the bits of
    ``adamem_factored_step``) and allocates nothing. A call takes the step's gradient (W's
    shape, dtype and device; any strides), the scalars and ``skip``."""

    def __init__(self, W, row, col):
        from lowrank_fused.ops import _check_float

        _check_float("W", W)
        if W.dim() != 2:
            raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
        M, N = W.shape
        for name, t, n in (("row", row, M), ("col", col, N)):
            if t.dtype != torch.float32 or tuple(t.shape) != (n,) or t.stride(0) != 1 \
                    or t.device != W.device:
                raise ValueError(f"{name} must be a contiguous fp32 vector of {n} on "
                                 f"{W.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
        self.W, self.row, self.col = W, row, col
        self.M, self.N, self.device = M, N, W.device
        self.buffers = _Buffers(M, N, W.device) if M and N else None
        self._tables = KeptTables(W.device)   # its scalar table, kept (a graph reads it)

    def __call__(self, G, *, lr: float, beta2: float, eps1: float, eps: float, c2: float,
                 pre_scale: float, post_decay: float, skip=None) -> None:
        from lowrank_fused.ops import _check_skip

        W, row, col, M, N = self.W, self.row, self.col, self.M, self.N
        if G.shape != W.shape or G.dtype != W.dtype or G.device != W.device:
            raise ValueError(f"G must have W's shape {tuple(W.shape)}, dtype {W.dtype} and "
                             f"device {W.device}, got {tuple(G.shape)} {G.dtype} {G.device}")
        _check_skip(skip, self.device)
        if M == 0 or N == 0:
            adamem_factored_step(W, G, row, col, lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2,
                                 pre_scale=pre_scale, post_decay=post_decay, skip=skip)
            return
        # the step's scalars first, then the device work as one capture unit: a replayed
        # CUDA graph reads the table and makes every launch of ``_run`` (beta2 and eps1,
        # which it takes by value, are in the optimizer's capture key)
        scal = self._tables.fill(_scalar_rows(lr, eps, c2, pre_scale, post_decay))
        _capture.unit(self._run, G, scal, float(beta2), float(eps1), skip)

    def _run(self, G, scal, beta2, eps1, skip):
        _launch(self.buffers, self.W, G, self.row, self.col, scal, beta2, eps1, skip, self.M,
                self.N, self._planned)

    def _planned(self, kernel, grid, *args, **meta):
        launch_planned(self, kernel, grid, *args, **meta)


def aot_variants():
    """W/G dtype (the parameter dtypes AdaMeM accepts) for the apply pass, and the EMA pass;
    the stats pass is ``adafactor_step``'s ``_adafactor_stats_kernel``, compiled there."""
    from lowrank_fused.testing.aot import Variant

    yield Variant(_adamem_factored_ema_kernel,
                  {"row_ptr": "*fp32", "col_ptr": "*fp32", "rowp_ptr": "*fp32",
                   "colp_ptr": "*fp32", "new_ptr": "*fp32", "meanp_ptr": "*fp32",
                   "skip_ptr": "*i1", "M": "i32", "N": "i32", "TILES_M": "i32",
                   "TILES_N": "i32", "ROW_BLOCKS": "i32", "beta2": "fp32",
                   "one_minus_beta2": "fp32"},
                  dict(BLOCK=EMA_BLOCK), EMA_WARPS, 3)
    for x in ("fp32", "bf16", "fp16"):
        p = "*" + x
        yield Variant(_adamem_factored_apply_kernel,
                      {"w_ptr": p, "g_ptr": p, "row_ptr": "*fp32", "col_ptr": "*fp32",
                       "meanp_ptr": "*fp32", "skip_ptr": "*i1", "scal_ptr": "*fp32",
                       "M": "i32", "N": "i32", "ROW_BLOCKS": "i32", "stride_wm": "i32",
                       "stride_wn": "i32", "stride_gm": "i32", "stride_gn": "i32"},
                      dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N, MEAN_BLOCK=MEAN_BLOCK,
                           INTERPRET=False), TILE_WARPS, 3)
