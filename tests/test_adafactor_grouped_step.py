"""The grouped Adafactor step (``kernels/adafactor_step.py``: ``GroupedAdafactorStep``, what the
step engine runs per class): every member of a group equals the single-tensor op on it bit
for bit (a group of one) and the eager reference to fp32 rounding, with members taking
different scalar sets, factored (2-D and batched) and unfactored, fp32 and bf16; the scratch
is poisoned with NaN first (every value the kernels read from it must have been written);
``skip`` holding True leaves every tensor bit-identical; bad layouts are refused by name."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.reference.adafactor_step import adafactor_step_ref
from lowrank_fused.testing import assert_parity, tolerance

COUNT = 3
# (rho, beta2t, eps1, eps2, clip_threshold, beta1, weight_decay): set 1 clips (d small), set 0
# does not; sel gives member 1 set 1
SETS = [(0.3, 0.4, 1e-30, 1e-3, 1e3, 0.9, 0.1), (0.2, 0.7, 1e-30, 5e-2, 0.05, 0.8, 0.0)]
SEL = [0, 1, 0]


def _members(shape, dtype, momentum, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=g).to(device)             # noqa: E731
    pos = lambda *s: (0.05 + torch.rand(s, generator=g)).to(device)     # noqa: E731
    out = []
    for _ in range(COUNT):
        W, G = rnd(*shape).to(dtype), rnd(*shape).to(dtype)
        if len(shape) == 3:
            row, col, V = pos(shape[0], shape[1]), pos(shape[0], shape[2]), None
        else:
            row = col = None
            V = pos(*shape)
        E = 0.1 * rnd(*shape) if momentum else None
        out.append([W, G, row, col, V, E])
    return out


def _clone(members):
    return [[t.clone() if t is not None else None for t in m] for m in members]


def _grouped(members, scale_parameter, skip=None):
    from lowrank_fused.kernels.adafactor_step import GroupedAdafactorStep

    col = lambda i: None if members[0][i] is None else [m[i] for m in members]  # noqa: E731
    step = GroupedAdafactorStep(col(0), col(2), col(3), col(4), col(5),
                                shape=members[0][0].shape, scale_parameter=scale_parameter)
    step.scratch.fill_(float("nan"))
    step([m[1] for m in members], SETS, SEL, skip=skip)


def _single(fn, members, scale_parameter, momentum):
    for m, s in zip(members, SEL):
        rho, beta2t, eps1, eps2, d, beta1, wd = SETS[s]
        fn(*m, rho=rho, beta2t=beta2t, eps1=eps1, eps2=eps2, clip_threshold=d,
           scale_parameter=scale_parameter, beta1=beta1 if momentum else None, weight_decay=wd)


NAMES = "W G row col V exp_avg".split()


@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 37, 150), (2, 20, 9), (1100,)], ids=str)
def test_members_equal_single_op_and_reference(shape, dtype, scaled, momentum, device):
    members = _members(shape, dtype, momentum, device)
    grouped, single, ref = _clone(members), _clone(members), _clone(members)
    _grouped(grouped, scaled)
    _single(implementation("adafactor_step", "triton", device), single, scaled, momentum)
    _single(adafactor_step_ref, ref, scaled, momentum)
    for i in range(COUNT):
        for name, a, b, e in zip(NAMES, grouped[i], single[i], ref[i]):
            if a is None:
                continue
            assert torch.equal(a, b), f"member {i} {name}: grouped != single"
            assert_parity(a, e, rtol=tolerance(a.dtype), name=f"member {i} {name}")
        assert not torch.equal(grouped[i][0], members[i][0]), "W did not move"


@pytest.mark.parametrize("shape", [(2, 20, 9), (1100,)], ids=str)
def test_skip_leaves_every_tensor_bit_identical(shape, device):
    members = _members(shape, torch.bfloat16, True, device)
    work = _clone(members)
    _grouped(work, True, skip=torch.tensor(True, device=device))
    for i in range(COUNT):
        for name, a, e in zip(NAMES, work[i], members[i]):
            if a is not None:
                assert torch.equal(a, e), f"member {i} {name} written under skip"
    _grouped(work, True, skip=torch.tensor(False, device=device))
    assert not torch.equal(work[0][0], members[0][0])


def test_bad_layouts_are_refused_by_name(device):
    from lowrank_fused.kernels.adafactor_step import GroupedAdafactorStep

    members = _members((1, 8, 6), torch.float32, False, device)
    Ws = [m[0] for m in members]
    rows = [m[2] for m in members]
    cols = [m[3] for m in members]
    with pytest.raises(ValueError, match=r"Ws\[1\]"):
        GroupedAdafactorStep([Ws[0], Ws[1].transpose(1, 2).contiguous().transpose(1, 2)
                              .to(torch.bfloat16), Ws[2]],
                             rows, cols, None, None, shape=(1, 8, 6), scale_parameter=True)
    with pytest.raises(TypeError, match=r"rows\[0\]"):
        GroupedAdafactorStep(Ws, [r.double() for r in rows], cols, None, None, shape=(1, 8, 6),
                             scale_parameter=True)
    step = GroupedAdafactorStep(Ws, rows, cols, None, None, shape=(1, 8, 6),
                                scale_parameter=True)
    with pytest.raises(ValueError, match=r"Gs\[2\]"):
        step([members[0][1], members[1][1], torch.zeros(1, 8, 7, device=device)], SETS[:1])
    with pytest.raises(ValueError, match="sel"):
        step([m[1] for m in members], SETS, [0, 1])


def test_group_keeps_its_members_alive(device):
    """The kernels address members by offset from the first: the group holds them."""
    import gc
    import weakref

    from lowrank_fused.kernels.adafactor_step import GroupedAdafactorStep

    members = _members((1, 8, 6), torch.float32, False, device)
    step = GroupedAdafactorStep([m[0] for m in members], [m[2] for m in members],
                                [m[3] for m in members], None, None, shape=(1, 8, 6),
                                scale_parameter=True)
    refs = [weakref.ref(members[2][i]) for i in (0, 2, 3)]
    del members
    gc.collect()
    assert all(r() is not None for r in refs)
    assert step.count == COUNT
