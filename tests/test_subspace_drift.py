"""RSAdamW's random subspace drift (kernels/subspace_drift.py: Triton mix + CholeskyQR2) vs its
Householder reference (lowrank_fused/reference/subspace_drift.py): random bases and draws,
odd shapes, ranks 1 / odd middle / min(m, n), fp32 and bf16 bases, sigma in {1, 0.3, 0},
the first refresh (P_old None), a transposed (right-form) basis, sign_canon False."""
import math

import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.testing import assert_parity
from _cases import DTYPES, SHAPES, orthonormal, ranks_for

CASES = [(s[0], r) for s in SHAPES for r in ranks_for(s)]
IDS = [f"m{m}-r{r}" for m, r in CASES]
EPS32 = torch.finfo(torch.float32).eps


def _draw(m, r, device, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=gen) / m ** 0.5).to(device)


def _rtol(Y):
    """Both routes compute an exact-arithmetic-equal Q from the same fp32 Y; rounding moves Q
    by ~eps * cond(Y) (Householder and CholeskyQR2 alike; CholeskyQR2 hands an ill-conditioned
    Y to Householder). 1e-5 for a well-conditioned Y (the fp32 table entry), and 20 eps
    cond(Y) beyond: a square Gaussian draw (r = m, sigma = 1) has cond ~ 1e2..1e3."""
    cond = torch.linalg.cond(Y.double().cpu()).item()
    return max(1e-5, 20 * EPS32 * cond)


@pytest.mark.parametrize("m,r", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sigma", [1.0, 0.3, 0.0])
def test_subspace_drift_matches_reference(m, r, dtype, sigma, device):
    P = orthonormal(m, r, device).to(dtype)
    Z = _draw(m, r, device, 31 * m + r)
    want = implementation("subspace_drift", "reference", device)(P, Z, sigma=sigma)
    got = implementation("subspace_drift", "triton", device)(P, Z, sigma=sigma)
    assert got.dtype == torch.float32 and got.shape == (m, r)
    Y = (1 - sigma ** 2) ** 0.5 * P.float() + sigma * Z
    assert_parity(got, want, rtol=_rtol(Y), name="P_new")
    assert (got.t() @ got - torch.eye(r, device=device)).abs().max() < 1e-5


@pytest.mark.parametrize("m,r", CASES, ids=IDS)
def test_first_refresh_is_orth_of_the_draw(m, r, device):
    Z = _draw(m, r, device, 7 * m + r)
    want = implementation("subspace_drift", "reference", device)(None, Z, sigma=1.0)
    got = implementation("subspace_drift", "triton", device)(None, Z, sigma=1.0)
    assert_parity(got, want, rtol=_rtol(Z), name="P_new")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_basis_right_form(dtype, device):
    """A right-projected matrix passes ``Q^T`` (a transposed view) as P_old."""
    m, r = 157, 21
    Q = orthonormal(m, r, device).t().contiguous().to(dtype)      # stored r x m
    Z = _draw(m, r, device, 3)
    want = implementation("subspace_drift", "reference", device)(Q.t(), Z, sigma=0.5)
    got = implementation("subspace_drift", "triton", device)(Q.t(), Z, sigma=0.5)
    assert_parity(got, want, rtol=1e-5, name="P_new")


def test_mix_kernel_is_the_spec_formula(device):
    """The Triton mix itself: the same fp32 expression as the reference (exact)."""
    from lowrank_fused.subspace import cholesky_qr2

    m, r, sigma = 300, 5, 0.4
    P = orthonormal(m, r, device)
    Z = _draw(m, r, device, 1)
    got = implementation("subspace_drift", "triton", device)(P, Z, sigma=sigma)
    Y = math.sqrt(1 - sigma ** 2) * P + sigma * Z
    assert torch.equal(got, cholesky_qr2(Y.contiguous()))   # Y: row-major like the kernel's


def test_sign_canon_false_runs_the_reference(device):
    """Library signs are Householder's: the composition hands those calls to the reference."""
    P = orthonormal(50, 6, device)
    Z = _draw(50, 6, device, 2)
    for old in (P, None):
        want = implementation("subspace_drift", "reference", device)(old, Z, sigma=0.7,
                                                                     sign_canon=False)
        got = implementation("subspace_drift", "triton", device)(old, Z, sigma=0.7,
                                                                 sign_canon=False)
        assert torch.equal(got, want)


def test_bad_shape_names_the_argument(device):
    with pytest.raises(ValueError, match="P_old"):
        implementation("subspace_drift", "triton", device)(
            torch.zeros(10, 3, device=device), torch.randn(10, 4, device=device), sigma=0.5)
