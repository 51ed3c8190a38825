"""GHAAdamW's batched basis update (``_GHABatch`` in lowrank_fused/optim/adaptive_adamw.py,
docs/methods/adaptive_adamw.md) after its two projections, as launches over a whole class: no
torch op, no loop over the members. Canonical left form per member: G m x n, P m x r,
moments r x n; every buffer a (count, ...) stack::

    Y^T = P^T G, colsum(G^2) ; GY = G Y                 the two grouped K1 (the caller's)
    H  = Y^T Y                                          batched_matmul
    _gha_scale_kernel:   g2 = sum(colsum) ; ok = 0 < g2 < inf ; g2s = where(ok, g2, 1) ;
                         T = triu(H / g2s)
    PH = P T                                            batched_matmul
    _gha_step_kernel:    Z = where(ok, (GY/g2s - PH)*eta + P, P)
    Q  = CholeskyQR2(Z):  W = Z^T Z ; L1 = chol(W)^-1 ; Q1 = Z L1^T ;
                          W = Q1^T Q1 ; L2 = chol(W)^-1 ; Q = Q1 L2^T
                         (batched_matmul and small_cholesky_inverse, twice; qok1, qok2 the
                         factorizations' flags)
    _gha_basis_kernel:   Pn = dtype(where(ok & qok1 & qok2, Q, P)) ; Pnf = fp32(Pn) ;
                         the stored basis <- where(skip, P, Pn)
    C = Pnf^T P ; C2 = C*C                              batched_matmul (C2 stored by it)
    Mn = C M ; Vn = C2 V                                one batched_matmul pair launch
    _gha_moments_kernel: M <- where(skip, M, dtype(Mn)) ; V <- where(skip, V, dtype(Vn))

The QR is CholeskyQR2 (``lowrank_fused.subspace.BoundCholeskyQR2``: ``cholesky_qr2``'s two
passes without its host-side fallback): ``Z = Q R`` with ``R = (C1 C2)^T`` (C1, C2 the two Cholesky factors),
upper triangular with a positive diagonal, so the basis is the sign-canonical one (``orth``)
whatever ``sign_canon``. Z is well conditioned (``P^T Z = I + eta*tril(H, -1)`` with ``H``
positive semi-definite of trace <= 1: a condition number of at most ``(1 + 2 eta)/(1 -
eta)``, 4 at the default ``eta`` = 0.5; docs/methods/adaptive_adamw.md), far inside the fp32
Cholesky's range (about 3e3). A member whose factorization fails all the same (a large
``eta``) keeps its basis, like a member whose gradient is zero or not finite (its moments
still move by ``C = P^T P``). Where the Triton path does not run, ``_GHABatch`` makes the same update with
torch ops and a Householder QR (the reference backend): the two agree to fp32 rounding
(tests/test_gha_batch.py). Every GEMM runs in ``ieee`` where the step's precision is
``ieee``, else in ``tf32x3``: the QR needs an fp32-accurate Gram.

The divisions in the elementwise kernels are IEEE divisions (``div_rn``), ``eta`` is rounded
once to fp32 (as torch rounds a Python scalar operand of an fp32 op), no product is fused
with an add under the interpreter (on a GPU the compiler may contract ``(GY/g2s - PH)*eta +
P`` into one FMA).

The stored basis and moments may be strided views (the class's state blocks, transposed on
the right side): their three strides are arguments; every other buffer is contiguous. With
``skip`` (a 0-dim bool on the device, never read on the host) holding True nothing is
written into the stored blocks (written in place, ``IN_PLACE``); gathered state's buffers
(the per-matrix step's, then copied to the members) get the old values. The elementwise
kernels' grid: (count, blocks of ``ELEMENTWISE_BLOCK`` elements of one member); offsets are
int64.
"""
import itertools

import torch
import triton
import triton.language as tl

from lowrank_fused.ops import checked_skip

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, check_buffer, interpreting,
                      skip_flag, sum_fp32, to_storage)
from ._launch import PlannedLaunch

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _gha_scale_kernel(cs_ptr, g2_ptr, h_ptr, ok_ptr, g2s_ptr, t_ptr, R, N,
                      BLOCK: tl.constexpr):
    """Member ``program_id(0)``: ``g2 = sum(colsum)`` (its n column sums of G^2), ``ok = 0 <
    g2 < inf`` and ``g2s = where(ok, g2, 1)`` (stored by the first block), and block
    ``program_id(1)`` of ``T = triu(H / g2s)``."""
    i = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    g2 = sum_fp32(cs_ptr + i * N, N, BLOCK)
    ok = (g2 > 0.0) & (g2 <= 3.4028234663852886e38)     # g2 < inf: FLT_MAX; NaN: neither
    g2s = tl.where(ok, g2, 1.0)
    if blk == 0:
        tl.store(g2_ptr + i, g2)
        tl.store(ok_ptr + i, ok)
        tl.store(g2s_ptr + i, g2s)
    rr = R * R
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < rr
    row = offs // R
    col = offs - row * R
    base = i * rr
    h = tl.load(h_ptr + base + offs, mask=mask, other=0.0)
    tl.store(t_ptr + base + offs, tl.where(col >= row, tl.div_rn(h, g2s), 0.0), mask=mask)


@triton.jit
def _gha_step_kernel(gy_ptr, ph_ptr, pf_ptr, z_ptr, ok_ptr, g2s_ptr, eta, MR,
                     BLOCK: tl.constexpr):
    """Block ``program_id(1)`` of member ``program_id(0)``:
    ``Z = where(ok, (GY/g2s - PH)*eta + P, P)`` (each operation rounded to fp32)."""
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MR
    base = i * MR
    ok = tl.load(ok_ptr + i)
    g2s = tl.load(g2s_ptr + i)
    gy = tl.load(gy_ptr + base + offs, mask=mask, other=0.0)
    ph = tl.load(ph_ptr + base + offs, mask=mask, other=0.0)
    pf = tl.load(pf_ptr + base + offs, mask=mask, other=0.0)
    d = tl.div_rn(gy, g2s) - ph
    z = d * tl.cast(eta, tl.float32)             # eta rounded to fp32, as torch's mul_
    z = z + pf
    tl.store(z_ptr + base + offs, tl.where(ok, z, pf), mask=mask)


@triton.jit
def _gha_basis_kernel(q_ptr, qok1_ptr, qok2_ptr, pf_ptr, ok_ptr, pnf_ptr, old_ptr, dst_ptr,
                      skip_ptr, R, MR, s0, s1, s2, IN_PLACE: tl.constexpr, BLOCK: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """Block ``program_id(1)`` of member ``program_id(0)``: ``Pn = where(ok & qok1 & qok2, Q,
    P)`` rounded to the basis dtype, ``Pnf = fp32(Pn)`` (contiguous; the old basis P too) and
    ``dst = where(skip, old, Pn)`` (``old`` and ``dst`` strided alike by ``s0, s1, s2``).
    ``IN_PLACE`` (``old`` is ``dst``: the stored block): with skip True nothing is written
    (the transport's products that read ``Pnf`` are then discarded too). Else (the stacked
    old bases and P_new's buffer) ``Pnf`` is stored first: where ``dst`` is the same memory
    (an fp32 stack), ``dst`` wins."""
    if IN_PLACE:
        if tl.load(skip_ptr):
            return
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MR
    row = offs // R
    col = offs - row * R
    base = i * MR
    q = tl.load(q_ptr + base + offs, mask=mask, other=0.0)
    ok = tl.load(ok_ptr + i) & (tl.load(qok1_ptr + i) != 0) & (tl.load(qok2_ptr + i) != 0)
    pf = tl.load(pf_ptr + base + offs, mask=mask, other=0.0)
    pn = to_storage(tl.where(ok, q, pf), dst_ptr.dtype.element_ty, INTERPRET)
    tl.store(pnf_ptr + base + offs, pn.to(tl.float32), mask=mask)
    at = i * s0 + row.to(tl.int64) * s1 + col.to(tl.int64) * s2
    if not IN_PLACE:
        pn = tl.where(tl.load(skip_ptr), tl.load(old_ptr + at, mask=mask), pn)
    tl.store(dst_ptr + at, pn, mask=mask)


@triton.jit
def _gha_moments_kernel(mn_ptr, mold_ptr, mdst_ptr, vn_ptr, vold_ptr, vdst_ptr, skip_ptr, N,
                        RN, sm0, sm1, sm2, sv0, sv1, sv2, IN_PLACE: tl.constexpr,
                        BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """Block ``program_id(1)`` of member ``program_id(0)``: ``dst = where(skip, old,
    dtype(new))`` for both moments (``new`` the fp32 products C M and C2 V, contiguous;
    ``old`` and ``dst`` strided alike, per moment). ``IN_PLACE`` (``old`` is ``dst``, the
    stored blocks): with skip True nothing is written."""
    skip = tl.load(skip_ptr)
    if IN_PLACE:
        if skip:
            return
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < RN
    row = offs // N
    col = (offs - row * N).to(tl.int64)
    row = row.to(tl.int64)
    base = i * RN
    _moment_write(mn_ptr + base + offs, mold_ptr, mdst_ptr, i * sm0 + row * sm1 + col * sm2,
                  mask, skip, IN_PLACE, INTERPRET)
    _moment_write(vn_ptr + base + offs, vold_ptr, vdst_ptr, i * sv0 + row * sv1 + col * sv2,
                  mask, skip, IN_PLACE, INTERPRET)


@triton.jit
def _moment_write(new_ptrs, old_ptr, dst_ptr, at, mask, skip, IN_PLACE: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """One moment of ``_gha_moments_kernel``: ``dst[at] = where(skip, old[at],
    dtype(new))`` (``IN_PLACE``: the skip was handled by the caller)."""
    x = to_storage(tl.load(new_ptrs, mask=mask, other=0.0), dst_ptr.dtype.element_ty,
                   INTERPRET)
    if not IN_PLACE:
        x = tl.where(skip, tl.load(old_ptr + at, mask=mask), x)
    tl.store(dst_ptr + at, x, mask=mask)


def _check(name, t, shape, dtypes, device, contiguous=True):
    check_buffer(name, t, shape, dtypes, device, contiguous=contiguous, owner="the batch")


def _check_pair(name, old, dst, shape, device):
    """``old`` and ``dst``: one dtype, one layout (the same tensor, or two alike)."""
    _check(name + " (old)", old, shape, STATE_DTYPES, device, contiguous=False)
    _check(name + " (destination)", dst, shape, (old.dtype,), device, contiguous=False)
    if old.stride() != dst.stride():
        raise ValueError(f"{name}: the old and destination tensors must have one layout, got "
                         f"strides {old.stride()} and {dst.stride()}")


class BoundGHABatch:
    """The update after the two K1 (module docstring) on one batch's fixed tensors (a
    ``_GHABatch``'s buffers), checked once, here. Canonical shapes, fp32 and contiguous unless
    said: ``Y`` (Y^T, count, r, n), ``cs`` (count, n), ``g2``, ``g2s`` (count, 1, 1), ``ok``
    (count, 1, 1) bool; ``H``, ``T``, ``W``, ``L1``, ``L2``, ``C``, ``C2`` (count, r, r);
    ``GY``, ``PH``, ``pf``, ``Z``, ``Q1``, ``Q``, ``Pnf`` (count, m, r); ``qok1``, ``qok2``
    (count,) int32; ``Mn``, ``Vn`` (count, r, n); ``P_old``/``P_dst``, ``M_old``/``M_dst``,
    ``V_old``/``V_dst`` the stored tensors and where their new values go (the same tensor in
    place, or two of one layout), fp32, bf16 or fp16, any strides. ``Q`` may be ``Pnf`` (an
    fp32 basis), ``Pnf`` may be ``P_dst`` (fp32 bases not stored in a block: ``P_dst`` is then
    written last) and ``Mn``/``Vn`` may be ``M_dst``/``V_dst`` (fp32 moments not in a block).

    ``__call__(eta, skip, precision)`` makes the whole update: 14 launches and no torch op
    for any class size (the caller runs them inside its capture unit). The products are
    bound per precision, at its first use; the QR is ``subspace.BoundCholeskyQR2`` on ``Z``
    (its factorizations on the Triton kernel up to rank ``small_cholesky_inverse.MAX_K``, on
    the reference, torch's batched Cholesky, above)."""

    def __init__(self, *, Y, cs, g2, H, ok, g2s, T, GY, PH, pf, Z, W, L1, L2, qok1, qok2, Q1,
                 Q, Pnf, C, C2, P_old, P_dst, Mn, M_old, M_dst, Vn, V_old, V_dst):
        if not isinstance(pf, torch.Tensor) or pf.dim() != 3:
            raise ValueError("pf must be a (count, m, r) tensor")
        count, m, r = pf.shape
        if not isinstance(Mn, torch.Tensor) or Mn.dim() != 3 or Mn.shape[:2] != (count, r):
            raise ValueError(f"Mn must be a ({count}, {r}, n) tensor")
        n = Mn.shape[2]
        dev = pf.device
        f32 = (torch.float32,)
        for name, t, shape in (("Y", Y, (count, r, n)), ("cs", cs, (count, n)),
                               ("g2", g2, (count, 1, 1)), ("g2s", g2s, (count, 1, 1)),
                               ("H", H, (count, r, r)), ("T", T, (count, r, r)),
                               ("W", W, (count, r, r)), ("L1", L1, (count, r, r)),
                               ("L2", L2, (count, r, r)), ("C", C, (count, r, r)),
                               ("C2", C2, (count, r, r)), ("GY", GY, (count, m, r)),
                               ("PH", PH, (count, m, r)), ("pf", pf, (count, m, r)),
                               ("Z", Z, (count, m, r)), ("Q1", Q1, (count, m, r)),
                               ("Q", Q, (count, m, r)), ("Pnf", Pnf, (count, m, r)),
                               ("Mn", Mn, (count, r, n)), ("Vn", Vn, (count, r, n))):
            _check(name, t, shape, f32, dev)
        _check("ok", ok, (count, 1, 1), (torch.bool,), dev)
        for name, t in (("qok1", qok1), ("qok2", qok2)):
            _check(name, t, (count,), (torch.int32,), dev)
        _check_pair("P", P_old, P_dst, (count, m, r), dev)
        _check_pair("M", M_old, M_dst, (count, r, n), dev)
        _check_pair("V", V_old, V_dst, (count, r, n), dev)
        self.count, self.m, self.r, self.n, self.device = count, m, r, n, dev
        self.Y, self.cs, self.g2, self.H, self.ok, self.g2s, self.T = Y, cs, g2, H, ok, g2s, T
        self.GY, self.PH, self.pf, self.Z, self.Q1, self.Q, self.Pnf = GY, PH, pf, Z, Q1, Q, Pnf
        self.W, self.L1, self.L2, self.qok1, self.qok2 = W, L1, L2, qok1, qok2
        self.C, self.C2 = C, C2
        self.P_old, self.P_dst = P_old, P_dst
        self.Mn, self.M_old, self.M_dst = Mn, M_old, M_dst
        self.Vn, self.V_old, self.V_dst = Vn, V_old, V_dst
        self.p_in_place = P_old is P_dst
        if (M_old is M_dst) != (V_old is V_dst):
            raise ValueError("M and V are both written in place (M_old is M_dst, V_old is "
                             "V_dst) or neither")
        self.moments_in_place = M_old is M_dst
        self.empty = count == 0 or m * r == 0
        self.interpret = interpreting()
        self._skip = None
        grid_rr = (count, max(1, cdiv(r * r, ELEMENTWISE_BLOCK)))
        grid_mr = (count, max(1, cdiv(m * r, ELEMENTWISE_BLOCK)))
        grid_rn = (count, max(1, cdiv(r * n, ELEMENTWISE_BLOCK)))
        ew = dict(BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
        self._scale = PlannedLaunch(_gha_scale_kernel, grid_rr, ew)
        self._step = PlannedLaunch(_gha_step_kernel, grid_mr, ew)
        self._basis = PlannedLaunch(_gha_basis_kernel, grid_mr, dict(
            ew, IN_PLACE=self.p_in_place, INTERPRET=self.interpret))
        self._moments = PlannedLaunch(_gha_moments_kernel, grid_rn, dict(
            ew, IN_PLACE=self.moments_in_place, INTERPRET=self.interpret))
        from lowrank_fused.subspace import BoundCholeskyQR2

        self._qr = BoundCholeskyQR2(Z, Q, dict(W=W, L1=L1, L2=L2, Q1=Q1, ok1=qok1, ok2=qok2))
        self._products = {}

    def products(self, precision: str):
        """The batch's GEMMs in ``precision``'s operand mode (``ieee``; ``tf32x3`` for every
        tensor-core mode), bound at the first call with it."""
        mode = "ieee" if precision == "ieee" else "tf32x3"
        got = self._products.get(mode)
        if got is None:
            from .batched_matmul import BoundBatchedMatmul as B
            from .batched_matmul import BoundBatchedMatmulPair as B2

            t = lambda X: X.transpose(1, 2)           # noqa: E731
            kw = dict(precision=mode)
            got = self._products[mode] = dict(
                H=B(self.Y, t(self.Y), self.H, **kw),
                PH=B(self.pf, self.T, self.PH, **kw),
                C=B(t(self.Pnf), self.pf, self.C, square_out=self.C2, **kw),
                # C M and C2 V as M^T C^T and V^T C2^T, in one launch: the moments read in
                # their stored dtype
                MV=B2(t(self.M_old), t(self.C), t(self.Mn), t(self.V_old), t(self.C2),
                      t(self.Vn), **kw))
        return got

    def _flag(self, skip):
        self._skip = checked_skip(skip, self.device, self._skip)
        return skip_flag(skip, self.device)

    def __call__(self, eta, skip=None, precision="ieee"):
        """The update from ``Y``, ``cs`` and ``GY`` (the K1's outputs) and ``pf`` (the old
        bases in fp32): the new bases and moments into their destinations."""
        flag = self._flag(skip)
        if self.empty:
            return
        mm = self.products(precision)
        mm["H"]()
        self._scale(self.cs, self.g2, self.H, self.ok, self.g2s, self.T, self.r, self.n)
        mm["PH"]()
        self._step(self.GY, self.PH, self.pf, self.Z, self.ok, self.g2s, float(eta),
                   self.m * self.r)
        self._qr(precision)
        self._basis(self.Q, self.qok1, self.qok2, self.pf, self.ok, self.Pnf, self.P_old,
                    self.P_dst, flag, self.r, self.m * self.r, *self.P_old.stride())
        mm["C"]()
        if self.r * self.n == 0:
            return
        mm["MV"]()
        self._moments(
            self.Mn, self.M_old, self.M_dst, self.Vn, self.V_old, self.V_dst, flag, self.n,
            self.r * self.n, *self.M_old.stride(), *self.V_old.stride())


def aot_variants():
    """The basis' and moments' stored dtypes (fp32: the default state; bf16 and fp16: a
    ``faithful_dtypes`` state; the two moments in one dtype), written in place (the state in
    blocks) or not (gathered); the rest fp32. (The GEMMs and the factorization are
    ``batched_matmul``'s and ``small_cholesky_inverse``'s variants.)"""
    from lowrank_fused.testing.aot import Variant

    yield Variant(_gha_scale_kernel,
                  {"cs_ptr": "*fp32", "g2_ptr": "*fp32", "h_ptr": "*fp32", "ok_ptr": "*i1",
                   "g2s_ptr": "*fp32", "t_ptr": "*fp32", "R": "i32", "N": "i32"},
                  dict(BLOCK=ELEMENTWISE_BLOCK), ELEMENTWISE_WARPS, 3)
    yield Variant(_gha_step_kernel,
                  {"gy_ptr": "*fp32", "ph_ptr": "*fp32", "pf_ptr": "*fp32", "z_ptr": "*fp32",
                   "ok_ptr": "*i1", "g2s_ptr": "*fp32", "eta": "fp32", "MR": "i32"},
                  dict(BLOCK=ELEMENTWISE_BLOCK), ELEMENTWISE_WARPS, 3)
    strides = {k: "i32" for k in ("s0", "s1", "s2")}
    for s_t, in_place in itertools.product(("fp32", "bf16", "fp16"), (True, False)):
        yield Variant(_gha_basis_kernel,
                      {"q_ptr": "*fp32", "qok1_ptr": "*i32", "qok2_ptr": "*i32",
                       "pf_ptr": "*fp32", "ok_ptr": "*i1", "pnf_ptr": "*fp32",
                       "old_ptr": "*" + s_t, "dst_ptr": "*" + s_t, "skip_ptr": "*i1",
                       "R": "i32", "MR": "i32", **strides},
                      dict(IN_PLACE=in_place, BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False),
                      ELEMENTWISE_WARPS, 3)
    moment_strides = {k: "i32" for k in ("sm0", "sm1", "sm2", "sv0", "sv1", "sv2")}
    for s_t, in_place in itertools.product(("fp32", "bf16", "fp16"), (True, False)):
        yield Variant(_gha_moments_kernel,
                      {"mn_ptr": "*fp32", "mold_ptr": "*" + s_t, "mdst_ptr": "*" + s_t,
                       "vn_ptr": "*fp32", "vold_ptr": "*" + s_t, "vdst_ptr": "*" + s_t,
                       "skip_ptr": "*i1", "N": "i32", "RN": "i32", **moment_strides},
                      dict(IN_PLACE=in_place, BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False),
                      ELEMENTWISE_WARPS, 3)
