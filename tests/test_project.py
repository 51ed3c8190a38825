"""K1 projection: Triton vs the eager reference (lowrank_fused/reference/project.py)."""
import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import DTYPES, SHAPES, basis, ranks_for

CASES = [(s, r) for s in SHAPES for r in ranks_for(s)]


@pytest.mark.parametrize("shape,rank", CASES, ids=[f"{s[0]}x{s[1]}-r{r}" for s, r in CASES])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_project_matches_reference(shape, rank, side, dtype, device):
    G = torch.randn(shape, device=device).to(dtype)
    P = basis(shape, rank, side, device)
    expected = ops.project(G, P, side=side, backend="reference")
    R = poison(torch.empty_like(expected))
    out = ops.project(G, P, R, side=side, backend="triton")
    assert out is R
    assert_parity(R, expected, rtol=tolerance(torch.float32), name="R")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_project_reduced_precision(precision, device):
    G = torch.randn(150, 90, device=device, dtype=torch.bfloat16)
    P = basis((150, 90), 24, "right", device)
    expected = ops.project(G, P, side="right", backend="reference")
    R = ops.project(G, P, poison(torch.empty_like(expected)), side="right",
                    precision=precision, backend="triton")
    assert_parity(R, expected, rtol=tolerance(torch.float32, precision=precision), name="R")


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("side", ["left", "right"])
def test_project_split_k(split_k, side, device):
    """The reduction over m cut into slices (what the launcher does on GPUs when the output
    grid is too small) gives the same R; uneven last slices included."""
    shape = (203, 97) if side == "left" else (97, 203)
    G = torch.randn(shape, device=device, dtype=torch.bfloat16)
    P = basis(shape, 19, side, device)
    expected = ops.project(G, P, side=side, backend="reference")
    R = poison(torch.empty_like(expected))
    from lowrank_fused.kernels.project import project as project_triton
    Gc, Pc, Rc = (G, P, R) if side == "left" else (G.t(), P.t(), R.t())
    project_triton(Gc, Pc, Rc, split_k=split_k)
    assert_parity(R, expected, rtol=tolerance(torch.float32), name="R")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("split_k", [None, 3])
def test_project_sumsq_side_output(side, split_k, device):
    """colsum(G^2) (left) / rowsum(G^2) (right) from the same pass over G."""
    shape = (130, 257)
    G = torch.randn(shape, device=device, dtype=torch.bfloat16)
    P = basis(shape, 19, side, device)
    want = (G.float() ** 2).sum(dim=0 if side == "left" else 1)
    sq = poison(torch.empty_like(want))
    R = ops.project(G, P, side=side, backend="triton", sumsq=sq)
    assert_parity(sq, want, rtol=tolerance(torch.float32), name="sumsq")
    assert_parity(R, ops.project(G, P, side=side, backend="reference"), rtol=1e-5, name="R")
    if split_k:
        from lowrank_fused.kernels.project import project as project_triton
        Gc, Pc, Rc = (G, P, R) if side == "left" else (G.t(), P.t(), R.t())
        sq2 = poison(torch.empty_like(want))
        project_triton(Gc, Pc, Rc, split_k=split_k, col_sumsq=sq2)
        assert_parity(sq2, want, rtol=tolerance(torch.float32), name="sumsq split-K")
    sq_ref = poison(torch.empty_like(want))
    ops.project(G, P, side=side, backend="reference", sumsq=sq_ref)
    assert_parity(sq_ref, want, rtol=1e-6, name="sumsq reference")
    with pytest.raises(ValueError, match="sumsq must have shape"):
        ops.project(G, P, side=side, backend="reference", sumsq=torch.empty(3, device=device))


def test_project_strided_basis(device):
    """A basis that is a non-contiguous view (e.g. the first r columns of a wider one)."""
    G = torch.randn(70, 120, device=device)
    P = basis((70, 120), 30, "left", device)[:, :17]
    assert not P.is_contiguous()
    expected = ops.project(G, P, side="left", backend="reference")
    R = ops.project(G, P, side="left", backend="triton")
    assert_parity(R, expected, rtol=tolerance(torch.float32), name="R")


def test_project_rejects_bad_input(device):
    G = torch.randn(10, 20, device=device)
    with pytest.raises(ValueError, match="side"):
        ops.project(G, torch.randn(10, 3, device=device), side="up", backend="reference")
    with pytest.raises(ValueError, match="P must have shape"):
        ops.project(G, torch.randn(11, 3, device=device), side="left", backend="reference")
    with pytest.raises(ValueError, match="P must have shape"):
        ops.project(G, torch.randn(3, 21, device=device), side="right", backend="reference")
    with pytest.raises(TypeError, match="R must be float32"):
        ops.project(G, torch.randn(10, 3, device=device), torch.empty(3, 20, dtype=torch.float64),
                    backend="reference")
    with pytest.raises(ValueError, match="precision"):
        ops.project(G, torch.randn(10, 3, device=device), precision="fp8", backend="reference")
    with pytest.raises(TypeError, match="G must be"):
        ops.project(G.long(), torch.randn(10, 3, device=device), backend="reference")
