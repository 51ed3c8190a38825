"""GHAAdamW's batched basis update on the Triton backend (``_GHABatch`` with the four launches
of ``kernels/gha_batch.py``) against the same update with the torch ops that the reference
backend runs (``kernels=False``: the same K1 launches, the same GEMMs and QR), on fresh
random inputs: fp32, bf16 and fp16 bases and moments, both projection sides (the right one's
stored tensors are transposed views), the state in blocks (the engine) or gathered (the
per-matrix step and a class whose state is not in blocks), ``sign_canon`` on and off, the
skip flag absent, False and True, a zero gradient and a non-finite one (ok False: the basis
kept), odd shapes (several 1024-element blocks per member). Every intermediate buffer is
filled with NaN (the masks with True) before each call, so a value a kernel fails to write
shows.

Under the interpreter the kernels make the torch ops' IEEE operations in their order, so the
stored basis and moments are the same bits, and so are the intermediates the GEMMs and the QR
read (T, P T, Z, P_new, C, C*C, C M, C2 V). On a GPU the compiler may fuse Z's product and
sum into one FMA (about one fp32 ulp of Z), so there they are compared within a tolerance."""

import pytest
import torch

from lowrank_fused.dispatch import available
from lowrank_fused.optim.adaptive_adamw import _GHABatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (count, m, n, r) canonical: tiny, a class, m*r and r*n over one block, r*r over one block
SHAPES = [(1, 5, 7, 2), (3, 12, 20, 4), (2, 300, 260, 5), (1, 40, 36, 33)]
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
        X.fill_(True if X.dtype == torch.bool else float("nan"))


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


def _assert_same(a, b, what):
    if a.device.type == "cpu":
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), what
    else:
        tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[a.dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=what)


def _check(shape, side, pdt, mdt, skip, device, **kw):
    before, _ = _run(False, shape, side, pdt, mdt, True, device, **kw)  # (skipped: kept)
    want, want_mid = _run(False, shape, side, pdt, mdt, skip, device, **kw)
    got, got_mid = _run(True, shape, side, pdt, mdt, skip, device, **kw)
    for key, x, y in zip(("basis", "exp_avg", "exp_avg_sq"), want, got):
        _assert_same(x, y, key)
    if skip:
        for key, x, y in zip(("basis", "exp_avg", "exp_avg_sq"), before, got):
            assert torch.equal(_bits(x), _bits(y)), f"{key} written under skip"
        return
    for key in SHARED:
        _assert_same(want_mid[key], got_mid[key], key)
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
    """``eta`` rounded to fp32 as torch's ``mul_`` rounds it (a subnormal one too), and the
    QR's signs kept or canonicalised."""
    kw = dict(sign_canon=sign_canon, eta=eta)
    for side in ("left", "right"):
        want, want_mid = _run(False, (2, 11, 13, 4), side, torch.float32, torch.float32,
                              None, device, **kw)
        got, got_mid = _run(True, (2, 11, 13, 4), side, torch.float32, torch.float32, None,
                            device, **kw)
        for x, y in zip(want, got):
            _assert_same(x, y, side)
        for key in SHARED:
            _assert_same(want_mid[key], got_mid[key], key)


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
    args = dict(g2=kern.g2, H=kern.H, ok=kern.ok, g2s=kern.g2s, T=kern.T, GY=kern.GY,
                PH=kern.PH, pf=kern.pf, Z=kern.Z, Q=kern.Q, Rq=kern.Rq, Pnf=kern.Pnf,
                P_old=kern.P_old, P_dst=kern.P_dst, Mn=kern.Mn, M_old=kern.M_old,
                M_dst=kern.M_dst, Vn=kern.Vn, V_old=kern.V_old, V_dst=kern.V_dst)
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
    with pytest.raises(TypeError, match="skip"):
        kern.basis(True, skip=1)


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
