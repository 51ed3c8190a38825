"""GaLoreAdamW on the step engine (grouped launches): every step runs K1 and K3 of every
matrix class as one grouped launch each; the trajectory equals the per-matrix step
(``opt.engine = False``) bit for bit on the CPU (same tiles), across refreshes, both
projection sides, fp32 and bf16, on the Triton (interpreter) and reference backends."""
import pytest
import torch

from lowrank_fused import GaLoreAdamW
from lowrank_fused.dispatch import available
from lowrank_fused.routing import galore_param_groups
from _cases import count_calls, lm_loss, tiny_lm_task


def _run(grouped, backend, dtype, steps=5, **kw):
    model, batch = tiny_lm_task(0)
    model.to(dtype)
    groups = galore_param_groups(model, rank=8, update_proj_gap=2, scale=0.25)
    opt = GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01, backend=backend, **kw)
    opt.engine = grouped
    sides = set()
    for _ in range(steps):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for g in opt.param_groups:
        for p in g["params"]:
            plan = opt._plan(p, g)
            if plan is not None:
                sides.add(plan[0])
    return [p.detach().clone() for p in model.parameters()], opt, sides


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_equals_per_matrix(backend, dtype):
    if not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    a, opt_a, sides = _run(False, backend, dtype)
    b, opt_b, _ = _run(True, backend, dtype)
    assert sides == {"left", "right"}, sides          # both projection sides are exercised
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    pa = [p for g in opt_a.param_groups for p in g["params"]]
    pb = [p for g in opt_b.param_groups for p in g["params"]]
    for p, q in zip(pa, pb):
        for key in ("exp_avg", "exp_avg_sq", "basis"):
            if key in opt_a.state[p]:
                assert torch.equal(opt_a.state[p][key], opt_b.state[q][key]), key


def test_grouped_launches_once_per_class(monkeypatch):
    """Between refreshes each class of same-shape matrices takes one grouped K1 call and one
    grouped K3 call, and no single-matrix K1/K3."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    calls = count_calls(monkeypatch)
    _, opt, _ = _run(True, "triton", torch.float32, steps=1)
    classes = {(tuple(p.shape), opt._plan(p, g)[0]) for g in opt.param_groups
               for p in g["params"] if opt._plan(p, g) is not None}
    assert calls.get("project", 0) == 0 and calls.get("backproject_update", 0) == 0
    assert calls["grouped_project"] == calls["grouped_backproject_update"] == len(classes)


def test_per_layer_mode_keeps_the_per_matrix_path():
    """In per-layer mode (steps inside backward, one parameter at a time) nothing is
    collected: the result equals the normal per-matrix step."""
    from lowrank_fused.per_layer import PerLayerStep

    model, batch = tiny_lm_task(0)
    opt = GaLoreAdamW(galore_param_groups(model, rank=8, update_proj_gap=2, scale=0.25),
                      lr=1e-2, backend="reference")
    stepper = PerLayerStep(opt)
    ref_model, ref_batch = tiny_lm_task(0)
    ref = GaLoreAdamW(galore_param_groups(ref_model, rank=8, update_proj_gap=2, scale=0.25),
                      lr=1e-2, backend="reference")
    for _ in range(3):
        with stepper.accumulate(False):
            lm_loss(model, batch).backward()
        lm_loss(ref_model, ref_batch).backward()
        ref.step()
        ref.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_removed_grouped_gemms_flag_is_refused():
    """The grouped path is the only path: the old opt-in keyword is an error, not ignored."""
    with pytest.raises((TypeError, ValueError), match="grouped_gemms"):
        GaLoreAdamW([torch.nn.Parameter(torch.randn(4, 4))], grouped_gemms="yes")
