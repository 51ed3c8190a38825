"""AdaRankGrad on the step engine (docs/engine.md): the projected matrices run by classes of
(side, current rank, shape, dtypes, layout), one grouped K1 with every ``||Ghat||^2`` as its
side output, one multi-tensor K2 and one grouped K3 per class. The trajectory (weights, bases,
moments, ranks, blocks, exit-test scalars) equals the per-matrix step (``opt.engine = False``)
bit for bit on the CPU, across subspace selections that keep or change a rank, both
projection sides, fp32 and bf16, on the Triton (interpreter) and reference backends; the exit
tests of all classes take one host read per step; a step skipped on the device applies no
exit test."""
import contextlib

import pytest
import torch

from lowrank_fused.dispatch import available
from lowrank_fused.optim.adarankgrad import AdaRankGrad
from lowrank_fused.routing import make_optimizer
from lowrank_fused.testing.trace import HostReads

from _cases import count_calls, lm_loss, tiny_lm_task
from _methods import assert_same, backward, model, optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(t_min=2, t_max=3, eta_th=0.8)
SCALARS = ("step", "rank", "j", "t_j", "z_ema", "z_ref", "refresh", "seed", "layer_id")


def _run(engine, backend, dtype, steps, **kw):
    """``steps`` tiny-LM steps (rank 8); the ranks and the (rank, block) of every matrix after
    each step."""
    net, batch = tiny_lm_task(0)
    net.to(dtype)
    opt = make_optimizer(net, "adarankgrad", rank=8, lr=1e-2, weight_decay=0.01,
                         backend=backend, **kw)
    opt.engine = engine
    history = []
    for _ in range(steps):
        lm_loss(net, batch).backward()
        opt.step()
        opt.zero_grad()
        history.append(tuple((st["rank"], st["j"]) for st in opt.state.values()
                             if "rank" in st))
    return [p.detach().clone() for p in net.parameters()], opt, history


def _assert_same_state(opt_a, opt_b):
    pa = [p for g in opt_a.param_groups for p in g["params"]]
    pb = [p for g in opt_b.param_groups for p in g["params"]]
    for p, q in zip(pa, pb):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key, v in sa.items():
            if torch.is_tensor(v):
                assert v.shape == sb[key].shape and torch.equal(v, sb[key]), key
            else:
                assert v == sb[key], key


@contextlib.contextmanager
def _host_reads(monkeypatch):
    """Device-to-host reads: ``HostReads``' aten ops and ``Tensor.tolist`` calls."""
    reads = HostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        reads.count["tolist"] += 1
        return real_tolist(t)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", tolist)
        with reads:
            yield reads


def _sides(opt):
    return {opt._plan(p, g)[0] for g in opt.param_groups for p in g["params"]
            if opt._plan(p, g) is not None}


@pytest.mark.parametrize("backend,dtype,capacity", [
    ("triton", torch.float32, False), ("reference", torch.float32, False),
    ("reference", torch.bfloat16, False), ("reference", torch.float32, True)], ids=str)
def test_engine_equals_per_matrix(backend, dtype, capacity, monkeypatch):
    if not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    steps = 4 if backend == "triton" else 7
    kw = dict(KW, capacity_buffers=capacity)
    a, opt_a, hist_a = _run(False, backend, dtype, steps, **kw)
    calls = count_calls(monkeypatch, backend=backend)
    b, opt_b, hist_b = _run(True, backend, dtype, steps, **kw)
    assert hist_a == hist_b
    ranks = [tuple(r for r, _ in h) for h in hist_b]
    assert len(set(ranks)) > 1 and len(set(ranks[-1])) > 1      # ranks change and differ
    # a new block with the same rank (written in place) and one with another rank (new class)
    pairs = [(x, y) for h0, h1 in zip(hist_b, hist_b[1:]) for x, y in zip(h0, h1)
             if y[1] > x[1]]
    assert any(x[0] == y[0] for x, y in pairs) and any(x[0] != y[0] for x, y in pairs)
    assert _sides(opt_b) == {"left", "right"}
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    _assert_same_state(opt_a, opt_b)
    plan = opt_b._engine_plan
    assert not plan.legacy and plan.classes
    for cls in plan.classes.values():               # the class key holds the current rank
        assert {m.state["rank"] for m in cls.members} == {cls.route.rank}
    # (single projections remain: IASS's B = Qb^T G at a subspace selection)
    assert calls.get("backproject_update", 0) == 0
    assert calls["grouped_project"] == calls["grouped_backproject_update"] > 0


def test_steady_step_one_launch_per_class_and_one_read(monkeypatch):
    """Between subspace selections: one grouped K1 and one grouped K3 per class, no
    per-matrix GEMM, and one host read for the exit tests of every class (plus the
    non-finite flag's, read at once on the CPU)."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    calls = count_calls(monkeypatch)     # before the plan binds its calls
    net = model()
    opt = optimizer(net, "adarankgrad", t_min=10 ** 6, backend="triton")
    for t in range(2):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert not opt._refresh_pending(opt._engine_plan)
    backward(net, 2)
    calls.clear()
    with _host_reads(monkeypatch) as reads:
        opt.step()
    classes = len(opt._engine_plan.classes)
    assert classes > 1
    assert calls.get("project", 0) == calls.get("backproject_update", 0) == 0
    assert calls["grouped_project"] == calls["grouped_backproject_update"] == classes
    assert sum(reads.count.values()) == 2, dict(reads.count)


def test_zero_gradients_equal_per_matrix():
    """A matrix whose gradient is zero at its first selection (weight decay only, in no
    class) and another whose gradient is zero at a later one (block kept, no exit test):
    the engine equals the per-matrix step."""
    runs = []
    for engine in (False, True):
        net = model()
        opt = optimizer(net, "adarankgrad", t_min=1, t_max=2, weight_decay=0.1,
                        backend="reference")
        opt.engine = engine
        names = dict(net.named_parameters())
        first = names["model.layers.0.mlp.down_proj.weight"]
        later = names["model.layers.0.self_attn.q_proj.weight"]
        for t in range(5):
            backward(net, t)
            if t < 2:
                first.grad.zero_()
            if t == 2:
                later.grad.zero_()
            opt.step()
            opt.zero_grad(set_to_none=False)
            if t == 0:
                assert "basis" not in opt.state[first]
        assert opt.state[first]["j"] >= 1
        runs.append(snapshot(net, opt))
    assert_same(runs[0], runs[1], "zero gradients")


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_device_skip_applies_no_exit_test(nonfinite, monkeypatch):
    """With the non-finite flag left on the device, a steady step makes no host read (the
    exit tests' norms follow the flag to the host and the tests run when it is read, at the
    next step); a step with a NaN gradient is skipped on the device, applies no exit test,
    and the run goes on as if that batch had never come, equal to a run that reads the flag
    and the norms at once, through the refreshes the exit tests trigger."""
    net = model()
    opt = optimizer(net, "adarankgrad", t_min=3, t_max=6, nonfinite=nonfinite)
    ref_net = model()
    ref = optimizer(ref_net, "adarankgrad", t_min=3, t_max=6, nonfinite=nonfinite)
    opt.lagged_nonfinite, ref.lagged_nonfinite = True, False
    for t in range(3):
        for n, o in ((net, opt), (ref_net, ref)):
            backward(n, t)
            o.step()
            o.zero_grad(set_to_none=False)
    assert not opt._refresh_pending(opt._engine_plan)
    opt.nonfinite_check()          # the last step's lagged exit tests: its state settled
    before = snapshot(net, opt)
    backward(net, 3)
    dict(net.named_parameters())["model.layers.0.mlp.down_proj.weight"].grad.view(-1)[3] = \
        float("nan")
    with _host_reads(monkeypatch) as reads:
        opt.step()
    assert sum(reads.count.values()) == 0, dict(reads.count)
    if nonfinite == "skip":
        opt.nonfinite_check()
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match="down_proj.*at step 4"):
            opt.nonfinite_check()
    assert_same(before, snapshot(net, opt), "skipped on the device")
    for t in range(4, 14):
        for n, o in ((net, opt), (ref_net, ref)):
            o.zero_grad(set_to_none=False)
            backward(n, t)
            o.step()
    opt.nonfinite_check()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), "after the skip")
    blocks = [st.get("j", 0) for st in opt.state.values()]
    assert max(blocks) >= 2, f"no exit test triggered a refresh in the run: {blocks}"


def test_removed_grouped_gemms_flag_is_refused():
    """The engine is the grouped path: the old opt-in keyword is an error, not ignored."""
    with pytest.raises(TypeError, match="grouped_gemms"):
        AdaRankGrad([torch.nn.Parameter(torch.randn(4, 4))], grouped_gemms=True)
