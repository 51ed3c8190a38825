"""AdaMeM's factored Adafactor step (its matrices on Adafactor: the first and last layers,
docs/methods/adamem.md, "Routing") with the on-device ``skip`` flag: the launcher
``adafactor_bc_factored_step`` (``kernels/adafactor_bc_step.py``: the bias-corrected Adafactor
with a fixed beta2, no momentum, no clip) whose every write keeps its bits when ``skip`` holds
True, without a host read.

The two passes are that launcher's: the row and column sums of ``g^2 + eps1``
(``row_col_sums``), the EMAs of ``row`` and ``col`` in torch (stored through a select on the
flag), and ``_adamem_factored_apply_kernel``: ``_adafactor_bc_apply_kernel`` with its store of
W masked by the flag (a mask, not an early return: the GEMM-free tile kernel keeps its register
allocation either way). The same expressions in the same order, so the bits equal
``adafactor_bc_factored_step``'s when the flag is None or False.
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture

from ._common import cdiv, interpreting, load_tile, skip_flag, tile_offsets, to_storage
from ._grouped import KeptTables, scalar_table
from ._launch import launch_planned
from .adafactor_step import TILE_M, TILE_N, TILE_WARPS, _adafactor_stats_kernel, _tile, \
    row_col_sums


@triton.jit
def _adamem_factored_apply_kernel(
    w_ptr, g_ptr, row_ptr, col_ptr, mean_ptr, skip_ptr, scal_ptr, M, N,
    stride_wm, stride_wn, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One tile of W from the updated ``row`` (M), ``col`` (N), both contiguous fp32, and
    ``mean(row)`` (a 1-element buffer); no store when ``skip_ptr`` holds True. The step's
    scalars (lr, eps, c2, pre_scale, post_decay) come from the fp32 table at ``scal_ptr``
    (kept at one address by the bound call: what a CUDA-graph replay needs)."""
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
    mean = tl.load(mean_ptr)
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


def adamem_factored_step(W, G, row, col, *, lr: float, beta2: float, eps1: float, eps: float,
                         c2: float, pre_scale: float, post_decay: float, skip=None) -> None:
    """``adafactor_bc_factored_step`` (in place on W (m x n), row (m) and col (n), fp32
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
    beta2 = float(beta2)
    rowsum, colsum = row_col_sums(G.unsqueeze(0), float(eps1))
    new_row = row * beta2 + (1.0 - beta2) * rowsum[0].div_(N)
    new_col = col * beta2 + (1.0 - beta2) * colsum[0].div_(M)
    if skip is None:
        row.copy_(new_row)
        col.copy_(new_col)
    else:
        row.copy_(torch.where(skip, row, new_row))
        col.copy_(torch.where(skip, col, new_col))
    mean = new_row.mean()
    tiles = cdiv(M, TILE_M) * cdiv(N, TILE_N)
    _adamem_factored_apply_kernel[(tiles,)](
        W, G, new_row, new_col, mean, skip_flag(skip, W.device),
        scalar_table(_scalar_rows(lr, eps, c2, pre_scale, post_decay), W.device), M, N,
        *W.stride(), *G.stride(), BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=interpreting(),
        num_warps=TILE_WARPS,
    )


class BoundAdamemFactoredStep:
    """``adamem_factored_step`` for a fixed matrix ``W`` (m x n) and its statistics ``row``
    (m) and ``col`` (n), checked once, here, with the partial sums and the new statistics
    in buffers kept from call to call: a call writes them in place (``out=`` forms of the
    same torch ops in the same order, so the bits of ``adamem_factored_step``) and
    allocates nothing. A call takes the step's gradient (W's shape, dtype and device; any
    strides), the scalars and ``skip``."""

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
        self.tiles_m, self.tiles_n = cdiv(M, TILE_M), cdiv(N, TILE_N)
        f32 = dict(dtype=torch.float32, device=W.device)
        # the row and column sums side by side (the ops they share run once on both): pass
        # 1's single partial row written there, or the sums of its partials
        self.sums = torch.empty(M + N, **f32)
        self.rowsum, self.colsum = self.sums[:M], self.sums[M:]
        self.rowp = self.rowsum.view(1, 1, M) if self.tiles_n == 1 else torch.empty(
            (self.tiles_n, 1, M), **f32)
        self.colp = self.colsum.view(1, 1, N) if self.tiles_m == 1 else torch.empty(
            (self.tiles_m, 1, N), **f32)
        self.new = torch.empty(M + N, **f32)
        self.new_row, self.new_col = self.new[:M], self.new[M:]
        self.mean = torch.empty((), **f32)
        self.rowsum_out, self.colsum_out = self.rowsum.view(1, M), self.colsum.view(1, N)
        self.tiles = self.tiles_m * self.tiles_n
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
        # CUDA graph reads the table and makes every launch and product of ``_run`` (beta2
        # and eps1, which it takes by value, are in the optimizer's capture key)
        scal = self._tables.fill(_scalar_rows(lr, eps, c2, pre_scale, post_decay))
        _capture.unit(self._run, G, scal, float(beta2), float(eps1), skip)

    def _run(self, G, scal, beta2, eps1, skip):
        W, row, col, M, N = self.W, self.row, self.col, self.M, self.N
        launch_planned(
            self, _adafactor_stats_kernel, (self.tiles,),
            G, self.rowp, self.colp, 1, M, N, M * G.stride(0), G.stride(0), G.stride(1),
            float(eps1),
            BLOCK_M=TILE_M, BLOCK_N=TILE_N, num_warps=TILE_WARPS,
        )
        rowsum, colsum, new_row, new_col = self.rowsum, self.colsum, self.new_row, self.new_col
        if self.tiles_n > 1:
            torch.sum(self.rowp, dim=0, out=self.rowsum_out)
        if self.tiles_m > 1:
            torch.sum(self.colp, dim=0, out=self.colsum_out)
        # new = stat * beta2 + (1 - beta2) * (sum / count), as adamem_factored_step (the
        # same elementwise ops, row and column in one call where they share the operands)
        rowsum.div_(N)
        colsum.div_(M)
        self.sums.mul_(1.0 - beta2)
        torch.mul(row, beta2, out=new_row)
        torch.mul(col, beta2, out=new_col)
        self.new.add_(self.sums)
        if skip is None:
            row.copy_(new_row)
            col.copy_(new_col)
        else:
            torch.where(skip, row, new_row, out=row)
            torch.where(skip, col, new_col, out=col)
        torch.mean(new_row, dim=0, out=self.mean)
        launch_planned(
            self, _adamem_factored_apply_kernel, (self.tiles,),
            W, G, new_row, new_col, self.mean, skip_flag(skip, W.device), scal, M, N,
            *W.stride(), *G.stride(), BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=interpreting(), num_warps=TILE_WARPS,
        )


def aot_variants():
    """W/G dtype (the parameter dtypes AdaMeM accepts); the stats pass is
    ``adafactor_step``'s ``_adafactor_stats_kernel``, compiled there."""
    from lowrank_fused.testing.aot import Variant

    for x in ("fp32", "bf16", "fp16"):
        p = "*" + x
        yield Variant(_adamem_factored_apply_kernel,
                      {"w_ptr": p, "g_ptr": p, "row_ptr": "*fp32", "col_ptr": "*fp32",
                       "mean_ptr": "*fp32", "skip_ptr": "*i1", "scal_ptr": "*fp32",
                       "M": "i32", "N": "i32", "stride_wm": "i32", "stride_wn": "i32",
                       "stride_gm": "i32", "stride_gn": "i32"},
                      dict(BLOCK_M=TILE_M, BLOCK_N=TILE_N, INTERPRET=False), TILE_WARPS, 3)
