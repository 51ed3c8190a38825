"""A step changes the parameters as far as autograd can tell (``_base.step``): the kernels
write the weights through their addresses, which autograd does not see, so the step bumps
every stepped parameter's version counter. A graph built before a step and run after it then
refuses (as after ``torch.optim.AdamW``) instead of computing gradients from the new weights
silently. For every method on the engine (Triton under the interpreter here), on a steady
step and on the first (refresh) step; a skipped step (non-finite gradient, ``skip``) writes
nothing and bumps nothing."""
import pytest
import torch

from _methods import backward, model, optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad",
           "ldadam", "adamem", "adapm", "adapm_mini", "adamw", "adafactor")


def _saved_graph(net, t):
    """A loss whose graph saved the weights (a forward, no backward yet)."""
    g = torch.Generator().manual_seed(2000 + t)
    ids = torch.randint(0, net.config.vocab_size, (2, 9), generator=g)
    _, loss = net(ids[:, :-1], labels=ids[:, 1:])
    return loss


@pytest.mark.parametrize("method", METHODS)
def test_a_graph_saved_before_a_step_refuses_after_it(method):
    net = model()
    opt = optimizer(net, method)
    for t in range(3):                         # the first step refreshes, then steady steps
        backward(net, t)
        loss = _saved_graph(net, t)
        before = {n: p._version for n, p in net.named_parameters()}
        opt.step()
        stepped = [n for n, p in net.named_parameters() if p.grad is not None]
        assert all(p._version > before[n] for n, p in net.named_parameters() if n in stepped)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        opt.zero_grad(set_to_none=False)


def test_torch_adamw_refuses_the_same_way():
    """The behaviour matched: torch's own optimizer, same model, same graph."""
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    backward(net, 0)
    loss = _saved_graph(net, 0)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_skipped_step_bumps_nothing():
    net = model()
    opt = optimizer(net, "galore", nonfinite="skip")
    backward(net, 0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    backward(net, 1)
    next(net.parameters()).grad.view(-1)[0] = float("nan")
    before = [p._version for p in net.parameters()]
    opt.step()
    assert opt.skipped_steps == 1
    assert [p._version for p in net.parameters()] == before
