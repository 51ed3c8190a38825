"""AdaMeM's residual column statistics (``residual_col_stats``, docs/methods/adamem.md lines 4
and 7 and the fused identity): the Triton kernels against the eager reference, in the three
ways the op runs: identity form with ``colsum(G^2)`` given (the optimizer's path: no pass over
G), identity form computing it, and the explicit form (S formed tile by tile, never stored).

Tolerances (``lowrank_fused.testing.tolerance``): the outputs ``c_os`` and ``col_scale`` are
fp32, and so is every intermediate in both implementations (a bf16 G is read exactly and
widened), so fp32 and bf16 G alike get the fp32 budget 1e-5 normwise: they differ only in
the order of the column sums over m and r and of the length-r dot products (about sqrt(m)
ulps). A bf16 ``c_os`` / ``col_scale`` gets the bf16 budget 1e-2 (1 ulp is 2^-8). The initial
``c_os`` is of the size of the new statistic (``beta2 = 0.9``), so an error in the residual
term is not hidden by the EMA. At ``r = m`` the residual is zero up to cancellation in both
implementations (identity form: clamped at 0); its absolute error is then measured against
the size of ``c_os``, which the normwise error does.
"""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, poison, tolerance

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(97, 203), (203, 97), (64, 64), (1, 33), (130, 257)]
FORMS = ["identity-given", "identity", "explicit"]
KW = dict(beta2=0.9, eps1=1e-30, eps=1e-8, c2=1 - 0.9 ** 3)


def _ranks(shape):
    """r in {1, an odd middle rank, min(m, n)} (P is m x r with orthonormal columns)."""
    lo = min(shape)
    return sorted({1, (lo // 2) | 1, lo})


def _inputs(shape, r, dtype, device, state_dtype=torch.float32, seed=0):
    """Fresh random G (never zero), orthonormal P (m x r), R = P^T G (fp32), colsum(G^2), and
    a positive c_os of the size of colmean(G^2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    m, n = shape
    G = torch.randn(shape, generator=g).to(dtype)
    P = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0].float()
    R = P.t() @ G.float()
    g_cs = G.float().square().sum(dim=0)
    c_os = ((torch.rand(n, generator=g) + 0.5) * (g_cs / m).mean()).to(state_dtype)
    return [t.to(device) for t in (G, P, R, g_cs, c_os)]


def _run(backend, form, G, P, R, g_cs, c_os, **extra):
    c = c_os.clone()
    scale = poison(torch.empty_like(c))
    lookup("residual_col_stats", backend)(
        G, P, R, c, scale, **KW, explicit=form == "explicit",
        g_col_sumsq=g_cs if form == "identity-given" else None, **extra)
    return c, scale


def _assert_same(got, want, dtype):
    for a, b, name in zip(got, want, ("c_os", "col_scale")):
        assert_parity(a, b, rtol=tolerance(dtype), name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_col_stats_matches_reference(shape, form, dtype, device):
    for r in _ranks(shape):
        inputs = _inputs(shape, r, dtype, device, seed=r)
        _assert_same(_run("triton", form, *inputs), _run("reference", form, *inputs),
                     torch.float32)


@pytest.mark.parametrize("form", FORMS)
def test_bf16_state(form, device):
    inputs = _inputs((97, 203), 9, torch.bfloat16, device, state_dtype=torch.bfloat16)
    _assert_same(_run("triton", form, *inputs), _run("reference", form, *inputs),
                 torch.bfloat16)


@pytest.mark.parametrize("form", ["identity", "explicit"])
@pytest.mark.parametrize("split", [1, 2, 3])
def test_row_slices(form, split, device):
    """The column-sum pass cut into row slices (split-K; on a GPU the launcher picks it) adds
    its partials in a fixed order: the same result for every split, deterministic."""
    inputs = _inputs((300, 130), 17, torch.float32, device)
    want = _run("reference", form, *inputs)
    got = _run("triton", form, *inputs, split=split)
    _assert_same(got, want, torch.float32)
    again = _run("triton", form, *inputs, split=split)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("form", FORMS)
def test_strided_inputs(form, device):
    """G, P, R as transposed views (a right-projected matrix arrives so), c_os, col_scale and
    colsum(G^2) as strided views."""
    G, P, R, g_cs, c_os = _inputs((40, 70), 6, torch.float32, device)
    Gt = G.t().contiguous().t()
    Pt = P.t().contiguous().t()
    Rt = R.t().contiguous().t()
    g_cs2 = torch.stack([g_cs, g_cs], dim=1)[:, 0]
    want = _run("reference", form, G, P, R, g_cs, c_os)
    c = torch.stack([c_os, c_os], dim=1)[:, 1]
    scale = poison(torch.empty(70, 3, device=device))[:, 2]
    lookup("residual_col_stats", "triton")(Gt, Pt, Rt, c, scale, **KW,
                                           explicit=form == "explicit",
                                           g_col_sumsq=g_cs2 if form == "identity-given" else None)
    _assert_same((c, scale), want, torch.float32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # interpreter
def test_non_finite_gradient_propagates(form, bad, device):
    """A non-finite entry of G makes its column's statistics NaN in both implementations (the
    clamp at 0 of the identity form keeps NaN, as torch.clamp does); the other columns are
    unaffected."""
    G, P, _, _, c_os = _inputs((97, 203), 5, torch.float32, device)
    G[11, 17] = float(bad)
    R = P.t() @ G
    g_cs = G.square().sum(dim=0)
    want = _run("reference", form, G, P, R, g_cs, c_os)
    got = _run("triton", form, G, P, R, g_cs, c_os)
    for a, b, name in zip(got, want, ("c_os", "col_scale")):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        assert not torch.isfinite(b[17])
        keep = torch.isfinite(b)
        assert_parity(a[keep], b[keep], rtol=tolerance(torch.float32), name=name)


def test_identity_clamps_cancellation_at_zero(device):
    """Where ``colsum(G^2) < colsum(R^2)`` (cancellation; forced here by a colsum(G^2) 1%
    short in every other column) the residual statistic is 0, not negative: ``c_os`` gets
    ``(1-beta2)*eps1`` there, as in the reference."""
    G, P, R, g_cs, c_os = _inputs((64, 90), 64, torch.float32, device)
    g_cs = g_cs.clone()
    g_cs[::2] *= 0.99
    want = _run("reference", "identity-given", G, P, R, g_cs, c_os)
    got = _run("triton", "identity-given", G, P, R, g_cs, c_os)
    _assert_same(got, want, torch.float32)
    assert torch.allclose(got[0][::2], KW["beta2"] * c_os[::2] + (1 - KW["beta2"]) * KW["eps1"])


def test_state_carries_over_steps(device):
    """Five steps of the optimizer's path (identity form, colsum(G^2) given), each step's
    c_os feeding the next, bias correction changing with t."""
    G, P, _, _, c_os = _inputs((64, 150), 8, torch.float32, device)
    ref, fused = c_os.clone(), c_os.clone()
    for t in range(1, 6):
        G = torch.randn(64, 150, device=device)
        R = P.t() @ G
        g_cs = G.square().sum(dim=0)
        kw = dict(KW, c2=1 - 0.9 ** t)
        s_ref, s = torch.empty_like(ref), poison(torch.empty_like(ref))
        lookup("residual_col_stats", "reference")(G, P, R, ref, s_ref, **kw, g_col_sumsq=g_cs)
        lookup("residual_col_stats", "triton")(G, P, R, fused, s, **kw, g_col_sumsq=g_cs)
        _assert_same((fused, s), (ref, s_ref), torch.float32)


def test_bad_shapes_name_the_argument(device):
    G, P, R, g_cs, c_os = _inputs((20, 30), 4, torch.float32, device)
    op = lookup("residual_col_stats", "triton")
    scale = torch.empty_like(c_os)
    with pytest.raises(ValueError, match="P must"):
        op(G, P[:10], R, c_os, scale, **KW)
    with pytest.raises(ValueError, match="R must"):
        op(G, P, R[:, :10], c_os, scale, **KW)
    with pytest.raises(ValueError, match="col_scale must"):
        op(G, P, R, c_os, scale[:5], **KW)
    with pytest.raises(ValueError, match="g_col_sumsq must"):
        op(G, P, R, c_os, scale, **KW, g_col_sumsq=g_cs[:3])
