"""GHAAdamW's batched basis update on the Triton backend (``_GHABatch`` with
``kernels/gha_batch.py``: batched_matmul GEMMs, CholeskyQR2 on small_cholesky_inverse, the
fused elementwise steps) against the same update with the torch ops that the reference
backend runs (``kernels=False``: the same K1 launches, torch's GEMMs and Householder QR), on
fresh random inputs: fp32, bf16 and fp16 bases and moments, both projection sides (the right
one's stored tensors are transposed views), the state in blocks (the engine) or gathered (the
per-matrix step and a class whose state is not in blocks), ``sign_canon`` on and off, the skip
flag absent, False and True, a zero gradient and a non-finite one (ok False: the basis kept),
a Z too ill-conditioned for the fp32 Cholesky (the basis kept), odd shapes (several
1024-element blocks per member, a rank above the register-tile Cholesky's 64). Every
intermediate buffer is filled with NaN (the masks with True, the flags with 7) before each
call, so a value a kernel fails to write shows.

The two paths round differently (the GEMMs' summation order, CholeskyQR2 against Householder),
so values are compared within a tolerance of a few fp32 ulps of the update (a bf16 or fp16
ulp where the state is stored in one); what a path must not change (skip, a kept basis) is
compared bit for bit."""

import pytest
import torch

from lowrank_fused.dispatch import available
from lowrank_fused.optim.adaptive_adamw import _GHABatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (count, m, n, r) canonical: tiny, a class, m*r and r*n over one block, r*r over one block,
# r above the Triton Cholesky's register tile (the reference factorization)
SHAPES = [(1, 5, 7, 2), (3, 12, 20, 4), (2, 300, 260, 5), (1, 40, 36, 33), (2, 70, 80, 66)]
SKIPS = [None, False, True]
# the intermediates the torch ops and the kernels both write (and the GEMMs and QR read)
SHARED = ("T", "PH", "Z", "Pnf", "C", "C2", "Mnew_f", "Vnew_f")

pytestmark = pytest.mark.skipif(not available("triton", "cpu") and not torch.cuda.is_available(),
                                reason="triton unavailable here")


def _state(shape, side, pdt, mdt, device, seed, grad="random"):
    """Gradients (canonical views) and the stored basis and moments: (count, ...) blocks in
    the side's stored layout, with their canonical (count, m, r) / (count, r, n) views."""
    count, m, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(count, m, n, generator=gen)
    if grad == "zero":
        G[count // 2] = 0.0
    elif grad in ("nan", "inf"):
        G[count // 2, m // 2, n // 3] = float(grad)
    P = torch.linalg.qr(torch.randn(count, m, r, generator=gen))[0]
    M = torch.randn(count, r, n, generator=gen) * 0.1
    V = torch.rand(count, r, n, generator=gen) * 0.01
    if side == "left":
        blocks = [X.to(device=device, dtype=dt).contiguous() for X, dt in
                  ((P, pdt), (M, mdt), (V, mdt))]
        views = blocks
        Gs = [g.to(device) for g in G.unbind(0)]
    else:          # stored transposed (P r x m, moments n x r); canonical = the transposes
        blocks = [X.transpose(1, 2).to(device=device, dtype=dt).contiguous() for X, dt in
                  ((P, pdt), (M, mdt), (V, mdt))]
        views = [X.transpose(1, 2) for X in blocks]
        Gs = [g.t().contiguous().to(device).t() for g in G.unbind(0)]
    return Gs, blocks, views


def _poison(batch):
    for key, X in batch.b.items():
        if key in ("one", "minus") or not torch.is_tensor(X):
            continue
        X.fill_(True if X.dtype == torch.bool else
                7 if X.dtype == torch.int32 else float("nan"))


def _run(kernels, shape, side, pdt, mdt, skip, device, *, stacked=True, grad="random",
         sign_canon=True, eta=0.3, seed=0):
    """(the stored basis and moments after one call, the shared intermediates). ``eta`` not
    a power of two: its product is rounded, so a product fused with the sum would show."""
    Gs, blocks, views = _state(shape, side, pdt, mdt, device, seed, grad)
    lists = [list(X.unbind(0)) for X in views]
    # the engine's classes bind their K1; the per-matrix step (a batch of one) does not
    batch = _GHABatch(Gs, *lists, "auto", bound=stacked or shape[0] > 1,
                      stacks=views if stacked else None, kernels=kernels)
    assert (batch.kernels is not None) == kernels
    _poison(batch)
    flag = None if skip is None else torch.tensor(skip, device=device)
    batch(Gs, eta, sign_canon, flag)
    return blocks, {k: batch.b[k].clone() for k in SHARED}


def _bits(X):
    return X.view({4: torch.int32, 2: torch.int16}[X.element_size()])


# fp32: the update's rounding (GEMM order, the two QRs), a few ulps of O(1) values; bf16 and
# fp16 storage: one ulp of the stored value (a rounding tie can fall either way)
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _assert_close(a, b, what, dtype=None):
    assert a.dtype == b.dtype, what
    tol = TOL[dtype or a.dtype]
    scale = max(1.0, float(b.float().abs().max()))
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale, equal_nan=True,
                               msg=what)


def _check(shape, side, pdt, mdt, skip, device, **kw):
    before, _ = _run(False, shape, side, pdt, mdt, True, device, **kw)  # (skipped: kept)
    want, want_mid = _run(False, shape, side, pdt, mdt, skip, device, **kw)
    got, got_mid = _run(True, shape, side, pdt, mdt, skip, device, **kw)
    if skip:
        for key, x, y in zip(("basis", "exp_avg", "exp_avg_sq"), before, got):
            assert torch.equal(_bits(x), _bits(y)), f"{key} written under skip"
        return
    for key, x, y in zip(("basis", "exp_avg", "exp_avg_sq"), want, got):
        _assert_close(y, x, key)
    for key in SHARED:
        # (Pnf is the stored basis' dtype, widened)
        _assert_close(got_mid[key], want_mid[key], key, pdt if key == "Pnf" else None)
    # the new bases are orthonormal (to the stored dtype's rounding)
    P = got[0].float()
    P = P if side == "left" else P.transpose(1, 2)
    eye = torch.eye(P.shape[-1], device=P.device)
    ortho = float((P.transpose(1, 2) @ P - eye).abs().max())
    assert ortho < {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[pdt], ortho
    # not trivially equal: the update moved the basis (where the gradient is usable)
    assert not torch.equal(before[0], got[0])
    return before, got


@pytest.mark.parametrize("skip", SKIPS, ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_equals_torch_ops(dtype, side, skip, device):
    _check((3, 12, 20, 4), side, dtype, dtype, skip, device)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
def test_odd_shapes(shape, side, device):
    _check(shape, side, torch.float32, torch.float32, False, device)


@pytest.mark.parametrize("stacked", [True, False], ids=["blocks", "gathered"])
@pytest.mark.parametrize("skip", SKIPS, ids=str)
@pytest.mark.parametrize("pdt,mdt", [(torch.float32, torch.float32),
                                     (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.float16)], ids=str)
def test_gathered_state_and_mixed_dtypes(pdt, mdt, skip, stacked, device):
    """The per-matrix step's path (a batch of one, state gathered into the batch's buffers
    and copied back to the members) and a class's, with the basis and moments in different
    dtypes."""
    _check((1, 9, 14, 3), "left", pdt, mdt, skip, device, stacked=stacked)
    _check((3, 9, 14, 3), "right", pdt, mdt, skip, device, stacked=stacked)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("grad", ["zero", "nan", "inf"])
@pytest.mark.parametrize("skip", [None, False], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unusable_gradient_keeps_the_basis(grad, skip, dtype, device):
    """A zero or non-finite gradient (ok False for that member): its basis is kept bit for
    bit (its moments still move by C = P^T P), the other members update."""
    count = 3
    before, got = _check((count, 10, 16, 3), "left", dtype, dtype, skip, device, grad=grad)
    bad = count // 2
    assert torch.equal(_bits(before[0][bad]), _bits(got[0][bad]))
    for i in range(count):
        if i != bad:
            assert not torch.equal(before[0][i], got[0][i])


@pytest.mark.parametrize("eta", [0.5, 0.1, 3.0, 1e-40, 0.0], ids=str)
@pytest.mark.parametrize("sign_canon", [True, False])
def test_eta_and_sign_canon(eta, sign_canon, device):
    """``eta`` rounded to fp32 as torch's ``mul_`` rounds it (a subnormal one too). The
    Triton path's QR (CholeskyQR2, R with a positive diagonal) is sign-canonical whatever
    ``sign_canon``: with it off, its result is bit for bit the one with it on, and close to
    the torch path's canonical one (the torch path keeps LAPACK's signs then)."""
    for side in ("left", "right"):
        want, want_mid = _run(False, (2, 11, 13, 4), side, torch.float32, torch.float32,
                              None, device, sign_canon=True, eta=eta)
        got, got_mid = _run(True, (2, 11, 13, 4), side, torch.float32, torch.float32, None,
                            device, sign_canon=sign_canon, eta=eta)
        for x, y in zip(want, got):
            _assert_close(y, x, side)
        for key in SHARED:
            _assert_close(got_mid[key], want_mid[key], key)
        if not sign_canon:
            canon, _ = _run(True, (2, 11, 13, 4), side, torch.float32, torch.float32, None,
                            device, sign_canon=True, eta=eta)
            for x, y in zip(canon, got):
                assert torch.equal(_bits(x), _bits(y))


@pytest.mark.parametrize("side", ["left", "right"])
def test_unfactorable_z_keeps_the_basis(side, device):
    """A member whose gradient lies in its basis' span has ``Z = P (I + eta*tril(H, -1))``
    (Z^T P unit lower triangular): with a large ``eta`` its condition number exceeds what the
    fp32 Gram's Cholesky factors (pivot ratio below ``subspace.PIVOT_RATIO_TOL``), and that
    member keeps its basis bit for bit (its moments move by ``C = P^T P``); the others
    update and stay orthonormal."""
    count, m, n, r = 3, 14, 18, 5
    Gs, blocks, views = _state((count, m, n, r), side, torch.float32, torch.float32, device, 5)
    bad = 1
    gen = torch.Generator().manual_seed(9)
    P = views[0][bad].float()
    G = (P @ torch.randn(r, n, generator=gen)).to(device)
    if side == "left":
        Gs[bad] = G
    else:
        Gs[bad] = G.t().contiguous().t()
    before = [X.clone() for X in blocks]
    lists = [list(X.unbind(0)) for X in views]
    batch = _GHABatch(Gs, *lists, "auto", bound=True, stacks=views)
    assert batch.kernels is not None
    _poison(batch)
    batch(Gs, 1e4, True, None)
    assert batch.b["qok1"][bad].item() == 0 or batch.b["qok2"][bad].item() == 0
    assert torch.equal(_bits(before[0][bad]), _bits(blocks[0][bad]))
    for i in range(count):
        if i != bad:
            assert not torch.equal(before[0][i], blocks[0][i])
            Pi = views[0][i]
            assert float((Pi.t() @ Pi - torch.eye(r, device=Pi.device)).abs().max()) < 1e-5


@pytest.mark.parametrize("eta", [0.5, 0.9])
@pytest.mark.parametrize("in_span", [False, True])
def test_z_is_well_conditioned(eta, in_span, device):
    """The bound the CholeskyQR2 relies on: ``cond(Z) <= (1 + 2 eta)/(1 - eta)`` (4 at the
    default 0.5), for random gradients and for gradients in the basis' span (where ``P^T Z``
    is all that Z has)."""
    count, m, n, r = 4, 30, 26, 6
    Gs, blocks, views = _state((count, m, n, r), "left", torch.float32, torch.float32,
                               device, 11)
    if in_span:
        gen = torch.Generator().manual_seed(4)
        Gs = [(views[0][i] @ torch.randn(r, n, generator=gen).to(device)) for i in
              range(count)]
    batch = _GHABatch(Gs, *[list(X.unbind(0)) for X in views], "auto", bound=True,
                      stacks=views, kernels=False)
    batch(Gs, eta, True, None)
    s = torch.linalg.svdvals(batch.b["Z"].double().cpu())
    cond = s[:, 0] / s[:, -1]
    assert float(cond.max()) <= (1 + 2 * eta) / (1 - eta), cond


def test_reference_backend_runs_the_torch_ops():
    Gs, blocks, views = _state((2, 6, 8, 2), "left", torch.float32, torch.float32, "cpu", 0)
    lists = [list(X.unbind(0)) for X in views]
    assert _GHABatch(Gs, *lists, "reference", bound=True, stacks=views).kernels is None
    if available("triton", "cpu"):
        assert _GHABatch(Gs, *lists, "triton", bound=True, stacks=views).kernels is not None


def test_bound_kernels_reject_mismatched_buffers():
    from lowrank_fused.kernels.gha_batch import BoundGHABatch

    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    Gs, blocks, views = _state((2, 6, 8, 2), "right", torch.float32, torch.float32, "cpu", 0)
    lists = [list(X.unbind(0)) for X in views]
    batch = _GHABatch(Gs, *lists, "triton", bound=True, stacks=views)
    kern = batch.kernels
    names = ("Y", "cs", "g2", "H", "ok", "g2s", "T", "GY", "PH", "pf", "Z", "W", "L1", "L2",
             "qok1", "qok2", "Q1", "Q", "Pnf", "C", "C2", "P_old", "P_dst", "Mn", "M_old",
             "M_dst", "Vn", "V_old", "V_dst")
    args = {k: getattr(kern, k) for k in names}
    BoundGHABatch(**args)
    with pytest.raises(ValueError, match="one layout"):
        BoundGHABatch(**{**args, "M_dst": kern.M_old.contiguous()})
    with pytest.raises(TypeError, match="must be"):
        BoundGHABatch(**{**args, "V_dst": kern.V_old.to(torch.bfloat16)})
    with pytest.raises(ValueError, match="contiguous"):
        BoundGHABatch(**{**args, "T": kern.T.transpose(1, 2)})
    with pytest.raises(ValueError, match="shape"):
        BoundGHABatch(**{**args, "Z": kern.Z[:1]})
    with pytest.raises(TypeError, match="bool"):
        BoundGHABatch(**{**args, "ok": kern.g2})
    with pytest.raises(TypeError, match="int32"):
        BoundGHABatch(**{**args, "qok2": kern.ok.view(-1)})
    with pytest.raises(TypeError, match="skip"):
        kern(0.5, skip=1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_precision_reaches_both_projections(side, device):
    """``precision`` (the optimizer's, on the engine) is the operand precision of both K1:
    Y^T = P^T G and G Y match the reference product in that mode (fp32 summation budget), and
    tf32 differs from ieee (so the mode is not dropped on the way)."""
    from lowrank_fused.reference._precision import matmul
    from lowrank_fused.testing import assert_parity, tolerance

    got = {}
    for mode in ("ieee", "tf32"):
        Gs, blocks, views = _state((2, 40, 36, 6), side, torch.float32, torch.float32, device, 3)
        batch = _GHABatch(Gs, *[list(X.unbind(0)) for X in views], "auto", bound=True,
                          stacks=views)
        _poison(batch)
        batch(Gs, 0.3, True, None, precision=mode)
        Y, GY = batch.Y.clone(), batch.GY.clone()
        for i, G in enumerate(Gs):
            P = batch.pf[i]                              # the old basis, fp32
            assert_parity(Y[i], matmul(P.t(), G, mode), rtol=tolerance(torch.float32),
                          name=f"Y^T[{i}] {mode}")
            assert_parity(GY[i], matmul(G, Y[i].t(), mode), rtol=tolerance(torch.float32),
                          name=f"GY[{i}] {mode}")
        got[mode] = Y
    assert not torch.equal(got["ieee"], got["tf32"])
