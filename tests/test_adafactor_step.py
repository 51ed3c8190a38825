"""Fused Adafactor step (docs/methods/adafactor.md, K6): Triton vs the eager reference on random
states (never zeros), odd shapes, factored and unfactored, every flag; no m x n temporary.

The op has no write-only output (W, the statistics and exp_avg are all read and updated), so
instead of NaN poisoning every state starts random and W moves by far more than the
tolerance (rho = 0.3): an element a kernel fails to write stays visibly wrong."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.reference.adafactor_step import adafactor_step_ref
from lowrank_fused.testing import assert_parity, tolerance
from lowrank_fused.testing.trace import AllocationTrace

triton_step = implementation("adafactor_step", "triton", "cuda" if torch.cuda.is_available()
                             else "cpu")

FACTORED = [(1, 1, 33), (1, 97, 203), (3, 64, 17), (1, 203, 97)]
UNFACTORED = [(1,), (7,), (1000,)]
# (beta1, scale_parameter, weight_decay, clip_threshold d): d = 0.05 makes the RMS clip active,
# d = 1e3 leaves it inactive (checked by _clip_active)
FLAGS = {
    "plain-noclip": (None, False, 0.0, 1e3),
    "scaled-clip": (None, True, 0.0, 0.05),
    "momentum-wd-clip": (0.9, True, 0.1, 0.05),
    "momentum-unscaled-wd-noclip": (0.8, False, 0.2, 1e3),
}


def _inputs(shape, dtype, beta1, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(s, generator=g).to(device)             # noqa: E731
    pos = lambda *s: (0.05 + torch.rand(s, generator=g)).to(device)     # noqa: E731
    W = rnd(*shape).to(dtype)
    G = rnd(*shape).to(dtype)
    if len(shape) == 3:
        B, m, n = shape
        row, col, V = pos(B, m), pos(B, n), None
    else:
        row = col = None
        V = pos(*shape)
    exp_avg = 0.1 * rnd(*shape) if beta1 is not None else None
    return W, G, row, col, V, exp_avg


def _clip_active(G, row, col, V, beta2t, eps1, d):
    """RMS(U)/d > 1 for the step about to run (the reference's formula, in fp64)."""
    q = G.double() ** 2 + eps1
    if row is not None:
        r = beta2t * row.double() + (1 - beta2t) * q.mean(-1)
        c = beta2t * col.double() + (1 - beta2t) * q.mean(-2)
        u = G.double() * (r / r.mean(-1, keepdim=True)).rsqrt()[..., None] * c.rsqrt()[..., None, :]
    else:
        u = G.double() * (beta2t * V.double() + (1 - beta2t) * q).rsqrt()
    return (u.norm() / u.numel() ** 0.5).item() / d > 1.0


def _run_both(inputs, **kw):
    out = {}
    for name, fn in (("reference", adafactor_step_ref), ("triton", triton_step)):
        ts = [t.clone() if t is not None else None for t in inputs]
        fn(*ts, **kw)
        out[name] = ts
    return out


def _compare(out, names="W G row col V exp_avg".split()):
    for name, a, e in zip(names, out["triton"], out["reference"]):
        if a is not None:
            assert_parity(a, e, rtol=tolerance(a.dtype), name=name)


@pytest.mark.parametrize("flags", list(FLAGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", FACTORED + UNFACTORED, ids=str)
def test_adafactor_step_matches_reference(shape, dtype, flags, device):
    beta1, scaled, wd, d = FLAGS[flags]
    inputs = _inputs(shape, dtype, beta1, device)
    beta2t, eps1 = 0.3, 1e-30
    assert _clip_active(inputs[1], inputs[2], inputs[3], inputs[4], beta2t, eps1, d) == (d < 1)
    out = _run_both(inputs, rho=0.3, beta2t=beta2t, eps1=eps1, eps2=1e-3, clip_threshold=d,
                    scale_parameter=scaled, beta1=beta1, weight_decay=wd)
    _compare(out)


def test_fp16_and_first_step(device):
    """fp16 W/G, step 1 (beta2t = 0: statistics replaced), a dead row (eps1 matters)."""
    inputs = list(_inputs((2, 24, 40), torch.float16, 0.9, device))
    inputs[1][0, 3] = 0.0
    out = _run_both(inputs, rho=1e-2, beta2t=0.0, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                    scale_parameter=True, beta1=0.9, weight_decay=0.0)
    _compare(out)


def test_non_contiguous(device):
    """Strided W/G/exp_avg (a transposed batch), strided row/col, and a strided vector."""
    g = torch.Generator().manual_seed(3)
    base = lambda *s: torch.randn(s, generator=g).to(device)            # noqa: E731
    W = base(2, 19, 37).transpose(1, 2)
    G = base(2, 19, 37).transpose(1, 2)
    E = base(2, 19, 37).transpose(1, 2)
    row = (0.1 + torch.rand(37, 2, generator=g)).to(device).t()
    col = (0.1 + torch.rand(2, 38, generator=g)).to(device)[:, ::2]
    kw = dict(rho=0.3, beta2t=0.5, eps1=1e-30, eps2=1e-3, clip_threshold=0.1,
              scale_parameter=True, beta1=0.9, weight_decay=0.1)
    _compare(_run_both([W, G, row, col, None, E], **kw))
    Wv, Gv, Ev = base(40)[::2], base(40)[::2], base(40)[::2]
    Vv = (0.1 + torch.rand(40, generator=g)).to(device)[::2]
    _compare(_run_both([Wv, Gv, None, None, Vv, Ev], **kw))


@pytest.mark.parametrize("shape", [(1, 0, 5), (2, 3, 0), (0,)], ids=str)
def test_empty(shape, device):
    inputs = _inputs(shape, torch.float32, 0.9, device)
    out = _run_both(inputs, rho=0.3, beta2t=0.5, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                    scale_parameter=True, beta1=0.9, weight_decay=0.1)
    for a, e in zip(out["triton"], out["reference"]):
        if a is not None:
            assert a.shape == e.shape and torch.equal(a.isnan(), e.isnan())
            assert torch.equal(a.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("factored", [True, False])
def test_no_full_size_temporary(factored, device):
    shape = (2, 48, 80) if factored else (3840,)
    numel = 48 * 80 if factored else 3840
    inputs = _inputs(shape, torch.bfloat16, 0.9, device)
    with AllocationTrace() as trace:
        triton_step(*inputs, rho=0.3, beta2t=0.5, eps1=1e-30, eps2=1e-3, clip_threshold=1.0,
                    scale_parameter=True, beta1=0.9, weight_decay=0.1)
    assert trace.at_least(numel) == []


def test_auto_backend_prefers_triton(device):
    assert implementation("adafactor_step", "auto", device) is triton_step


@pytest.mark.parametrize("flags", [{}, dict(lr=1e-2, relative_step=False, scale_parameter=False,
                                            beta1=0.8, weight_decay=0.1, clip_threshold=0.5)],
                         ids=["hf-defaults", "c4-momentum-wd"])
def test_optimizer_auto_runs_fused_and_matches_reference(flags, device):
    """``Adafactor(backend="auto")`` runs these kernels (2-D, >2-D batch, 1-D, 0-d, bf16)."""
    from lowrank_fused.optim.adafactor import Adafactor

    shapes = [((20, 33), torch.float32), ((2, 3, 5, 7), torch.float32), ((9,), torch.float32),
              ((), torch.float32), ((12, 40), torch.bfloat16)]
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g).to(device=device, dtype=dt) for s, dt in shapes]
    runs = {}
    for backend in ("reference", "auto"):
        ps = [torch.nn.Parameter(x.clone()) for x in init]
        opt = Adafactor(ps, backend=backend, **flags)
        for t in range(3):
            gg = torch.Generator().manual_seed(100 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg).to(device=device, dtype=p.dtype)
            opt.step()
        runs[backend] = ps
    assert implementation("adafactor_step", "auto", device) is triton_step
    for a, e in zip(runs["auto"], runs["reference"]):
        assert_parity(a, e, rtol=tolerance(a.dtype, "trajectory"), name=f"W {tuple(a.shape)}")
