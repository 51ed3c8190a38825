"""AdaMeM's steady step with the non-finite flag left on the device (``lagged_nonfinite``,
the default on CUDA; docs/engine.md): the class's middle step (the grouped kernels, or the
per-matrix ops with their state put back), the combined update and the Adafactor steps (the
vector sets of the 1-D parameters, the factored matrices: the paper's first and last layers)
take the step's ``skip`` flag, so a NaN/Inf gradient makes no host read on its step, leaves
weights and every state tensor bit-identical, and the next ``step()`` / ``nonfinite_check()``
rolls the counters back and skips or raises. A parameter on the per-parameter step (the
explicit residual form) makes the step read the flag at once. The grouped ops' own ``skip``
contract is checked directly too."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.optim.adamem import adamem_param_groups
from lowrank_fused.testing.trace import HostReads

from _methods import assert_same, backward, model, snapshot
from tests._skip import check_skip

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = {"wide": "model.layers.0.mlp.down_proj.weight",      # 32 x 48: left form
         "tall": "model.layers.0.mlp.up_proj.weight",         # 48 x 32: its transpose
         "vector": "model.layers.0.input_layernorm.weight",   # Adafactor, a vector set
         "embedding": "model.embed_tokens.weight"}             # Adafactor, factored


def _steady(backend="auto", dtype=torch.float32, **kw):
    """The paper's routing (adamem_param_groups: the embedding and the head on Adafactor)."""
    net = model(dtype=dtype)
    opt = lf.AdaMeM(adamem_param_groups(net, rank=4), lr=1e-2, update_proj_gap=50,
                    backend=backend, **kw)
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return net, opt


def _poison(net, name, value=float("nan")):
    dict(net.named_parameters())[name].grad.view(-1)[3] = value


def _reads(opt, net, t, poison=None):
    backward(net, t)
    if poison:
        _poison(net, poison)
    reads = HostReads()
    with reads:
        opt.step()
    opt.zero_grad(set_to_none=False)
    return sum(reads.count.values())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_steady_steps_read_nothing_on_the_host(backend):
    net, opt = _steady(backend)
    opt.lagged_nonfinite = True
    plan = opt._engine_plan
    assert not plan.legacy and plan.classes and plan.vector_sets and len(plan.factored) == 2
    assert [_reads(opt, net, t) for t in (3, 4)] == [0, 0]


def test_a_per_parameter_step_reads_the_flag_at_once():
    net, opt = _steady(residual_form="explicit")
    opt.lagged_nonfinite = True
    assert opt._engine_plan.legacy
    assert _reads(opt, net, 3) == 1


# every parameter kind on the default backend, the reference on two, bf16 on three
CASES = [("auto", w, torch.float32) for w in ("wide", "tall", "vector", "embedding")]
CASES += [("reference", "tall", torch.float32), ("auto", "tall", torch.bfloat16),
          ("reference", "embedding", torch.bfloat16), ("auto", "vector", torch.bfloat16)]


@pytest.mark.parametrize("backend,which,dtype", CASES, ids=str)
def test_device_skip_without_host_read_rolls_back(backend, which, dtype):
    net, opt = _steady(backend, dtype, nonfinite="skip")
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    assert _reads(opt, net, 3, poison=NAMES[which]) == 0
    opt.nonfinite_check()
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(net, opt), f"adamem {which}: skipped on the device")
    backward(net, 4)                # the run goes on as if that batch had never come
    opt.step()
    ref_net, ref = _steady(backend, dtype, nonfinite="skip")
    backward(ref_net, 4)
    ref.step()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), f"adamem {which}: after the skip")


def test_device_skip_raise_names_parameter_and_step_at_the_next_step():
    net, opt = _steady()
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 3)
    _poison(net, NAMES["tall"], float("inf"))
    opt.step()                                  # no read: the flag stays on the device
    opt.zero_grad(set_to_none=False)
    backward(net, 4)
    with pytest.raises(FloatingPointError, match=r"\(shape \(48, 32\)\).*at step 4"):
        opt.step()
    assert_same(before, snapshot(net, opt), "adamem: raise")
    assert opt.step_calls == 3 and opt.skipped_steps == 0


def test_false_flag_gives_the_bits_of_a_step_without_one():
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


# -- the grouped ops' skip contract (tests/_skip.py) -----------------------------------------

def _group(device, count=3, m=12, n=20, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(m, n, generator=g).to(device) for _ in range(count)]
    Gs = [torch.randn(m, n, generator=g).to(device) for _ in range(count)]
    Ps = [torch.linalg.qr(torch.randn(m, r, generator=g))[0].to(device) for _ in range(count)]
    Rs = [P.t() @ G for P, G in zip(Ps, Gs)]
    Ns = [torch.randn(r, n, generator=g).to(device) for _ in range(count)]
    css = [torch.rand(n, generator=g).to(device) + 0.5 for _ in range(count)]
    return Ws, Gs, Ps, Rs, Ns, css


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grouped_residual_update_skip(backend, device):
    from lowrank_fused.dispatch import lookup

    impl = lookup("grouped_residual_backproject_update", backend)
    _, Gs, Ps, Rs, Ns, css = _group(device)
    count = len(Gs)
    scal = dict(coef=[0.1] * count, res_coef=[0.05] * count, pre_scale=[0.99] * count,
                post_decay=[0.0] * count)

    def run(Ws, skip):
        kw = {} if skip is None else {"skip": skip}
        impl(Ws, Gs, Ps, [R.clone() for R in Rs], [N.clone() for N in Ns], css, **scal, **kw)

    check_skip(lambda: _group(device)[0], run, device)


def test_grouped_middle_skip(device):
    from lowrank_fused.kernels.grouped_adamem_middle import GroupedAdamemMiddle

    count, m, n, r = 3, 12, 20, 3
    g = torch.Generator().manual_seed(1)

    def make():
        return ([torch.randn(r, n, generator=g).to(device) for _ in range(count)]      # M
                + [torch.rand(r, generator=g).to(device) + .1 for _ in range(count)]  # rows
                + [torch.rand(n, generator=g).to(device) + .1 for _ in range(count)]  # cols
                + [torch.rand(n, generator=g).to(device) + .1 for _ in range(count)])  # c_os
    Rs = [torch.randn(r, n, generator=g).to(device) for _ in range(count)]
    sumsq = [(R * R).sum(0) + 1.0 for R in Rs]
    rows = [(0.9, 0.95, 1e-8, 1e-30, 0.3, 0.2)] * count

    def run(out, skip):
        Ms, a_rows, a_cols, c_os = (out[i * count:(i + 1) * count] for i in range(4))
        Ns = [torch.empty(r, n, device=device) for _ in range(count)]
        css = [torch.empty(n, device=device) for _ in range(count)]
        GroupedAdamemMiddle(m, Rs, Ms, a_rows, a_cols, Ns, c_os, css, sumsq,
                            stats_from_momentum=True)(rows, skip=skip)

    check_skip(make, run, device)
