"""Dense AdamW step (non-projected parameters): Triton vs the eager reference, and the
reference vs torch.optim.AdamW and the HF AdamW formula."""
import math

import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.testing import assert_parity, tolerance

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
