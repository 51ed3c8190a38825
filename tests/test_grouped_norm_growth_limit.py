"""The norm-growth limiter on a whole stack of members (``BoundGroupedNormGrowthLimit``, two
launches): each member's bits equal the single-matrix Triton limiter's given the same norm
(``sumsq``), it matches the eager grouped reference, and a set skip flag keeps every memory."""
import pytest
import torch

from lowrank_fused.kernels.norm_growth_limit import (BoundGroupedNormGrowthLimit,
                                                     grouped_norm_growth_limit,
                                                     norm_growth_limit)
from lowrank_fused.reference.norm_growth_limit import grouped_norm_growth_limit_ref
from lowrank_fused.testing import assert_parity, tolerance


def _case(dtype, device, count=5, shape=(3, 37)):
    N = torch.randn((count,) + shape, device=device).to(dtype)
    norms = N.float().pow(2).sum(dim=(1, 2))
    # per member: throttled (growth above gamma), kept, and no memory (0)
    ratios = [0.5, 2.0, 0.0, 0.9, 1.5][:count]
    prevs = [(r * z).reshape(()).clone() for r, z in zip(ratios, norms.sqrt())]
    return N, norms, prevs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_limiter_equals_the_single_kernel(dtype, device):
    N, norms, prevs = _case(dtype, device)
    want_N = N.clone()
    want_prevs = [p.clone() for p in prevs]
    for b in range(N.shape[0]):
        norm_growth_limit(want_N[b], want_prevs[b], gamma=1.01, first=False,
                          sumsq=norms[b:b + 1].clone())
    got_N = N.clone()
    got_N_before = got_N.clone()
    got_prevs = [p.clone() for p in prevs]
    BoundGroupedNormGrowthLimit(got_N, norms, got_prevs)(1.01)
    assert torch.equal(got_N, want_N)
    for b, (g, w) in enumerate(zip(got_prevs, want_prevs)):
        assert torch.equal(g, w), f"prevs[{b}]"
    assert not torch.equal(got_N[0], got_N_before[0]), "the throttled member is scaled"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_limiter_matches_reference(dtype, device):
    N, norms, prevs = _case(dtype, device)
    want_N, want_prevs = N.clone(), [p.clone() for p in prevs]
    grouped_norm_growth_limit_ref(want_N, norms, want_prevs, gamma=1.01)
    got_N, got_prevs = N.clone(), [p.clone() for p in prevs]
    grouped_norm_growth_limit(got_N, norms, got_prevs, gamma=1.01)
    assert_parity(got_N, want_N, rtol=tolerance(dtype), name="N")
    assert_parity(torch.stack(got_prevs), torch.stack(want_prevs),
                  rtol=tolerance(torch.float32), name="prevs")


@pytest.mark.parametrize("skip", [True, False])
def test_grouped_limiter_skip_keeps_every_memory(skip, device):
    N, norms, prevs = _case(torch.float32, device)
    before = [p.clone() for p in prevs]
    flag = torch.tensor(skip, device=device)
    BoundGroupedNormGrowthLimit(N, norms, prevs)(1.01, skip=flag)
    ref_prevs = [p.clone() for p in before]
    grouped_norm_growth_limit_ref(N.clone(), norms, ref_prevs, gamma=1.01, skip=flag)
    for b, (got, old, ref) in enumerate(zip(prevs, before, ref_prevs)):
        if skip:
            assert torch.equal(got, old), f"prevs[{b}] changed on a skipped step"
            assert torch.equal(ref, old), f"reference prevs[{b}] changed on a skipped step"
        else:
            assert_parity(got, ref, rtol=tolerance(torch.float32), name=f"prevs[{b}]")
    if not skip:
        assert not torch.equal(prevs[0], before[0])


def test_grouped_limiter_rejects_bad_lists(device):
    N, norms, prevs = _case(torch.float32, device)
    with pytest.raises(ValueError, match="norms must be"):
        BoundGroupedNormGrowthLimit(N, norms[:-1], prevs)
    with pytest.raises(ValueError, match="prevs has 4 memories"):
        BoundGroupedNormGrowthLimit(N, norms, prevs[:-1])
    with pytest.raises(ValueError, match=r"prevs\[1\] must be"):
        BoundGroupedNormGrowthLimit(N, norms, [prevs[0], prevs[1].double()] + prevs[2:])
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        BoundGroupedNormGrowthLimit(N, norms, prevs)(0.5)
