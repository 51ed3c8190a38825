"""The AdaptiveAdamW family on the step engine (docs/engine.md): K1 and K3 of every class of
same-shape, same-rank matrices run as one grouped launch each, K2 as one multi-tensor call
(with every ``||N||^2`` for the limiter) where the backend has one, the limiter once per
class (fused limiter) or per matrix, K-FAC's whitening per matrix. The trajectory equals
the per-matrix step (``opt.engine = False``) bit for bit on the CPU (same tiles), across
refreshes and AdaptiveAdamW's rank changes, both projection sides, fp32 and bf16, on the Triton
(interpreter), reference and auto backends. (AdaMeM: below; AdaRankGrad,
LDAdam: test_optim_adarankgrad_engine.py, test_optim_ldadam_engine.py.)"""
import pytest
import torch

from lowrank_fused.dispatch import available
from lowrank_fused.optim.adaptive_adamw import (AdaptiveAdamW, GaLoreKFACAdamW, GHAAdamW,
                                                RSAdamW)
from lowrank_fused.routing import galore_param_groups
from _cases import count_calls, lm_loss, tiny_lm_task

CLASSES = {"adaptive_adamw": AdaptiveAdamW, "rsadamw": RSAdamW, "gha": GHAAdamW,
           "galore_kfac": GaLoreKFACAdamW}


def _run(cls, engine, backend, dtype, steps=5, **kw):
    model, batch = tiny_lm_task(0)
    model.to(dtype)
    groups = galore_param_groups(model, rank=8, update_proj_gap=2, scale=0.25)
    opt = cls(groups, lr=1e-2, weight_decay=0.01, backend=backend, **kw)
    opt.engine = engine
    ranks = []
    for _ in range(steps):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        ranks.append(tuple(r for g in opt.ranks() for r in g))
    return [p.detach().clone() for p in model.parameters()], opt, ranks


def _assert_same(a, opt_a, b, opt_b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    sides = set()
    for p, q in zip(opt_a.state, opt_b.state):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, v in opt_a.state[p].items():
            if torch.is_tensor(v):
                assert torch.equal(v, opt_b.state[q][key]), key
            else:
                assert v == opt_b.state[q][key], key
    for g in opt_a.param_groups:
        for p in g["params"]:
            plan = opt_a._plan(p, g)
            if plan is not None:
                sides.add(plan[0])
    assert sides == {"left", "right"}, sides          # both projection sides are exercised


# the interpreter is slow: on Triton the classes whose steps differ most (rank changes and the
# limiter; K-FAC's whitening instead of K2), every class on the reference
CASES = [("triton", "adaptive_adamw", torch.float32), ("triton", "adaptive_adamw", torch.bfloat16),
         ("triton", "galore_kfac", torch.float32)]
CASES += [("reference", name, dtype) for name in CLASSES
          for dtype in (torch.float32, torch.bfloat16)]
# auto on the CPU: the compiled multi-tensor K2 (norms as its side output) against the
# per-matrix K2's sumsq
CASES += [("auto", "adaptive_adamw", torch.float32), ("auto", "rsadamw", torch.bfloat16)]


@pytest.mark.parametrize("backend,name,dtype", CASES, ids=str)
def test_engine_equals_per_matrix(backend, name, dtype):
    if backend != "auto" and not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    steps = 3 if backend == "triton" else 5    # refreshes at steps 1 and 3
    a, opt_a, ranks = _run(CLASSES[name], False, backend, dtype, steps)
    b, opt_b, ranks_b = _run(CLASSES[name], True, backend, dtype, steps)
    assert opt_a._engine_plan.legacy and not opt_b._engine_plan.legacy   # engine vs not
    assert opt_b._engine_plan.classes
    assert ranks == ranks_b
    if name == "adaptive_adamw":
        assert len(set(ranks)) > 1 and len(set(ranks[-1])) > 1   # rank changes, mixed ranks
    _assert_same(a, opt_a, b, opt_b)


def test_engine_with_capacity_buffers():
    """Capacity-buffer views are ordinary contiguous members of a class."""
    b, opt_b, ranks = _run(AdaptiveAdamW, True, "reference", torch.float32,
                           capacity_buffers=True, max_rank=12)
    c, opt_c, ranks_c = _run(AdaptiveAdamW, False, "reference", torch.float32, max_rank=12)
    assert ranks == ranks_c and max(max(r) for r in ranks) <= 12
    _assert_same(c, opt_c, b, opt_b)


@pytest.mark.parametrize("shape", [(30, 44), (44, 30)], ids=["left", "right"])
def test_engine_refresh_without_rank_change(shape):
    """One matrix (budget = rank: its rank cannot change): AdaptiveAdamW's refresh still
    replaces the moments (transport), which the engine's classes must pick up."""
    def run(engine):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape))
        opt = AdaptiveAdamW([dict(params=[p], rank=5, update_proj_gap=2)], lr=1e-2,
                            backend="reference")
        opt.engine = engine
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            p.grad = torch.randn(shape, generator=gen)
            opt.step()
        return [p.detach().clone()], opt, None

    a, opt_a, _ = run(False)
    b, opt_b, _ = run(True)
    assert opt_b._engine_plan.classes and opt_b.state[opt_b.param_groups[0]["params"][0]][
        "rank"] == 5
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for p, q in zip(opt_a.state, opt_b.state):
        for key, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][key]) if torch.is_tensor(v) else \
                v == opt_b.state[q][key], key


def test_engine_limiter_per_class(monkeypatch):
    """Between refreshes, with the fused limiter (Triton) and K2's norms, the limiter runs
    once per class on the stacked N (no per-matrix limiter call); its bits are the per-matrix
    kernel's (test_engine_equals_per_matrix)."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    from lowrank_fused import dispatch

    dispatch.lookup("norm_growth_limit", "triton")
    calls = {}
    real = dispatch.implementation

    def counted(op, backend, device):
        impl = real(op, backend, device)
        if op != "norm_growth_limit":
            return impl

        def run(*a, **k):
            calls[k["first"]] = calls.get(k["first"], 0) + 1
            return impl(*a, **k)
        return run
    import lowrank_fused.optim.adaptive_adamw as mod
    monkeypatch.setattr(mod, "implementation", counted)
    _, opt, _ = _run(AdaptiveAdamW, True, "auto", torch.float32, steps=2)
    assert calls == {True: sum(len(c.members) for c in opt._engine_plan.classes.values())}
    assert all("Nstack" in c.extra for c in opt._engine_plan.classes.values())


def test_engine_faithful_dtypes():
    """bf16 parameters with ``faithful_dtypes``: bf16 moments and N (the class limiter rounds
    its fp32 result to bf16 once, as the kernel does)."""
    a, opt_a, _ = _run(AdaptiveAdamW, False, "auto", torch.bfloat16, 4, faithful_dtypes=True)
    b, opt_b, _ = _run(AdaptiveAdamW, True, "auto", torch.bfloat16, 4, faithful_dtypes=True)
    assert all(c.Ns[0].dtype == torch.bfloat16 and "Nstack" in c.extra
               for c in opt_b._engine_plan.classes.values())
    _assert_same(a, opt_a, b, opt_b)


def test_engine_without_limiter():
    """``nl_gamma=None``: no norm side output, no limiter memory; still the per-matrix step."""
    a, opt_a, _ = _run(RSAdamW, False, "reference", torch.float32, 3, nl_gamma=None)
    b, opt_b, _ = _run(RSAdamW, True, "reference", torch.float32, 3, nl_gamma=None)
    assert not any("nl_prev" in st for st in opt_b.state.values())
    _assert_same(a, opt_a, b, opt_b)


def test_engine_launches_once_per_class(monkeypatch):
    """Between refreshes each class of same-shape, same-rank matrices takes one grouped K1 and
    one grouped K3 call, and no single-matrix K1/K3 (AdaptiveAdamW: ranks differ per matrix,
    so there are more classes than shapes); with the reference backend K2 is one
    multi-tensor call per class, not one per matrix."""
    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    calls = count_calls(monkeypatch)
    _, opt, _ = _run(AdaptiveAdamW, True, "triton", torch.float32, steps=1)
    classes = {(tuple(p.shape), opt._plan(p, g)[0], opt.state[p]["rank"])
               for g in opt.param_groups for p in g["params"] if opt._plan(p, g) is not None}
    shapes = {c[:2] for c in classes}
    assert len(classes) > len(shapes)
    assert calls.get("project", 0) == 0 and calls.get("backproject_update", 0) == 0
    assert calls["grouped_project"] == calls["grouped_backproject_update"] == len(classes)
    assert len(opt._engine_plan.classes) == len(classes)
    calls = count_calls(monkeypatch, ("adam_moments", "adam_moments_multi"),
                        backend="reference")
    _run(AdaptiveAdamW, True, "reference", torch.float32, steps=2)   # no refresh at step 2
    assert calls.get("adam_moments", 0) == 0 and calls["adam_moments_multi"] > 0


@pytest.mark.parametrize("name", list(CLASSES))
def test_removed_grouped_gemms_flag_is_refused(name):
    """The engine is the only path: the old opt-in keyword is an error, not ignored."""
    with pytest.raises(TypeError, match="grouped_gemms"):
        CLASSES[name]([torch.nn.Parameter(torch.randn(4, 4))], grouped_gemms=True)


# AdaRankGrad on the engine: tests/test_optim_adarankgrad_engine.py


# LDAdamW on the engine: tests/test_optim_ldadam_engine.py


ADAMEM_OPS = ("project", "grouped_project", "residual_backproject_update",
              "grouped_residual_backproject_update")


def _run_adamem(engine, backend, dtype, steps, **kw):
    """``steps`` tiny-LM steps of AdaMeM built by ``make_optimizer`` (rank 8), on the engine
    or (``engine=False``) the per-matrix step."""
    from lowrank_fused.routing import make_optimizer

    model, batch = tiny_lm_task(0)
    model.to(dtype)
    opt = make_optimizer(model, "adamem", rank=8, lr=1e-2, weight_decay=0.01, backend=backend,
                         **kw)
    opt.engine = engine
    for _ in range(steps):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32),
                                           ("reference", torch.float32),
                                           ("reference", torch.bfloat16)], ids=str)
def test_adamem_engine_equals_per_matrix(backend, dtype, monkeypatch):
    """AdaMeM on the engine: the grouped K1 carries every ``colsum(G^2)`` (the residual's
    statistics) and the grouped K3 the residual term; weights, bases, moments and statistics
    equal the per-matrix step (``opt.engine = False``) bit for bit over steps crossing a
    refresh (t = 1 and 3), for wide and tall (transposed) matrices; each class takes one
    grouped K1 and K3 per step and no single one (the refresh is an SVD, no K1)."""
    if not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    steps = 3
    a, opt_a = _run_adamem(False, backend, dtype, steps, update_proj_gap=2)
    calls = count_calls(monkeypatch, ADAMEM_OPS, backend=backend)
    b, opt_b = _run_adamem(True, backend, dtype, steps, update_proj_gap=2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for p, q in zip(opt_a.state, opt_b.state):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][key]) if torch.is_tensor(v) else \
                v == opt_b.state[q][key], key
    plans = [opt_b._plan(p, g) for g in opt_b.param_groups for p in g["params"]]
    classes = {(shape, transposed) for _, shape, transposed in filter(None, plans)}
    assert {t for _, t in classes} == {False, True}     # wide and tall matrices
    assert len(opt_b._engine_plan.classes) == len(classes)
    assert calls.get("project", 0) == calls.get("residual_backproject_update", 0) == 0
    assert (calls["grouped_project"] == calls["grouped_residual_backproject_update"]
            == steps * len(classes))


def test_adamem_explicit_form_keeps_the_per_matrix_step(monkeypatch):
    """``residual_form="explicit"`` keeps the per-matrix step; ``grouped_gemms`` is gone."""
    from lowrank_fused.optim.adamem import AdaMeM

    with pytest.raises(TypeError, match="grouped_gemms"):
        AdaMeM([torch.nn.Parameter(torch.randn(4, 4))], grouped_gemms=True)
    calls = count_calls(monkeypatch, ADAMEM_OPS, backend="reference")
    _run_adamem(True, "reference", torch.float32, 1, residual_form="explicit")
    assert calls.get("grouped_project", 0) == 0 and calls["project"] > 0
