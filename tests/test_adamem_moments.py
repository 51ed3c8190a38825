"""AdaMeM's K2 (``adamem_moments``, docs/methods/adamem.md lines 5-6): the Triton kernel
against the eager reference.

Tolerances (``lowrank_fused.testing.tolerance``): fp32 states 1e-5 normwise: the kernel
differs from torch only in the order of the row/column sums (about sqrt(n) ulps of 6e-8);
bf16 states 1e-2: a bf16 row/column statistic or M whose fp32 value lands on the other side
of a rounding boundary in the other summation order moves by 1 bf16 ulp (2^-8), which reaches
N as at most that relative change."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, poison, tolerance
from lowrank_fused.testing.trace import HostReads

SHAPES = [(r, n) for r in (1, 5, 32) for n in (1, 33, 257, 1000)]


def _inputs(shape, dtype, device, seed=0):
    """Fresh random state, never zeros: R ~ N(0, 1), M ~ 0.1 N(0, 1), positive statistics."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r, n = shape
    R = torch.randn(shape, generator=g).to(device)
    M = (0.1 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    row = (torch.rand(r, generator=g) + 0.1).to(device=device, dtype=dtype)
    col = (torch.rand(n, generator=g) + 0.1).to(device=device, dtype=dtype)
    return R, M, row, col


def _kw(stats_from_momentum, bias_correction, t=3):
    b1, b2 = 0.9, 0.95
    c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
    return dict(beta1=b1, beta2=b2, eps=1e-8, eps1=1e-30, c1=c1, c2=c2,
                stats_from_momentum=stats_from_momentum)


def _run(backend, R, M, row, col, kw, out=None):
    M, row, col = M.clone(), row.clone(), col.clone()
    N = out if out is not None else torch.empty_like(M)
    lookup("adamem_moments", backend)(R, M, row, col, N, **kw)
    return M, row, col, N


def _assert_same(got, want, dtype):
    tol = tolerance(dtype)
    for a, b, name in zip(got, want, ("M", "row", "col", "N")):
        assert_parity(a, b, rtol=tol, name=name)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stats_from_momentum", [True, False], ids=["momentum", "gradient"])
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bc", "no-bc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adamem_moments_matches_reference(shape, stats_from_momentum, bias_correction, dtype,
                                          device):
    R, M, row, col = _inputs(shape, dtype, device)
    kw = _kw(stats_from_momentum, bias_correction)
    want = _run("reference", R, M, row, col, kw)
    got = _run("triton", R, M, row, col, kw, out=poison(torch.empty_like(M)))
    _assert_same(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adamem_moments_state_carries_over_steps(dtype, device):
    """Five steps, each kernel's in-place state feeding the next (t = 1..5, fresh R)."""
    shape = (7, 300)
    _, M, row, col = _inputs(shape, dtype, device, seed=1)
    ref = [M.clone(), row.clone(), col.clone()]
    fused = [M.clone(), row.clone(), col.clone()]
    for t in range(1, 6):
        R = torch.randn(shape, device=device)
        kw = _kw(True, True, t)
        N_ref = torch.empty_like(M)
        lookup("adamem_moments", "reference")(R, *ref, N_ref, **kw)
        N = poison(torch.empty_like(M))
        lookup("adamem_moments", "triton")(R, *fused, N, **kw)
        _assert_same(fused + [N], ref + [N_ref], dtype)


def test_adamem_moments_strided(device):
    """M and N as transposed views, row and col as strided views: the kernel takes any
    strides of M, N and R (row and col go through contiguous copies)."""
    R, _, _, _ = _inputs((6, 70), torch.float32, device, seed=2)
    M = (0.1 * torch.randn(70, 6, device=device)).t()
    N = poison(torch.empty(70, 6, device=device)).t()
    row = (torch.rand(12, device=device) + 0.1)[::2]
    col = (torch.rand(140, device=device) + 0.1)[::2]
    kw = _kw(False, True)
    want = _run("reference", R, M, row, col, kw)
    lookup("adamem_moments", "triton")(R, M, row, col, N, **kw)
    _assert_same((M, row, col, N), want, torch.float32)


def test_adamem_moments_tiny_statistics(device):
    """A zero row and column of R (stats from the gradient): eps1 keeps mean(row) > 0 and eps
    keeps N finite, as in the reference (docs/methods/adamem.md)."""
    R, M, row, col = _inputs((4, 40), torch.float32, device, seed=3)
    R[1].zero_()
    R[:, 7].zero_()
    row[1] = 0.0
    col[7] = 0.0
    kw = _kw(False, True)
    want = _run("reference", R, M, row, col, kw)
    got = _run("triton", R, M, row, col, kw, out=poison(torch.empty_like(M)))
    _assert_same(got, want, torch.float32)


def test_adamem_moments_reads_nothing_to_the_host(device):
    R, M, row, col = _inputs((5, 33), torch.float32, device, seed=4)
    N = torch.empty_like(M)
    reads = HostReads()
    with reads:
        lookup("adamem_moments", "triton")(R, M, row, col, N, **_kw(True, True))
    assert sum(reads.count.values()) == 0, dict(reads.count)


def test_adamem_moments_rejects_bad_shapes(device):
    R, M, row, col = _inputs((5, 33), torch.float32, device)
    N = torch.empty_like(M)
    impl = lookup("adamem_moments", "triton")
    with pytest.raises(ValueError, match="row must have shape"):
        impl(R, M, row[:4], col, N, **_kw(True, True))
    with pytest.raises(ValueError, match="col must have shape"):
        impl(R, M, row, col[:4], N, **_kw(True, True))
    with pytest.raises(ValueError, match="N must have shape"):
        impl(R, M, row, col, N.t(), **_kw(True, True))
