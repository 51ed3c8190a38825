"""LDAdamW's steady step with the non-finite flag left on the device (``lagged_nonfinite``,
the default on CUDA; docs/engine.md): every state-writing op of a class's step takes the
step's ``skip`` flag (the error accumulation, the basis, the transported moments, the error
feedback, the Adam moments, K3; the dense set through the engine), so a NaN/Inf gradient makes
no host read on its step, leaves weights and every state tensor bit-identical, and the next
``step()`` / ``nonfinite_check()`` rolls back ``completed_steps`` and skips or raises. The
power-iteration guards of a steady step are read from their host copy, not from the device."""
import pytest
import torch

from lowrank_fused.testing.trace import AllocationTrace, HostReads

from _methods import assert_same, backward, model, optimizer, snapshot
from test_step_engine import LaunchRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = {"lowrank": "model.layers.0.mlp.down_proj.weight",      # 32 x 48: left
         "tall": "model.layers.0.mlp.up_proj.weight",            # 48 x 32: right
         "dense": "model.embed_tokens.weight"}


def _steady(backend="auto", dtype=torch.float32, **kw):
    """Past the first step (the SVD bases): every matrix on its class."""
    net = model(dtype=dtype)
    opt = optimizer(net, "ldadam", backend=backend, **kw)
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert not opt._engine_plan.legacy and opt._engine_plan.classes
    return net, opt


def _poison(net, name, value=float("nan")):
    dict(net.named_parameters())[name].grad.view(-1)[3] = value


def _steady_reads(opt, net, t):
    backward(net, t)
    reads = HostReads()
    with reads:
        opt.step()
    opt.zero_grad(set_to_none=False)
    return sum(reads.count.values())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_steady_steps_read_nothing_on_the_host(backend):
    net, opt = _steady(backend)
    opt.lagged_nonfinite = True
    assert [_steady_reads(opt, net, t) for t in (3, 4)] == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_steady_steps_allocate_nothing(dtype, monkeypatch):
    """With the flag on the device, a steady step of the default (GPU) path allocates no
    tensor: the power iteration, the QR, the transport and the guards write into the class's
    scratch, and the guards of several classes are gathered into a kept buffer. (Launches are
    stubbed: the interpreter's own copies are not the step's.)"""
    net, opt = _steady("auto", dtype)
    opt.lagged_nonfinite = True
    assert len(opt._engine_plan.classes) >= 2          # the guards are gathered
    backward(net, 3)
    opt.step()                                         # the plan's flags buffer
    opt.zero_grad(set_to_none=False)
    backward(net, 4)
    LaunchRecorder(monkeypatch, stub=True)
    with AllocationTrace() as trace:
        opt.step()
    assert trace.sizes == [], trace.sizes


# every backend, parameter kind and dtype, each pairing at least once (suite time)
SKIP_CASES = [("auto", "lowrank", torch.float32), ("auto", "tall", torch.bfloat16),
              ("auto", "dense", torch.float32), ("reference", "lowrank", torch.bfloat16),
              ("reference", "tall", torch.float32), ("reference", "dense", torch.bfloat16)]


@pytest.mark.parametrize("backend,which,dtype", SKIP_CASES, ids=str)
def test_device_skip_without_host_read_rolls_back(backend, which, dtype):
    net, opt = _steady(backend, dtype, nonfinite="skip")
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    steps = opt.completed_steps
    backward(net, 3)
    _poison(net, NAMES[which])
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, dict(reads.count)
    opt.nonfinite_check()
    assert opt.skipped_steps == 1 and opt.completed_steps == steps
    assert_same(before, snapshot(net, opt), f"ldadam {which}: skipped on the device")
    # the run goes on as if that batch had never come
    opt.zero_grad(set_to_none=False)
    backward(net, 4)
    opt.step()
    ref_net, ref = _steady(backend, dtype, nonfinite="skip")
    ref.zero_grad(set_to_none=False)
    backward(ref_net, 4)
    ref.step()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), f"ldadam {which}: after the skip")


def test_device_skip_raise_names_parameter_and_step_at_the_next_step():
    net, opt = _steady()
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 3)
    _poison(net, NAMES["tall"], float("inf"))
    opt.step()                                  # no read: the flag stays on the device
    opt.zero_grad(set_to_none=False)
    backward(net, 4)
    with pytest.raises(FloatingPointError, match=rf"'{NAMES['tall']}'.*at step 4"):
        opt.step()
    assert_same(before, snapshot(net, opt), "ldadam: raise")
    assert opt.step_calls == 3 and opt.completed_steps == 3
    opt.step()                                  # the flag was consumed: the run goes on
    assert opt.step_calls == 4 and opt.completed_steps == 4


def test_false_flag_gives_the_bits_of_a_step_without_one():
    """The lagged step (a False flag on every op) equals the step that read the flag."""
    net, opt = _steady(nonfinite="skip")
    ref_net, ref = _steady(nonfinite="skip")
    opt.lagged_nonfinite, ref.lagged_nonfinite = True, False
    for t in (3, 4):
        for n, o in ((net, opt), (ref_net, ref)):
            backward(n, t)
            o.step()
            o.zero_grad(set_to_none=False)
    opt.nonfinite_check()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), "lagged vs at once")
