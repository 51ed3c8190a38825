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


# ||R||^2 side output: (shape, rank, side, dtype); ranks 1 and min(m, n), both sides
R_SUMSQ_CASES = [
    ((37, 53), 1, "left", torch.float32), ((37, 53), 37, "right", torch.bfloat16),
    ((130, 67), 67, "left", torch.bfloat16), ((130, 67), 1, "right", torch.float32),
    ((256, 300), 5, "left", torch.float32), ((256, 300), 7, "right", torch.bfloat16),
]


@pytest.mark.parametrize("shape,rank,side,dtype", R_SUMSQ_CASES,
                         ids=[f"{s[0]}x{s[1]}-r{r}-{sd}-{str(d)[6:]}"
                              for s, r, sd, d in R_SUMSQ_CASES])
def test_project_r_sumsq_side_output(shape, rank, side, dtype, device):
    """||R||_F^2 of the fp32 R from the projection's own output tiles (no second read of R),
    against the fp64 sum of squares of the reference R from the same G; the reference
    backend's own r_sumsq too."""
    G = torch.randn(shape, device=device).to(dtype)
    P = basis(shape, rank, side, device)
    expected = ops.project(G, P, side=side, backend="reference")
    want = expected.double().square().sum().reshape(1)
    for backend in ("triton", "reference"):
        rsq = poison(torch.empty(1, device=device))
        R = ops.project(G, P, poison(torch.empty_like(expected)), side=side, backend=backend,
                        r_sumsq=rsq)
        assert_parity(R, expected, rtol=tolerance(torch.float32), name=f"R {backend}")
        assert_parity(rsq, want, rtol=tolerance(torch.float32), name=f"r_sumsq {backend}")


@pytest.mark.parametrize("side,layout", [("left", "dense"), ("right", "dense"),
                                         ("left", "strided")])
def test_project_r_sumsq_split_k(side, layout, device):
    """With split-K the tiles hold partial sums: ||R||^2 comes from the slice sum (with the
    colsum side output alongside), for a row-major R, the right side's column-major view and
    an R that is neither (a column window of a wider buffer)."""
    shape = (203, 45) if side == "left" else (45, 203)
    G = torch.randn(shape, device=device, dtype=torch.bfloat16)
    P = basis(shape, 45, side, device)
    expected = ops.project(G, P, side=side, backend="reference")
    if layout == "strided":
        R = poison(torch.empty(45, 50, device=device))[:, :45]
    else:
        R = poison(torch.empty_like(expected))
    from lowrank_fused.kernels.project import project as project_triton
    Gc, Pc, Rc = (G, P, R) if side == "left" else (G.t(), P.t(), R.t())
    rsq, cs = poison(torch.empty(1, device=device)), poison(torch.empty(45, device=device))
    project_triton(Gc, Pc, Rc, split_k=3, col_sumsq=cs, r_sumsq=rsq)
    assert_parity(R, expected, rtol=tolerance(torch.float32), name="R split-K")
    assert_parity(rsq, expected.double().square().sum().reshape(1),
                  rtol=tolerance(torch.float32), name="r_sumsq split-K")
    assert_parity(cs, Gc.double().square().sum(dim=0), rtol=tolerance(torch.float32),
                  name="col_sumsq split-K")


def test_project_r_sumsq_empty_and_bad_input(device):
    G = torch.randn(10, 20, device=device)
    P = torch.randn(10, 3, device=device)
    for backend in ("triton", "reference"):
        rsq = poison(torch.empty(1, device=device))
        ops.project(G[:0], P[:0], side="left", backend=backend, r_sumsq=rsq)
        assert rsq.item() == 0.0, backend
    with pytest.raises(TypeError, match="r_sumsq must be float32"):
        ops.project(G, P, backend="reference", r_sumsq=torch.empty(1, dtype=torch.float64))
    with pytest.raises(TypeError, match="r_sumsq must be a torch.Tensor"):
        ops.project(G, P, backend="reference", r_sumsq=0.0)
    for bad in (torch.empty((), device=device), torch.empty(2, device=device),
                torch.empty(1, 1, device=device)):
        with pytest.raises(ValueError, match=r"r_sumsq must have shape \(1,\)"):
            ops.project(G, P, backend="reference", r_sumsq=bad)
    from lowrank_fused.kernels.project import project as project_triton
    with pytest.raises(TypeError, match="r_sumsq must be a 1-element float32"):
        project_triton(G, P, torch.empty(3, 20, device=device),
                       r_sumsq=torch.empty(1, dtype=torch.bfloat16))
