"""SSRF range finder and AdaPM's basis initialisation on the shared subspace primitives
(kernels/range_finder.py: batched GEMM kernel + CholeskyQR2) vs their Householder references
(lowrank_fused/reference/range_finder.py, reference/adapm_refit.py): random gradients with a
decaying spectrum, odd shapes, widths 1..min(m, n), power iterations 0..2, fp32 and bf16
gradients, poisoned outputs."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.testing import assert_parity, poison
from _cases import DTYPES, SHAPES, orthonormal

CASES = [(s, k) for s in SHAPES for k in sorted({1, max(1, min(s) // 3) | 1})]


def decaying(m, n, device, dtype, decay=0.9):
    """G = U diag(s) V^T with s_i = decay^i: cond(G Omega) stays ~decay^-k, so both QR
    routes are well posed and must agree to fp32 rounding."""
    k = min(m, n)
    s = decay ** torch.arange(k, dtype=torch.float32, device=device)
    G = (orthonormal(m, k, device) * s) @ orthonormal(n, k, device).t()
    return G.to(dtype)


# A Q column moves by ~eps * cond(Y) under rounding; with decay 0.9 and k <= 68 the QR inputs
# have cond <~ 1e3, so 1e-4 normwise is fp32 rounding (bf16 G: both routes read the same
# rounded G and compute in fp32, so the bound is the same).
RTOL = 1e-4


@pytest.mark.parametrize("shape,k", CASES, ids=[f"{s[0]}x{s[1]}-k{k}" for s, k in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q", [0, 1, 2])
def test_range_finder_matches_reference(shape, k, dtype, q, device):
    m, n = shape
    G = decaying(m, n, device, dtype)
    omega = torch.randn(n, k, device=device)
    want = poison(torch.empty(m, k, device=device))
    got = poison(torch.empty(m, k, device=device))
    implementation("range_finder", "reference", device)(G, omega, want, power_iters=q,
                                                        fill_seed=3)
    implementation("range_finder", "triton", device)(G, omega, got, power_iters=q, fill_seed=3)
    assert_parity(got, want, rtol=RTOL, name="Q")
    eye = torch.eye(k, device=device)
    assert (got.t() @ got - eye).abs().max() < 1e-5


@pytest.mark.parametrize("shape,k", CASES, ids=[f"{s[0]}x{s[1]}-k{k}" for s, k in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adapm_init_basis_matches_reference(shape, k, dtype, device):
    m, n = shape
    G = decaying(m, n, device, dtype)
    omega = torch.randn(n, k, device=device)
    want = poison(torch.empty(m, k, device=device))
    got = poison(torch.empty(m, k, device=device))
    implementation("adapm_init_basis", "reference", device)(G, omega, want)
    implementation("adapm_init_basis", "triton", device)(G, omega, got)
    assert_parity(got, want, rtol=RTOL, name="L")


def test_sign_canon_false_runs_the_reference(device):
    """Library signs are Householder's: the composition hands those calls to the reference."""
    G = decaying(40, 30, device, torch.float32)
    omega = torch.randn(30, 5, device=device)
    want, got = torch.empty(40, 5, device=device), torch.empty(40, 5, device=device)
    implementation("range_finder", "reference", device)(G, omega, want, power_iters=1,
                                                        sign_canon=False)
    implementation("range_finder", "triton", device)(G, omega, got, power_iters=1,
                                                     sign_canon=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["zero", "rank2"])
def test_range_finder_rank_deficient_input_is_orthonormal_seeded_and_spans_g(kind, device):
    """Zero and rank-deficient gradients: CholeskyQR2 falls back to Householder with seeded
    completion, so the basis is orthonormal, reproducible, seed-dependent, and contains the
    range of G."""
    m, n, k = 40, 70, 8
    G = torch.zeros(m, n, device=device)
    if kind == "rank2":
        G = orthonormal(m, 2, device) @ torch.randn(2, n, device=device)
    omega = torch.randn(n, k, device=device)
    rf = implementation("range_finder", "triton", device)
    a, b, c = (torch.empty(m, k, device=device) for _ in range(3))
    rf(G, omega, a, power_iters=1, fill_seed=5)
    rf(G, omega, b, power_iters=1, fill_seed=5)
    rf(G, omega, c, power_iters=1, fill_seed=6)
    assert (a.t() @ a - torch.eye(k, device=device)).abs().max() < 1e-5
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (G - a @ (a.t() @ G)).abs().max() <= 1e-5 * max(1.0, G.abs().max().item())
