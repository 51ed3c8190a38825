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


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_k3_divisor_equals_the_scale_launch_then_k3(dtype, side, device):
    """The engine's fused form: the limiter's factors only (``scale=False``: N untouched) and
    the grouped K3 reading ``N_b / f_b`` (``divisor``, ``DIVIDE_N``) give W the bits of the
    two-launch limiter followed by the plain K3; the memories equal too. Both sides; N and
    the bases in fp32 or bf16 (N's rounding after the division is kept); odd shapes."""
    from lowrank_fused.ops_grouped import BoundGroupedBackprojectUpdate

    count, m, n, r = 5, 37, 29, 6
    gen = torch.Generator().manual_seed(7)
    low = (r, n) if side == "left" else (m, r)
    N, norms, prevs = _case(dtype, device, count=count, shape=low)
    Ws = [torch.randn(m, n, generator=gen).to(device=device, dtype=dtype) for _ in range(count)]
    Ps = [torch.randn((m, r) if side == "left" else (r, n), generator=gen).to(
        device=device, dtype=dtype) for _ in range(count)]
    coef, post = [0.3, 0.7, 1.1, 0.2, 0.5], [0.01] * count

    def run(fused):
        W = [w.clone() for w in Ws]
        Nb, pv = N.clone(), [p.clone() for p in prevs]
        Nb_before = Nb.clone()
        k3 = BoundGroupedBackprojectUpdate(W, Ps, list(Nb.unbind(0)), side=side,
                                           backend="triton")
        assert k3.takes_divisor
        lim = BoundGroupedNormGrowthLimit(Nb, norms, pv)
        lim(1.01, scale=not fused)
        if fused:
            assert torch.equal(Nb, Nb_before), "N is not written"
        k3(coef=coef, pre_scale=1.0, post_decay=post, divisor=lim.f if fused else None)
        return W, pv

    want_W, want_p = run(False)
    got_W, got_p = run(True)
    for b in range(count):
        assert torch.equal(got_W[b], want_W[b]), f"W[{b}]"
        assert torch.equal(got_p[b], want_p[b]), f"prevs[{b}]"
    # not trivially equal: a throttled member's update differs from the unlimited one
    plain = [w.clone() for w in Ws]
    BoundGroupedBackprojectUpdate(plain, Ps, list(N.clone().unbind(0)), side=side,
                                  backend="triton")(coef=coef, pre_scale=1.0, post_decay=post)
    assert not torch.equal(plain[0], got_W[0])


def test_k3_divisor_is_checked(device):
    from lowrank_fused.ops_grouped import BoundGroupedBackprojectUpdate

    Ws = [torch.randn(8, 9, device=device) for _ in range(2)]
    Ps = [torch.randn(8, 3, device=device) for _ in range(2)]
    Ns = [torch.randn(3, 9, device=device) for _ in range(2)]
    k3 = BoundGroupedBackprojectUpdate(Ws, Ps, Ns, backend="triton")
    with pytest.raises(ValueError, match="divisor must be"):
        k3(coef=0.1, divisor=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="divisor must be"):
        k3(coef=0.1, divisor=torch.ones(2, device=device, dtype=torch.float64))
    ref = BoundGroupedBackprojectUpdate(Ws, Ps, Ns, backend="reference")
    assert not ref.takes_divisor
    with pytest.raises(ValueError, match="Triton launcher"):
        ref(coef=0.1, divisor=torch.ones(2, device=device))
