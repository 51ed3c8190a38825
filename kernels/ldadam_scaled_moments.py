"""The elementwise parts of LDAdam's batched steady step (``LDAdamW._batch_step``,
docs/methods/ldadam.md lines 1, 4 + 6 and the error feedback's right operand) that take
per-step scalars, as three launches for a whole class, reading those scalars from a table kept
at one address (``lowrank_fused._tables.StagedTable``, refilled every step): the launches of a
steady step then have the same arguments at every step, which a replayed CUDA graph requires
(docs/engine.md, "Per-step scalars at fixed addresses").

The table holds one column (a class is one param group) of five fp32 rows, each a Python
float rounded once to fp32, as torch rounds a scalar operand of an fp32 op:

    0 coef_m = rho / (1 - beta1**t)     1 coef_a = 1 - rho
    2 bc2 = 1 - beta2**t                3 bc1_sq = (1 - beta1**t)**2
    4 c = beta1 / (1 - beta1)

The three kernels, over the class's stacked (count, ...) buffers as flat arrays (every buffer
contiguous; M and V the stored moments, fp32, bf16 or fp16; the rest fp32 scratch):

* ``_momentum_mix_kernel`` (line 1's left factor, and the transport's first half):
  ``V1 = coef_m*M + coef_a*R1`` and, in R1's place (R1 is dead after it),
  ``w = V/bc2 - M^2/bc1_sq``;
* ``_basis_mix_kernel`` (line 1's Y): ``Y = coef_a*Y + coef_m*corr`` in place;
* ``_transport_finish_kernel`` (after ``w2 = (C∘C) w``): unless ``skip`` holds True,
  ``V = |(w2 + M_tr^2/bc1_sq) * bc2|``, ``M = M_tr`` and, with error feedback, the right
  operand of the K = 2r back-projection ``L = [c*M_tr + R; -c*M]`` (from the old M); with a
  True flag nothing is written (the flag is never read on the host).

Each value is the torch expression it replaces (``LDAdamW._batch_step``'s reference path),
operation for operation: ``torch.mul(M, coef_m, out=V1)`` rounds the product to M's dtype
before the fp32 output (so does ``M*M`` and ``-c*M``; emulated with a round trip through
the storage dtype), ``add_(x, alpha=a)`` is one fused multiply-add (what torch's CPU and CUDA
kernels compute), a division by a scalar is an IEEE division (``div_rn``) and a store into a
bf16/fp16 moment rounds to nearest-even. Under the interpreter the bits equal torch's on the
CPU. On a GPU each result may differ from torch's by about one fp32 ulp per operation: torch's
CUDA kernels divide by a scalar as a multiplication by its reciprocal, and the compiler may
fuse ``c*M_tr + R`` into one FMA where torch rounds the product first (the tolerance of
``tests/test_ldadam_scaled_moments.py``).

Grid: (blocks of ``ELEMENTWISE_BLOCK`` elements,); offsets are int64.
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture
from lowrank_fused._tables import StagedTable
from lowrank_fused.ops import checked_skip

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, check_buffer, interpreting,
                      skip_flag, to_storage)
from ._launch import PlannedLaunch

ROWS = ("coef_m", "coef_a", "bc2", "bc1_sq", "c")
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _momentum_mix_kernel(
    m_ptr, r1_ptr, v_ptr, v1_ptr, scal_ptr, numel,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``V1 = coef_m*M + coef_a*R1`` and ``R1 <- V/bc2 - M^2/bc1_sq`` over block
    ``program_id(0)`` (each element's R1 is read before it is overwritten)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    coef_m = tl.load(scal_ptr)
    coef_a = tl.load(scal_ptr + 1)
    bc2 = tl.load(scal_ptr + 2)
    bc1_sq = tl.load(scal_ptr + 3)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r1 = tl.load(r1_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch.mul(M, coef_m, out=V1).add_(R1, alpha=coef_a): the product in M's dtype, then FMA
    mixed = to_storage(m * coef_m, m_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(v1_ptr + offs, tl.fma(r1, coef_a, mixed), mask=mask)
    # w = V/bc2 - (M*M in M's dtype)/bc1_sq
    sq = to_storage(m * m, m_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    tl.store(r1_ptr + offs, tl.div_rn(v, bc2) - tl.div_rn(sq, bc1_sq), mask=mask)


@triton.jit
def _basis_mix_kernel(y_ptr, corr_ptr, scal_ptr, numel, BLOCK: tl.constexpr):
    """``Y = coef_a*Y + coef_m*corr`` in place over block ``program_id(0)``
    (``Y.mul_(coef_a).add_(corr, alpha=coef_m)``: the product rounded, then one FMA)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    coef_m = tl.load(scal_ptr)
    coef_a = tl.load(scal_ptr + 1)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    corr = tl.load(corr_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, tl.fma(corr, coef_m, y * coef_a), mask=mask)


@triton.jit
def _transport_finish_kernel(
    v_ptr, m_ptr, w2_ptr, mtr_ptr, r_ptr, l_ptr, scal_ptr, skip_ptr, numel, HALF,
    HAS_EF: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Over block ``program_id(0)`` of the moments' elements, unless ``skip_ptr`` holds True:
    ``V = |(w2 + M_tr^2/bc1_sq) * bc2|``; with ``HAS_EF`` the back-projection's operand
    ``L_top = c*M_tr + R``, ``L_bot = -c*M`` (the old M; element i of a (count, a, b)
    moment is at ``i + (i // HALF)*HALF`` of L's top half and ``HALF`` further in its bottom
    half: ``HALF`` = a*b for L = (count, 2a, b), b for L = (count, a, 2b)); then ``M = M_tr``."""
    if tl.load(skip_ptr):
        return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    bc2 = tl.load(scal_ptr + 2)
    bc1_sq = tl.load(scal_ptr + 3)
    w2 = tl.load(w2_ptr + offs, mask=mask, other=0.0)
    mtr = tl.load(mtr_ptr + offs, mask=mask, other=0.0)
    v = tl.abs((w2 + tl.div_rn(mtr * mtr, bc1_sq)) * bc2)
    tl.store(v_ptr + offs, to_storage(v, v_ptr.dtype.element_ty, INTERPRET), mask=mask)
    if HAS_EF:
        c = tl.load(scal_ptr + 4)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0)
        top = offs + (offs // HALF) * HALF
        tl.store(l_ptr + top, mtr * c + r, mask=mask)
        bot = to_storage(m * -c, m_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        tl.store(l_ptr + top + HALF, bot, mask=mask)
    tl.store(m_ptr + offs, to_storage(mtr, m_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check(name, t, shape, dtypes, device):
    check_buffer(name, t, shape, dtypes, device, owner="M")


class BoundScaledMoments:
    """The three kernels on a batch's fixed tensors, with the batch's scalar table.

    ``M``, ``V``: the stacked moments (count, a, b), fp32, bf16 or fp16, written in place
    (``transport_finish``); ``R1``, ``V1``, ``mtr``, ``w2`` (count, a, b) and ``Y``, ``corr``
    (count, m, r) fp32 scratch; ``R`` (count, a, b) fp32 and ``L`` fp32, (count, 2a, b) for
    ``side="left"`` or (count, a, 2b) for ``"right"``, with error feedback, else None. Every
    tensor contiguous, on one device; checked once, here.

    ``fill(...)`` writes the step's scalars into the table (the host half of a step: it runs
    on a replayed step too); ``momentum_mix()``, ``basis_mix()`` and
    ``transport_finish(skip)`` each make one launch, none while a captured step is replayed
    (``lowrank_fused._capture``: the graph makes them)."""

    def __init__(self, M, V, R1, V1, Y, corr, mtr, w2, R=None, L=None, *, side="left"):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if not isinstance(M, torch.Tensor) or M.dim() != 3:
            raise ValueError("M must be a (count, a, b) tensor")
        device = M.device
        low = tuple(M.shape)
        _check("M", M, low, STATE_DTYPES, device)
        _check("V", V, low, STATE_DTYPES, device)
        f32 = (torch.float32,)
        for name, t in (("R1", R1), ("V1", V1), ("mtr", mtr), ("w2", w2)):
            _check(name, t, low, f32, device)
        if not isinstance(Y, torch.Tensor) or Y.dim() != 3 or Y.shape[0] != low[0]:
            raise ValueError(f"Y must be a ({low[0]}, m, r) tensor")
        _check("Y", Y, Y.shape, f32, device)
        _check("corr", corr, Y.shape, f32, device)
        if (R is None) != (L is None):
            raise ValueError("R and L go together (error feedback) or are both None")
        self.has_ef = R is not None
        count, a, b = low
        if self.has_ef:
            _check("R", R, low, f32, device)
            _check("L", L, (count, 2 * a, b) if side == "left" else (count, a, 2 * b), f32,
                   device)
        self.half = a * b if side == "left" else b
        self.M, self.V, self.R1, self.V1, self.Y, self.corr = M, V, R1, V1, Y, corr
        self.mtr, self.w2 = mtr, w2
        self.R = R if self.has_ef else mtr           # (not read without error feedback)
        self.L = L if self.has_ef else mtr
        self.numel, self.y_numel = M.numel(), Y.numel()
        self.device = device
        self.table = StagedTable(len(ROWS), 1, device)
        self.scal = self.table.table
        self._skip = None
        ew = dict(BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
        blocks = (cdiv(self.numel, ELEMENTWISE_BLOCK),)
        self._momentum_mix = PlannedLaunch(_momentum_mix_kernel, blocks,
                                           dict(ew, INTERPRET=interpreting()))
        self._basis_mix = PlannedLaunch(_basis_mix_kernel,
                                        (cdiv(self.y_numel, ELEMENTWISE_BLOCK),), ew)
        self._transport_finish = PlannedLaunch(_transport_finish_kernel, blocks, dict(
            ew, HAS_EF=self.has_ef, INTERPRET=interpreting()))

    def fill(self, *, coef_m, coef_a, bc2, bc1_sq, c):
        """The step's scalars into the table (each rounded once to fp32); returns it."""
        return self.table.fill([coef_m, coef_a, bc2, bc1_sq, c])

    def momentum_mix(self):
        """``V1 = coef_m*M + coef_a*R1``; ``R1 <- V/bc2 - M^2/bc1_sq``."""
        if _capture.replaying() or self.numel == 0:
            return
        self._momentum_mix(self.M, self.R1, self.V, self.V1, self.scal, self.numel)

    def basis_mix(self):
        """``Y = coef_a*Y + coef_m*corr``."""
        if _capture.replaying() or self.y_numel == 0:
            return
        self._basis_mix(self.Y, self.corr, self.scal, self.y_numel)

    def transport_finish(self, skip=None):
        """``V = |(w2 + M_tr^2/bc1_sq)*bc2|``, ``L = [c*M_tr + R; -c*M]`` (error feedback),
        ``M = M_tr``; nothing written when ``skip`` (a 0-dim bool on the device) holds True."""
        self._skip = checked_skip(skip, self.device, self._skip)
        if _capture.replaying() or self.numel == 0:
            return
        self._transport_finish(self.V, self.M, self.w2, self.mtr, self.R, self.L, self.scal,
                               skip_flag(skip, self.device), self.numel, self.half)


def aot_variants():
    """The moments' dtypes (fp32: LDAdam's state; bf16 and fp16: the parameter dtype of a
    state loaded from a ``faithful_dtypes`` run), with and without error feedback; the
    basis mix is fp32 scratch only."""
    from lowrank_fused.testing.aot import Variant

    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_momentum_mix_kernel,
                      {"m_ptr": "*" + s_t, "r1_ptr": "*fp32", "v_ptr": "*" + s_t,
                       "v1_ptr": "*fp32", "scal_ptr": "*fp32", "numel": "i32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
        for has_ef in (True, False):
            yield Variant(_transport_finish_kernel,
                          {"v_ptr": "*" + s_t, "m_ptr": "*" + s_t, "w2_ptr": "*fp32",
                           "mtr_ptr": "*fp32", "r_ptr": "*fp32", "l_ptr": "*fp32",
                           "scal_ptr": "*fp32", "skip_ptr": "*i1", "numel": "i32",
                           "HALF": "i32"},
                          dict(HAS_EF=has_ef, BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False),
                          ELEMENTWISE_WARPS, 3)
    yield Variant(_basis_mix_kernel,
                  {"y_ptr": "*fp32", "corr_ptr": "*fp32", "scal_ptr": "*fp32", "numel": "i32"},
                  dict(BLOCK=ELEMENTWISE_BLOCK), ELEMENTWISE_WARPS, 3)
