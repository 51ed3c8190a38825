"""LDAdam's per-step-scaled elementwise steps (``kernels/ldadam_scaled_moments.py``: line 1's
two mixes, the transport's two halves, the error feedback's right operand, the moment's
update) against the torch expressions they replace in ``LDAdamW._batch_step`` (its reference
path), on fresh random inputs of odd shapes, fp32, bf16 and fp16 moments, both sides, with and
without error feedback, the skip flag, and every pure output filled with NaN before the launch.

Tolerance: the kernels make the same IEEE operations as the torch expression (the product in
the moment's dtype where torch computes it so, ``add_(x, alpha=a)`` as one FMA, IEEE division
by the scalars), so under the interpreter the bits equal torch's CPU result (checked exactly
on the CPU). On a GPU torch's CUDA kernels divide by a scalar through its reciprocal and the
compiler may fuse ``c*M_tr + R`` into an FMA: each output may then differ by a few fp32
rounding errors of the magnitudes it is formed from, ``ULPS * 2**-23 * scale`` with ``scale``
the sum of the absolute terms (one bf16/fp16 rounding more for a value stored in the moment's
dtype)."""
import pytest
import torch

from lowrank_fused import _capture
from lowrank_fused.kernels.ldadam_scaled_moments import ROWS, BoundScaledMoments
from tests._skip import check_bad_skips, check_skip

ULPS = 4
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (count, a, b) of the moments: one element, a row, more than one 1024-element block, odd
SHAPES = [(1, 1, 1), (3, 5, 7), (2, 17, 70), (1, 3, 1029)]
SIDES = ["left", "right"]


def _scalars(t=3, beta1=0.908, beta2=0.99, rho=0.908):
    bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
    return dict(coef_m=rho / bc1, coef_a=1.0 - rho, bc2=bc2, bc1_sq=bc1 * bc1,
                c=beta1 / (1.0 - beta1))


def _batch(shape, dtype, side, device, seed, ef=True):
    """The bound call's tensors: random inputs (V positive, as a second moment), NaN in
    every scratch the kernels only write; ``Y`` and ``corr`` of an m x r basis."""
    gen = torch.Generator().manual_seed(seed)
    count, a, b = shape
    basis = (count, b + 2, a) if side == "left" else (count, a + 3, b)

    def rnd(shp, dt=torch.float32, scale=1.0):
        return (torch.randn(shp, generator=gen) * scale).to(device=device, dtype=dt)

    def nan(shp):
        return torch.full(shp, float("nan"), device=device)

    L_shape = (count, 2 * a, b) if side == "left" else (count, a, 2 * b)
    return dict(M=rnd(shape, dtype, 0.1), V=rnd(shape, dtype, 0.01).abs(), R1=rnd(shape),
                V1=nan(shape), Y=rnd(basis), corr=rnd(basis), mtr=rnd(shape, scale=0.1),
                w2=rnd(shape, scale=0.01), R=rnd(shape) if ef else None,
                L=nan(L_shape) if ef else None)


def _bind(t, side):
    return BoundScaledMoments(t["M"], t["V"], t["R1"], t["V1"], t["Y"], t["corr"], t["mtr"],
                              t["w2"], t["R"], t["L"], side=side)


def _halves(L, a, b, side):
    """L's top and bottom halves as ``LDAdamW._derive_views`` takes them."""
    return (L[:, :a], L[:, a:]) if side == "left" else (L[..., :b], L[..., b:])


def _close(got, want, scale, dtype=torch.float32, device="cpu"):
    """Within ``ULPS`` fp32 roundings of ``scale`` (one rounding to ``dtype`` more), NaN
    nowhere; bit for bit under the interpreter."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "an output element was not written"
    if torch.device(device).type == "cpu":
        assert torch.equal(got, want), (got - want).abs().max()
        return
    tol = ULPS * EPS[torch.float32] * scale.float() + EPS[dtype] * want.float().abs()
    err = (got.float() - want.float()).abs()
    assert bool((err <= tol).all()), (err - tol).max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_momentum_mix_matches_torch(shape, dtype, device):
    t = _batch(shape, dtype, "left", device, seed=sum(shape) + 7 * DTYPES.index(dtype))
    s = _scalars()
    M, V, R1 = t["M"], t["V"], t["R1"].clone()
    # LDAdamW._batch_step's torch path (sq and w in fresh buffers)
    V1_ref = torch.mul(M, s["coef_m"], out=torch.empty(shape, device=device)).add_(
        R1, alpha=s["coef_a"])
    w_ref = V.float().div_(s["bc2"]) if V.dtype != torch.float32 else torch.div(V, s["bc2"])
    w_ref.sub_(torch.mul(M, M, out=torch.empty(shape, device=device)).div_(s["bc1_sq"]))
    bound = _bind(t, "left")
    bound.fill(**s)
    bound.momentum_mix()
    m = M.float()
    _close(t["V1"], V1_ref, (s["coef_m"] * m).abs() + (s["coef_a"] * R1).abs(), device=device)
    _close(t["R1"], w_ref, V.float() / s["bc2"] + m * m / s["bc1_sq"], device=device)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_basis_mix_matches_torch(shape, side, device):
    t = _batch(shape, torch.float32, side, device, seed=3 + sum(shape))
    s = _scalars(t=5, rho=0.7)
    Y0, corr = t["Y"].clone(), t["corr"]
    want = Y0.clone().mul_(s["coef_a"]).add_(corr, alpha=s["coef_m"])
    bound = _bind(t, side)
    bound.fill(**s)
    bound.basis_mix()
    _close(t["Y"], want, (s["coef_a"] * Y0).abs() + (s["coef_m"] * corr).abs(), device=device)


@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no-ef"])
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_transport_finish_matches_torch(shape, dtype, side, ef, device):
    t = _batch(shape, dtype, side, device, seed=11 * sum(shape) + DTYPES.index(dtype), ef=ef)
    s = _scalars(t=4)
    count, a, b = shape
    M0, w2, mtr = t["M"].clone(), t["w2"].clone(), t["mtr"]
    # LDAdamW._batch_step's torch path, skip=None
    x = w2.clone().add_(torch.mul(mtr, mtr).div_(s["bc1_sq"]))
    V_ref = t["V"].clone().copy_(x.mul_(s["bc2"]).abs_())
    M_ref = M0.clone().copy_(mtr)
    t["V"].fill_(float("nan"))                 # V and (without error feedback) M: pure outputs
    if not ef:
        t["M"].fill_(float("nan"))
    bound = _bind(t, side)
    bound.fill(**s)
    bound.transport_finish()
    scale_v = (w2.abs() + mtr * mtr / s["bc1_sq"]) * s["bc2"]
    _close(t["V"], V_ref, scale_v, dtype, device)
    _close(t["M"], M_ref, mtr.abs(), dtype, device)
    assert torch.equal(t["w2"], w2)            # an input only
    if ef:
        top, bot = _halves(t["L"], a, b, side)
        R = t["R"]
        _close(top, torch.mul(mtr, s["c"]).add_(R), (s["c"] * mtr).abs() + R.abs(),
               device=device)
        _close(bot, torch.mul(M0, -s["c"], out=torch.empty(shape, device=device)),
               (s["c"] * M0.float()).abs(), device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", SIDES)
def test_transport_finish_skip_writes_nothing(side, dtype, device):
    shape = (2, 5, 9)

    def make():
        t = _batch(shape, dtype, side, device, seed=21)
        t["L"].normal_()                       # a prefill that a skipped call must keep
        make.t = t
        return [t["V"], t["M"], t["L"]]

    def run(outs, skip):
        t = dict(make.t, V=outs[0], M=outs[1], L=outs[2])
        bound = _bind(t, side)
        bound.fill(**_scalars())
        bound.transport_finish(skip)

    check_skip(make, run, device)
    t = _batch(shape, dtype, side, device, seed=22)
    bound = _bind(t, side)
    check_bad_skips(lambda skip: bound.transport_finish(skip), device)


def test_table_rounds_each_scalar_once_and_replays_launch_nothing(device):
    """``fill`` writes the five scalars (fp32 of each Python float) into the one kept table;
    inside ``_capture.replay`` (a replayed CUDA graph's host half) the table is still filled
    but no kernel runs."""
    t = _batch((2, 4, 6), torch.float32, "right", device, seed=5)
    bound = _bind(t, "right")
    s = _scalars(t=2)
    table = bound.fill(**s)
    assert table is bound.table.table and table.shape == (len(ROWS), 1)
    if table.device.type == "cuda":
        torch.cuda.synchronize()
    want = torch.tensor([[s[k]] for k in ROWS], dtype=torch.float32)
    assert torch.equal(table.cpu(), want)
    before = {k: v.clone() for k, v in t.items() if v is not None}
    s2 = _scalars(t=9)
    with _capture.replay():
        assert bound.fill(**s2) is table
        bound.momentum_mix()
        bound.basis_mix()
        bound.transport_finish()
    for k, v in before.items():
        assert torch.equal(t[k], v) or (torch.isnan(v).all() and torch.isnan(t[k]).all()), k
    assert torch.equal(bound.table.staging if bound.table.staging is not None else table,
                       torch.tensor([[s2[k]] for k in ROWS], dtype=torch.float32))


def test_bad_tensors_are_named(device):
    t = _batch((2, 4, 6), torch.float32, "left", device, seed=6)
    with pytest.raises(TypeError, match="R1"):
        _bind(dict(t, R1=t["R1"].double()), "left")
    with pytest.raises(ValueError, match="V1 must be contiguous"):
        _bind(dict(t, V1=t["V1"].transpose(1, 2).contiguous().transpose(1, 2)), "left")
    with pytest.raises(ValueError, match="L must have shape"):
        _bind(t, "right")                          # L is the left form's (count, 2a, b)
    with pytest.raises(ValueError, match="together"):
        _bind(dict(t, L=None), "left")
    with pytest.raises(TypeError, match="M must be"):
        _bind(dict(t, M=t["M"].double()), "left")
    with pytest.raises(ValueError, match="side"):
        _bind(t, "up")
