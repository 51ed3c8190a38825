"""Dense AdamW step (non-projected parameters): Triton vs the eager reference, and the
reference vs torch.optim.AdamW and the HF AdamW formula."""
import math

import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.testing import assert_parity, tolerance

from _skip import backends as skip_backends, check_bad_skips, check_skip

SHAPES = [(1,), (97, 203), (4097,), (3, 5, 7)]
MODES = {"torch": dict(eps_mode="torch", wd_mode="pre"), "hf": dict(eps_mode="hf", wd_mode="post")}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_adamw_step_matches_reference(shape, dtype, state_dtype, mode, device):
    W0 = torch.randn(shape, device=device).to(dtype)
    M0 = (0.1 * torch.randn(shape, device=device)).to(state_dtype)
    V0 = (0.01 * torch.rand(shape, device=device)).to(state_dtype)
    outs = {}
    for backend in ("reference", "triton"):
        W, M, V = W0.clone(), M0.clone(), V0.clone()
        for step in (1, 2, 3):
            G = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(step)).to(dtype)
            ops.adamw_step(W, G, M, V, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=step,
                           weight_decay=0.1, backend=backend, **MODES[mode])
        outs[backend] = (W, M, V)
    for name, a, e in zip("WMV", outs["triton"], outs["reference"]):
        assert_parity(a, e, rtol=tolerance(a.dtype), name=name)


def test_reference_equals_torch_adamw(device):
    p1 = torch.nn.Parameter(torch.randn(33, 17, device=device))
    p2 = torch.nn.Parameter(p1.detach().clone())
    opt = torch.optim.AdamW([p1], lr=3e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    M, V = torch.zeros_like(p2), torch.zeros_like(p2)
    for step in range(1, 6):
        g = torch.randn_like(p1)
        p1.grad = g.clone()
        opt.step()
        with torch.no_grad():
            ops.adamw_step(p2, g, M, V, lr=3e-2, beta1=0.8, beta2=0.95, eps=1e-8, step=step,
                           weight_decay=0.1, backend="reference")
    assert_parity(p2, p1, rtol=1e-6, name="W")


def test_reference_hf_adamw_formula(device):
    """HF AdamW (GaLore's dense groups): p -= lr*sqrt(bc2)/bc1 * m/(sqrt(v)+eps); p -= lr*wd*p."""
    W = torch.randn(20, 30, device=device, dtype=torch.float64)
    Wf = W.float()
    M = torch.zeros_like(W); V = torch.zeros_like(W)
    Mf, Vf = M.float(), V.float()
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 0.05
    for t in range(1, 4):
        g = torch.randn_like(W)
        M = b1 * M + (1 - b1) * g
        V = b2 * V + (1 - b2) * g * g
        W = W - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * M / (V.sqrt() + eps)
        W = W - lr * wd * W
        ops.adamw_step(Wf, g.float(), Mf, Vf, lr=lr, beta1=b1, beta2=b2, eps=eps, step=t,
                       weight_decay=wd, eps_mode="hf", wd_mode="post", backend="reference")
    assert_parity(Wf, W, rtol=1e-6, name="W")


# -- the on-device skip flag (ops.adamw_step(..., skip=...)) -----------------------------------

@pytest.mark.parametrize("backend", skip_backends("adamw_step"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adamw_step_skip_flag(backend, dtype, device):
    """skip=True: W, M, V keep their prefilled bits, no host read; skip=False: the bits of a
    call without a flag. 2053 elements: several Triton programs and a partial last one."""
    G = torch.randn(2053, device=device).to(dtype)
    for mode in MODES.values():

        def make():
            return [torch.randn(2053, device=device).to(dtype),
                    torch.randn(2053, device=device).to(dtype),
                    torch.rand(2053, device=device).to(dtype)]

        def run(out, skip):
            ops.adamw_step(*out[:1], G, *out[1:], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                           step=2, weight_decay=0.1, backend=backend, skip=skip, **mode)

        check_skip(make, run, device)


def test_adamw_step_skip_none_allocates_nothing(device):
    """Without a flag the Triton launcher passes one cached False flag per device: no tensor
    is allocated per call (after the first), and a second call gets the same flag."""
    from lowrank_fused.testing.trace import AllocationTrace

    W, G, M, V = (torch.randn(100, device=device) for _ in range(4))
    V = V.abs()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=1, backend="triton")
    ops.adamw_step(W, G, M, V, **kw)
    with AllocationTrace() as trace:
        ops.adamw_step(W, G, M, V, **kw)
    assert trace.at_least(1) == []   # (the interpreter's own argument copies are empty)
    from lowrank_fused.kernels._common import skip_flag

    dev = torch.device(device)
    assert skip_flag(None, dev) is skip_flag(None, dev)
    assert not skip_flag(None, dev).item()


def test_adamw_step_skip_rejects_bad_flags(device):
    W = torch.randn(5, device=device)
    check_bad_skips(lambda skip: ops.adamw_step(
        W, W.clone(), W.clone(), W.clone().abs(), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
        step=1, backend="reference", skip=skip), device)
