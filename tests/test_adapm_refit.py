"""AdaPM's refit of (L, R) (kernels/adapm_refit.py: both G products on the K1 projection kernel,
the small algebra in torch, lmax chosen on the device, CholeskyQR2 with its triangular factor)
vs its reference (lowrank_fused/reference/adapm_refit.py): random gradients and factors, odd
shapes, ranks 1 / odd middle / min(m, n), fp32 and bf16 gradients and states, 0..3
iterations, poisoned outputs, a zero target (skipped half-steps), sign_canon False."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import DTYPES, orthonormal, ranks_for

SHAPES = [(97, 203), (203, 97), (64, 64), (130, 257)]
CASES = [(s, r) for s in SHAPES for r in ranks_for(s)]
IDS = [f"{s[0]}x{s[1]}-r{r}" for s, r in CASES]
EPS32 = torch.finfo(torch.float32).eps


def _inputs(m, n, r, g_dtype, s_dtype, device, seed):
    """G in ``g_dtype``; L0 (orthonormal), R0 in the state dtype; Rg = L0^T G in fp32 (the
    step's projection)."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, n, generator=gen).to(device=device, dtype=g_dtype)
    L0 = orthonormal(m, r, device, generator=gen).to(s_dtype)
    R0 = (0.5 * torch.randn(r, n, generator=gen)).to(device=device, dtype=s_dtype)
    Rg = L0.float().t() @ G.float()
    return G, L0, R0, Rg


def _refit(backend, G, L0, R0, Rg, iters, dtype, **kw):
    m, n = G.shape
    r = L0.shape[1]
    L = poison(torch.empty(m, r, dtype=dtype, device=G.device))
    R = poison(torch.empty(r, n, dtype=dtype, device=G.device))
    implementation("adapm_refit", backend, G.device)(G, L0, R0, Rg, L, R, beta1=0.9,
                                                     iters=iters, **kw)
    return L, R


@pytest.mark.parametrize("shape,r", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adapm_refit_matches_reference(shape, r, dtype, device):
    m, n = shape
    G, L0, R0, Rg = _inputs(m, n, r, dtype, dtype, device, 13 * m + r)
    Lw, Rw = _refit("reference", G, L0, R0, Rg, 2, dtype)
    Lg, Rg_ = _refit("triton", G, L0, R0, Rg, 2, dtype)
    # Both routes run the same fp32 GD iterations (the G products differ only in summation
    # order) and orthonormalise the same Lc: Q and Rq move by ~eps * cond(Lc) under rounding.
    # Lc stays close to the orthonormal L0 (cond ~1..10), so the fp32 budget is 1e-5 up to
    # that factor; bf16 states (L, R stored in bf16) take the bf16 entry of the table.
    cond = torch.linalg.cond(Lw.double().cpu()).item()
    rtol = max(tolerance(dtype), 10 * EPS32 * cond)
    assert Lg.dtype == Rg_.dtype == dtype
    assert_parity(Lg, Lw, rtol=rtol, name="L")
    assert_parity(Rg_, Rw, rtol=rtol, name="R")
    # the product, independent of the QR: fp32 GD to rounding
    assert_parity(Lg.float() @ Rg_.float(), Lw.float() @ Rw.float(), rtol=rtol, name="L@R")


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_iteration_counts(iters, device):
    m, n, r = 75, 120, 9
    G, L0, R0, Rg = _inputs(m, n, r, torch.float32, torch.float32, device, iters)
    Lw, Rw = _refit("reference", G, L0, R0, Rg, iters, torch.float32)
    Lg, Rg_ = _refit("triton", G, L0, R0, Rg, iters, torch.float32)
    assert_parity(Lg, Lw, rtol=1e-5, name="L")
    assert_parity(Rg_, Rw, rtol=1e-5, name="R")
    assert (Lg.t() @ Lg - torch.eye(r, device=device)).abs().max() < 1e-5


def test_bf16_gradient_fp32_state(device):
    """The optimizer's common mix: G bf16 (read as bf16 by the projection kernel, cast in its
    prologue: the same values the reference's ``G.float()`` gives), states fp32."""
    m, n, r = 110, 93, 17
    G, L0, R0, Rg = _inputs(m, n, r, torch.bfloat16, torch.float32, device, 4)
    Lw, Rw = _refit("reference", G, L0, R0, Rg, 2, torch.float32)
    Lg, Rg_ = _refit("triton", G, L0, R0, Rg, 2, torch.float32)
    assert_parity(Lg, Lw, rtol=1e-5, name="L")
    assert_parity(Rg_, Rw, rtol=1e-5, name="R")


def test_zero_target_skips_half_steps(device):
    """G = 0 and R0 = 0: R starts at 0, so R R^T = 0 and the L-step is skipped (lmax = 0,
    chosen on the device); the R-step's gradient is 0. Both give L = qr(L0), R = 0."""
    m, n, r = 40, 60, 5
    G = torch.zeros(m, n, device=device)
    L0 = orthonormal(m, r, device)
    R0 = torch.zeros(r, n, device=device)
    Rg = torch.zeros(r, n, device=device)
    Lw, Rw = _refit("reference", G, L0, R0, Rg, 2, torch.float32)
    Lg, Rg_ = _refit("triton", G, L0, R0, Rg, 2, torch.float32)
    assert_parity(Lg, Lw, rtol=1e-5, name="L")
    assert torch.equal(Rg_, torch.zeros_like(Rg_)) and torch.equal(Rw, torch.zeros_like(Rw))


def test_sign_canon_false_runs_the_reference(device):
    """Library signs are Householder's: the composition hands those calls to the reference."""
    G, L0, R0, Rg = _inputs(50, 70, 6, torch.float32, torch.float32, device, 1)
    Lw, Rw = _refit("reference", G, L0, R0, Rg, 2, torch.float32, sign_canon=False)
    Lg, Rg_ = _refit("triton", G, L0, R0, Rg, 2, torch.float32, sign_canon=False)
    assert torch.equal(Lg, Lw) and torch.equal(Rg_, Rw)


def test_no_host_read(device):
    """lmax stays on the device: no ``.item()`` / ``bool(tensor)`` in the composition (the
    reference reads lmax twice per iteration)."""
    from lowrank_fused.testing.trace import HostReads

    G, L0, R0, Rg = _inputs(64, 80, 8, torch.float32, torch.float32, device, 2)
    counts = {}
    for backend in ("reference", "triton"):
        with HostReads() as reads:
            _refit(backend, G, L0, R0, Rg, 2, torch.float32)
        counts[backend] = dict(reads.count)
    assert counts["reference"] == {"_local_scalar_dense": 4}
    # none left (on a GPU the syncs that remain are library ones: eigvalsh's error check and
    # cholesky_qr2's selection of fallback matrices, ``nonzero().tolist()``, once per refit)
    assert counts["triton"] == {}, counts
