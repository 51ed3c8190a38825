"""Multi-tensor apply in the optimizers: within ``step()`` the dense AdamW step of every
non-projected parameter is one ``adamw_step_multi`` call, and GaLoreAdamW (on the step engine)
runs K2 of every class of projected matrices as one ``adam_moments_multi``.

* The multi-tensor path equals the per-tensor loop (``opt.multi_tensor = False``) bit for bit on
  the reference backend, over 5 steps of every optimizer with dense parameters; on the C++ twin
  (backend "cpu") within fp32 1e-6 relative of the reference.
* One step makes one multi-tensor call and no per-tensor call; ``backend="triton"`` (no multi
  op) constructs and keeps the per-tensor loop.
* GaLore's engine step equals its per-matrix step (``opt.engine = False``) bit for bit
  (reference) over 12 steps that cross two refreshes, with left- and right-projected
  matrices, fp32 and bf16 parameters.
* Per-layer mode steps each parameter alone and still equals ``opt.step()``.
"""
import collections

import pytest
import torch

import lowrank_fused as lf
from lowrank_fused import dispatch
from lowrank_fused.dispatch import AutoBackend, interpreting
from lowrank_fused.optim._base import multi_backend
from lowrank_fused.optim.galore_adamw import projection_side
from lowrank_fused.per_layer import PerLayerStep

from _methods import assert_same, backward, model, optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cpu_ext = pytest.mark.skipif(
    not dispatch.available("cpu", "cpu"),
    reason=f"backend 'cpu' unavailable: {dispatch._why_unavailable('cpu', torch.device('cpu'))}")

# every optimizer whose non-projected parameters take LowRankOptimizer._dense_adamw_step
DENSE_METHODS = ("adamw", "hfadamw", "galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac",
                 "adarankgrad", "ldadam")
STEPS = 5
OPS = ("adamw_step", "adamw_step_multi", "adam_moments", "adam_moments_multi")


def build(net, method, **kw):
    if method == "hfadamw":
        return lf.HFAdamW(net.parameters(), weight_decay=0.01, **kw).set_param_names(net)
    return optimizer(net, method, **kw)


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of every implementation of ``OPS`` (the dispatch table's entries are
    wrapped for the test)."""
    count = collections.Counter()
    for op in OPS:
        for backend, fn in dispatch.implementations(op).items():
            def counted(*a, _fn=fn, _key=(op, backend), **k):
                count[_key] += 1
                count[_key[0]] += 1
                return _fn(*a, **k)
            monkeypatch.setitem(dispatch._TABLE[op], backend, counted)
    return count


def run(method, *, multi=True, steps=STEPS, dtype=torch.float32, **kw):
    net = model(dtype=dtype)
    opt = build(net, method, **kw)
    opt.multi_tensor = multi
    for t in range(steps):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


def run_fixed_grads(method, *, multi=True, steps=STEPS, **kw):
    """As ``run``, with gradients that do not depend on the weights (seeded per step and
    parameter): the C++ twin's few-ulp differences in the dense weights then stay there
    instead of reaching every gradient through backward and being amplified by the refreshes'
    SVDs, so the comparison with the reference can be tight."""
    net = model()
    opt = build(net, method, **kw)
    opt.multi_tensor = multi
    for t in range(steps):
        gen = torch.Generator().manual_seed(500 + t)
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


def dense_count(opt):
    return sum(1 for g in opt.param_groups for p in g["params"]
               if p.requires_grad and (not hasattr(opt, "_plan") or opt._plan(p, g) is None))


# -- (a) multi-tensor == per-tensor ------------------------------------------------------------

@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_multi_equals_per_tensor_reference(method, calls):
    a, opt_a = run(method, multi=True, backend="reference")
    assert calls["adamw_step_multi", "reference"] == STEPS
    assert calls["adamw_step"] == 0
    calls.clear()
    b, opt_b = run(method, multi=False, backend="reference")
    assert calls["adamw_step_multi"] == 0
    assert calls["adamw_step", "reference"] == STEPS * dense_count(opt_b)
    assert_same(snapshot(a, opt_a), snapshot(b, opt_b), method)


@pytest.mark.parametrize("method", ["adamw", "hfadamw", "galore", "ldadam"])
def test_dense_multi_equals_per_tensor_bf16(method):
    a, opt_a = run(method, multi=True, backend="reference", dtype=torch.bfloat16)
    b, opt_b = run(method, multi=False, backend="reference", dtype=torch.bfloat16)
    assert_same(snapshot(a, opt_a), snapshot(b, opt_b), method)


def assert_close_snapshots(ours, ref, rtol=1e-6, what=""):
    """Weights and state tensors within ``rtol`` relative (elements near zero: absolute
    ``rtol`` times the tensor's largest magnitude)."""
    (wa, sa), (wb, sb) = ours, ref
    pairs = [(f"weight {k}", wa[k], wb[k]) for k in wb]
    pairs += [(f"state {i}.{k}", v, sb[i][k]) for i in sb for k, v in sa[i].items()
              if torch.is_tensor(v)]
    for name, x, y in pairs:
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {name}"
        if y.numel():
            scale = float(y.double().abs().max())
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: f"{what}: {name}: {m}")


@needs_cpu_ext
@pytest.mark.parametrize("method", ["adamw", "hfadamw"])
def test_dense_multi_cpu_twin(method, calls):
    """backend="cpu": the whole step is one call of the C++ twin's adamw_step_multi."""
    a, opt_a = run_fixed_grads(method, backend="cpu")
    assert calls["adamw_step_multi", "cpu"] == STEPS and calls["adamw_step"] == 0
    b, opt_b = run_fixed_grads(method, multi=False, backend="reference")
    assert_close_snapshots(snapshot(a, opt_a), snapshot(b, opt_b), what=method)


@needs_cpu_ext
@pytest.mark.parametrize("method", [m for m in DENSE_METHODS if m not in ("adamw", "hfadamw")])
def test_dense_multi_cpu_twin_in_lowrank_methods(method, calls, monkeypatch):
    """The low-rank methods need ops the C++ twin does not have (project, ...), so they cannot
    be built with backend="cpu": the reference backend's adamw_step_multi is swapped for the
    twin's, which checks that the lists these optimizers collect are what the compiled kernel
    takes (contiguous, fp32/bf16) and gives the reference's result."""
    monkeypatch.setitem(dispatch._TABLE["adamw_step_multi"], "reference",
                        dispatch._TABLE["adamw_step_multi"]["cpu"])
    a, opt_a = run_fixed_grads(method, backend="reference")
    assert calls["adamw_step_multi", "cpu"] == STEPS
    monkeypatch.undo()
    b, opt_b = run_fixed_grads(method, multi=False, backend="reference")
    assert_close_snapshots(snapshot(a, opt_a), snapshot(b, opt_b), what=method)


@needs_cpu_ext
def test_non_contiguous_parameter_keeps_the_per_tensor_op(calls):
    """The compiled multi kernel takes contiguous buffers: a transposed parameter keeps the
    per-tensor op (which handles it), the others share the one multi call."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5).t()), torch.nn.Parameter(torch.randn(9)),
              torch.nn.Parameter(torch.randn(3, 4))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = lf.AdamW(params, backend="cpu")
    opt_ref = lf.AdamW(ref, backend="reference")
    for t in range(3):
        for ps in (params, ref):
            for i, p in enumerate(ps):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + t + i) \
                    .reshape(p.shape)
        opt.step()
        opt_ref.step()
    assert calls["adamw_step_multi", "cpu"] == 3 and calls["adamw_step", "cpu"] == 3
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- (b) call counts and backend choice ----------------------------------------------------------

def test_one_multi_call_per_step(calls):
    net = model()
    opt = lf.AdamW([{"params": [p for p in net.parameters() if p.dim() >= 2]},
                    {"params": [p for p in net.parameters() if p.dim() < 2], "lr": 3e-3,
                     "weight_decay": 0.0, "betas": (0.8, 0.99)}], backend="reference")
    assert dense_count(opt) > 5
    for t in range(2):
        backward(net, t)
        calls.clear()
        opt.step()
        assert calls["adamw_step_multi"] == 1, "one multi-tensor call for every parameter"
        assert calls["adamw_step"] == 0
        opt.zero_grad(set_to_none=True)
    assert all(opt.state[p]["step"] == 2 for p in net.parameters())


def test_per_group_settings_split_calls_only_by_convention(calls):
    """Per-parameter lr/betas/eps/weight decay share a call; GaLore's dense groups with another
    ``bias_correction`` need a call of their own."""
    net = model()
    dense = [p for n, p in net.named_parameters() if "norm" in n or "embed" in n]
    opt = lf.GaLoreAdamW([{"params": dense[:1]}, {"params": dense[1:], "bias_correction": False}],
                         backend="reference")
    backward(net, 0)
    opt.step()
    assert calls["adamw_step_multi"] == 2 and calls["adamw_step"] == 0


def test_triton_backend_constructs_and_keeps_the_per_tensor_loop(calls):
    if not (interpreting() or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = [torch.nn.Parameter(torch.randn(5, 3, device=device)),
              torch.nn.Parameter(torch.randn(4, device=device))]
    opt = lf.AdamW(params, backend="triton")
    assert multi_backend("adamw_step", "triton", torch.device(device)) is None
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls["adamw_step", "triton"] == 2 and calls["adamw_step_multi"] == 0


def test_multi_backend_choice():
    cpu = torch.device("cpu")
    assert multi_backend("adamw_step", "reference", cpu) == "reference"
    assert multi_backend("adam_moments", "reference", cpu) == "reference"
    # auto: the compiled CPU twin when built (dispatch.AUTO_ON_CPU); without it the reference
    # loop, only where the single op also runs its reference
    if dispatch.available("cpu", "cpu"):
        want = "cpu"
    else:
        want = None if interpreting() else "reference"
    assert multi_backend("adamw_step", AutoBackend("cpu"), cpu) == want
    assert multi_backend("adam_moments", AutoBackend("cpu"), cpu) == (
        "cpu" if want == "cpu" else None if interpreting() else "reference")
    if dispatch.available("cpu", "cpu"):
        assert multi_backend("adamw_step", "cpu", cpu) == "cpu"


def test_outside_step_runs_now():
    """No step in progress (what per-layer mode is): the update happens at the call."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = lf.AdamW([p], backend="reference")
    p.grad = torch.ones(4)
    with torch.no_grad():
        opt._step_param(p, opt.param_groups[0], "reference", "ieee")
    assert opt.state[p]["step"] == 1 and not torch.equal(p.detach(), torch.ones(4))


# -- (c) GaLoreAdamW: K2 of each matrix class in one multi-tensor call -----------------------------

GAP = 5         # refreshes at counters 0, 5, 10: two after the first within 12 steps


def run_engine(engine, **kw):
    """``run`` with the step engine on (every class's K2 in one multi-tensor call) or off (the
    per-matrix step)."""
    net = model(dtype=kw.pop("dtype", torch.float32))
    opt = build(net, "galore", **kw)
    opt.engine = engine
    for t in range(12):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return net, opt


@pytest.mark.parametrize("dtype,faithful", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.bfloat16, True)])
@pytest.mark.parametrize("projector", ["svd", "randomized"])
def test_galore_multi_tensor_moments_equal(dtype, faithful, projector, calls):
    steps = 12
    kw = dict(backend="reference", update_proj_gap=GAP, faithful_dtypes=faithful,
              projector=projector, dtype=dtype)
    a, opt_a = run_engine(True, **kw)
    lowrank = [(p, g) for g in opt_a.param_groups for p in g["params"]
               if opt_a._plan(p, g) is not None]
    sides = {projection_side(tuple(p.shape), g["proj_type"]) for p, g in lowrank}
    assert sides == {"left", "right"}, "the model must have wide and tall matrices"
    classes = len(opt_a._engine_plan.classes)
    assert classes >= 2
    assert calls["adam_moments_multi", "reference"] == steps * classes
    assert calls["adam_moments"] == 0
    calls.clear()
    b, opt_b = run_engine(False, **kw)
    assert calls["adam_moments_multi"] == 0 and calls["adam_moments"] == steps * len(lowrank)
    assert all(opt_b.state[p]["step"] == steps for g in opt_b.param_groups for p in g["params"]
               if opt_b._plan(p, g) is not None)
    assert_same(snapshot(a, opt_a), snapshot(b, opt_b), "engine vs per-matrix")


@needs_cpu_ext
def test_galore_multi_tensor_moments_cpu_twin(monkeypatch, calls):
    """The twin's adam_moments_multi takes the lists of GaLore's classes (see
    test_dense_multi_cpu_twin_in_lowrank_methods for the swap)."""
    for op in ("adamw_step_multi", "adam_moments_multi"):
        monkeypatch.setitem(dispatch._TABLE[op], "reference", dispatch._TABLE[op]["cpu"])
    a, opt_a = run_fixed_grads("galore", backend="reference", update_proj_gap=3)
    assert calls["adam_moments_multi", "cpu"] == STEPS * len(opt_a._engine_plan.classes)
    monkeypatch.undo()
    b, opt_b = run_fixed_grads("galore", multi=False, backend="reference", update_proj_gap=3)
    assert_close_snapshots(snapshot(a, opt_a), snapshot(b, opt_b), what="galore")



# -- (d) per-layer mode ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,kw", [("adamw", {}), ("galore", {}),
                                       ("ldadam", {})])
def test_per_layer_steps_per_tensor_and_equals_step(method, kw, calls):
    a, _ = run(method, backend="reference", **kw)
    assert calls["adamw_step_multi"] == STEPS
    calls.clear()
    net = model()
    opt = build(net, method, backend="reference", **kw)
    stepper = PerLayerStep(opt)
    for t in range(STEPS):
        backward(net, t)
    stepper.remove()
    assert calls["adamw_step_multi"] == 0 and calls["adam_moments_multi"] == 0
    assert calls["adamw_step"] == STEPS * dense_count(opt)
    for (name, x), y in zip(a.state_dict().items(), net.state_dict().values()):
        assert torch.equal(x, y), f"{method}: {name} differs in per-layer mode"
    assert opt.step_calls == STEPS
