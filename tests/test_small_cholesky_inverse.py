"""The Triton batched small Cholesky inverse (``kernels/small_cholesky_inverse.py``) against
the eager reference (``reference/small_cholesky_inverse.py``) and against an fp64 Cholesky, on
fresh random Gram matrices of odd sizes up to the register tile's limit: well conditioned,
moderately ill-conditioned (still ok), singular, zero, with a tiny pivot (not ok) and
non-finite (not ok). Outputs are poisoned before each call. Under the CPU interpreter these
tests interpret the kernel itself; its numpy twin (what other tests launch there) is compared
with it bit for bit."""
import importlib

import pytest
import torch

from lowrank_fused import subspace as ss
from lowrank_fused.dispatch import available, implementation, resolve_call

pytestmark = pytest.mark.skipif(not available("triton", "cpu") and not torch.cuda.is_available(),
                                reason="triton unavailable here")


@pytest.fixture(autouse=True)
def _interpret_the_kernel():
    """The kernel interpreted, not its numpy twin (``kernels/_interpreter.py``)."""
    from lowrank_fused.dispatch import interpreting

    if not interpreting():
        yield
        return
    from lowrank_fused.kernels._interpreter import interpreted_only

    with interpreted_only():
        yield


def _grams(k, seed, device):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(7, 2 * k + 3, k, generator=g)
    Y[1] *= torch.logspace(0, -2, k)                   # moderately ill-conditioned: still ok
    if k > 3:
        Y[2, :, 3] = Y[2, :, 1]                        # singular
    Y[3] = 0                                           # zero
    Y[4, :, -1] *= 1e-5                                # tiny pivot: not ok
    Y[5, 0, 0] = float("nan")                          # non-finite: not ok
    return (Y.transpose(-1, -2) @ Y).to(device)


def _poisoned(G):
    return (torch.full_like(G, float("nan")),
            torch.full(G.shape[:1], 7, dtype=torch.int32, device=G.device))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("k", [1, 2, 5, 16, 17, 33, 64])
def test_matches_reference_and_fp64(k, device):
    from lowrank_fused.kernels.small_cholesky_inverse import small_cholesky_inverse
    from lowrank_fused.reference.small_cholesky_inverse import small_cholesky_inverse_ref

    G = _grams(k, seed=k, device=device)
    L1, o1 = _poisoned(G)
    L0, o0 = _poisoned(G)
    small_cholesky_inverse(G, L1, o1, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)
    small_cholesky_inverse_ref(G, L0, o0, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)
    assert o1.tolist() == o0.tolist()
    want_ok = [1, 1, 0 if k > 3 else 1, 0, 0 if k > 1 else 1, 0, 1]
    if k == 1:
        want_ok[4] = 1                                 # one pivot: its own ratio is 1
    assert o1.tolist() == want_ok
    eye = torch.eye(k, device=device)
    for b in range(G.shape[0]):
        if not o1[b]:
            assert torch.equal(L1[b], eye)
            continue
        ref = torch.linalg.inv(torch.linalg.cholesky(G[b].double().cpu()))
        # fp32 factorization of a matrix of condition up to ~1e4: ~cond * eps32 relative
        tol = 2e-3 if b == 1 else 2e-5
        torch.testing.assert_close(L1[b].double().cpu(), ref, rtol=tol,
                                   atol=tol * float(ref.abs().max()))
        assert torch.equal(L1[b], L1[b].tril())


def test_cholesky_qr2_on_triton_is_orthonormal(device):
    """``subspace.cholesky_qr2`` with this kernel: Q^T Q = I and Q R = Y (R = Q^T Y upper)."""
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(5, 90, 24, generator=g).to(device)
    Q = ss.cholesky_qr2(Y, backend="triton")
    eye = torch.eye(24, device=device)
    assert float((Q.transpose(1, 2) @ Q - eye).abs().max()) < 1e-5
    R = Q.transpose(1, 2) @ Y
    assert float((R - R.triu()).abs().max()) < 1e-4 * float(R.abs().max())
    assert bool((torch.diagonal(R, dim1=1, dim2=2) > 0).all())
    torch.testing.assert_close(Q, ss.cholesky_qr2(Y, backend="reference"), rtol=1e-4,
                               atol=1e-5)


def test_auto_takes_the_reference_above_the_register_tile(device):
    from lowrank_fused.kernels.small_cholesky_inverse import MAX_K

    for k, want in ((MAX_K, "triton"), (MAX_K + 1, "reference")):
        G = torch.eye(k, device=device).expand(2, k, k).contiguous()
        L, ok = _poisoned(G)
        chosen, _ = resolve_call("small_cholesky_inverse", "auto", G.device, G, L, ok)
        implementation("small_cholesky_inverse", "auto", G.device)(
            G, L, ok, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)
        assert chosen == want
        assert torch.equal(L, torch.eye(k, device=device).expand(2, k, k))
        assert ok.tolist() == [1, 1]


def test_bound_call_and_checks(device):
    from lowrank_fused.kernels.small_cholesky_inverse import (BoundSmallCholeskyInverse,
                                                              small_cholesky_inverse)

    G = _grams(9, seed=1, device=device)
    L1, o1 = _poisoned(G)
    L0, o0 = _poisoned(G)
    small_cholesky_inverse(G, L0, o0, pivot_ratio_tol=1e-3)
    bound = BoundSmallCholeskyInverse(G, L1, o1, pivot_ratio_tol=1e-3)
    for _ in range(2):                     # the second call: the planned launch
        bound()
        assert torch.equal(L1, L0) and torch.equal(o1, o0)
        L1.fill_(float("nan"))
    ok = torch.empty(7, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="Gram must be"):
        small_cholesky_inverse(G.double(), L0, ok, pivot_ratio_tol=0.0)
    with pytest.raises(TypeError, match="ok must be"):
        small_cholesky_inverse(G, L0, ok.float(), pivot_ratio_tol=0.0)
    with pytest.raises(ValueError, match="ok must have shape"):
        small_cholesky_inverse(G, L0, ok[:3], pivot_ratio_tol=0.0)
    with pytest.raises(ValueError, match="distinct"):
        small_cholesky_inverse(G, G, ok, pivot_ratio_tol=0.0)
    with pytest.raises(ValueError, match="at most 64"):
        big = torch.eye(65, device=device).expand(1, 65, 65).contiguous()
        small_cholesky_inverse(big, torch.empty_like(big), ok[:1], pivot_ratio_tol=0.0)
    with pytest.raises(ValueError, match="pivot_ratio_tol"):
        BoundSmallCholeskyInverse(G, L1, o1, pivot_ratio_tol=float("nan"))


def _edge_grams(k, seed):
    """Random SPD Grams and the edge cases (``_grams``), plus: exact zeros off the diagonal
    (signed zeros in the factor), an indefinite matrix, an infinite entry, a negative zero
    pivot, and entries in the upper triangle that must not be read."""
    g = torch.Generator().manual_seed(seed)
    G = _grams(k, seed, "cpu")
    extra = torch.randn(5, k, k, generator=g)
    extra = extra @ extra.transpose(-1, -2) + k * torch.eye(k)
    extra[0] = torch.diag(torch.rand(k, generator=g) + 0.5)      # diagonal: zeros off it
    extra[0].tril_(-1).neg_()
    extra[0] += torch.diag(torch.rand(k, generator=g) + 0.5)
    extra[1] -= 2 * k * torch.eye(k)                               # indefinite
    extra[2, k - 1, 0] = float("inf")
    extra[3, 0, 0] = -0.0
    extra[4] += torch.triu(torch.full((k, k), float("nan")), 1)   # upper triangle not read
    return torch.cat([G, extra]).contiguous()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("k", [1, 3, 16, 17, 31, 33, 64])
def test_numpy_twin_equals_the_interpreted_kernel_bit_for_bit(k):
    """What the CPU interpreter launches for this kernel elsewhere (its batched numpy
    transcription) gives the interpreted kernel's outputs bit for bit, ok flags included."""
    from lowrank_fused.dispatch import interpreting
    sci = importlib.import_module("lowrank_fused.kernels.small_cholesky_inverse")

    if not interpreting():
        pytest.skip("the twin exists under the CPU interpreter only")
    G = _edge_grams(k, seed=100 + k)
    L1, o1 = _poisoned(G)
    sci.small_cholesky_inverse(G, L1, o1, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)  # interpreted
    L2, o2 = _poisoned(G)
    block = sci.block_for(k)
    sci._interpreted_twin((G.shape[0],), G, L2, o2, k, ss.PIVOT_RATIO_TOL, block)
    assert o1.tolist() == o2.tolist()
    assert 0 in o1.tolist() and 1 in o1.tolist()
    assert torch.equal(L1.view(torch.int32), L2.view(torch.int32))


def test_the_twin_is_what_other_tests_launch():
    """Outside ``interpreted_only`` a launch of the kernel runs the twin (a launch counted by
    the interpreter's entry point, no program interpreted)."""
    from lowrank_fused.dispatch import interpreting
    from lowrank_fused.kernels import _interpreter
    sci = importlib.import_module("lowrank_fused.kernels.small_cholesky_inverse")

    if not interpreting():
        pytest.skip("the twin exists under the CPU interpreter only")
    calls = []
    kernel = sci._small_cholesky_inverse_kernel
    keys = [k for k, t in _interpreter._TWINS.items() if t is sci._interpreted_twin]
    assert kernel.rewrite() in keys               # what a launch runs
    G = _grams(5, seed=3, device="cpu")
    L, o = _poisoned(G)
    _interpreter._TWINS_OFF[0] -= 1            # leave the fixture's interpreted_only
    try:
        for key in keys:
            _interpreter._TWINS[key] = lambda *a, **kw: (calls.append(1),
                                                         sci._interpreted_twin(*a, **kw))
        sci.small_cholesky_inverse(G, L, o, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)
    finally:
        for key in keys:
            _interpreter._TWINS[key] = sci._interpreted_twin
        _interpreter._TWINS_OFF[0] += 1
    assert calls == [1]
    assert o.tolist() == [1, 1, 0, 0, 0, 0, 1]
