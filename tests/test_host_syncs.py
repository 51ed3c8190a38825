"""No hidden host synchronisation between refreshes: a step reads at most the documented
scalars from the device (the step could be captured in a CUDA graph and overlap compute).
Counted on CPU as the aten ops that turn a tensor into a Python value (``.item()``,
``bool(t)``, ``.tolist()``), which are device-to-host reads on a GPU."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_fused.routing import METHODS

from _methods import backward, model, optimizer

HOST_READS = ("_local_scalar_dense", "is_nonzero", "equal")
# reads a step needs by construction, per projected matrix: AdaRankGrad's convergence test
# (data-dependent refresh trigger, ALGORITHMS.md 6.4)
PER_MATRIX = {"adarankgrad": 1}
# reads per step with nonfinite='raise' | 'skip': the non-finite flag, and LDAdam's one read
# of its power-iteration guards (for the fallback warning)
PER_STEP_CHECKED = {"ldadam": 2}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in HOST_READS:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


def _projected(opt):
    return sum(1 for g in opt.param_groups if g.get("rank") is not None
               and g.get("enable_lowrank", True) for p in g["params"] if p.dim() == 2)


CASES = [(m, "ignore") for m in METHODS] + [
    (m, "raise") for m in ("galore", "ldadam", "adarankgrad", "adamw", "adapm")]


@pytest.mark.parametrize("method,nonfinite", CASES)
def test_host_reads_per_step(method, nonfinite):
    net = model()
    gap = {"update_proj_gap": 50} if method in (
        "galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adamem") else {}
    opt = optimizer(net, method, nonfinite=nonfinite, **gap)
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    backward(net, 3)
    reads = HostReads()
    with reads:
        opt.step()
    expected = PER_MATRIX.get(method, 0) * _projected(opt)
    if nonfinite != "ignore":
        expected += PER_STEP_CHECKED.get(method, 1)
    assert sum(reads.count.values()) == expected, f"{method}: {dict(reads.count)}"
