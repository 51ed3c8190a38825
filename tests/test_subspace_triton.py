"""Triton batched GEMM of the subspace refresh (kernels/batched_matmul.py) against torch,
under TRITON_INTERPRET on the CPU (conftest) or on a GPU."""
import pytest
import torch

from lowrank_fused import subspace as ss
from lowrank_fused.dispatch import lookup


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 37, 50, 9), (3, 64, 33, 40)])
def test_batched_matmul_matches_torch(dtype, shape):
    nb, m, kk, n = shape
    g = torch.Generator().manual_seed(0)
    A = torch.randn(nb, m, kk, generator=g).to(dtype).to(_dev())
    B = torch.randn(nb, kk, n, generator=g).to(_dev())
    C = torch.full((nb, m, n), float("nan"), device=_dev())
    lookup("batched_matmul", "triton")(A, B, C, precision="ieee")
    ref = torch.matmul(A.float(), B)
    torch.testing.assert_close(C, ref, rtol=1e-4, atol=1e-4)
    # transposed view of A (G^T) and a broadcast B (one sketch for the batch)
    C2 = torch.empty(nb, kk, n, device=_dev())
    B1 = torch.randn(1, m, n, generator=g).to(_dev())
    lookup("batched_matmul", "triton")(A.transpose(-1, -2), B1, C2, precision="ieee")
    torch.testing.assert_close(C2, torch.matmul(A.float().transpose(-1, -2), B1),
                               rtol=1e-4, atol=1e-4)


def test_power_iteration_triton_matches_reference():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(2, 48, 40, generator=g).to(_dev())
    Q0 = ss.cholesky_qr2(torch.randn(2, 48, 6, generator=g).to(_dev()))
    Qt = ss.power_iteration(G, Q0, iters=2, backend="triton")
    Qr = ss.power_iteration(G, Q0, iters=2, backend="reference")
    torch.testing.assert_close(Qt, Qr, rtol=1e-4, atol=1e-4)
