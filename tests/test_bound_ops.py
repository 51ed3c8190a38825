"""Bound calls (what the step engine calls every step): a grouped or multi-tensor op bound to
fixed lists is checked and resolved once, then called with the step's values. Each equals the
unbound op bit for bit on every backend here (reference, Triton under the interpreter, the
compiled CPU twin), on fresh gradients per call (new tensors, as ``zero_grad(set_to_none=True)``
gives), both projection sides, fp32 and bf16; a call whose gradients do not match the bound
layout raises naming them; ``skip`` keeps every written tensor."""
import pytest
import torch

from lowrank_fused import ops_grouped, ops_multi
from lowrank_fused.dispatch import AutoBackend, available

pytestmark = pytest.mark.usefixtures("one_thread")

MULTI_BACKENDS = [b for b in ("reference", "cpu") if available(b, "cpu")] + ["auto"]   # no Triton multi op
GEMM_BACKENDS = [b for b in ("reference", "triton") if available(b, "cpu")] + ["auto"]


def _backend(name):
    return AutoBackend("cpu") if name == "auto" else name


def _group(count, m, n, r, side, dtype, gen):
    P = [torch.linalg.qr(torch.randn(m, r, generator=gen))[0] if side == "left"
         else torch.linalg.qr(torch.randn(n, r, generator=gen))[0].t().contiguous()
         for _ in range(count)]
    W = [torch.randn(m, n, generator=gen).to(dtype) for _ in range(count)]
    low = (r, n) if side == "left" else (m, r)
    return W, P, low


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bound_grouped_k1_k3_equal_the_ops(backend, side, dtype):
    gen = torch.Generator().manual_seed(7)
    m, n, r, count = (13, 21, 4, 3) if side == "left" else (21, 13, 4, 3)
    W, P, low = _group(count, m, n, r, side, dtype, gen)
    Rs = [torch.full(low, float("nan")) for _ in range(count)]
    Ns = [torch.randn(low, generator=gen) for _ in range(count)]
    W_ref = [w.clone() for w in W]
    be = _backend(backend)
    k1 = k3 = None
    for step in range(2):                  # fresh gradients every call
        Gs = [torch.randn(m, n, generator=gen).to(dtype) for _ in range(count)]
        if k1 is None:
            k1 = ops_grouped.BoundGroupedProject(Gs, P, Rs, side=side, backend=be)
            k3 = ops_grouped.BoundGroupedBackprojectUpdate(W, P, Ns, side=side, backend=be)
        k1(Gs, precision="ieee")
        want = ops_grouped.grouped_project(Gs, P, side=side, backend=be)
        for a, b in zip(Rs, want):
            assert torch.equal(a, b)
        coef = [0.1 * (i + 1) + step for i in range(count)]
        k3(coef=coef, post_decay=[0.01] * count, precision="ieee")
        ops_grouped.grouped_backproject_update(W_ref, P, Ns, side=side, coef=coef,
                                               post_decay=[0.01] * count, backend=be)
        for a, b in zip(W, W_ref):
            assert torch.equal(a, b)
    before = [w.clone() for w in W]
    k3(coef=[1.0] * count, precision="ieee", skip=torch.ones((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(W, before))
    bad = [torch.randn(n, m, generator=gen).to(dtype) for _ in range(count)]
    with pytest.raises(ValueError, match="Gs"):
        k1(bad, precision="ieee")


@pytest.mark.skipif(not available("triton", "cpu"), reason="needs Triton (interpreter)")
@pytest.mark.parametrize("side", ["left", "right"])
def test_bound_grouped_triton_plans_once_while_gradients_stay(side, monkeypatch):
    """The Triton launch is planned once per (precision, side outputs, gradient addresses):
    gradients refilled in place reuse the plan, gradients at new addresses re-plan; every call
    equals the unbound op, side outputs included."""
    import importlib

    k1mod = importlib.import_module("lowrank_fused.kernels.grouped_project")
    k3mod = importlib.import_module("lowrank_fused.kernels.grouped_backproject_update")

    plans = {"k1": 0, "k3": 0}
    for mod, name, tag in ((k1mod, "plan_grouped_project", "k1"),
                           (k3mod, "plan_grouped_backproject_update", "k3")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _tag=tag, **kw):
            plans[_tag] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(mod, name, counted)
    gen = torch.Generator().manual_seed(21)
    m, n, r, count = (13, 21, 4, 3) if side == "left" else (21, 13, 4, 3)
    W, P, low = _group(count, m, n, r, side, torch.float32, gen)
    Rs = [torch.full(low, float("nan")) for _ in range(count)]
    Ns = [torch.randn(low, generator=gen) for _ in range(count)]
    W_ref = [w.clone() for w in W]
    Gs = [torch.randn(m, n, generator=gen) for _ in range(count)]
    k1 = ops_grouped.BoundGroupedProject(Gs, P, Rs, side=side, backend="triton")
    k3 = ops_grouped.BoundGroupedBackprojectUpdate(W, P, Ns, side=side, backend="triton")
    rsq = torch.full((count,), float("nan"))
    length = n if side == "left" else m
    cs = torch.full((count, length), float("nan"))
    for step in range(4):
        if step == 2:                       # new tensors: new addresses
            Gs = [torch.randn(m, n, generator=gen) for _ in range(count)]
        else:
            for G in Gs:                    # refilled in place: the same addresses
                G.copy_(torch.randn(m, n, generator=gen))
        k1(Gs, precision="ieee", r_sumsq=rsq, sumsq=cs)
        want_rsq = torch.empty(count)
        want_cs = torch.empty(count, length)
        want = ops_grouped.grouped_project(Gs, P, side=side, backend="triton",
                                           r_sumsq=want_rsq, sumsq=want_cs)
        assert all(torch.equal(a, b) for a, b in zip(Rs, want))
        assert torch.equal(rsq, want_rsq) and torch.equal(cs, want_cs)
        coef = [0.1 * (i + 1) + step for i in range(count)]
        k3(coef=coef, post_decay=0.01, precision="ieee")
        ops_grouped.grouped_backproject_update(W_ref, P, Ns, side=side, coef=coef,
                                               post_decay=0.01, backend="triton")
        assert all(torch.equal(a, b) for a, b in zip(W, W_ref))
    # unbound calls plan every time (4 x K1, 4 x K3); the bound ones: K1 twice (the first
    # gradients, the new ones at step 2; step 3 reuses), K3 once
    assert plans == {"k1": 4 + 2, "k3": 4 + 1}


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bound_adamw_multi_equals_the_op(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (11,), (3, 2, 4)]
    Ws = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    Ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    Vs = [torch.rand(s, generator=gen) * 0.1 for s in shapes]
    ref = [[t.clone() for t in lst] for lst in (Ws, Ms, Vs)]
    be = _backend(backend)
    bound = None
    for t in (1, 2, 3):
        Gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        rows = [(1e-2 * (i + 1), 0.9, 0.999, 1e-8, 0.01, t) for i in range(len(shapes))]
        if bound is None:
            bound = ops_multi.BoundAdamWStepMulti(Ws, Gs, Ms, Vs, eps_mode="torch",
                                                  wd_mode="pre", backend=be)
        bound(Gs, rows)
        ops_multi.adamw_step_multi(*ref[:1], Gs, *ref[1:], lr=[r[0] for r in rows],
                                   beta1=0.9, beta2=0.999, eps=1e-8, step=t,
                                   weight_decay=0.01, eps_mode="torch", wd_mode="pre",
                                   backend=be)
        for got, want in zip(Ws + Ms + Vs, ref[0] + ref[1] + ref[2]):
            assert torch.equal(got, want)
    before = [x.clone() for x in Ws + Ms + Vs]
    bound(Gs, rows, skip=torch.ones((), dtype=torch.bool))
    assert all(torch.equal(a, b) for a, b in zip(Ws + Ms + Vs, before))
    with pytest.raises((TypeError, ValueError), match="Gs"):
        bound([g.double() for g in Gs], rows)


@pytest.mark.parametrize("backend", MULTI_BACKENDS)
def test_bound_adam_moments_multi_equals_the_op(backend):
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 9), (6, 4), (4, 9)]
    Rs = [torch.randn(s, generator=gen) for s in shapes]
    Ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    Vs = [torch.rand(s, generator=gen) * 0.1 for s in shapes]
    Ns = [torch.full(s, float("nan")) for s in shapes]
    ref = [[t.clone() for t in lst] for lst in (Ms, Vs, Ns)]
    be = _backend(backend)
    bound = ops_multi.BoundAdamMomentsMulti(Rs, Ms, Vs, Ns, eps_mode="hf", backend=be)
    for t in (1, 2):
        bound([(0.9, 0.999, 1e-6, t)] * 3)
        ops_multi.adam_moments_multi(Rs, *ref, beta1=0.9, beta2=0.999, eps=1e-6, step=t,
                                     eps_mode="hf", backend=be)
        for got, want in zip(Ms + Vs + Ns, ref[0] + ref[1] + ref[2]):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rows"):
        bound([(0.9, 0.999, 1e-6, 3)] * 2)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("scratch", [False, True], ids=["keep", "scratch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bound_grouped_residual_update_equals_the_op(backend, scratch, dtype):
    """AdaMeM's combined update bound to a group (left form; a transposed member list, as
    AdaMeM passes for tall matrices, in the bf16 case): equal to the unbound op bit for bit
    over fresh gradients per call; with ``scratch`` the R and N workspaces are consecutive
    slices of one buffer (the engine's), which the Triton launcher folds in place."""
    gen = torch.Generator().manual_seed(11)
    m, n, r, count = 9, 21, 3, 3
    P = [torch.linalg.qr(torch.randn(m, r, generator=gen))[0] for _ in range(count)]
    if dtype == torch.float32:
        W = [torch.randn(m, n, generator=gen) for _ in range(count)]
    else:                                   # transposed views (strides (1, m))
        W = [torch.randn(n, m, generator=gen).to(dtype).t() for _ in range(count)]
    buf = torch.empty(2 * count, r, n)
    Rs, Ns = list(buf[:count].unbind(0)), list(buf[count:].unbind(0))
    css = list(torch.empty(count, n).unbind(0))
    W_ref = [w.clone() for w in W]
    be = _backend(backend)
    bound = None
    for step in range(2):
        Gs = [torch.randn(m, n, generator=gen).to(dtype) for _ in range(count)]
        for R, N, cs in zip(Rs, Ns, css):
            R.copy_(torch.randn(r, n, generator=gen))
            N.copy_(torch.randn(r, n, generator=gen))
            cs.copy_(torch.rand(n, generator=gen) + 0.5)
        R_ref, N_ref = [R.clone() for R in Rs], [N.clone() for N in Ns]
        cs_ref = [c.clone() for c in css]
        if bound is None:
            bound = ops_grouped.BoundGroupedResidualBackprojectUpdate(
                W, Gs, P, Rs, Ns, css, backend=be, scratch=scratch)
            if scratch and backend == "triton":
                assert "stacked" in bound.kw
        coef = [0.1 * (i + 1) + step for i in range(count)]
        res = [0.05 * (i + 2) for i in range(count)]
        bound(Gs, coef=coef, res_coef=res, pre_scale=[0.99] * count, post_decay=0.0,
              precision="ieee")
        ops_grouped.grouped_residual_backproject_update(
            W_ref, Gs, P, R_ref, N_ref, cs_ref, coef=coef, res_coef=res,
            pre_scale=[0.99] * count, post_decay=0.0, backend=be)
        for a, b in zip(W, W_ref):
            assert torch.equal(a, b)
        assert not torch.equal(W[0], W[1])
        if not scratch:                     # the inputs are kept
            assert all(torch.equal(a, b) for a, b in zip(Rs + Ns, R_ref + N_ref))
    before = [w.clone() for w in W]          # skip: every W keeps its bits, bound or not
    flag = torch.ones((), dtype=torch.bool)
    bound(Gs, coef=coef, res_coef=res, precision="ieee", skip=flag)
    ops_grouped.grouped_residual_backproject_update(
        W, Gs, P, [r.clone() for r in Rs], [x.clone() for x in Ns], [c.clone() for c in css],
        coef=coef, res_coef=res, backend=be, skip=flag)
    assert all(torch.equal(a, b) for a, b in zip(W, before))
    with pytest.raises(TypeError, match="skip"):
        bound(Gs, coef=coef, res_coef=res, skip=torch.ones(1))
    bad = [torch.randn(n, m, generator=gen).to(dtype) for _ in range(count)]
    with pytest.raises(ValueError, match="Gs"):
        bound(bad, coef=coef, res_coef=res)
    with pytest.raises(ValueError, match="Rs"):
        ops_grouped.BoundGroupedResidualBackprojectUpdate(
            W, Gs, P, [torch.zeros(r, n + 1)] * count, Ns, css, backend=be)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_layout_token_checks_once_per_token(backend):
    """``layout_token`` (the step engine's): a call with the token of the last checked call
    does not check the gradients again; a new token, or None, checks them (a mismatch
    raises, naming Gs); the results equal the unbound op either way. Also the dense AdamW
    multi-tensor call."""
    gen = torch.Generator().manual_seed(5)
    m, n, r, count = 13, 21, 4, 3
    W, P, low = _group(count, m, n, r, "left", torch.float32, gen)
    Rs = [torch.full(low, float("nan")) for _ in range(count)]
    be = _backend(backend)
    Gs = [torch.randn(m, n, generator=gen) for _ in range(count)]
    k1 = ops_grouped.BoundGroupedProject(Gs, P, Rs, backend=be)
    checks = []
    real = k1.layout.matches
    k1.layout.matches = lambda Xs: checks.append(1) or real(Xs)
    for token in (7, 7, 7):
        Gs = [torch.randn(m, n, generator=gen) for _ in range(count)]
        k1(Gs, layout_token=token)
        want = ops_grouped.grouped_project(Gs, P, backend=be)
        assert all(torch.equal(a, b) for a, b in zip(Rs, want))
    assert len(checks) == 1                # once for token 7
    k1(Gs, layout_token=None)
    k1(Gs, layout_token=None)
    assert len(checks) == 3                # None: every call
    bad = [torch.randn(n, m, generator=gen) for _ in range(count)]
    with pytest.raises(ValueError, match="Gs"):
        k1(bad, layout_token=8)            # a new token: checked
    with pytest.raises(ValueError, match="Gs"):
        k1(bad, layout_token=None)

    shapes = [(5, 7), (11,)]
    Ws = [torch.randn(s, generator=gen) for s in shapes]
    Ms = [torch.zeros(s) for s in shapes]
    Vs = [torch.zeros(s) for s in shapes]
    dense = ops_multi.BoundAdamWStepMulti(Ws, [torch.empty(s) for s in shapes], Ms, Vs,
                                          backend=_backend("auto"))
    rows = [(1e-2, 0.9, 0.999, 1e-8, 0.0, 1)] * 2
    dense([torch.randn(s, generator=gen) for s in shapes], rows, layout_token=3)
    wrong = [torch.randn(7, 5, generator=gen), torch.randn(11, generator=gen)]
    with pytest.raises(ValueError, match="Gs"):
        dense(wrong, rows, layout_token=4)
