"""The AdaptiveAdamW family's steady step on the engine (docs/methods/adaptive_adamw.md): GHA's
basis update and transport per class (``_GHABatch``), K-FAC's whitening and the limiter per
class, and the non-finite flag left on the device (``DEVICE_SKIP``). Each engine step equals
the per-matrix step (``opt.engine = False``) bit for bit on the CPU, both projection sides,
fp32 and bf16; a NaN gradient with the lagged flag writes nothing, reads nothing on the host,
and is acted on at the next step. (The reference-backend parity of every method and the
Triton cases of AdaptiveAdamW: test_optim_subspace_grouped.py.)"""
import pytest
import torch

from lowrank_fused.dispatch import available
from lowrank_fused.optim.adaptive_adamw import (AdaptiveAdamW, GaLoreKFACAdamW, GHAAdamW,
                                                RSAdamW)
from lowrank_fused.routing import galore_param_groups
from lowrank_fused.testing.trace import HostReads
from _cases import count_calls, count_kernel_runs, lm_loss, tiny_lm_task

CLASSES = {"adaptive_adamw": AdaptiveAdamW, "rsadamw": RSAdamW, "gha": GHAAdamW,
           "galore_kfac": GaLoreKFACAdamW}


def _model(dtype):
    model, batch = tiny_lm_task(0)
    model.to(dtype)
    return model, batch


def _opt(name, model, backend, gap=2, **kw):
    groups = galore_param_groups(model, rank=8, update_proj_gap=gap, scale=0.25)
    return CLASSES[name](groups, lr=1e-2, weight_decay=0.01, backend=backend, **kw)


def _run(name, engine, backend, dtype, steps, **kw):
    model, batch = _model(dtype)
    opt = _opt(name, model, backend, **kw)
    opt.engine = engine
    for _ in range(steps):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


def _states(opt):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"] if p in opt.state]


def _assert_same(a, opt_a, b, opt_b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for sa, sb in zip(_states(opt_a), _states(opt_b)):
        assert sa.keys() == sb.keys()
        for key, v in sa.items():
            assert torch.equal(v, sb[key]) if torch.is_tensor(v) else v == sb[key], key
    sides = {opt_a._plan(p, g)[0] for g in opt_a.param_groups for p in g["params"]
             if opt_a._plan(p, g) is not None}
    assert sides == {"left", "right"}


# the Triton interpreter is slow: GHA (the grouped update) and K-FAC in fp32 and bf16; the
# reference backend for GHA in both dtypes is in test_optim_subspace_grouped.py
@pytest.mark.parametrize("name,dtype", [("gha", torch.float32), ("gha", torch.bfloat16),
                                        ("galore_kfac", torch.bfloat16)], ids=str)
def test_engine_equals_per_matrix_triton(name, dtype):
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    a, opt_a = _run(name, False, "triton", dtype, 3)
    b, opt_b = _run(name, True, "triton", dtype, 3)
    assert opt_a._engine_plan.legacy and not opt_b._engine_plan.legacy
    _assert_same(a, opt_a, b, opt_b)


def test_gha_update_runs_once_per_class(monkeypatch):
    """A steady GHA step: two grouped K1 for the update and one for the step per class, no
    single-matrix projection or transport."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    model, batch = _model(torch.float32)
    opt = _opt("gha", model, "triton")
    calls = count_calls(monkeypatch, ("project", "grouped_project", "gha_update",
                                      "moment_transport"))
    lm_loss(model, batch).backward()
    opt.step()                                    # the first bases (SVD)
    calls.clear()
    opt.step()
    classes = len(opt._engine_plan.classes)
    assert calls.get("project", 0) == 0 and calls.get("gha_update", 0) == 0
    assert calls.get("moment_transport", 0) == 0
    assert calls["grouped_project"] == 3 * classes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gha_class_state_lives_in_blocks(dtype):
    """The engine keeps each GHA class's bases and moments as one block per key (the
    members' state tensors are consecutive views of it), so the class's update reads and
    writes the blocks whole instead of gathering and scattering every member; the values
    are the per-matrix step's (test_engine_equals_per_matrix_*), and a block survives a
    re-plan without being copied again."""
    from lowrank_fused.ops_grouped import stacked_view
    model, batch = _model(dtype)
    opt = _opt("gha", model, "reference")
    for _ in range(3):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    classes = list(opt._engine_plan.classes.values())
    assert classes and any(len(c.members) > 1 for c in classes)
    blocks = {}
    for cls in classes:
        assert cls.extra["gha"].stacks is not None
        for key in ("basis", "exp_avg", "exp_avg_sq"):
            block = stacked_view([m.state[key] for m in cls.members])
            assert block is not None, key
            blocks[(id(cls.members[0].state), key)] = block.data_ptr()
        assert all(P is m.state["basis"] for P, m in zip(cls.Ps, cls.members))
    opt._classes_stale = True                     # a re-plan keeps the blocks where they are
    lm_loss(model, batch).backward()
    opt.step()
    for cls in opt._engine_plan.classes.values():
        for key in ("basis", "exp_avg", "exp_avg_sq"):
            ptr = stacked_view([m.state[key] for m in cls.members]).data_ptr()
            assert blocks[(id(cls.members[0].state), key)] == ptr


def _counter(counts):
    """``counting(kernel)``: a stand-in for ``kernel`` whose launches (``kernel[grid](...)``)
    run it and count into ``counts`` by the kernel's name."""
    def counting(kernel):
        class Counted:
            def __getitem__(self, grid):
                counts[kernel.fn.__name__] = counts.get(kernel.fn.__name__, 0) + 1
                return kernel[grid]
        return Counted()
    return counting


def _poisoned(model):
    p = next(p for p in model.parameters() if p.dim() == 2 and p.grad is not None)
    p.grad[0, 0] = float("nan")


# the reference backend for every method; "auto" (the fused limiter on the class's stacked
# N, K-FAC's grouped whitening and norms) for the class paths the reference does not take
NAN_CASES = [(name, mode, "reference") for name in CLASSES for mode in ("raise", "skip")]
NAN_CASES += [("rsadamw", "skip", "auto"), ("galore_kfac", "skip", "auto")]


@pytest.mark.parametrize("name,mode,backend", NAN_CASES, ids=str)
def test_nan_gradient_with_the_lagged_flag(name, mode, backend):
    """A steady step with a NaN gradient, the flag left on the device: weights and every
    state tensor keep their bits, no host read; ``raise``/``skip`` act at the next step."""
    if backend != "reference" and not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    model, batch = _model(torch.float32)
    opt = _opt(name, model, backend, gap=100, nonfinite=mode)
    opt.lagged_nonfinite = True
    for _ in range(2):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    lm_loss(model, batch).backward()
    _poisoned(model)
    weights = [p.detach().clone() for p in model.parameters()]
    before = _states(opt)
    groups = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, reads.count
    if backend == "auto":                     # the class paths ran (the grouped limiter)
        assert all("Nstack" in c.extra and "limit_call" in c.extra
                   for c in opt._engine_plan.classes.values())
    for w, p in zip(weights, model.parameters()):
        assert torch.equal(w, p)
    after = _states(opt)
    for sa, sb in zip(before, after):
        for key, v in sa.items():
            if torch.is_tensor(v):
                assert torch.equal(v, sb[key]), key
    opt.zero_grad()
    lm_loss(model, batch).backward()
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    else:
        opt.step()                           # the NaN step's counters back, then a step
        assert opt.skipped_steps == 1
    # the counters are as if the bad step had not happened
    for g, saved in zip(opt.param_groups, groups):
        if "pool_step" in saved:
            assert g["pool_step"] == saved["pool_step"] + (mode == "skip")


@pytest.mark.parametrize("name", list(CLASSES))
def test_steady_step_reads_nothing(name):
    """Between refreshes (and K-FAC root recomputes) the lagged flag costs no host read."""
    model, batch = _model(torch.float32)
    opt = _opt(name, model, "reference", gap=100,
               **({"kfac_update_freq": 100} if name == "galore_kfac" else {}))
    opt.lagged_nonfinite = True
    for _ in range(2):
        lm_loss(model, batch).backward()
        opt.step()
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, reads.count


def test_kfac_whitening_and_limiter_run_once_per_class(monkeypatch):
    """A steady K-FAC step (no root recompute): the whitening and the limiter's norms run
    as grouped launches per class, never the single-matrix kernels."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    import importlib

    kp = importlib.import_module("lowrank_fused.kernels.kfac_precondition")
    nl = importlib.import_module("lowrank_fused.kernels.norm_growth_limit")

    model, batch = _model(torch.float32)
    opt = _opt("galore_kfac", model, "triton", gap=100)
    for _ in range(2):                       # the first bases and roots, the limiter memory
        lm_loss(model, batch).backward()
        opt.step()

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("a single-matrix kernel ran")
    counts = {}
    counting = _counter(counts)
    for name in ("_kfac_momentum_whiten_kernel", ):
        monkeypatch.setattr(kp, name, Refuse())
    for name in ("_sumsq_partials_kernel", "_limiter_factor_kernel", "_limiter_scale_kernel"):
        monkeypatch.setattr(nl, name, Refuse())
    monkeypatch.setattr(kp, "_grouped_kfac_momentum_whiten_kernel",
                        counting(kp._grouped_kfac_momentum_whiten_kernel))
    monkeypatch.setattr(nl, "_grouped_sumsq_kernel", counting(nl._grouped_sumsq_kernel))
    opt.step()
    classes = len(opt._engine_plan.classes)
    assert counts == {"_grouped_kfac_momentum_whiten_kernel": classes,
                      "_grouped_sumsq_kernel": classes}


# -- GHA's elementwise steps as Triton launches (kernels/gha_batch.py) ----------------------
NAN_CASES_GHA_TRITON = [("gha", "skip", "auto"), ("gha", "raise", "auto")]


@pytest.mark.parametrize("name,mode,backend", NAN_CASES_GHA_TRITON, ids=str)
def test_nan_gradient_with_the_lagged_flag_gha_kernels(name, mode, backend):
    """The lagged-flag NaN step with GHA's update on its Triton kernels (the skip flag read
    on the device by the basis and moments write-back)."""
    test_nan_gradient_with_the_lagged_flag(name, mode, backend)


@pytest.mark.parametrize("dtype,faithful", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=str)
def test_gha_kernels_match_the_torch_ops(dtype, faithful, monkeypatch):
    """On the Triton backend the engine's GHA update is ``kernels/gha_batch.py``'s launches
    per class; the per-matrix step (which runs the same kernels on a batch of one) equals it
    bit for bit, and three steps agree with the same steps on the torch ops (the reference
    backend's path: torch's GEMMs and Householder QR, the same K1) to the update's rounding:
    fp32 state, and bf16 bases and moments (``faithful_dtypes``)."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    from lowrank_fused.optim.adaptive_adamw import _GHABatch

    a, opt_a = _run("gha", True, "triton", dtype, 3, faithful_dtypes=faithful)
    classes = list(opt_a._engine_plan.classes.values())
    assert classes and all(c.extra["gha"].kernels is not None for c in classes)
    if faithful:
        assert any(m.state["basis"].dtype == torch.bfloat16 for c in classes
                   for m in c.members)
    c, opt_c = _run("gha", False, "triton", dtype, 3, faithful_dtypes=faithful)
    _assert_same(a, opt_a, c, opt_c)
    monkeypatch.setattr(_GHABatch, "_bind_kernels", lambda self, backend, dev: None)
    b, opt_b = _run("gha", True, "triton", dtype, 3, faithful_dtypes=faithful)
    assert all(c.extra["gha"].kernels is None for c in opt_b._engine_plan.classes.values())
    # fp32: a few ulps of the update per step; bf16 state: an ulp of a stored value
    tol = 1e-4 if dtype == torch.float32 and not faithful else 2e-2
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)
    for sa, sb in zip(_states(opt_a), _states(opt_b)):
        assert sa.keys() == sb.keys()
        for key, v in sa.items():
            if torch.is_tensor(v) and v.is_floating_point():
                scale = max(1.0, float(sb[key].float().abs().max()))
                torch.testing.assert_close(v.float(), sb[key].float(), rtol=tol,
                                           atol=tol * scale, msg=key)
            else:
                assert torch.equal(v, sb[key]) if torch.is_tensor(v) else v == sb[key], key


def test_gha_kernels_launch_a_fixed_count_per_class(monkeypatch):
    """A steady GHA step on Triton: per class (one launch over the class's stacked buffers,
    whatever its size) each of the four elementwise kernels once, the GEMMs of the update
    (H, P T, two Grams, two Q; C with C*C; C M and C*C V in one launch) and the two
    factorizations."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    model, batch = _model(torch.float32)
    opt = _opt("gha", model, "triton")
    for _ in range(2):
        lm_loss(model, batch).backward()
        opt.step()
    # counted where every launch runs (the bound kernels are planned launches that hold
    # the kernel objects, so a stand-in for the module's names would not see them)
    per_class = {"_gha_scale_kernel": 1, "_gha_step_kernel": 1, "_gha_basis_kernel": 1,
                 "_gha_moments_kernel": 1, "_batched_matmul_kernel": 6,
                 "_batched_matmul_square_kernel": 1, "_batched_matmul_pair_kernel": 1,
                 "_small_cholesky_inverse_kernel": 2}
    counts = count_kernel_runs(monkeypatch)
    opt.step()
    classes = opt._engine_plan.classes.values()
    assert any(len(c.members) > 1 for c in classes)
    assert {name: counts[name] for name in per_class} == {
        name: k * len(classes) for name, k in per_class.items()}
