"""The Triton batched small Cholesky inverse (``kernels/small_cholesky_inverse.py``) against
the eager reference (``reference/small_cholesky_inverse.py``) and against an fp64 Cholesky, on
fresh random Gram matrices of odd sizes up to the register tile's limit: well conditioned,
moderately ill-conditioned (still ok), singular, zero, with a tiny pivot (not ok) and
non-finite (not ok). Outputs are poisoned before each call."""
import pytest
import torch

from lowrank_fused import subspace as ss
from lowrank_fused.dispatch import available, implementation, resolve_call

pytestmark = pytest.mark.skipif(not available("triton", "cpu") and not torch.cuda.is_available(),
                                reason="triton unavailable here")


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
