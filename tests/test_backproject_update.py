"""K3 back-projection + weight update + weight decay: Triton vs the eager reference."""
import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.testing import assert_parity, tolerance
from _cases import DTYPES, SHAPES, basis, ranks_for
from _skip import backends as skip_backends, check_bad_skips, check_skip

CASES = [(s, r) for s in SHAPES for r in ranks_for(s)]
WD = {"post": dict(pre_scale=1.0, post_decay=1e-2), "pre": dict(pre_scale=0.99, post_decay=0.0),
      "none": dict()}


@pytest.mark.parametrize("shape,rank", CASES, ids=[f"{s[0]}x{s[1]}-r{r}" for s, r in CASES])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wd", list(WD))
def test_backproject_update_matches_reference(shape, rank, side, dtype, wd, device):
    P = basis(shape, rank, side, device)
    N = torch.randn(ops.low_rank_shape(shape, rank, side), device=device)
    W0 = torch.randn(shape, device=device).to(dtype)
    W1, W2 = W0.clone(), W0.clone()
    kw = dict(side=side, coef=0.05, **WD[wd])
    ops.backproject_update(W1, P, N, backend="reference", **kw)
    ops.backproject_update(W2, P, N, backend="triton", **kw)
    assert_parity(W2, W1, rtol=tolerance(dtype), name="W")
    # the update is real: W moved by about coef * |P @ N|
    assert (W1.float() - W0.float()).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_backproject_update_reduced_precision(precision, device):
    P = basis((150, 90), 24, "left", device)
    N = torch.randn(24, 90, device=device)
    W0 = torch.randn(150, 90, device=device)
    W1, W2 = W0.clone(), W0.clone()
    ops.backproject_update(W1, P, N, side="left", coef=0.1, backend="reference")
    ops.backproject_update(W2, P, N, side="left", coef=0.1, precision=precision, backend="triton")
    # compare the applied updates, whose size is what the GEMM precision affects
    assert_parity(W2 - W0, W1 - W0, rtol=tolerance(torch.float32, precision=precision), name="dW")


def test_backproject_update_transposed_weight(device):
    """A weight stored transposed (non-contiguous view) is updated through its strides."""
    base = torch.randn(90, 60, device=device)
    W1, W2 = base.clone().t(), base.clone().t()          # 60 x 90 views
    P = basis((60, 90), 7, "left", device)
    N = torch.randn(7, 90, device=device)
    ops.backproject_update(W1, P, N, side="left", coef=0.3, post_decay=0.01, backend="reference")
    ops.backproject_update(W2, P, N, side="left", coef=0.3, post_decay=0.01, backend="triton")
    assert_parity(W2, W1, rtol=1e-5, name="W")


def test_backproject_update_rejects_bad_input(device):
    W = torch.randn(10, 20, device=device)
    with pytest.raises(ValueError, match="N must have shape"):
        ops.backproject_update(W, torch.randn(10, 3), torch.randn(3, 19), coef=1.0,
                               backend="reference")
    with pytest.raises(ValueError, match="coef must be finite"):
        ops.backproject_update(W, torch.randn(10, 3), torch.randn(3, 20), coef=float("nan"),
                               backend="reference")
    W0 = W.clone()
    with pytest.raises(ValueError):
        ops.backproject_update(W, torch.randn(10, 3), torch.randn(3, 20), side="right", coef=1.0,
                               backend="reference")
    assert torch.equal(W, W0), "a rejected call must leave W untouched"


# -- the on-device skip flag (ops.backproject_update(..., skip=...)) ---------------------------

@pytest.mark.parametrize("backend", skip_backends("backproject_update"))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backproject_update_skip_flag(backend, side, dtype, device):
    """skip=True: W keeps its prefilled bits, no host read; skip=False: the bits of a call
    without a flag. 70 x 150 spans two interpreter tiles in n (more than one program)."""
    shape, rank = (70, 150), 5
    P = basis(shape, rank, side, device)
    N = torch.randn(ops.low_rank_shape(shape, rank, side), device=device)

    def run(out, skip):
        ops.backproject_update(out[0], P, N, side=side, coef=0.3, post_decay=0.01,
                               backend=backend, skip=skip)

    check_skip(lambda: [torch.randn(shape, device=device).to(dtype)], run, device)


def test_backproject_update_skip_rejects_bad_flags(device):
    W = torch.randn(10, 20, device=device)
    check_bad_skips(lambda skip: ops.backproject_update(
        W, torch.randn(10, 3, device=device), torch.randn(3, 20, device=device), coef=1.0,
        backend="reference", skip=skip), device)
