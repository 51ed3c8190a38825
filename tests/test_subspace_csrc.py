"""The compiled batched small Cholesky inverse (csrc/small_cholesky.h, CPU twin; the CUDA
kernel shares the routine and is compiled by tests/test_csrc_nvcc.py) against torch."""
import pytest
import torch

from lowrank_fused import _ext
from lowrank_fused import subspace as ss
from lowrank_fused.dispatch import lookup
from lowrank_fused.reference.small_cholesky_inverse import small_cholesky_inverse_ref

needs_cpu_ext = pytest.mark.skipif(_ext.why_no_cpu() is not None, reason=str(_ext.why_no_cpu()))


def _grams(k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(5, 60, k, generator=g)
    Y[1] *= torch.logspace(0, -2, k)                   # moderately ill-conditioned: still ok
    Y[2, :, 3] = Y[2, :, 1]                            # singular
    Y[3] = 0                                           # zero
    Y[4, :, -1] *= 1e-5                                # tiny pivot -> not ok
    return Y.transpose(-1, -2) @ Y


@needs_cpu_ext
@pytest.mark.parametrize("k", [4, 7, 33])
def test_cpu_matches_torch_cholesky(k):
    G = _grams(k)
    impl = lookup("small_cholesky_inverse", "cpu")
    L1, o1 = torch.empty_like(G), torch.empty(5, dtype=torch.int32)
    L0, o0 = torch.empty_like(G), torch.empty(5, dtype=torch.int32)
    impl(G, L1, o1, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)
    small_cholesky_inverse_ref(G, L0, o0, pivot_ratio_tol=ss.PIVOT_RATIO_TOL)
    assert o1.tolist() == o0.tolist()
    if k > 1:
        assert o1.tolist() == [1, 1, 0, 0, 0]
    for b in range(5):
        if o1[b]:
            L = torch.linalg.cholesky(G[b].double())
            ref = torch.linalg.inv(L)
            assert torch.allclose(L1[b].double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max())
            assert torch.equal(L1[b], L1[b].tril())
        else:
            assert torch.equal(L1[b], torch.eye(k))


@needs_cpu_ext
def test_cholesky_qr2_on_cpu_backend_matches_reference():
    Y = torch.randn(4, 100, 10, generator=torch.Generator().manual_seed(1))
    Y[2] = 0
    Qc = ss.cholesky_qr2(Y, backend="cpu")
    Qr = ss.cholesky_qr2(Y, backend="reference")
    assert torch.allclose(Qc, Qr, atol=1e-5)
    err = (Qc.transpose(-1, -2) @ Qc - torch.eye(10)).abs().max()
    assert err < 1e-5


@needs_cpu_ext
def test_cpu_checks():
    impl = lookup("small_cholesky_inverse", "cpu")
    G = torch.eye(3).expand(2, 3, 3).contiguous()
    with pytest.raises(TypeError):
        impl(G.double(), torch.empty(2, 3, 3), torch.empty(2, dtype=torch.int32),
             pivot_ratio_tol=0.0)
    with pytest.raises(ValueError):
        impl(G, torch.empty(2, 3, 3), torch.empty(3, dtype=torch.int32), pivot_ratio_tol=0.0)
    with pytest.raises(ValueError):
        impl(G, G, torch.empty(2, dtype=torch.int32), pivot_ratio_tol=0.0)
