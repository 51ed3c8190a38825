"""The norm-growth limiter (docs/methods/adaptive_adamw.md, phase B): Triton kernel against the
eager reference, with its norm read from N or given by K2's side output (``sumsq``). fp32 N: 1e-5
(``||N||`` summed in another order); bf16 N: 1e-2 (one bf16 ulp of N/f)."""
import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, poison, tolerance


def _limit(backend, N, prev, *, first, gamma=1.01, with_sumsq=False):
    N, prev = N.clone(), prev.clone()
    sumsq = (N.float() ** 2).sum().reshape(1) if with_sumsq else None
    lookup("norm_growth_limit", backend)(N, prev, gamma=gamma, first=first, sumsq=sumsq)
    return N, prev


# previous norms relative to ||N||: growth far above gamma (throttled), below gamma (kept),
# and 0 (no memory: f = 1)
@pytest.mark.parametrize("prev_ratio", [0.5, 2.0, 0.0], ids=["throttled", "kept", "zero"])
@pytest.mark.parametrize("first", [False, True], ids=["step", "first"])
@pytest.mark.parametrize("with_sumsq", [False, True], ids=["norm-from-N", "sumsq"])
@pytest.mark.parametrize("shape,dtype", [((5, 33), torch.float32), ((32, 1000), torch.float32),
                                         ((1, 1), torch.float32), ((7, 300), torch.bfloat16)],
                         ids=str)
def test_norm_growth_limit_matches_reference(prev_ratio, first, with_sumsq, shape, dtype,
                                             device):
    N = torch.randn(shape, device=device).to(dtype)
    z = N.float().norm()
    prev = (prev_ratio * z).reshape(()).clone()
    want_N, want_prev = _limit("reference", N, prev, first=first, with_sumsq=with_sumsq)
    got_N, got_prev = _limit("triton", N, prev, first=first, with_sumsq=with_sumsq)
    tol = tolerance(dtype)
    assert_parity(got_N, want_N, rtol=tol, name="N")
    assert_parity(got_prev, want_prev, rtol=tolerance(torch.float32), name="nl_prev")
    if first:
        assert torch.equal(got_N, N), "the first call only records the norm"
    elif prev_ratio == 0.5:
        assert_parity(got_N.float().norm(), 1.01 * prev, rtol=tol, name="||N|| capped")


def test_sumsq_from_adam_moments_feeds_the_limiter(device):
    """The path AdaptiveAdamW takes between refreshes: K2 with ``sumsq``, then the limiter on
    that norm, equals K2 then the limiter reading N (reference, all in fp32)."""
    shape = (6, 200)
    R = torch.randn(shape, device=device)
    M0, V0 = 0.1 * torch.randn(shape, device=device), torch.rand(shape, device=device) + 1e-3
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-6, step=4, eps_mode="hf")
    prev0 = torch.tensor(1.0, device=device)
    outs = []
    for backend, fused_norm in (("reference", False), ("triton", True)):
        M, V, N = M0.clone(), V0.clone(), poison(torch.empty(shape, device=device))
        sumsq = torch.empty(1, device=device) if fused_norm else None
        ops.adam_moments(R, M, V, N, sumsq=sumsq, backend=backend, **kw)
        prev = prev0.clone()
        lookup("norm_growth_limit", backend)(N, prev, gamma=1.01, first=False, sumsq=sumsq)
        outs.append((N, prev))
    assert_parity(outs[1][0], outs[0][0], rtol=1e-5, name="N")
    assert_parity(outs[1][1], outs[0][1], rtol=1e-5, name="nl_prev")


def test_norm_growth_limit_non_contiguous_and_empty(device):
    N = torch.randn(30, 8, device=device).t()
    prev = torch.tensor(0.1, device=device)
    want_N, want_prev = _limit("reference", N, prev, first=False)
    got_N, got_prev = N.clone().t().contiguous().t(), prev.clone()
    assert not got_N.is_contiguous()
    lookup("norm_growth_limit", "triton")(got_N, got_prev, gamma=1.01, first=False)
    assert_parity(got_N, want_N, rtol=1e-5, name="N")
    assert_parity(got_prev, want_prev, rtol=1e-5, name="nl_prev")
    E, p = torch.empty(0, 4, device=device), torch.tensor(2.0, device=device)
    lookup("norm_growth_limit", "triton")(E, p, gamma=1.01, first=False)
    assert p.item() == 0.0


def test_norm_growth_limit_rejects_bad_sumsq(device):
    N, prev = torch.randn(3, 4, device=device), torch.tensor(1.0, device=device)
    with pytest.raises(TypeError, match="sumsq must be a 1-element float32"):
        lookup("norm_growth_limit", "triton")(N, prev, gamma=1.01, first=False,
                                              sumsq=torch.ones(2, device=device))
    with pytest.raises(ValueError, match="nl_prev must hold one element"):
        lookup("norm_growth_limit", "triton")(N, torch.ones(2, device=device), gamma=1.01,
                                              first=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_sumsq_is_the_limiters_own_norm(dtype, device):
    """``grouped_sumsq`` over a stack gives each member the ``||N||^2`` the fused limiter
    computes for it alone (without ``sumsq``): fed back as ``sumsq``, the limiter's results
    are bit-identical; members span several partial blocks (2500 elements)."""
    import importlib

    nl = importlib.import_module("lowrank_fused.kernels.norm_growth_limit")
    gen = torch.Generator().manual_seed(3)
    Ns = (torch.randn(3, 50, 50, generator=gen) * 10).to(device=device, dtype=dtype)
    norms = poison(torch.empty(3, dtype=torch.float32, device=device))
    nl.grouped_sumsq(Ns, norms)
    for b in range(3):
        prev = torch.full((), 2.0, device=device)
        a, pa = Ns[b].clone(), prev.clone()
        nl.norm_growth_limit(a, pa, gamma=1.01, first=False)
        c, pc = Ns[b].clone(), prev.clone()
        nl.norm_growth_limit(c, pc, gamma=1.01, first=False, sumsq=norms[b:b + 1])
        assert torch.equal(a, c) and torch.equal(pa, pc)
    with pytest.raises(ValueError, match="out must be"):
        nl.grouped_sumsq(Ns, torch.empty(2, device=device))
