"""AdaMeM's factored Adafactor step with the on-device ``skip`` flag
(``kernels/adamem_factored_step.py``): bit for bit the launcher it extends
(``adafactor_bc_factored_step``) without a flag and with a False one, the eager reference within
its tolerance, W, row and col bit-identical with a True flag and no host read, bad flags
refused; both memory orders of W and G (a transposed view), every parameter dtype."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.kernels.adamem_factored_step import adamem_factored_step
from lowrank_fused.reference.adamem_factored_step import adamem_factored_step_ref
from lowrank_fused.testing import assert_parity, poison, tolerance
from tests._skip import check_bad_skips, check_skip

KW = dict(lr=1e-2, beta2=0.95, eps1=1e-30, eps=1e-8, c2=0.4, pre_scale=0.999,
          post_decay=0.0)


def _inputs(shape, dtype, device, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    G = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    if transposed:
        W, G = W.t().contiguous().t(), G.t().contiguous().t()
    row = torch.rand(m, generator=g).to(device) + 0.1
    col = torch.rand(n, generator=g).to(device) + 0.1
    return W, G, row, col


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (40, 300)], ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "column-major"])
def test_matches_the_launcher_and_the_reference(dtype, shape, transposed, device):
    W, G, row, col = _inputs(shape, dtype, device, seed=sum(shape), transposed=transposed)
    want = [t.clone() for t in (W, row, col)]
    lookup("adafactor_bc_factored_step", "triton")(want[0], G, want[1], want[2], **KW)
    ref = [t.clone() for t in (W, row, col)]
    adamem_factored_step_ref(ref[0], G, ref[1], ref[2], **KW)
    no = torch.zeros((), dtype=torch.bool, device=device)
    for skip in (None, no):
        got = [W.clone(), poison(row.clone()).copy_(row), poison(col.clone()).copy_(col)]
        adamem_factored_step(got[0], G, got[1], got[2], **KW, skip=skip)
        for name, a, b, r in zip(("W", "row", "col"), got, want, ref):
            assert torch.equal(a, b), f"{name} differs from adafactor_bc_factored_step"
            assert_parity(a, r, rtol=tolerance(dtype) if name == "W" else 1e-6, name=name)


@pytest.mark.parametrize("impl", [adamem_factored_step, adamem_factored_step_ref],
                         ids=["triton", "reference"])
def test_skip_leaves_weight_and_statistics(impl, device):
    G = _inputs((12, 40), torch.bfloat16, device, seed=3)[1]
    check_skip(lambda: list(_inputs((12, 40), torch.bfloat16, device, seed=3)[0:1])
               + list(_inputs((12, 40), torch.bfloat16, device, seed=3)[2:]),
               lambda out, skip: impl(out[0], G, out[1], out[2], **KW, skip=skip), device)
    W, G, row, col = _inputs((6, 9), torch.float32, device)
    check_bad_skips(lambda skip: impl(W, G, row, col, **KW, skip=skip), device)
