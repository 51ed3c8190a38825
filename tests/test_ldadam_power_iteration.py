"""LDAdam's per-step power iteration on the batched GEMM kernel
(kernels/ldadam_power_iteration.py) vs the eager reference
(lowrank_fused/reference/ldadam_power_iteration.py): random inputs, odd shapes, ranks
1..min(m, n), fp32 and bf16 accumulated gradients, poisoned outputs."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.testing import assert_parity, poison, tolerance
from lowrank_fused.testing.trace import AllocationTrace
from _cases import DTYPES, SHAPES, orthonormal, ranks_for

CASES = [(s, r) for s in SHAPES for r in ranks_for(s)]


@pytest.mark.parametrize("shape,rank", CASES, ids=[f"{s[0]}x{s[1]}-r{r}" for s, r in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_power_iteration_matches_reference(shape, rank, dtype, device):
    m, n = shape
    A = torch.randn(m, n, device=device).to(dtype)
    P = orthonormal(m, rank, device)
    M = torch.randn(rank, n, device=device)
    kw = dict(coef_m=0.9 / (1 - 0.9 ** 3), coef_a=0.1)
    want = poison(torch.empty(m, rank, device=device))
    got = poison(torch.empty(m, rank, device=device))
    implementation("ldadam_power_iteration", "reference", device)(A, P, M, want, **kw)
    implementation("ldadam_power_iteration", "triton", device)(A, P, M, got, **kw)
    # two fp32-accumulated GEMMs over the same (rounded) A: fp32 rounding either way
    assert_parity(got, want, rtol=tolerance(torch.float32), name="Y")


def test_explicit_form_runs_the_reference(device):
    """The explicit form reproduces the official code's rounding points in a materialised b:
    the composition hands it to the reference."""
    A = torch.randn(30, 20, device=device).bfloat16()
    P = orthonormal(30, 4, device)
    M = torch.randn(4, 20, device=device)
    kw = dict(coef_m=1.1, coef_a=0.1, explicit=True, b_dtype=torch.bfloat16)
    want, got = torch.empty(30, 4, device=device), torch.empty(30, 4, device=device)
    implementation("ldadam_power_iteration", "reference", device)(A, P, M, want, **kw)
    implementation("ldadam_power_iteration", "triton", device)(A, P, M, got, **kw)
    assert torch.equal(got, want)


def test_power_iteration_allocates_no_full_size_tensor(device):
    A = torch.randn(96, 80, device=device).bfloat16()
    P = orthonormal(96, 8, device)
    M = torch.randn(8, 80, device=device)
    Y = torch.empty(96, 8, device=device)
    with AllocationTrace() as trace:
        implementation("ldadam_power_iteration", "triton", device)(A, P, M, Y, coef_m=1.0,
                                                                   coef_a=0.1)
    assert trace.at_least(A.numel()) == []
