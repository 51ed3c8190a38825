"""GaLoreKFACAdamW's whitening (kernels/kfac_precondition.py: fused M EMA + ``root @ M/c1``
over the r x n tiles, Gram ``R R^T`` on the batched GEMM kernel, ``eigh`` in torch) vs its
reference (lowrank_fused/reference/kfac_precondition.py): random inputs, ranks 1 / odd middle /
min(m, n) (the multi-pass path for r > 64), fp32 and bf16 states, with and without a recompute
of the inverse root, transposed (right-form) views, poisoned outputs, the F == 0 edge case."""
import pytest
import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import DTYPES, ranks_for

SHAPES = [(97, 203), (203, 97), (64, 64), (130, 257)]
CASES = [(s, r) for s in SHAPES for r in ranks_for(s)]
IDS = [f"{s[0]}x{s[1]}-r{r}" for s, r in CASES]
HYPER = dict(beta1=0.9, beta2=0.999, c1=1 - 0.9 ** 3, c2=1 - 0.999 ** 3, eps_rel=1e-6)


def _inputs(r, n, dtype, device, gen):
    """R fp32 (the projection), states in ``dtype``. F = beta2-weighted SPD with eigenvalues in
    [1, ~4]: the inverse root then moves by ~eps * cond(F) = O(eps) under the rounding of the
    Gram matrix (a near-singular F would make any two correct roots differ by eps * cond)."""
    R = torch.randn(r, n, generator=gen).to(device)
    M = torch.randn(r, n, generator=gen).to(device=device, dtype=dtype)
    X = torch.randn(r, 2 * r, generator=gen)
    F = (X @ X.t() / (2 * r) + torch.eye(r)).to(device=device, dtype=dtype)
    root = torch.randn(r, r, generator=gen).to(device=device, dtype=dtype)
    return R, M, F, root


def _run(backend, R, M, F, root, N, recompute, **kw):
    return implementation("kfac_precondition", backend, R.device)(
        R, M, F, root, N, recompute=recompute, **{**HYPER, **kw})


@pytest.mark.parametrize("shape,r", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recompute", [False, True], ids=["cached", "recompute"])
def test_kfac_precondition_matches_reference(shape, r, dtype, recompute, device):
    n = shape[1]
    gen = torch.Generator().manual_seed(11 * r + n)
    R, M, F, root = _inputs(r, n, dtype, device, gen)
    want = [t.clone() for t in (M, F, root)] + [poison(torch.empty(r, n, dtype=dtype,
                                                                   device=device))]
    got = [t.clone() for t in (M, F, root)] + [poison(torch.empty(r, n, dtype=dtype,
                                                                  device=device))]
    if recompute:     # the root is an output then: every element must be written
        poison(got[2])
        poison(want[2])
    assert _run("reference", R, *want, recompute) is True
    assert _run("triton", R, *got, recompute) is True
    # fp32: 1e-5 (sums over n and r in another order, eigh of the same F to rounding).
    # bf16 states: M, F, root, N stored in bf16, 1 ulp = 2^-8 relative where the fp32
    # values straddle a rounding boundary: the bf16 entry of the table.
    rtol = tolerance(dtype)
    for name, a, b in zip(("M", "F", "root", "N"), got, want):
        assert a.dtype == b.dtype == dtype
        assert_parity(a, b, rtol=rtol, name=name)
    if not recompute:
        assert torch.equal(got[2], root)


def test_momentum_update_is_exact_in_fp32(device):
    """The EMA is the reference's expression in fp32 with the same coefficients: identical."""
    gen = torch.Generator().manual_seed(5)
    R, M, F, root = _inputs(37, 150, torch.float32, device, gen)
    outs = []
    for backend in ("reference", "triton"):
        Mb, N = M.clone(), torch.empty(37, 150, device=device)
        _run(backend, R, Mb, F.clone(), root.clone(), N, False)
        outs.append(Mb)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_views_right_form(dtype, device):
    """A right-projected matrix arrives as transposed views of R, M and N (r x n with unit
    stride down the rank); the kernel follows the strides."""
    r, n = 70, 111
    gen = torch.Generator().manual_seed(9)
    R0, M0, F, root = _inputs(r, n, dtype, device, gen)
    outs = []
    for backend in ("reference", "triton"):
        Rt = R0.t().contiguous().t()
        Mt = M0.t().contiguous().t()
        Nt = poison(torch.empty(n, r, dtype=dtype, device=device)).t()
        Fb, qb = F.clone(), root.clone()
        assert _run(backend, Rt, Mt, Fb, qb, Nt, True) is True
        outs.append((Mt, Fb, qb, Nt))
    for name, a, b in zip(("M", "F", "root", "N"), outs[1], outs[0]):
        assert_parity(a, b, rtol=tolerance(dtype), name=name)


def test_first_step_from_zero_factor(device):
    """The first step of the optimizer: F = 0, M = 0, recompute. With r <= n/2 the Gram of a
    Gaussian R has cond <= ((1 + 0.71)/(1 - 0.71))^2 ~ 34, so the roots agree to fp32."""
    r, n = 23, 90
    R = torch.randn(r, n, device=device)
    outs = []
    for backend in ("reference", "triton"):
        M = torch.zeros(r, n, device=device)
        F = torch.zeros(r, r, device=device)
        root = poison(torch.empty(r, r, device=device))
        N = poison(torch.empty(r, n, device=device))
        assert _run(backend, R, M, F, root, N, True) is True
        outs.append((M, F, root, N))
    for name, a, b in zip(("M", "F", "root", "N"), outs[1], outs[0]):
        assert_parity(a, b, rtol=1e-5, name=name)


def test_zero_factor_recompute_returns_false(device):
    """``F == 0`` at a recompute (zero R, zero F): root = 0, N = 0, False; M still decays."""
    r, n = 6, 40
    for backend in ("reference", "triton"):
        R = torch.zeros(r, n, device=device)
        M = torch.randn(r, n, device=device)
        M0 = M.clone()
        F = torch.zeros(r, r, device=device)
        root = poison(torch.empty(r, r, device=device))
        N = poison(torch.empty(r, n, device=device))
        assert _run(backend, R, M, F, root, N, True) is False
        assert torch.equal(root, torch.zeros_like(root))
        assert torch.equal(N, torch.zeros_like(N))
        assert torch.equal(F, torch.zeros_like(F))
        assert_parity(M, 0.9 * M0, rtol=1e-6, name="M")


def test_bad_shape_names_the_argument(device):
    R = torch.randn(4, 10, device=device)
    M, N = torch.zeros(4, 10, device=device), torch.empty(4, 10, device=device)
    F, root = torch.zeros(4, 4, device=device), torch.zeros(5, 5, device=device)
    with pytest.raises(ValueError, match="root"):
        _run("triton", R, M, F, root, N, False)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [5, 40], ids=["r5", "r40"])
def test_grouped_whitening_equals_the_single_op(side, dtype, r, device):
    """``grouped_kfac_precondition`` (one Gram launch, one grouped launch for M, N and F)
    gives every member the single op's bits (cached root): separate state tensors, R a
    stack (transposed for right-form views), poisoned N; r = 40: each of the 3 programs of
    a member updates several tiles of its F (1600 elements); with the skip flag set M and
    F keep their bits."""
    import importlib

    kp = importlib.import_module("lowrank_fused.kernels.kfac_precondition")
    count, n = 3, 70
    gen = torch.Generator().manual_seed(7)
    ins = [_inputs(r, n, dtype, device, gen) for _ in range(count)]
    if side == "left":
        Rs = torch.stack([R for R, *_ in ins])
    else:                                      # canonical R = stored.t(): a transposed stack
        Rs = torch.stack([R.t().contiguous() for R, *_ in ins]).transpose(1, 2)

    def states(right):
        Ms = [M.t().contiguous().t() if right else M.clone() for _, M, _, _ in ins]
        return Ms, [F.clone() for *_, F, _ in ins], [q.clone() for *_, q in ins], \
            [poison(torch.empty(r, n, dtype=dtype, device=device)) for _ in range(count)]
    hyper = {k: v for k, v in HYPER.items() if k != "eps_rel"}
    want = states(side == "right")
    for b in range(count):
        _run("triton", Rs[b], want[0][b], want[1][b], want[2][b], want[3][b], False)
    got = states(side == "right")
    kp.grouped_kfac_precondition(Rs, *got, **hyper)
    for W, G in zip(want, got):
        for a, b in zip(W, G):
            assert torch.equal(a, b)
    before = [[t.clone() for t in lst] for lst in got[:2]]
    kp.grouped_kfac_precondition(Rs, *got, **hyper, skip=torch.tensor(True, device=device))
    for B, G in zip(before, got[:2]):
        for a, b in zip(B, G):
            assert torch.equal(a, b)
    kp.grouped_kfac_precondition(Rs, *got, **hyper, skip=torch.tensor(False, device=device))
    assert not torch.equal(before[0][0], got[0][0])
    for b in range(count):                 # a second step, after the skipped one
        _run("triton", Rs[b], want[0][b], want[1][b], want[2][b], want[3][b], False)
    for W, G in zip(want, got):
        for a, b in zip(W, G):
            assert torch.equal(a, b)
