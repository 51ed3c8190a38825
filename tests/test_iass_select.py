"""IASS rank selection (``iass_select``, docs/methods/adarankgrad.md, ``prefix`` and ``ritz``): the
Triton implementation (``||G||^2`` by a Triton reduction, the k x n work on torch) against the
eager reference.

The selected rank is an integer: it must be equal. The inputs put every threshold
``eta_th * E`` at the midpoint between two consecutive cumulative energies (computed in
float64), a gap of about ``E/k`` against fp32 rounding of about ``1e-7 E``, so no decision
lies within rounding of a boundary. E itself is compared with the fp32 budget (1e-5,
``lowrank_fused.testing.tolerance``) for fp32 and bf16 G alike: the kernel reads bf16 exactly
and accumulates in fp32 like the reference, only the summation order differs. The rotated
basis of ``ritz`` mode comes from the same torch SVD of the same B in both, so it must be
bit-identical.
"""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, tolerance

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(97, 203), (203, 97), (64, 64), (1, 33), (130, 257)]
DTYPES = [torch.float32, torch.bfloat16]


def _widths(shape):
    """k in {1, an odd middle width, min(m, n)}."""
    lo = min(shape)
    return sorted({1, (lo // 2) | 1, lo})


def _inputs(shape, k, dtype, device, seed=0):
    """Fresh random G (never zero), an orthonormal sketch basis Qb (m x k, fp32) and
    ``B = Qb^T G`` (fp32)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    m, _ = shape
    G = torch.randn(shape, generator=g).to(dtype)
    Qb = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0].float()
    B = Qb.t() @ G.float()
    return G.to(device), Qb.to(device), B.to(device)


def _cumulative(Qb, B, mode):
    """The cumulative energies c_r (float64) and E (float64) the decision compares."""
    if mode == "ritz":
        e = torch.linalg.svdvals(B.double()).square()
    else:
        e = B.double().square().sum(dim=1)
    return torch.cumsum(e, dim=0)


def _gap(c, r):
    return float(c[r - 1]) - (0.0 if r == 1 else float(c[r - 2]))


def _target(c, E, r):
    """The largest rank <= r whose energy step is at least 1e-4 E (a square B's last
    singular values can be tiny), so its threshold is far from rounding of c."""
    while r > 1 and _gap(c, r) < 1e-4 * E:
        r -= 1
    assert _gap(c, r) >= 1e-4 * E
    return r


def _eta_for(c, E, r_target):
    """eta_th putting ``eta_th * E`` halfway between c[r_target - 2] and c[r_target - 1]."""
    return (float(c[r_target - 1]) - _gap(c, r_target) / 2.0) / E


def _select(backend, G, Qb, B, **kw):
    Q = Qb.clone()
    r = lookup("iass_select", backend)(G, Q, B, **kw)
    return r, Q


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["prefix", "ritz"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_iass_select_matches_reference(shape, mode, dtype, device):
    for k in _widths(shape):
        G, Qb, B = _inputs(shape, k, dtype, device, seed=k)
        E = float(G.double().square().sum())
        c = _cumulative(Qb, B, mode)
        targets = sorted({_target(c, E, r) for r in (1, (k + 1) // 2, k)})
        for r_target in targets:
            for r_max in sorted({k, max(r_target, k - 1)}):
                eta = _eta_for(c, E, r_target)
                want, Q_ref = _select("reference", G, Qb, B, eta_th=eta, r_max=r_max, mode=mode)
                got, Q = _select("triton", G, Qb, B, eta_th=eta, r_max=r_max, mode=mode)
                assert want == r_target == got, (k, r_target, r_max, want, got)
                assert torch.equal(Q, Q_ref)
                if mode == "prefix":
                    assert torch.equal(Q, Qb), "prefix mode must leave Qb unchanged"


@pytest.mark.parametrize("mode", ["prefix", "ritz"])
def test_no_sufficient_prefix_returns_r_max(mode, device):
    """k < m: even the whole sketch keeps less than all of the energy, so eta_th = 1 selects
    min(r_max, k)."""
    G, Qb, B = _inputs((97, 203), 9, torch.float32, device)
    for r_max in (4, 9, 20):
        want, _ = _select("reference", G, Qb, B, eta_th=1.0, r_max=r_max, mode=mode)
        got, _ = _select("triton", G, Qb, B, eta_th=1.0, r_max=r_max, mode=mode)
        assert want == got == min(r_max, 9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_energy_kernel(dtype, device):
    """``||G||^2`` (the op's only m x n work): fp32 budget against float64, deterministic, any
    strides (row-major, transposed, sliced in both dimensions)."""
    from lowrank_fused.kernels.iass_select import grad_sumsq

    for shape in SHAPES + [(300, 1100)]:
        G, _, _ = _inputs(shape, 1, dtype, device)
        want = G.double().square().sum()
        for view in (G, G.t(), G[::2, ::3]):
            got = grad_sumsq(view)
            assert got.dtype == torch.float32 and got.shape == (1,)
            assert_parity(got.reshape(()), view.double().square().sum(),
                          rtol=tolerance(torch.float32), name=f"E {shape}")
        assert torch.equal(grad_sumsq(G), grad_sumsq(G)), "E must be deterministic"
        assert_parity(grad_sumsq(G).reshape(()), want, rtol=tolerance(torch.float32), name="E")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_given_energy_is_used_and_g_not_read(backend, device):
    """With ``E`` (a tensor or a number) the op does not read G: a NaN G still selects the
    same rank as the finite G without E."""
    G, Qb, B = _inputs((64, 64), 11, torch.float32, device)
    E = G.double().square().sum()
    c = _cumulative(Qb, B, "prefix")
    eta = _eta_for(c, float(E), 6)
    want, _ = _select("reference", G, Qb, B, eta_th=eta, r_max=11)
    nan_G = torch.full_like(G, float("nan"))
    for given in (E.float().reshape(1), E.float(), float(E)):
        got, _ = _select(backend, nan_G, Qb, B, eta_th=eta, r_max=11, E=given)
        assert got == want == 6
    with pytest.raises(ValueError, match="E must be"):
        _select(backend, G, Qb, B, eta_th=eta, r_max=11, E=torch.ones(2, device=device))
    with pytest.raises(FloatingPointError):
        _select(backend, G, Qb, B, eta_th=eta, r_max=11, E=float("inf"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["prefix", "ritz"])
def test_zero_gradient_selects_zero(backend, mode, device):
    """The documented zero-gradient case (docs/methods/adarankgrad.md): E == 0 returns 0, Qb
    kept."""
    _, Qb, _ = _inputs((40, 70), 5, torch.float32, device)
    G = torch.zeros(40, 70, device=device)
    B = Qb.t() @ G
    r, Q = _select(backend, G, Qb, B, eta_th=0.9, r_max=5, mode=mode)
    assert r == 0 and torch.equal(Q, Qb)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["prefix", "ritz"])
@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")   # interpreter
def test_non_finite_gradient_raises(backend, mode, bad, device):
    """A NaN or inf entry, or a squared norm overflowing fp32 (bf16 entries of 1e30), raises
    FloatingPointError in both backends, before Qb is touched."""
    G, Qb, _ = _inputs((97, 203), 7, torch.bfloat16 if bad == "overflow" else torch.float32,
                       device)
    if bad == "overflow":
        G[5, 9] = 1e30
    else:
        G[5, 9] = float(bad)
    B = torch.randn(7, 203, device=device)
    Q = Qb.clone()
    with pytest.raises(FloatingPointError, match="non-finite"):
        lookup("iass_select", backend)(G, Q, B, eta_th=0.9, r_max=7, mode=mode)
    assert torch.equal(Q, Qb)


def test_bad_arguments_name_themselves(device):
    G, Qb, B = _inputs((20, 30), 4, torch.float32, device)
    op = lookup("iass_select", "triton")
    with pytest.raises(ValueError, match="mode"):
        op(G, Qb, B, eta_th=0.9, r_max=4, mode="svd")
    with pytest.raises(ValueError, match="Qb"):
        op(G, Qb[:10], B, eta_th=0.9, r_max=4)
    with pytest.raises(ValueError, match="B must"):
        op(G, Qb, B[:, :10], eta_th=0.9, r_max=4)
