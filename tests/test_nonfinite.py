"""nonfinite="raise" | "skip" | "ignore" for every method: a NaN or Inf in one gradient element
either raises naming the parameter and the step, or skips the whole step leaving weights and
every state tensor bit-identical (and the run then equals one that never saw that batch)."""
import math

import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.routing import METHODS

from _methods import assert_same, backward, model, optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = [float("nan"), float("inf"), -float("inf")]


def _poison(net, which, value, seed):
    """Put ``value`` in one random element of the gradient of a parameter: the first
    projected (2-D attention/MLP) weight or the embedding (dense path)."""
    name = "model.layers.0.mlp.down_proj.weight" if which == "lowrank" else \
        "model.embed_tokens.weight"
    p = dict(net.named_parameters())[name]
    g = torch.Generator().manual_seed(seed)
    p.grad.view(-1)[torch.randint(p.numel(), (1,), generator=g)] = value
    return name


def _run(method, steps, bad_step=None, which="lowrank", value=float("nan"), **kw):
    net = model()
    opt = optimizer(net, method, **kw)
    for t in steps:
        backward(net, t)
        if t == bad_step:
            _poison(net, which, value, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["lowrank", "dense"])
def test_raise_names_parameter_and_step_and_changes_nothing(method, which):
    net, opt = _run(method, range(3))
    before = snapshot(net, opt)
    backward(net, 3)
    name = _poison(net, which, BAD[hash(method) % 3], 3)
    with pytest.raises(FloatingPointError, match=rf"'{name}'.*non-finite.*at step 4"):
        opt.step()
    assert_same(before, snapshot(net, opt), f"{method} raise")
    assert opt.skipped_steps == 0 and opt.step_calls == 3


@pytest.mark.parametrize("method,value", [(m, BAD[i % 3]) for i, m in enumerate(METHODS)])
def test_skip_leaves_everything_bit_identical_and_counts(method, value):
    net, opt = _run(method, range(3), nonfinite="skip")
    before = snapshot(net, opt)
    backward(net, 3)
    _poison(net, "lowrank", value, 3)
    opt.step()
    assert_same(before, snapshot(net, opt), f"{method} skip")
    assert opt.skipped_steps == 1 and opt.step_calls == 4


@pytest.mark.parametrize("method", METHODS)
def test_skipped_step_equals_a_run_without_that_batch(method):
    """Steps 0..5 with a NaN at step 2 (crossing refreshes) == steps 0, 1, 3, 4, 5."""
    a, opt_a = _run(method, range(6), bad_step=2, which="dense", nonfinite="skip")
    b, _ = _run(method, [0, 1, 3, 4, 5], nonfinite="skip")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{method}: {k} differs from the run without the bad batch"
    assert opt_a.skipped_steps == 1


@pytest.mark.parametrize("method", ["galore", "ldadam", "adamw"])
def test_skip_counter_is_checkpointed(method):
    net, opt = _run(method, range(4), bad_step=1, nonfinite="skip")
    sd = opt.state_dict()
    opt2 = optimizer(model(), method, nonfinite="skip")
    opt2.load_state_dict(sd)
    assert (opt2.skipped_steps, opt2.step_calls) == (1, 4)


def test_ignore_does_no_check():
    net, opt = _run("adamw", range(2), bad_step=1, nonfinite="ignore")
    assert not all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("value", ["warn", None, True, "Raise"])
def test_bad_policy_is_refused(value):
    with pytest.raises(ValueError, match=r"nonfinite must be one of .*" + repr(value)[:4]):
        optimizer(model(), "galore", nonfinite=value)


# -- the flag op ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(4))
def test_nonfinite_flag_finds_one_bad_element_anywhere(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(torch.randint(1, 300, (1,), generator=g)),
              int(torch.randint(1, 300, (1,), generator=g))) for _ in range(5)]
    ts = [torch.randn(s, generator=g).to(dtype) for s in sizes] + [torch.empty(0, 3, dtype=dtype)]
    assert not bool(ops.nonfinite_flag(ts))
    for value in BAD:
        i = int(torch.randint(0, 5, (1,), generator=g))
        j = int(torch.randint(0, ts[i].numel(), (1,), generator=g))
        old = ts[i].view(-1)[j].clone()
        ts[i].view(-1)[j] = value
        assert bool(ops.nonfinite_flag(ts)), (value, i, j)
        ts[i].view(-1)[j] = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nonfinite_flag_has_no_false_positive_at_the_dtype_max(dtype):
    big = torch.finfo(dtype).max
    t = torch.full((257, 3), big, dtype=dtype)
    t[::2] = -big
    assert not bool(ops.nonfinite_flag([t, torch.zeros(5, dtype=dtype)]))
    assert not bool(ops.nonfinite_flag([]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nonfinite_flag_on_cuda():
    ts = [torch.randn(1000, 37, device="cuda"), torch.randn(5, device="cuda").bfloat16()]
    assert not bool(ops.nonfinite_flag(ts))
    for value in BAD:
        ts[0][999, 36] = value
        assert bool(ops.nonfinite_flag(ts))
        ts[0][999, 36] = 0.0
    ts[1][4] = math.nan
    assert bool(ops.nonfinite_flag(ts))


@pytest.mark.parametrize("method", ["galore", "adaptive_adamw", "gha", "adapm"])
def test_ignore_still_refuses_a_nonfinite_gradient_where_a_basis_is_computed(method):
    """"ignore" skips the step-wide check, but the first step computes a basis (SVD / sketch)
    from the gradient: a NaN there is refused by name before anything is written."""
    net = model()
    opt = optimizer(net, method, nonfinite="ignore")
    before = snapshot(net, opt)
    backward(net, 0)
    name = _poison(net, "lowrank", float("nan"), 0)
    with pytest.raises(FloatingPointError, match=rf"'{name}'.*non-finite.*no parameter"):
        opt.step()
    assert_same(before, snapshot(net, opt), f"{method} ignore")
