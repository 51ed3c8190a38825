"""CUDA-graph capture of AdaPM and AdaPM-mini's steady step (docs/engine.md, "CUDA-graph
capture"), on the CPU: what ``tests/test_step_engine.py``'s generic replay test does not cover.

* Every class of a steady step (low-rank, full- and no-momentum, elementwise and block-mean
  second moments) is capturable on the Triton launches, none on the reference backend.
* A replay takes every per-step and per-group value from the class's scalar table: lr,
  weight decay, betas, eps, the clip and the correction changed between replays give the eager
  run's bits (nothing is taken by value, so ``_captured_values`` holds nothing of AdaPM's).
* The refits run eagerly (the per-parameter step, the flag read at once) and write L and R in
  place: the launches captured before a refit, replayed between later refits, equal the eager
  run bit for bit.
"""
import pytest
import torch

from lowrank_fused import _ext

from test_step_engine import LaunchTape, _steady, replay_run

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("adapm", "adapm_mini")


@pytest.mark.parametrize("method", METHODS)
def test_every_class_of_a_steady_step_is_capturable(method):
    net, opt = _steady(method)
    classes = list(opt._engine_plan.classes.values())
    assert {c.route.kind for c in classes} == {"lowrank", "full", "none"}
    assert all(opt._class_capturable(c) for c in classes)
    assert opt._captured_values() == ()
    if method == "adapm_mini":
        assert any(c.extra["step"].impl.blocks for c in classes)
    # a class on the reference backend (torch ops with the scalars by value) is not
    net, opt = _steady(method, backend="reference")
    classes = list(opt._engine_plan.classes.values())
    assert classes and not any(opt._class_capturable(c) for c in classes)


def _replay_run(tape, method, steps, change=None, **kw):
    """test_step_engine's replay loop (``replay_run``) with the optimizer keywords ``kw``:
    the steps with a refit pending run eagerly (as with ``capture`` on), a NaN gradient at
    t = 7. Returns the steps' modes ("eager", "capture", "replay")."""
    runs = [_steady(method, nonfinite="skip", **kw) for _ in range(2)]
    return replay_run(tape, runs[0], runs[1], range(3, 3 + steps), poison_at=7, change=change)


@pytest.fixture
def tape(monkeypatch):
    return LaunchTape(monkeypatch)


@pytest.mark.skipif(_ext.why_no_cpu() is not None, reason="needs the compiled CPU twin")
@pytest.mark.parametrize("method", METHODS)
def test_replayed_steps_take_changed_hyperparameters_from_the_table(method, tape):
    """lr (a schedule), weight decay, betas, eps, the clip threshold and the correction,
    changed between replays, reach the replayed launches through the scalar table."""
    def change(opt, t):
        for i, g in enumerate(opt.param_groups):
            g["lr"] = 1e-3 * (1.0 + 0.1 * t + 0.01 * i)
        g = opt.param_groups[-1]
        if t == 4:
            g["weight_decay"] = 0.05
            g["clip_threshold"] = 0.5
        if t == 5:
            for g in opt.param_groups:
                g["betas"] = (0.8, 0.99)
                g["eps"] = 1e-6
        if t == 6:
            for g in opt.param_groups:
                g["adapm_correction"] = "eq3"
                g["clip_mode"] = "none"

    modes = _replay_run(tape, method, 6, change)
    assert modes == ["capture"] + ["replay"] * 5, modes


@pytest.mark.skipif(_ext.why_no_cpu() is not None, reason="needs the compiled CPU twin")
@pytest.mark.parametrize("method", METHODS)
def test_replays_between_the_eager_refits(method, tape):
    """The refits (every ``refit_T`` steps, eager: the per-parameter step) write L and R in
    place; the launches captured before them, replayed after, equal the eager run."""
    modes = _replay_run(tape, method, 8, refit_T=3)
    assert modes.count("eager") >= 2 and modes.count("replay") >= 4, modes
    idx = modes.index("eager", modes.index("capture"))
    assert "replay" in modes[idx:], modes

