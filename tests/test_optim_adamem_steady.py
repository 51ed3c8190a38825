"""AdaMeM's steady step on the engine (docs/methods/adamem.md, "The step on the engine"): what
it binds once and what a steady step does with it.

* The bound combined update (``ops_adamem_grouped.BoundAdamemResidualUpdate``: the grouped
  residual K3 planned once per precision and gradient addresses) equals the unbound op bit for
  bit on fresh inputs, both orientations (a tall class bound on its untransposed gradients),
  fp32 and bf16 weights, one number or one value per member for each scalar, gradients that
  stay put and gradients that move; bad input raises naming it, with the weights untouched.
* The bound factored step of the Adafactor matrices (``BoundAdamemFactoredStep``) equals
  ``adamem_factored_step`` bit for bit over several tiles, with and without ``skip``, and
  allocates nothing.
* A steady step of the paper's routing (classes, a vector set, two factored matrices) with
  the flag left on the device allocates no tensor and makes the same launches with the same
  arguments as the step before it (the per-step scalars in tables at fixed addresses; the
  factored matrices' statistics passes take beta2 and eps1 by value, fixed per group).
"""
import collections

import pytest
import torch

import lowrank_fused as lf
from lowrank_fused import ops_grouped
from lowrank_fused.dispatch import available
from lowrank_fused.ops_adamem_grouped import BoundAdamemResidualUpdate
from lowrank_fused.optim.adamem import adamem_param_groups
from lowrank_fused.testing.trace import AllocationTrace

from _methods import backward, model
from test_step_engine import LaunchRecorder

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = [b for b in ("reference", "triton") if available(b, "cpu")]


def _class(count, m, n, r, side, dtype, gen):
    """A class as the engine binds it: left-form weights (a tall class: transposed views),
    bases, R and N workspaces as consecutive slices of one fp32 buffer, column scales."""
    k, cols = (m, n) if side == "left" else (n, m)
    P = [torch.linalg.qr(torch.randn(k, r, generator=gen))[0] for _ in range(count)]
    W = [torch.randn(m, n, generator=gen).to(dtype) for _ in range(count)]
    Wc = W if side == "left" else [w.t() for w in W]
    buf = torch.empty(2 * count, r, cols)
    Rs, Ns = list(buf[:count].unbind(0)), list(buf[count:].unbind(0))
    css = list(torch.empty(count, cols).unbind(0))
    return W, Wc, P, Rs, Ns, css


def _fill(Rs, Ns, css, gen):
    for R, N, cs in zip(Rs, Ns, css):
        R.copy_(torch.randn(R.shape, generator=gen))
        N.copy_(torch.randn(N.shape, generator=gen))
        cs.copy_(torch.rand(cs.shape, generator=gen) + 0.5)
    return [R.clone() for R in Rs], [N.clone() for N in Ns], [c.clone() for c in css]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bound_residual_update_equals_the_op(backend, side, dtype):
    gen = torch.Generator().manual_seed(21)
    m, n, r, count = (9, 21, 3, 3) if side == "left" else (21, 9, 3, 3)
    W, Wc, P, Rs, Ns, css = _class(count, m, n, r, side, dtype, gen)
    W_ref = [w.clone() for w in W]
    Wc_ref = W_ref if side == "left" else [w.t() for w in W_ref]
    bound = None
    Gs = [torch.randn(m, n, generator=gen).to(dtype) for _ in range(count)]
    # steps 0, 1: the same gradient tensors (new values); 2: new tensors (a re-plan); 3:
    # per-member scalars
    for step in range(4):
        if step == 2:
            Gs = [torch.randn(m, n, generator=gen).to(dtype) for _ in range(count)]
        else:
            for G in Gs:
                G.copy_(torch.randn(m, n, generator=gen))
        R_ref, N_ref, cs_ref = _fill(Rs, Ns, css, gen)
        if bound is None:
            bound = BoundAdamemResidualUpdate(Wc, Gs, P, Rs, Ns, css, side=side,
                                              backend=backend)
            assert (bound.stacked is not None) == (backend == "triton")
        if step < 3:
            kw = dict(coef=0.1 + step, res_coef=0.05, pre_scale=0.99, post_decay=0.0)
            per = {k: [v] * count for k, v in kw.items()}
        else:
            per = kw = dict(coef=[0.1 * (i + 1) for i in range(count)],
                            res_coef=[0.05 * (i + 2) for i in range(count)],
                            pre_scale=[0.99, 1.0, 0.98], post_decay=[0.0, 0.01, 0.0])
        bound(Gs, precision="ieee", **kw)
        left = Gs if side == "left" else [G.t() for G in Gs]
        ops_grouped.grouped_residual_backproject_update(
            Wc_ref, left, P, R_ref, N_ref, cs_ref, backend=backend, **per)
        for a, b in zip(W, W_ref):
            assert torch.equal(a, b), step
        assert not torch.equal(W[0], W[1])
    if backend == "triton":
        assert len(bound._plans) == 1            # one plan per precision, re-planned once
    before = [w.clone() for w in W]              # skip: every W keeps its bits
    _fill(Rs, Ns, css, gen)
    bound(Gs, coef=0.1, res_coef=0.05, skip=torch.ones((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(W, before))
    # bad input: named, nothing written
    with pytest.raises(ValueError, match="coef"):
        bound(Gs, coef=float("nan"), res_coef=0.05)
    with pytest.raises(ValueError, match="res_coef"):
        bound(Gs, coef=0.1, res_coef=[0.05] * (count + 1))
    bad = [torch.randn(n, m + 1, generator=gen).to(dtype) for _ in range(count)]
    with pytest.raises(ValueError, match="Gs"):
        bound(bad, coef=0.1, res_coef=0.05)
    with pytest.raises(ValueError, match="Gs"):     # a layout checked elsewhere: not this one
        bound(bad, coef=0.1, res_coef=0.05, checked=ops_grouped._Layout(bad[0], count))
    with pytest.raises(TypeError, match="skip"):
        bound(Gs, coef=0.1, res_coef=0.05, skip=torch.ones(1))
    with pytest.raises(ValueError, match="precision"):
        bound(Gs, coef=0.1, res_coef=0.05, precision="fp8")
    assert all(torch.equal(a, b) for a, b in zip(W, before))


def test_planned_update_refuses_moved_gradients():
    """The planned launch reads the residuals at the planned offsets: a first gradient at
    another address is refused (the bound call re-plans instead)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable here")
    from lowrank_fused.kernels.grouped_residual_backproject_update import (
        PlannedResidualUpdate)

    gen = torch.Generator().manual_seed(22)
    W, Wc, P, Rs, Ns, css = _class(2, 8, 12, 2, "left", torch.float32, gen)
    Gs = [torch.randn(8, 12, generator=gen) for _ in range(2)]
    stacked = tuple(ops_grouped.stacked_view(X) for X in (Rs, Ns, css))
    planned = PlannedResidualUpdate(Wc, Gs, P, Ns, css, stacked)
    before = [w.clone() for w in W]
    with pytest.raises(ValueError, match="moved"):
        planned(Gs[0].clone(), coef=0.1, res_coef=0.1, pre_scale=1.0, post_decay=0.0)
    assert all(torch.equal(a, b) for a, b in zip(W, before))


@pytest.mark.parametrize("shape", [(70, 300), (40, 129), (9, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bound_factored_step_equals_the_op(shape, dtype, monkeypatch):
    """Over several 32 x 128 tiles (sums of partial rows and columns) and one; the skip flag
    (None, False, True) keeps the op's contract; a call allocates nothing."""
    if "triton" not in BACKENDS:
        pytest.skip("triton unavailable here")
    from lowrank_fused.kernels.adamem_factored_step import (BoundAdamemFactoredStep,
                                                            adamem_factored_step)

    gen = torch.Generator().manual_seed(23)
    W = torch.randn(shape, generator=gen).to(dtype)
    row, col = torch.rand(shape[0], generator=gen), torch.rand(shape[1], generator=gen)
    W2, row2, col2 = W.clone(), row.clone(), col.clone()
    bound = BoundAdamemFactoredStep(W2, row2, col2)
    for step in range(2):
        G = torch.randn(shape, generator=gen).to(dtype)
        for skip in (None, torch.tensor(False), torch.tensor(True)):
            kw = dict(lr=1e-2, beta2=0.95, eps1=1e-30, eps=1e-8, c2=0.3 + step,
                      pre_scale=0.999, post_decay=0.001 * step, skip=skip)
            adamem_factored_step(W, G, row, col, **kw)
            bound(G, **kw)
            assert torch.equal(W, W2) and torch.equal(row, row2) and torch.equal(col, col2)
    assert not torch.equal(W, torch.randn(shape, generator=gen).to(dtype))
    with pytest.raises(ValueError, match="G must have"):
        bound(torch.randn(shape[1], shape[0]).to(dtype), **kw)
    with pytest.raises(ValueError, match="col"):
        BoundAdamemFactoredStep(W2, row2, torch.zeros(shape[1] + 1))
    LaunchRecorder(monkeypatch, stub=True)       # the interpreter's own copies not counted
    with AllocationTrace() as trace:
        bound(G, **{**kw, "skip": torch.tensor(False)})
    assert trace.sizes == [], trace.sizes


def _steady():
    net = model()
    opt = lf.AdaMeM(adamem_param_groups(net, rank=4), lr=1e-2, update_proj_gap=50)
    opt.lagged_nonfinite = True
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return net, opt


def test_steady_step_allocates_nothing_and_repeats_its_launches(monkeypatch):
    recorder = LaunchRecorder(monkeypatch)
    net, opt = _steady()
    plan = opt._engine_plan
    assert not plan.legacy and plan.classes and plan.vector_sets and len(plan.factored) == 2
    steps = []
    for t in range(3, 5):
        backward(net, t)
        recorder.log.clear()
        opt.step()
        opt.zero_grad(set_to_none=False)
        steps.append(list(recorder.log))
    assert steps[0] and len(steps[0]) == len(steps[1])
    for a, b in zip(*steps):
        assert a == b, f"a steady step changed a launch:\n{a}\n{b}"
    kernels = collections.Counter(entry[0] for entry in steps[0])
    # per class: K1, the middle's four, K3; three per factored matrix (stats, EMA, apply);
    # one per vector set; the non-finite flags
    assert sum(kernels.values()) == 6 * len(plan.classes) + 3 * len(plan.factored) \
        + len(plan.vector_sets) + 1, kernels
    backward(net, 5)
    LaunchRecorder(monkeypatch, stub=True)
    with AllocationTrace() as trace:
        opt.step()
    assert trace.sizes == [], trace.sizes
