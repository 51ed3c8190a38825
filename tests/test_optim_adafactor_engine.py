"""Adafactor on the step engine (docs/methods/adafactor.md, "The step engine").

* The engine step (every parameter on a class of its canonical shape, one grouped launch set
  per class on Triton, the op per member on the reference) equals the per-parameter step
  (``opt.engine = False``) bit for bit: reference and Triton (interpreter), fp32 and bf16,
  factored (2-D and >2-D) and unfactored (1-D, 0-d) parameters, momentum and weight decay,
  two groups of one shape in one class (two scalar sets), and a member that skipped a step
  (another step counter within its class).
* A steady step launches a handful of kernels per class, not per parameter.
* With the flag left on the device (``lagged_nonfinite``), a NaN/Inf gradient makes no host
  read, leaves weights and every state tensor bit-identical, and "skip"/"raise" act at the
  next step.
"""

import pytest
import torch

from lowrank_fused.optim.adafactor import Adafactor
from lowrank_fused.testing.trace import HostReads

from _cases import count_kernel_runs
from _methods import assert_same, backward, model, optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(12, 20), (12, 20), (12, 20), (20, 12), (2, 3, 5, 7), (9,), (9,), ()]
FLAGS = {
    "hf-defaults": {},
    "momentum-wd-unscaled": dict(lr=1e-2, relative_step=False, scale_parameter=False,
                                 beta1=0.8, weight_decay=0.1, clip_threshold=0.5),
}


def _params(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype))
            for s in SHAPES]


def _grads(ps, t):
    g = torch.Generator().manual_seed(100 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype)


def _run(engine, backend, dtype, flags, device, steps=3):
    ps = _params(dtype, device)
    # two groups: parameter 2 (same shape as 0 and 1) in a group of its own hyperparameters,
    # so one class holds two scalar sets
    other = dict(flags, eps=(1e-30, 2e-3), clip_threshold=0.7)
    opt = Adafactor([{"params": ps[:2] + ps[3:]}, {"params": [ps[2]], **other}],
                    backend=backend, **flags)
    opt.engine = engine
    for t in range(steps):
        _grads(ps, t)
        if t == 1:
            ps[1].grad = None        # member 1 skips a step: its counter lags its class's
        opt.step()
    return ps, opt


def _state(opt):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


# each backend with both dtypes and both flag sets (two cases each: suite time)
CASES = [("reference", torch.float32, "hf-defaults"),
         ("reference", torch.bfloat16, "momentum-wd-unscaled"),
         ("triton", torch.float32, "momentum-wd-unscaled"),
         ("triton", torch.bfloat16, "hf-defaults")]


@pytest.mark.parametrize("backend,dtype,flags", CASES, ids=lambda v: str(v))
def test_engine_equals_per_parameter_step_bit_for_bit(backend, dtype, flags, device):
    runs = {}
    for engine in (True, False):
        ps, opt = _run(engine, backend, dtype, FLAGS[flags], device)
        runs[engine] = ([p.detach().clone() for p in ps], _state(opt), opt)
    (w_e, s_e, opt), (w_p, s_p, _) = runs[True], runs[False]
    plan = opt._engine_plan
    assert not plan.legacy and len(plan.classes) == 5, plan.classes.keys()
    assert any(len(c.members) == 3 for c in plan.classes.values())
    if backend == "triton":
        assert all(c.extra["grouped"] is not None for c in plan.classes.values())
    for i, (a, b) in enumerate(zip(w_e, w_p)):
        assert torch.equal(a, b), f"weight {i} {SHAPES[i]}"
    for i, (a, b) in enumerate(zip(s_e, s_p)):
        assert a.keys() == b.keys()
        for k in a:
            same = torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
            assert same, f"state {i}.{k}"
    assert s_e[1]["step"] == 2 and s_e[0]["step"] == 3


def test_gradients_of_mixed_layouts_in_a_class_match_the_per_parameter_step(device):
    """One member's gradient in another dtype, another's transposed: the class takes the op
    per member on that step, with the same bits."""
    out = []
    for engine in (True, False):
        ps = _params(torch.bfloat16, device)
        opt = Adafactor(ps, backend="triton")
        opt.engine = engine
        for t in range(2):
            _grads(ps, t)
            if t == 1:
                ps[1].grad_dtype = None          # torch refuses another dtype otherwise
                ps[1].grad = ps[1].grad.float()
                ps[2].grad = ps[2].grad.t().contiguous().t()
            opt.step()
        out.append([p.detach().clone() for p in ps])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_group_flags_changed_mid_run_rebuild_the_classes(device):
    """Turning momentum on in a group (a class's kernels) rebuilds the classes; the engine
    still equals the per-parameter step."""
    out = []
    for engine in (True, False):
        ps = _params(torch.float32, device)
        opt = Adafactor(ps, backend="triton", lr=1e-2, relative_step=False)
        opt.engine = engine
        for t in range(3):
            _grads(ps, t)
            if t == 2:
                opt.param_groups[0]["beta1"] = 0.9
            opt.step()
        out.append([p.detach().clone() for p in ps])
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_steady_step_launches_per_class(monkeypatch):
    from lowrank_fused.dispatch import interpreting

    if not interpreting():
        pytest.skip("counts the interpreter's launches")
    ps = _params(torch.float32)
    opt = Adafactor(ps, backend="triton")
    _grads(ps, 0)
    opt.step()
    launches = count_kernel_runs(monkeypatch)
    _grads(ps, 1)
    opt.step()
    classes = opt._engine_plan.classes.values()
    factored = sum(1 for c in classes if c.route.factored)
    assert factored == 3 and len(classes) == 5
    # five launches per factored class, three per unfactored one, whatever the member count
    assert sum(launches.values()) == 5 * factored + 3 * (len(classes) - factored), launches


def _steady(**kw):
    net = model()
    opt = optimizer(net, "adafactor", **kw)
    for t in range(2):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return net, opt


POISON = {"matrix": "model.layers.0.mlp.down_proj.weight",
          "vector": "model.layers.0.input_layernorm.weight"}


@pytest.mark.parametrize("which,backend", [("matrix", "auto"), ("vector", "auto"),
                                           ("matrix", "reference")])
def test_device_skip_without_host_read_rolls_back(which, backend):
    net, opt = _steady(nonfinite="skip", beta1=0.9, backend=backend)
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 2)
    dict(net.named_parameters())[POISON[which]].grad.view(-1)[3] = float("nan")
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, dict(reads.count)
    assert not opt._engine_plan.legacy
    assert_same(before, snapshot(net, opt)[:1] + (before[1],), "weights after the NaN step")
    opt.nonfinite_check()
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(net, opt), "skipped on the device")
    opt.zero_grad(set_to_none=False)
    backward(net, 3)
    opt.step()
    ref_net, ref = _steady(nonfinite="skip", beta1=0.9, backend=backend)
    ref.zero_grad(set_to_none=False)
    backward(ref_net, 3)
    ref.step()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), "after the skip")


def test_device_skip_raise_names_parameter_and_step_at_the_next_step():
    net, opt = _steady()
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 2)
    dict(net.named_parameters())[POISON["matrix"]].grad.view(-1)[3] = float("inf")
    reads = HostReads()
    with reads:
        opt.step()                              # no read: the flag stays on the device
    assert sum(reads.count.values()) == 0, dict(reads.count)
    opt.zero_grad(set_to_none=False)
    backward(net, 3)
    with pytest.raises(FloatingPointError, match=rf"'{POISON['matrix']}'.*at step 3"):
        opt.step()
    assert_same(before, snapshot(net, opt), "raise")
    assert opt.step_calls == 2 and opt.skipped_steps == 0
    opt.step()                                  # the flag was consumed: the run goes on
    assert opt.step_calls == 3
