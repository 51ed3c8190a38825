"""AdaPM and AdaPM-mini on the step engine (docs/methods/adapm.md, "Step engine"): every
one-block parameter runs by classes (low-rank blocks: the grouped K1 and two launches; full-
and no-momentum blocks: one launch; Adam-mini block means: two more). The trajectory (weights
and every state tensor) equals the per-parameter step (``opt.engine = False``) bit for bit on
the CPU, across refits, on the Triton (interpreter) and reference backends, fp32 and bf16
(with and without faithful dtypes), for a LLaMA layout and a GPT-2 layout with transposed
(Conv1D) weights, whose fused QKV stays on the per-parameter step. With the flag left on the
device, a NaN gradient on a steady step is skipped with no host read and acted on at the next
step."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.optim.adapm import AdaPM, AdaPMMini, adapm_param_groups
from lowrank_fused.testing.trace import HostReads

from _methods import assert_same, backward, model, snapshot
from test_optim_adapm import TinyGPT2

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4          # refits at t = 1 and 3 (refit_T = 2): two steady steps between


def _llama(cls_name, engine, backend, dtype, faithful, steps=STEPS, **kw):
    net = model(dtype=dtype)
    opt = lf.make_optimizer(net, cls_name, rank=4, refit_T=2, refit_K=2, lr=1e-2,
                            backend=backend, faithful_dtypes=faithful, **kw)
    opt.engine = engine
    for t in range(steps):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


CASES = [("adapm", "triton", torch.float32, False),
         ("adapm_mini", "triton", torch.bfloat16, True),
         ("adapm", "reference", torch.bfloat16, False)]


@pytest.mark.parametrize("method,backend,dtype,faithful", CASES,
                         ids=[f"{m}-{b}-{str(d)[6:]}{'-faithful' if f else ''}"
                              for m, b, d, f in CASES])
def test_engine_equals_per_parameter_step(method, backend, dtype, faithful):
    net_e, opt_e = _llama(method, True, backend, dtype, faithful)
    net_p, opt_p = _llama(method, False, backend, dtype, faithful)
    plan = opt_e._engine_plan
    assert not plan.legacy and plan.classes        # everything ran by classes
    kinds = {c.route.kind for c in plan.classes.values()}
    assert kinds == {"lowrank", "full", "none"}
    assert_same(snapshot(net_p, opt_p), snapshot(net_e, opt_e), f"{method} {backend}")
    assert not torch.equal(net_e.model.layers[0].mlp.up_proj.weight,
                           model(dtype=dtype).model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("cls", [AdaPMMini], ids=["AdaPM-mini"])
def test_engine_equals_per_parameter_step_gpt2_conv1d(cls):
    """Transposed (Conv1D) low-rank and no-momentum blocks, the no-momentum ``adagrad`` mode,
    ``clip_mode="none"`` and a tied embedding by classes; the fused QKV per parameter."""
    def run(engine):
        net = TinyGPT2(conv=True, d=16, n_head=2, layers=1, vocab=24, block=8)
        opt = cls(adapm_param_groups(net, rank=3), lr=1e-2, refit_T=2, refit_K=1,
                  nomomentum_mode="adagrad", clip_mode="none", backend="triton")
        opt.engine = engine
        g = torch.Generator().manual_seed(5)
        for _ in range(STEPS):
            idx = torch.randint(0, 24, (2, 8), generator=g)
            net(idx, idx.roll(1, 1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return net, opt

    net_e, opt_e = run(True)
    net_p, opt_p = run(False)
    plan = opt_e._engine_plan
    assert len(plan.legacy) == 1                    # c_attn: q, k, v blocks in one weight
    assert any(c.route.transposed and c.route.kind == "lowrank"
               for c in plan.classes.values())
    assert_same(snapshot(net_p, opt_p), snapshot(net_e, opt_e), cls.__name__)


def test_steady_steps_run_by_classes_and_refits_per_parameter(monkeypatch):
    """Between refits no parameter takes the per-parameter step; a refit step runs the
    low-rank classes' members through it (and only those)."""
    net, opt = _llama("adapm", True, "triton", torch.float32, False, steps=1)
    stepped = []
    real = AdaPM._step_param

    def spy(self, p, group, backend, precision):
        stepped.append(p)
        return real(self, p, group, backend, precision)
    monkeypatch.setattr(AdaPM, "_step_param", spy)
    backward(net, 1)
    opt.step()                                      # t = 2: steady
    assert stepped == []
    opt.zero_grad(set_to_none=True)
    backward(net, 2)
    opt.step()                                      # t = 3: refit
    lowrank = {id(m.p) for c in opt._engine_plan.classes.values() if c.route.kind == "lowrank"
               for m in c.members}
    assert lowrank and {id(p) for p in stepped} == lowrank


def _steady(nonfinite="raise", backend="triton"):
    net, opt = _llama("adapm_mini", True, backend, torch.float32, False, steps=2,
                      nonfinite=nonfinite)
    for g in opt.param_groups:
        g["refit_T"] = 100                         # no refit in the steps below
    opt.zero_grad(set_to_none=False)
    return net, opt


@pytest.mark.parametrize("where,backend", [("mlp.up_proj", "triton"),
                                           ("input_layernorm", "reference")])
def test_device_skip_without_host_read(where, backend):
    net, opt = _steady(nonfinite="skip", backend=backend)
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 2)
    param = dict(net.named_parameters())[f"model.layers.0.{where}.weight"]
    param.grad.view(-1)[3] = float("nan")
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, dict(reads.count)
    opt.nonfinite_check()
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(net, opt), f"{where}: skipped on the device")
    # the run goes on as if that batch had never come
    opt.zero_grad(set_to_none=False)
    backward(net, 3)
    opt.step()
    ref_net, ref = _steady(nonfinite="skip", backend=backend)
    backward(ref_net, 3)
    ref.step()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), f"{where}: after the skip")


def test_device_skip_raises_at_the_next_step_naming_parameter_and_step():
    net, opt = _steady()
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 2)
    net.model.layers[0].mlp.down_proj.weight.grad[0, 0] = float("inf")
    reads = HostReads()
    with reads:
        opt.step()                                  # no read: the flag stays on the device
    assert sum(reads.count.values()) == 0, dict(reads.count)
    opt.zero_grad(set_to_none=False)
    backward(net, 3)
    with pytest.raises(FloatingPointError, match=r"down_proj.*at step 3"):
        opt.step()
    assert_same(before, snapshot(net, opt), "raise")
    assert opt.step_calls == 2 and opt.skipped_steps == 0
    opt.step()                                      # the flag was consumed: the run goes on
    assert opt.step_calls == 3


def test_refit_step_reads_the_flag_at_once():
    net, opt = _steady(nonfinite="skip", backend="reference")
    for g in opt.param_groups:
        g["refit_T"] = 2                           # the next step (t = 3) refits
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 2)
    net.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) >= 1
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(net, opt), "refit step skipped at once")
