"""Per-layer update in backward (lowrank_fused.per_layer): equal to opt.step() after a full
backward, bit for bit, for every method (crossing refreshes, AdaptiveAdamW's deferred
allocation steps), with gradient accumulation; gradients freed; bad input still refused."""
import pytest
import torch

from lowrank_fused.per_layer import PerLayerStep
from lowrank_fused.routing import METHODS

from _methods import CFG, backward, model, optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5


def _loss(net, t, micro=0):
    g = torch.Generator().manual_seed(100 * t + micro)
    ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g)
    return net(ids[:, :-1], labels=ids[:, 1:])[1]


def _normal(method, accum, **kw):
    net = model()
    opt = optimizer(net, method, **kw)
    for t in range(STEPS):
        for micro in range(accum):
            (_loss(net, t, micro) / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


def _per_layer(method, accum, **kw):
    net = model()
    opt = optimizer(net, method, **kw)
    stepper = PerLayerStep(opt)
    for t in range(STEPS):
        for micro in range(accum):
            with stepper.accumulate(micro != accum - 1):
                (_loss(net, t, micro) / accum).backward()
        assert all(p.grad is None for p in net.parameters()), "gradients were not freed"
    return net, opt


@pytest.mark.parametrize("method", METHODS)
def test_per_layer_equals_step(method):
    a, opt_a = _normal(method, 1)
    b, opt_b = _per_layer(method, 1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{method}: {name} differs in per-layer mode"
    assert opt_a.step_calls == opt_b.step_calls == STEPS


@pytest.mark.parametrize("method", ["galore", "adaptive_adamw", "ldadam", "adamw"])
def test_per_layer_with_gradient_accumulation(method):
    a, _ = _normal(method, 3)
    b, _ = _per_layer(method, 3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{method}: {name} differs with accumulation"


def test_randomized_refresh_steps_are_deferred_and_equal():
    a, _ = _normal("galore", 1, projector="randomized")
    b, _ = _per_layer("galore", 1, projector="randomized")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_nonfinite_raise_names_the_parameter_and_skip_is_refused():
    net = model()
    opt = optimizer(net, "galore")
    stepper = PerLayerStep(opt)
    _loss(net, 0).backward()
    w = net.model.layers[0].mlp.down_proj.weight
    w.register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*"
                                                 r"per-layer mode"):
        _loss(net, 1).backward()
    stepper.remove()
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        PerLayerStep(optimizer(model(), "galore", nonfinite="skip"))
    with pytest.raises(TypeError, match="lowrank_fused optimizer"):
        PerLayerStep(torch.optim.SGD(model().parameters(), lr=0.1))


@pytest.mark.parametrize("method,deferred", [("galore", 0), ("ldadam", 0),
                                             ("adaptive_adamw", 1)])
def test_gradients_are_freed_during_backward(method, deferred):
    """Between refreshes each gradient is freed right after its update, so at most one
    projected gradient is alive at a time; AdaptiveAdamW defers its allocation steps only."""
    net = model()
    opt = optimizer(net, method, update_proj_gap=2) if method != "ldadam" else \
        optimizer(net, method)
    stepper = PerLayerStep(opt)
    _loss(net, 0).backward()                      # step 1 (a refresh for every method)
    alive = []
    for p in net.parameters():
        p.register_post_accumulate_grad_hook(
            lambda q: alive.append(sum(x.grad is not None for x in net.parameters())))
    _loss(net, 1).backward()                      # step 2: between refreshes
    assert max(alive) <= 2, f"{method}: up to {max(alive)} gradients alive during backward"
    _loss(net, 2).backward()                      # step 3: AdaptiveAdamW reallocates
    n = len(list(net.parameters()))
    assert (max(alive[n:]) == n) == bool(deferred)
    stepper.remove()
