"""GaLoreKFACAdamW's transport across a refresh (kernels/kfac_transport.py: C on the K1
projection kernel, ``C @ M`` and ``C @ F`` in one launch of the K8 transport kernel,
``(C F) C^T`` in torch) vs its reference (lowrank_fused/reference/kfac_transport.py): random
bases and states, odd shapes, equal and changed ranks, fp32 and bf16 states, transposed
(right-form) views."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.testing import assert_parity, tolerance
from _cases import DTYPES, orthonormal

# (m, n, r_new, r_old)
CASES = [(97, 203, 33, 33), (203, 97, 1, 1), (130, 257, 70, 45), (64, 64, 64, 64)]
IDS = [f"{m}x{n}-r{a}-from{b}" for m, n, a, b in CASES]


@pytest.mark.parametrize("m,n,r_new,r_old", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kfac_transport_matches_reference(m, n, r_new, r_old, dtype, device):
    P_new = orthonormal(m, r_new, device).to(dtype)
    P_old = orthonormal(m, r_old, device).to(dtype)
    M = torch.randn(r_old, n, device=device).to(dtype)
    X = torch.randn(r_old, 2 * r_old, device=device)
    F = (X @ X.t() / (2 * r_old)).to(dtype)
    want = implementation("kfac_transport", "reference", device)(P_new, P_old, M, F)
    got = implementation("kfac_transport", "triton", device)(P_new, P_old, M, F)
    # fp32: sums over m and r in another order, 1e-5; bf16 states: outputs rounded to bf16
    # once on both sides (1 ulp where the fp32 values straddle a rounding boundary)
    for name, a, b in zip(("M", "F"), got, want):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert_parity(a, b, rtol=tolerance(dtype), name=name)


def test_transposed_views_right_form(device):
    """A right-projected matrix passes ``Q^T`` bases and the transposed momentum (views)."""
    m, n, r = 150, 77, 12
    P_new = orthonormal(m, r, device).t().contiguous().t()
    P_old = orthonormal(m, r, device).t().contiguous().t()
    M = torch.randn(n, r, device=device).t()
    X = torch.randn(r, 3 * r, device=device)
    F = X @ X.t() / (3 * r)
    want = implementation("kfac_transport", "reference", device)(P_new, P_old, M, F)
    got = implementation("kfac_transport", "triton", device)(P_new, P_old, M, F)
    for name, a, b in zip(("M", "F"), got, want):
        assert_parity(a, b, rtol=1e-5, name=name)


def test_bad_factor_shape_names_it(device):
    P = orthonormal(20, 3, device)
    with pytest.raises(ValueError, match="F must"):
        implementation("kfac_transport", "triton", device)(
            P, P, torch.randn(3, 9, device=device), torch.randn(3, 4, device=device))
