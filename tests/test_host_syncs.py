"""No hidden host synchronisation between refreshes: a step reads at most the documented
scalars from the device (the step could be captured in a CUDA graph and overlap compute).
Counted on CPU as the aten ops that turn a tensor into a Python value (``.item()``,
``bool(t)``) and the calls of ``Tensor.tolist``, which are device-to-host reads on a GPU."""
import pytest
import torch

from lowrank_fused.routing import METHODS
from lowrank_fused.testing.trace import HostReads

from _methods import backward, model, optimizer

# reads a step needs by construction: AdaRankGrad's convergence test (data-dependent refresh
# trigger, docs/methods/adarankgrad.md) reads the norms of all matrices at once
PER_STEP = {"adarankgrad": 1}
# reads per step with nonfinite='raise' | 'skip': the non-finite flag, and LDAdam's one read
# of its power-iteration guards (for the fallback warning)
PER_STEP_CHECKED = {"ldadam": 2}


CASES = [(m, "ignore") for m in METHODS] + [
    (m, "raise") for m in ("galore", "ldadam", "adarankgrad", "adamw", "adapm")]


@pytest.mark.parametrize("method,nonfinite", CASES)
def test_host_reads_per_step(method, nonfinite, monkeypatch):
    reads = _steady_step_reads(method, monkeypatch, nonfinite=nonfinite)
    expected = PER_STEP.get(method, 0)
    if nonfinite != "ignore":
        expected += PER_STEP_CHECKED.get(method, 1)
    assert sum(reads.count.values()) == expected, f"{method}: {dict(reads.count)}"


def _steady_step_reads(method, monkeypatch, lagged=None, **kw):
    """The host reads (``HostReads`` plus ``Tensor.tolist`` calls) of one step between
    refreshes, after three steps; ``lagged`` sets ``lagged_nonfinite``."""
    net = model()
    gap = {"update_proj_gap": 50} if method in (
        "galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adamem") else {}
    opt = optimizer(net, method, **kw, **gap)
    if lagged is not None:
        opt.lagged_nonfinite = lagged
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    backward(net, 3)
    reads = HostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        reads.count["tolist"] += 1
        return real_tolist(t)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with reads:
        opt.step()
    monkeypatch.undo()
    return reads


# reads per steady step with nonfinite="raise" and the flag left on the device (the CUDA
# default, docs/engine.md): none for every method. The flag and what follows it to the host
# (AdaRankGrad's exit-test norms, LDAdam's power-iteration guards) are copied without a read
# and acted on when the flag is read, at the next step. Here the base engine, the two methods
# whose host decisions follow the flag and AdaMeM's vector sets; the other methods' engine
# tests count theirs (test_optim_adaptive_engine, test_optim_adapm_engine,
# test_optim_adafactor_engine; AdamW's: test_step_engine).
LAGGED_METHODS = ("galore", "adarankgrad", "ldadam", "adamem")


@pytest.mark.parametrize("method", LAGGED_METHODS)
def test_host_reads_per_step_with_the_flag_on_the_device(method, monkeypatch):
    reads = _steady_step_reads(method, monkeypatch, lagged=True)
    assert sum(reads.count.values()) == 0, f"{method}: {dict(reads.count)}"
