"""AdaMeM's combined update (K3 with the residual term): the fused Triton op vs the eager
reference (lowrank_fused/reference/residual_backproject_update.py)."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, tolerance
from _cases import orthonormal

SHAPES = [(97, 203), (64, 64), (33, 130)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rank", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed-view"])
def test_residual_update_matches_reference(shape, rank, dtype, transposed, device):
    m, n = shape
    P = orthonormal(m, rank, device)
    G = torch.randn(m, n, device=device).to(dtype)
    R = P.t() @ G.float()
    N = torch.randn(rank, n, device=device)
    cs = torch.rand(n, device=device) + 0.5
    kw = dict(coef=0.05, res_coef=0.02, pre_scale=0.999, post_decay=0.0)
    W0 = torch.randn(n, m, device=device).to(dtype).t() if transposed \
        else torch.randn(m, n, device=device).to(dtype)
    out = {}
    for backend in ("reference", "triton"):
        W = W0.clone() if not transposed else W0.t().clone().t()
        lookup("residual_backproject_update", backend)(W, G, P, R, N, cs, **kw)
        out[backend] = W
    assert_parity(out["triton"], out["reference"], rtol=tolerance(dtype), name="W")
    assert (out["reference"].float() - W0.float()).abs().max() > 1e-3   # the update is real


def test_residual_term_alone(device):
    """With coef = 0 and P orthonormal, W moves by exactly -res_coef*(G - P P^T G)*cs."""
    m, n, r = 40, 70, 5
    P = orthonormal(m, r, device)
    G = torch.randn(m, n, device=device)
    R = P.t() @ G
    cs = torch.rand(n, device=device) + 0.5
    W = torch.zeros(m, n, device=device)
    lookup("residual_backproject_update", "triton")(W, G, P, R, torch.zeros(r, n, device=device),
                                                    cs, coef=0.0, res_coef=1.0, pre_scale=1.0,
                                                    post_decay=0.0)
    assert_parity(W, -((G - P @ R) * cs), rtol=1e-5, name="W")
