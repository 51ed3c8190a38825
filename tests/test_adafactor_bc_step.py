"""Fused bias-corrected Adafactor (AdaMeM's non-low-rank parameters, docs/methods/adamem.md):
Triton vs the eager references, factored and unfactored, on random positive statistics; no
m x n temporary. W and the statistics are all read-and-updated (no write-only output to
poison): every state starts random and W moves by far more than the tolerance (lr = 0.1)."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.reference.adafactor_bc_factored_step import adafactor_bc_factored_step_ref
from lowrank_fused.reference.adafactor_bc_unfactored_step import (
    adafactor_bc_unfactored_step_ref)
from lowrank_fused.testing import assert_parity, tolerance
from lowrank_fused.testing.trace import AllocationTrace

DEV = "cuda" if torch.cuda.is_available() else "cpu"
factored_step = implementation("adafactor_bc_factored_step", "triton", DEV)
unfactored_step = implementation("adafactor_bc_unfactored_step", "triton", DEV)

# (c2, pre_scale, post_decay): bias correction at t=1 and later, WD-pre, WD-post, none
HYPER = {"t1-pre": (0.05, 0.999, 0.0), "t5-post": (0.226, 1.0, 1e-3), "nobc-nowd": (1.0, 1.0, 0.0)}


def _rand(shape, dtype, device, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    x = (0.05 + torch.rand(shape, generator=g)) if positive else torch.randn(shape, generator=g)
    return x.to(device=device, dtype=dtype)


def _run(ref, fn, inputs, kw):
    out = {}
    for name, f in (("reference", ref), ("triton", fn)):
        ts = [t.clone() for t in inputs]
        f(*ts, **kw)
        out[name] = ts
    return out


def _compare(out, names):
    for name, a, e in zip(names, out["triton"], out["reference"]):
        assert_parity(a, e, rtol=tolerance(a.dtype), name=name)


def _kw(hyper):
    c2, pre, post = HYPER[hyper]
    return dict(lr=0.1, beta2=0.95, eps1=1e-30, eps=1e-8, c2=c2, pre_scale=pre, post_decay=post)


@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 33), (97, 203), (64, 17), (203, 97)], ids=str)
def test_factored_matches_reference(shape, dtype, hyper, device):
    m, n = shape
    inputs = [_rand(shape, dtype, device, 1), _rand(shape, dtype, device, 2),
              _rand(m, torch.float32, device, 3, True), _rand(n, torch.float32, device, 4, True)]
    out = _run(adafactor_bc_factored_step_ref, factored_step, inputs, _kw(hyper))
    _compare(out, "W G row col".split())


@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (1000,), (3, 5)], ids=str)
def test_unfactored_matches_reference(shape, dtype, hyper, device):
    inputs = [_rand(shape, dtype, device, 1), _rand(shape, dtype, device, 2),
              _rand(shape, torch.float32, device, 3, True)]
    out = _run(adafactor_bc_unfactored_step_ref, unfactored_step, inputs, _kw(hyper))
    _compare(out, "W G V".split())


def test_fp16_dead_row_and_non_contiguous(device):
    """fp16 W/G with a zero row (eps1 matters); transposed W/G and strided row/col/vector."""
    W = _rand((24, 40), torch.float16, device, 1)
    G = _rand((24, 40), torch.float16, device, 2)
    G[5] = 0.0
    row, col = _rand(24, torch.float32, device, 3, True), _rand(40, torch.float32, device, 4, True)
    _compare(_run(adafactor_bc_factored_step_ref, factored_step, [W, G, row, col], _kw("t1-pre")),
             "W G row col".split())
    Wt = _rand((40, 24), torch.float32, device, 5).t()
    Gt = _rand((40, 24), torch.float32, device, 6).t()
    rs = _rand(48, torch.float32, device, 7, True)[::2]
    cs = _rand(80, torch.float32, device, 8, True)[::2]
    _compare(_run(adafactor_bc_factored_step_ref, factored_step, [Wt, Gt, rs, cs],
                  _kw("t5-post")), "W G row col".split())
    vec = [_rand(60, torch.float32, device, s, s == 3)[::3] for s in (1, 2, 3)]
    _compare(_run(adafactor_bc_unfactored_step_ref, unfactored_step, vec, _kw("t5-post")),
             "W G V".split())


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_empty(shape, device):
    m, n = shape
    inputs = [torch.empty(shape, device=device), torch.empty(shape, device=device),
              _rand(m, torch.float32, device, 3, True), _rand(n, torch.float32, device, 4, True)]
    out = _run(adafactor_bc_factored_step_ref, factored_step, inputs, _kw("t1-pre"))
    for a, e in zip(out["triton"], out["reference"]):
        assert torch.equal(a.isnan(), e.isnan()) and torch.equal(a.nan_to_num(), e.nan_to_num())
    V = torch.empty(0, device=device)
    unfactored_step(V.clone(), V.clone(), V.clone(), **_kw("t1-pre"))


def test_no_full_size_temporary(device):
    m, n = 48, 80
    inputs = [_rand((m, n), torch.bfloat16, device, 1), _rand((m, n), torch.bfloat16, device, 2),
              _rand(m, torch.float32, device, 3, True), _rand(n, torch.float32, device, 4, True)]
    with AllocationTrace() as trace:
        factored_step(*inputs, **_kw("t5-post"))
    assert trace.at_least(m * n) == []
    vec = [_rand(m * n, torch.float32, device, s, s == 3) for s in (1, 2, 3)]
    with AllocationTrace() as trace:
        unfactored_step(*vec, **_kw("t5-post"))
    assert trace.at_least(m * n) == []


def test_auto_backend_prefers_triton(device):
    assert implementation("adafactor_bc_factored_step", "auto", device) is factored_step
    assert implementation("adafactor_bc_unfactored_step", "auto", device) is unfactored_step


def test_adamem_auto_runs_fused_on_its_adafactor_parameters(device):
    """AdaMeM routes parameters without a low-rank plan (no ``rank``) and 1-D ones to these
    ops; ``backend="auto"`` runs them fused and matches the reference optimizer."""
    from lowrank_fused.optim.adamem import AdaMeM

    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g).to(device) for s in ((30, 20), (13,), (4, 3, 5))]
    runs = {}
    for backend in ("reference", "auto"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = AdaMeM(ps, lr=1e-2, weight_decay=0.1, backend=backend)
        for t in range(3):
            gg = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg).to(device)
            opt.step()
        runs[backend] = ps
    for a, e in zip(runs["auto"], runs["reference"]):
        assert_parity(a, e, rtol=tolerance(a.dtype, "trajectory"), name=f"W {tuple(a.shape)}")
