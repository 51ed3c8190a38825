"""The GPU tile configurations of the GEMM kernels, run under the interpreter. On the CPU the
launchers pick one large interpreter-only tile (``CONFIGS_INTERPRET`` / ``CONFIG_INTERPRET``:
fewer programs run faster there), so the configurations a GPU launches are exercised here
explicitly: every one of them, on odd shapes whose edges cut every tile dimension, ranks 1 and
a few tiles' worth, fp32 and bf16 operands, outputs poisoned, against the eager references
(fp32 tolerance: R and the products are fp32 whatever the operands)."""
import importlib

import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import basis

# the modules (the package exports the launcher functions under the same names)
pj, bp, bmm = (importlib.import_module(f"lowrank_fused.kernels.{m}")
               for m in ("project", "backproject_update", "batched_matmul"))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the GPU runs these configurations in every test")


def _unique(configs):
    return list(dict.fromkeys(configs))


@pytest.mark.parametrize("cfg", pj.GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("rank", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_project_every_gpu_config(cfg, rank, dtype):
    G = torch.randn(139, 67).to(dtype)
    P = basis((139, 67), rank, "left", "cpu")
    want = ops.project(G, P, side="left", backend="reference")
    R = poison(torch.empty_like(want))
    cs = poison(torch.empty(67))
    rsq = poison(torch.empty(1))
    pj.project(G, P, R, config=cfg, split_k=1, col_sumsq=cs, r_sumsq=rsq)
    assert_parity(R, want, rtol=tolerance(torch.float32), name=f"R {cfg}")
    assert_parity(cs, G.float().square().sum(0), rtol=tolerance(torch.float32), name="colsum")
    assert_parity(rsq, want.double().square().sum().reshape(1).float(),
                  rtol=tolerance(torch.float32), name="||R||^2")


@pytest.mark.parametrize("cfg", bp.GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("rank", [1, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backproject_update_every_gpu_config(cfg, rank, dtype):
    W = torch.randn(139, 67).to(dtype)
    P = basis((139, 67), rank, "left", "cpu")
    N = torch.randn(rank, 67)
    want = W.clone()
    ops.backproject_update(want, P, N, side="left", coef=0.3, pre_scale=0.99, post_decay=0.01,
                           backend="reference")
    bp.backproject_update(W, P, N, coef=0.3, pre_scale=0.99, post_decay=0.01, config=cfg)
    assert_parity(W, want, rtol=tolerance(dtype), name=f"W {cfg}")


@pytest.mark.parametrize("cfg", _unique(bmm.CONFIGS_FMA + bmm.CONFIGS_MMA + bmm.CONFIGS_TF32X3), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_matmul_every_gpu_config(cfg, dtype):
    A = torch.randn(3, 139, 67).to(dtype)
    B = torch.randn(3, 67, 41)
    C = poison(torch.empty(3, 139, 41))
    bmm.batched_matmul(A, B, C, config=cfg)
    assert_parity(C, A.float() @ B, rtol=tolerance(torch.float32), name=f"C {cfg}")
