"""Memory claims, measured per step: one step of every method between refreshes, on the
default (fused) backend, allocates no full-size (m x n) temporary (docs/bytes.md: the
fused methods read G and W in place and keep only the state of their table)."""
import pytest
import torch

from lowrank_fused.routing import METHODS
from lowrank_fused.testing.trace import AllocationTrace

from _methods import backward, model, optimizer

@pytest.mark.parametrize("method", METHODS)
def test_no_full_size_temporary_between_refreshes(method):
    net = model()
    opt = optimizer(net, method, update_proj_gap=50) if method in (
        "galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adamem") else \
        optimizer(net, method)
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    backward(net, 3)
    smallest = min(p.numel() for p in net.parameters() if p.dim() == 2)
    with AllocationTrace() as trace:
        opt.step()
    big = trace.at_least(smallest)
    assert big == [], f"{method}: full-size temporaries in one step: {sorted(set(big))[:6]}"
