"""AdaMeM's Adafactor step of a set of same-size vectors in one launch
(``kernels/grouped_adamem_vector_step.py``) against the single-vector launcher it extends
(``adafactor_bc_unfactored_step``, bit for bit: the same expression per member) and against
the eager reference (its loop, ``lowrank_fused.reference.grouped_adamem_vector_step``), with
per-member scalars, every parameter dtype, the on-device ``skip`` flag and bad input."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.kernels.grouped_adamem_vector_step import GroupedAdamemVectorStep
from lowrank_fused.reference.grouped_adamem_vector_step import grouped_adamem_vector_step_ref
from lowrank_fused.testing import assert_parity, tolerance
from tests._skip import check_bad_skips, check_skip

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _members(numel, dtype, count, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(numel, generator=g).to(device=device, dtype=dtype) for _ in range(count)]
    Gs = [torch.randn(numel, generator=g).to(device=device, dtype=dtype) for _ in range(count)]
    Vs = [torch.rand(numel, generator=g).to(device) + 0.1 for _ in range(count)]
    return Ws, Gs, Vs


def _rows(count):
    """Per-member scalars, the decay branches both ways (pre_scale 1 / not, post 0 / not)."""
    return [(1e-2 * (b + 1), 0.95 - 0.01 * b, 1e-30, 1e-8, 0.3 + 0.1 * b,
             1.0 if b % 2 else 0.999, 0.0 if b % 3 else 1e-3) for b in range(count)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 33, 1500])
def test_matches_the_single_launcher_bit_for_bit(dtype, numel, device):
    count = 4
    Ws, Gs, Vs = _members(numel, dtype, count, device, seed=numel)
    rows = _rows(count)
    want_W, want_V = [W.clone() for W in Ws], [V.clone() for V in Vs]
    grouped_adamem_vector_step_ref(want_W, Gs, want_V, rows,
                                   impl=lookup("adafactor_bc_unfactored_step", "triton"))
    ref_W, ref_V = [W.clone() for W in Ws], [V.clone() for V in Vs]
    grouped_adamem_vector_step_ref(ref_W, Gs, ref_V, rows)
    GroupedAdamemVectorStep(Ws, Gs, Vs)(Gs, rows)
    for b in range(count):
        assert torch.equal(Ws[b], want_W[b]) and torch.equal(Vs[b], want_V[b]), f"member {b}"
        assert_parity(Ws[b], ref_W[b], rtol=tolerance(dtype), name=f"W[{b}]")
        assert_parity(Vs[b], ref_V[b], rtol=1e-6, name=f"V[{b}]")


def test_new_gradient_tensors_are_addressed_again(device):
    Ws, Gs, Vs = _members(40, torch.float32, 3, device)
    step = GroupedAdamemVectorStep(Ws, Gs, Vs)
    others = [G.clone() * 2 for G in Gs]
    want_W, want_V = [W.clone() for W in Ws], [V.clone() for V in Vs]
    grouped_adamem_vector_step_ref(want_W, others, want_V, _rows(3),
                                   impl=lookup("adafactor_bc_unfactored_step", "triton"))
    step(others, _rows(3))
    for b in range(3):
        assert torch.equal(Ws[b], want_W[b]) and torch.equal(Vs[b], want_V[b])


@pytest.mark.parametrize("which", ["triton", "reference"])
def test_skip_leaves_weights_and_statistics(which, device):
    count, numel = 3, 50
    Gs = _members(numel, torch.bfloat16, count, device, seed=5)[1]

    def make():
        Ws, _, Vs = _members(numel, torch.bfloat16, count, device, seed=5)
        return Ws + [V for V in Vs]

    def run(out, skip):
        Ws, Vs = out[:count], out[count:]
        if which == "triton":
            GroupedAdamemVectorStep(Ws, Gs, Vs)(Gs, _rows(count), skip=skip)
        else:
            grouped_adamem_vector_step_ref(Ws, Gs, Vs, _rows(count), skip=skip)

    check_skip(make, run, device)
    Ws, Gs, Vs = _members(numel, torch.float32, count, device)
    step = GroupedAdamemVectorStep(Ws, Gs, Vs)
    check_bad_skips(lambda skip: step(Gs, _rows(count), skip=skip), device)
    check_bad_skips(lambda skip: grouped_adamem_vector_step_ref(Ws, Gs, Vs, _rows(count),
                                                                skip=skip), device)


def test_bad_members_are_named(device):
    Ws, Gs, Vs = _members(10, torch.float32, 2, device)
    with pytest.raises(ValueError, match=r"Gs\[1\]"):
        GroupedAdamemVectorStep(Ws, [Gs[0], Gs[1][:5]], Vs)
    with pytest.raises(TypeError, match="fp32"):
        GroupedAdamemVectorStep(Ws, Gs, [V.double() for V in Vs])
    step = GroupedAdamemVectorStep(Ws, Gs, Vs)
    with pytest.raises(ValueError, match="one entry per member"):
        step(Gs, _rows(1))
    with pytest.raises(ValueError, match=r"Gs\[0\]"):
        step([G.to(torch.bfloat16) for G in Gs], _rows(2))
