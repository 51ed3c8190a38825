"""LDAdam's error-feedback accumulation ``E_i += G_i`` for a class in one launch
(``kernels/ldadam_error_accumulate.py``) against its reference (``torch._foreach_add_``):
bit for bit, every dtype pair LDAdam uses, aligned and unaligned members, the fallback for
non-contiguous members, the on-device ``skip`` flag and bad input."""
import pytest
import torch

from lowrank_fused.kernels.ldadam_error_accumulate import ldadam_error_accumulate
from lowrank_fused.reference.ldadam_error_accumulate import ldadam_error_accumulate_ref
from tests._skip import check_bad_skips, check_skip

PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]


def _members(shape, e_dtype, g_dtype, count, device, seed, packed=False):
    gen = torch.Generator().manual_seed(seed)
    Es = [torch.randn(shape, generator=gen).to(device=device, dtype=e_dtype)
          for _ in range(count)]
    Gs = [torch.randn(shape, generator=gen).to(device=device, dtype=g_dtype)
          for _ in range(count)]
    if packed:     # views of one buffer at odd element offsets: the unaligned variant
        numel = Es[0].numel()
        buf = torch.empty(count * numel + count, dtype=e_dtype, device=device)
        views = [buf[1 + i * (numel + 1):1 + i * (numel + 1) + numel].view(shape)
                 for i in range(count)]
        for v, e in zip(views, Es):
            v.copy_(e)
        Es = views
    return Es, Gs


@pytest.mark.parametrize("e_dtype,g_dtype", PAIRS, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (17, 70), (1, 1)], ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_matches_reference_bit_for_bit(e_dtype, g_dtype, shape, packed, device):
    Es, Gs = _members(shape, e_dtype, g_dtype, 3, device, seed=sum(shape), packed=packed)
    want = [E.clone() for E in Es]
    ldadam_error_accumulate_ref(want, Gs)
    before = [E.clone() for E in Es]
    ldadam_error_accumulate(Es, Gs)
    for i, (got, ref, old) in enumerate(zip(Es, want, before)):
        assert torch.equal(got, ref), f"E[{i}] differs from the reference"
        assert not torch.equal(got, old), f"E[{i}] was not written"


def test_non_contiguous_members_take_the_reference(device):
    Es, Gs = _members((6, 4), torch.float32, torch.float32, 2, device, seed=3)
    Ets = [E.t() for E in Es]
    Gts = [G.t() for G in Gs]
    want = [E.clone() for E in Ets]
    ldadam_error_accumulate_ref(want, Gts)
    ldadam_error_accumulate(Ets, Gts)
    for got, ref in zip(Ets, want):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("impl", [ldadam_error_accumulate, ldadam_error_accumulate_ref],
                         ids=["triton", "reference"])
def test_skip_leaves_every_error_buffer(impl, device):
    def make():
        Es, Gs = _members((5, 9), torch.bfloat16, torch.bfloat16, 3, device, seed=7)
        Gs[1][2, 3] = float("inf")     # the non-finite gradient a skipped step has
        make.Gs = Gs
        return Es

    check_skip(make, lambda Es, skip: impl(Es, make.Gs, skip=skip), device)
    Es, Gs = _members((5, 9), torch.float32, torch.float32, 2, device, seed=8)
    check_bad_skips(lambda skip: impl(Es, Gs, skip=skip), device)


def test_bad_members_are_named(device):
    Es, Gs = _members((4, 4), torch.float32, torch.float32, 2, device, seed=1)
    with pytest.raises(ValueError, match="one entry per member"):
        ldadam_error_accumulate(Es, Gs[:1])
    with pytest.raises(ValueError, match=r"Gs\[1\]"):
        ldadam_error_accumulate(Es, [Gs[0], Gs[1][:3]])
    with pytest.raises(ValueError, match=r"Es\[1\]"):
        ldadam_error_accumulate([Es[0], Es[1].double()], Gs)


def test_bound_call_matches_and_readdresses_new_gradients(device):
    from lowrank_fused.kernels.ldadam_error_accumulate import BoundErrorAccumulate

    Es, Gs = _members((7, 9), torch.float32, torch.bfloat16, 3, device, seed=11)
    want = [E.clone() for E in Es]
    bound = BoundErrorAccumulate(Es, Gs)
    others = [G.clone() for G in Gs]
    for step_grads in (Gs, Gs, others):         # the same tensors, then new ones
        ldadam_error_accumulate_ref(want, step_grads)
        bound(step_grads)
        for got, ref in zip(Es, want):
            assert torch.equal(got, ref)
    before = [E.clone() for E in Es]
    bound(others, skip=torch.ones((), dtype=torch.bool, device=device))
    assert all(torch.equal(a, b) for a, b in zip(Es, before))
    with pytest.raises(ValueError, match=r"Gs\[2\]"):
        bound([others[0], others[1], others[2][:3]])


def test_bound_call_with_a_layout_token_readdresses_and_rechecks(device):
    """Under one layout token a call compares only the gradients' addresses: new gradient
    tensors (same layout) are re-addressed; a new token checks the layouts again."""
    from lowrank_fused.kernels.ldadam_error_accumulate import BoundErrorAccumulate

    Es, Gs = _members((5, 6), torch.float32, torch.float32, 4, device, seed=12)
    want = [E.clone() for E in Es]
    bound = BoundErrorAccumulate(Es, Gs)
    others = [torch.randn_like(G) for G in Gs]
    for token, step_grads in ((1, Gs), (1, Gs), (1, others), (1, Gs)):
        ldadam_error_accumulate_ref(want, step_grads)
        bound(step_grads, layout_token=token)
        for got, ref in zip(Es, want):
            assert torch.equal(got, ref)
    with pytest.raises(ValueError, match=r"Gs\[1\]"):
        bound([Gs[0], Gs[1][:2], Gs[2], Gs[3]], layout_token=2)
    for got, ref in zip(Es, want):             # the refused call wrote nothing
        assert torch.equal(got, ref)
