"""LDAdamW on the step engine (docs/engine.md): every class of same-shape, same-rank matrices of
one group takes its whole steady step together (the power iteration as two grouped K1 calls
and batched r x r products, one batched QR, the main K1, the transport on the stacked state,
the error feedback as one grouped K = 2r back-projection, one multi-tensor or per-matrix K2,
one grouped K3). The trajectory (weights, bases, moments, error buffers, the global counter)
equals the per-matrix step (``opt.engine = False``) bit for bit on the CPU, both projection
sides, fp32 and bf16, with and without error feedback, on the Triton (interpreter), reference
and auto backends; the per-step host reads and the warning on a non-finite power iteration."""
import warnings

import pytest
import torch

from lowrank_fused.dispatch import available
from lowrank_fused.linalg import RefreshFallbackWarning
from lowrank_fused.optim.ldadam import LDAdamW
from lowrank_fused.routing import make_optimizer
from _cases import count_calls, lm_loss, tiny_lm_task


def _run(engine, backend, dtype, steps, before_step=None, **kw):
    """``steps`` steps of LDAdam (``make_optimizer``'s, options ``kw``) on the tiny LM task in
    ``dtype``; ``_train``'s result."""
    model, batch = tiny_lm_task(0)
    model.to(dtype)
    opt = make_optimizer(model, "ldadam", rank=8, lr=1e-2, weight_decay=0.01, backend=backend,
                         **kw)
    return _train(model, batch, opt, engine, steps, before_step)


def _train(model, batch, opt, engine, steps, before_step=None):
    """``steps`` steps of ``opt`` on the engine or per matrix (``before_step(opt, step)``
    first, where given): the parameters after them (copies) and the optimizer."""
    opt.engine = engine
    for step in range(steps):
        if before_step is not None:
            before_step(opt, step)
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def _assert_same(a, opt_a, b, opt_b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    sides = set()
    for p, q in zip(opt_a.state, opt_b.state):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, v in opt_a.state[p].items():
            if torch.is_tensor(v):
                assert v.dtype == opt_b.state[q][key].dtype, key
                assert torch.equal(v, opt_b.state[q][key]), key
            else:
                assert v == opt_b.state[q][key], key
    for g in opt_a.param_groups:
        for p in g["params"]:
            plan = opt_a._plan(p, g)
            if plan is not None:
                sides.add(plan[0])
    assert sides == {"left", "right"}, sides          # both projection sides are exercised
    assert opt_a.completed_steps == opt_b.completed_steps


CASES = [("triton", torch.float32, True), ("triton", torch.bfloat16, True),
         ("reference", torch.float32, True), ("reference", torch.bfloat16, True),
         ("reference", torch.float32, False), ("reference", torch.bfloat16, False),
         ("auto", torch.float32, True)]


@pytest.mark.parametrize("backend,dtype,ef", CASES, ids=str)
def test_engine_equals_per_matrix(backend, dtype, ef):
    if backend != "auto" and not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    steps = 3 if backend == "triton" else 5
    a, opt_a = _run(False, backend, dtype, steps, error_feedback=ef)
    b, opt_b = _run(True, backend, dtype, steps, error_feedback=ef)
    assert opt_a._engine_plan.legacy and opt_b._engine_plan.classes
    assert not opt_b._engine_plan.legacy                 # after the first step: all on classes
    assert any("error" in st for st in opt_b.state.values()) == ef
    _assert_same(a, opt_a, b, opt_b)


def test_engine_fp32_error_buffer_and_groups():
    """ef_dtype='fp32' on bf16 weights, and two groups with different hyperparameters (their
    matrices are separate classes: a class reads one group's scalars)."""
    def run(engine):
        model, batch = tiny_lm_task(0)
        model.to(torch.bfloat16)
        mats = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
                and "lm_head" not in n]
        rest = [p for p in model.parameters() if all(p is not q for q in mats)]
        half = len(mats) // 2
        opt = LDAdamW([dict(params=mats[:half], enable_lowrank=True, rank=8, rho=0.9),
                       dict(params=mats[half:], enable_lowrank=True, rank=8, lr=3e-3,
                            ef_dtype="fp32"),
                       dict(params=rest)], lr=1e-2, weight_decay=0.01, backend="reference")
        return _train(model, batch, opt, engine, 4)

    a, opt_a = run(False)
    b, opt_b = run(True)
    groups = {k[-1] for k in opt_b._engine_plan.classes}
    assert len(groups) == 2
    assert any(st.get("error") is not None and st["error"].dtype == torch.float32
               for st in opt_b.state.values())
    _assert_same(a, opt_a, b, opt_b)


def test_engine_calls_per_class(monkeypatch):
    """A steady step takes no single-matrix K1 or K3; per class three grouped projections
    (the power iteration's two and line 2's) and two grouped back-projections (the error
    feedback and line 9)."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    _, opt = _run(True, "triton", torch.float32, 1)       # the first step: per matrix
    calls = count_calls(monkeypatch)
    model_params = [p for g in opt.param_groups for p in g["params"]]
    for p in model_params:
        p.grad = torch.randn_like(p) * 1e-2
    opt.step()
    n = len(opt._engine_plan.classes)
    assert n >= 2 and not opt._engine_plan.legacy
    assert calls.get("project", 0) == calls.get("backproject_update", 0) == 0
    assert calls["grouped_project"] == 3 * n and calls["grouped_backproject_update"] == 2 * n


def test_state_is_per_matrix_views_and_checkpoints():
    """The class's stacked state is still one tensor per matrix in the state and in a
    checkpoint; a resumed run continues bit-identically on the engine."""
    a, _ = _run(True, "reference", torch.float32, 5)
    # resume: 3 steps, a checkpoint, 2 more on a fresh optimizer of the same weights
    model, batch = tiny_lm_task(0)
    opt_r = make_optimizer(model, "ldadam", rank=8, lr=1e-2, weight_decay=0.01,
                           backend="reference")
    for _ in range(3):
        lm_loss(model, batch).backward()
        opt_r.step()
        opt_r.zero_grad()
    sd = opt_r.state_dict()
    for st in sd["state"].values():
        if "basis" in st:               # one tensor per matrix, not the class's buffer
            assert st["basis"].dim() == 2 and st["exp_avg"].dim() == 2
    opt_r2 = make_optimizer(model, "ldadam", rank=8, lr=1e-2, weight_decay=0.01,
                            backend="reference")
    opt_r2.load_state_dict(sd)
    for _ in range(2):
        lm_loss(model, batch).backward()
        opt_r2.step()
        opt_r2.zero_grad()
    for x, y in zip(a, model.parameters()):
        assert torch.equal(x, y)
    for st in opt_r2.state.values():
        if "basis" in st:
            assert st["basis"].dim() == 2 and st["exp_avg"].dim() == 2


def test_nonfinite_power_iteration_keeps_basis_and_warns_once_per_step():
    """An overflowing power iteration keeps that matrix's previous basis (chosen on the
    device), and the step's one read of the flags names it."""
    _, opt = _run(True, "reference", torch.float32, 2)
    plan = opt._engine_plan
    cls = next(iter(plan.classes.values()))
    m = cls.members[0]
    before = m.state["basis"].clone()
    other = cls.members[-1].state["basis"].clone() if len(cls.members) > 1 else None
    m.state["exp_avg"].fill_(3e38)      # b = rho*P M + A overflows in Y
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p) * 1e-2
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.step()
    hits = [x for x in w if issubclass(x.category, RefreshFallbackWarning)]
    assert len(hits) == 1 and opt.param_label(m.p) in str(hits[0].message)
    assert torch.equal(m.state["basis"], before)
    if other is not None:
        assert not torch.equal(cls.members[-1].state["basis"], other)


def test_removed_grouped_gemms_flag_is_refused():
    with pytest.raises(TypeError, match="grouped_gemms"):
        LDAdamW([torch.nn.Parameter(torch.randn(4, 4))], grouped_gemms=True)


def test_lagged_guards_warn_at_the_next_call():
    """With the flags left on the device (``lagged_nonfinite``, CUDA's default), the step does
    not read the power-iteration guards: the warning comes at the next ``step()`` (or
    ``nonfinite_check()`` / ``state_dict()``), naming the matrix."""
    _, opt = _run(True, "reference", torch.float32, 2)
    opt.lagged_nonfinite = True
    cls = next(iter(opt._engine_plan.classes.values()))
    m = cls.members[0]
    m.state["exp_avg"].fill_(3e38)
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p) * 1e-2
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.step()
    assert not [x for x in w if issubclass(x.category, RefreshFallbackWarning)]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.nonfinite_check()
        opt.nonfinite_check()                 # read once
    hits = [x for x in w if issubclass(x.category, RefreshFallbackWarning)]
    assert len(hits) == 1 and opt.param_label(m.p) in str(hits[0].message)


# -- CUDA-graph capture of the class step (docs/engine.md), on the CPU ------------------------

def _capture_steady(backend="auto", **kw):
    """The step-engine tests' tiny LLaMA past LDAdam's first (SVD) step, gradients in fixed
    tensors."""
    from _methods import backward, model, optimizer

    net = model()
    opt = optimizer(net, "ldadam", backend=backend, **kw)
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return net, opt


@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no-ef"])
def test_classes_are_capturable_on_the_triton_kernels(ef):
    """On the Triton backend (auto, here the interpreter) every class reads its per-step
    scalars from tables (its scaled elementwise steps bound, K2 on the multi-tensor op with
    its table): capturable; on the reference backend (torch ops with the scalars by value) no
    class is. ``sign_canon``, which the capture unit takes by value, is in the capture key."""
    from lowrank_fused import _ext

    if _ext.why_no_cpu() is not None or not available("triton", "cpu"):
        pytest.skip("needs the compiled CPU twin and Triton")
    _, opt = _capture_steady(error_feedback=ef)
    classes = list(opt._engine_plan.classes.values())
    assert classes and all(opt._class_capturable(c) for c in classes)
    assert all(c.extra["calls"]["scaled"].has_ef == ef for c in classes)
    before = opt._captured_values()
    opt.sign_canon = not opt.sign_canon
    assert opt._captured_values() != before
    _, opt = _capture_steady(backend="reference", error_feedback=ef)
    classes = list(opt._engine_plan.classes.values())
    assert classes and not any(opt._class_capturable(c) for c in classes)
    assert all(c.extra["calls"]["scaled"] is None for c in classes)


@pytest.mark.parametrize("ef", [True, False], ids=["ef", "no-ef"])
def test_replayed_steps_take_changed_hyperparameters_from_the_tables(ef, monkeypatch):
    """test_step_engine's replay test (one eager steady step's launches on a tape, replayed
    after the host half of each later step, a NaN gradient on one step) with lr (a schedule),
    weight decay, rho, betas and eps changed between the replays: each reaches the replayed
    launches through a table (the step count's bias corrections too), equal to the eager run
    bit for bit."""
    from lowrank_fused import _ext

    if _ext.why_no_cpu() is not None or not available("triton", "cpu"):
        pytest.skip("needs the compiled CPU twin and Triton")
    from test_step_engine import LaunchTape, replay_run

    tape = LaunchTape(monkeypatch)
    runs = [_capture_steady(nonfinite="skip", error_feedback=ef) for _ in range(2)]

    def change(o, t):
        for i, g in enumerate(o.param_groups):
            g["lr"] = 1e-3 * (1.0 + 0.1 * t + 0.01 * i)
            if t == 5:
                g["weight_decay"] = 0.05
            if t == 6 and g["enable_lowrank"]:
                g["rho"] = 0.8
            if t == 7:
                g["betas"] = (0.85, 0.95)
                g["eps"] = 1e-6

    modes = replay_run(tape, runs[0], runs[1], range(3, 10), poison_at=8, change=change)
    assert modes == ["capture"] + ["replay"] * 6, modes
    assert runs[0][1].completed_steps == runs[1][1].completed_steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_engine_equals_per_matrix_on_triton_without_error_feedback(dtype):
    """The Triton path's scaled steps without the error feedback's operand (``L``)."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    a, opt_a = _run(False, "triton", dtype, 3, error_feedback=False)
    b, opt_b = _run(True, "triton", dtype, 3, error_feedback=False)
    assert not any("error" in st for st in opt_b.state.values())
    _assert_same(a, opt_a, b, opt_b)


def test_triton_path_with_bf16_moments_equals_per_matrix():
    """Moments in bf16 on the batched path (a ``faithful_dtypes`` run's state, then the
    setting off): the scaled steps read and write the bf16 moments (rounding as the torch
    ops do); the engine equals the per-matrix step bit for bit."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")

    def setting_off(opt, step):
        if step == 2:
            opt.faithful_dtypes = False          # the bf16 state stays: the batched path

    a, opt_a = _run(False, "triton", torch.bfloat16, 4, setting_off, faithful_dtypes=True)
    b, opt_b = _run(True, "triton", torch.bfloat16, 4, setting_off, faithful_dtypes=True)
    classes = list(opt_b._engine_plan.classes.values())
    assert classes and all(c.extra["st"]["M"].dtype == torch.bfloat16 for c in classes)
    assert all(c.extra["calls"]["scaled"] is not None for c in classes)
    _assert_same(a, opt_a, b, opt_b)
