"""The fused GEMMs' operand precisions (``ieee | tf32 | bf16 | tf32x3``, docs/precision.md):
every GEMM op in every mode against the eager reference in the same mode, and the accuracy of
each mode against an fp64 ground truth.

The reference rounds (tf32, bf16) or splits (tf32x3) the same operands the kernels do
(``lowrank_fused.reference._precision``), so where the kernel multiplies the op's own operands
(project, backproject_update, their grouped forms, batched_matmul, LDAdam's error feedback and
moment transport) only the fp32 summation order differs: the fp32 budget (1e-5), or the output
dtype's (a bf16 W: 1e-2); on a GPU, tf32 gets its own (``budget``). Where the kernel first
folds several operands into one (AdaMeM's residual update, AdaPM's momentum factor) the
rounding falls on other values, so the budget is the mode's (``tolerance(..., precision=mode)``: 3e-3 tf32, 1e-2 bf16). Under the interpreter
the reduced modes are emulated (operands rounded, fp32 dots), so a kernel that ignored its
mode would be caught: its tf32/bf16 result would sit at the ieee reference, not at its own.
"""
import pytest
import torch
import triton
import triton.language as tl

from lowrank_fused import ops, ops_grouped
from lowrank_fused.dispatch import lookup
from lowrank_fused.kernels._common import round_tf32_rne
from lowrank_fused.reference._precision import matmul, round_tf32
from lowrank_fused.subspace import batched_matmul
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import DTYPES, basis, orthonormal

MODES = ("ieee", "tf32", "bf16", "tf32x3")
REDUCED = ("tf32", "bf16")
CASES = [((97, 203), 17), ((130, 257), 1)]
CASE_IDS = [f"{s[0]}x{s[1]}-r{r}" for s, r in CASES]


def budget(dtype, mode, device):
    """Same operands on both sides: the output dtype's budget. On a GPU the tensor cores take
    an fp32 operand of a tf32 dot as they do (rounded or truncated to TF32, which the reference
    cannot pin down), so there tf32 gets its own budget."""
    if device == "cuda" and mode == "tf32":
        return tolerance(dtype, precision=mode)
    return tolerance(dtype)


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def mode_is_real(out, ieee_ref, mode, device, name):
    """A reduced mode is measurably off the ieee result (so it is not silently ieee); tf32x3
    is not bit-identical to ieee under the interpreter (its emulation is deterministic)."""
    if mode in REDUCED:
        assert rel(out, ieee_ref) > 2e-5, f"{name}: {mode} result indistinguishable from ieee"
    elif mode == "tf32x3" and device == "cpu":
        assert not torch.equal(out, ieee_ref), f"{name}: tf32x3 result bit-identical to ieee"


# -- K1 / K3, single and grouped ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,rank", CASES, ids=CASE_IDS)
def test_project(shape, rank, dtype, side, mode, device):
    G = torch.randn(shape, device=device).to(dtype)
    P = basis(shape, rank, side, device)
    want = ops.project(G, P, side=side, precision=mode, backend="reference")
    R = ops.project(G, P, poison(torch.empty_like(want)), side=side, precision=mode,
                    backend="triton")
    assert_parity(R, want, rtol=budget(torch.float32, mode, device), name=f"R[{mode}]")
    ieee = ops.project(G, P, side=side, backend="reference" if mode in REDUCED else "triton")
    mode_is_real(R, ieee, mode, device, "R")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,rank", CASES, ids=CASE_IDS)
def test_backproject_update(shape, rank, dtype, side, mode, device):
    """W small against the update, so that the product's error is what is compared."""
    m, n = shape
    W0 = (0.05 * torch.randn(shape, device=device)).to(dtype)
    P = basis(shape, rank, side, device)
    N = torch.randn((rank, n) if side == "left" else (m, rank), device=device)
    kw = dict(side=side, coef=0.5, pre_scale=0.99, post_decay=0.01, precision=mode)
    want = ops.backproject_update(W0.clone(), P, N, backend="reference", **kw)
    W = ops.backproject_update(W0.clone(), P, N, backend="triton", **kw)
    assert_parity(W, want, rtol=budget(dtype, mode, device), name=f"W[{mode}]")
    if dtype == torch.float32:
        ieee = ops.backproject_update(W0.clone(), P, N, backend="reference" if mode in REDUCED
                                      else "triton", **{**kw, "precision": "ieee"})
        mode_is_real(W, ieee, mode, device, "W")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped(dtype, side, mode, device):
    """Grouped K1 and K3 over three members of an odd shape vs the per-member reference."""
    shape, rank, count = (97, 203), 13, 3
    m, n = shape
    Gs = [torch.randn(shape, device=device).to(dtype) for _ in range(count)]
    Ps = [basis(shape, rank, side, device) for _ in range(count)]
    want = [ops.project(G, P, side=side, precision=mode, backend="reference")
            for G, P in zip(Gs, Ps)]
    Rs = [poison(torch.empty_like(w)) for w in want]
    ops_grouped.grouped_project(Gs, Ps, Rs, side=side, precision=mode, backend="triton")
    for b, (R, w) in enumerate(zip(Rs, want)):
        assert_parity(R, w, rtol=budget(torch.float32, mode, device), name=f"R[{b}][{mode}]")
    Ns = [torch.randn(R.shape, device=device) for R in Rs]
    W0 = [(0.05 * torch.randn(shape, device=device)).to(dtype) for _ in range(count)]
    coef, pre, post = [0.5, 0.3, 0.2], [1.0, 0.99, 0.98], [0.0, 0.01, 0.02]
    want = [W.clone() for W in W0]
    for W, P, N, c, a, d in zip(want, Ps, Ns, coef, pre, post):
        ops.backproject_update(W, P, N, side=side, coef=c, pre_scale=a, post_decay=d,
                               precision=mode, backend="reference")
    Ws = [W.clone() for W in W0]
    ops_grouped.grouped_backproject_update(Ws, Ps, Ns, side=side, coef=coef, pre_scale=pre,
                                           post_decay=post, precision=mode, backend="triton")
    for b, (W, w) in enumerate(zip(Ws, want)):
        assert_parity(W, w, rtol=budget(dtype, mode, device), name=f"W[{b}][{mode}]")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_matmul(dtype, mode, device):
    """The refresh's batched GEMM: A (batch, M, K) in its storage dtype, B fp32, B broadcast
    over the batch too."""
    A = torch.randn(3, 45, 131, device=device).to(dtype)
    for B in (torch.randn(3, 131, 19, device=device), torch.randn(1, 131, 19, device=device)):
        want = batched_matmul(A, B, backend="reference", precision=mode)
        C = batched_matmul(A, B, backend="triton", precision=mode)
        assert_parity(C, want, rtol=budget(torch.float32, mode, device), name=f"C[{mode}]")
        ieee = batched_matmul(A, B, backend="reference" if mode in REDUCED else "triton")
        mode_is_real(C, ieee, mode, device, "C")


# -- the other GEMM ops ------------------------------------------------------------------------

def _residual_operands(shape, rank, dtype, device):
    m, n = shape
    W = (0.05 * torch.randn(shape, device=device)).to(dtype)
    G = torch.randn(shape, device=device).to(dtype)
    P = orthonormal(m, rank, device)
    R = P.t() @ G.float()
    N = torch.randn(rank, n, device=device)
    cs = torch.rand(n, device=device) + 0.5
    return W, G, P, R, N, cs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_backproject_update(dtype, mode, device):
    """AdaMeM's update, single and grouped (the kernel folds P @ N and P @ R into one GEMM:
    the mode's own budget)."""
    shape, rank = (97, 203), 11
    kw = dict(coef=0.5, res_coef=0.3, pre_scale=0.99, post_decay=0.01)
    W, G, P, R, N, cs = _residual_operands(shape, rank, dtype, device)
    want = W.clone()
    lookup("residual_backproject_update", "reference")(want, G, P, R, N, cs, precision=mode,
                                                       **kw)
    out = W.clone()
    lookup("residual_backproject_update", "triton")(out, G, P, R, N, cs, precision=mode, **kw)
    assert_parity(out, want, rtol=tolerance(dtype, precision=mode), name=f"W[{mode}]")
    Ws, Gs, Ps, Rs, Ns, css = zip(*[_residual_operands(shape, rank, dtype, device)
                                    for _ in range(2)])
    want = [W.clone() for W in Ws]
    gkw = {k: [v, v] for k, v in kw.items()}
    ops_grouped.grouped_residual_backproject_update(want, Gs, Ps, Rs, Ns, css, **gkw,
                                                    precision=mode, backend="reference")
    out = [W.clone() for W in Ws]
    ops_grouped.grouped_residual_backproject_update(out, Gs, Ps, Rs, Ns, css, **gkw,
                                                    precision=mode, backend="triton")
    for b, (o, w) in enumerate(zip(out, want)):
        assert_parity(o, w, rtol=tolerance(dtype, precision=mode), name=f"W[{b}][{mode}]")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("refit", [False, True], ids=["between", "refit"])
def test_adapm_update(refit, mode, device):
    """AdaPM's fused update (L @ B, and L0 @ B0 on refit steps, with the factors folded)."""
    from test_adapm_update import HYPER, make_inputs

    inputs = make_inputs((97, 130), 9, refit=refit, device=device, seed=3)
    outs = []
    for backend in ("reference", "triton"):
        W, G, L, R, Rg, V, L0, R0 = [None if t is None else t.clone() for t in inputs]
        lookup("adapm_update", backend)(W, G, L, R, Rg, V, L0, R0, precision=mode,
                                        clip_mode="rms", **HYPER)
        outs.append({"W": W, "V": V, "R": R})
    for name, want in outs[0].items():
        assert_parity(outs[1][name], want, rtol=tolerance(want.dtype, precision=mode),
                      name=f"{name}[{mode}]")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("explicit", [False, True], ids=["fused", "explicit"])
def test_ldadam_error_feedback(explicit, mode, device):
    m, n, r = 97, 130, 7
    A = torch.randn(m, n, device=device)
    P_new, P_old = orthonormal(m, r, device), orthonormal(m, r, device)
    Rg = P_new.t() @ A
    M = torch.randn(r, n, device=device)
    M_tr = (P_new.t() @ P_old) @ M
    outs = []
    for backend in ("reference", "triton"):
        E = poison(torch.empty(m, n, device=device))
        lookup("ldadam_error_feedback", backend)(A, P_new, P_old, Rg, M, M_tr, E, c=9.0,
                                                 explicit=explicit, precision=mode)
        outs.append(E)
    assert_parity(outs[1], outs[0], rtol=budget(torch.float32, mode, device), name=f"E[{mode}]")


@pytest.mark.parametrize("mode", MODES)
def test_ldadam_moment_transport(mode, device):
    m, n, r = 97, 130, 7
    P_new, P_old = orthonormal(m, r, device), orthonormal(m, r, device)
    M = torch.randn(r, n, device=device)
    V = torch.rand(r, n, device=device) + M * M
    outs = []
    for backend in ("reference", "triton"):
        V_out, M_tr = V.clone(), poison(torch.empty(r, n, device=device))
        lookup("ldadam_moment_transport", backend)(P_new, P_old, M, V_out, M_tr, bc1=0.19,
                                                   bc2=0.0975, precision=mode)
        outs.append((M_tr, V_out))
    for name, a, b in (("M_tr", outs[1][0], outs[0][0]), ("V", outs[1][1], outs[0][1])):
        assert_parity(a, b, rtol=budget(torch.float32, mode, device), name=f"{name}[{mode}]")


# -- accuracy against fp64 ---------------------------------------------------------------------

def _errors(op, backend, device):
    """Normwise error of each mode's result against the fp64 product of the same fp32
    operands (K1 ``P^T G`` or K3's ``P @ N`` with W = 0, coef = -1)."""
    gen = torch.Generator(device=device).manual_seed(5)
    m, n, r = 512, 300, 32
    P = orthonormal(m, r, device, generator=gen)
    if op == "project":
        G = torch.randn(m, n, device=device, generator=gen)
        exact = P.double().t() @ G.double()
        run = lambda mode: ops.project(G, P, precision=mode, backend=backend)  # noqa: E731
    else:
        N = torch.randn(r, n, device=device, generator=gen)
        exact = P.double() @ N.double()
        run = lambda mode: ops.backproject_update(  # noqa: E731
            torch.zeros(m, n, device=device), P, N, coef=-1.0, precision=mode,
            backend=backend)
    return {mode: rel(run(mode), exact) for mode in MODES}


@pytest.mark.parametrize("op", ["project", "backproject_update"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_accuracy_against_fp64(op, backend, device):
    """tf32x3 stays within a small multiple of ieee's error (both ~1e-7), while tf32 is about
    1e-3 off (10-bit operands) and bf16 about 1e-2 (8-bit): the split recovers fp32."""
    err = _errors(op, backend, device)
    assert err["ieee"] < 2e-6, err
    assert err["tf32x3"] < 4 * err["ieee"] + 1e-7, err
    assert 1e-4 < err["tf32"] < 3e-3, err
    assert 1e-3 < err["bf16"] < 2e-2, err
    assert err["tf32"] > 50 * err["tf32x3"], err


# -- rounding, names, defaults -----------------------------------------------------------------

def test_round_tf32_ties_to_even_and_specials():
    one = 1.0
    x = torch.tensor([one, one + 2 ** -11, one + 3 * 2 ** -11, one + 2 ** -11 + 2 ** -20,
                      -(one + 3 * 2 ** -11), 2.0 ** -130, float("inf"), float("nan"),
                      3.4028235e38, 0.0])
    y = round_tf32(x)
    want = [one, one, one + 2 ** -9, one + 2 ** -10, -(one + 2 ** -9), 2.0 ** -130,
            float("inf"), float("nan"), float("inf"), 0.0]
    assert torch.equal(y[:7], torch.tensor(want[:7])) and torch.isnan(y[7])
    assert y[8] == float("inf") and y[9] == 0.0
    # 10 mantissa bits survive: the low 13 bits of every result are zero
    z = round_tf32(torch.randn(1000))
    assert (z.view(torch.int32) & 0x1FFF).eq(0).all()


@triton.jit
def _round_tf32_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, round_tf32_rne(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_kernel_rounding_is_the_reference_rounding(device):
    """The kernels' ``round_tf32_rne`` and the reference's ``round_tf32`` agree bit for bit
    (ties, signs, subnormals, inf, NaN, overflow), so emulated operands are the same."""
    x = torch.cat([torch.randn(900), torch.randn(50) * 1e-39, torch.tensor(
        [1 + 2 ** -11, 1 + 3 * 2 ** -11, -1 - 2 ** -11, 3.4028235e38, -3.4028235e38,
         float("inf"), float("-inf"), float("nan"), 0.0, -0.0])])
    # exact ties in the random part too: values whose low 13 bits are 0x1000
    x[:100] = (x[:100].view(torch.int32) & ~0x1FFF | 0x1000).view(torch.float32)
    x = x.to(device)
    y = poison(torch.empty_like(x))
    _round_tf32_kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    want = round_tf32(x)
    assert torch.equal(y.view(torch.int32)[~want.isnan()], want.view(torch.int32)[~want.isnan()])
    assert y.isnan().eq(want.isnan()).all()


def test_matmul_reference_modes_on_exact_operands():
    """Operands already TF32 (bf16) values: tf32 and tf32x3 (bf16) equal ieee exactly."""
    a = round_tf32(torch.randn(40, 70)).to(torch.bfloat16).float()
    b = round_tf32(torch.randn(70, 30)).to(torch.bfloat16).float()
    ieee = matmul(a, b, "ieee")
    for mode in MODES:
        assert torch.allclose(matmul(a, b, mode), ieee, rtol=0, atol=1e-5), mode


def test_bad_precision_is_named(device):
    G = torch.randn(10, 20, device=device)
    P = torch.randn(10, 3, device=device)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match=r"precision must be one of .*'tf32x3'.* 'fp8'"):
            ops.project(G, P, precision="fp8", backend=backend)
    with pytest.raises(ValueError, match="precision must be one of"):
        matmul(G, P.t(), "tf32x2")
    from lowrank_fused.kernels._common import dot_mode

    with pytest.raises(ValueError, match="precision must be one of .*'tf32x3'"):
        dot_mode("fp8", torch.device("cpu"))
    from lowrank_fused import GaLoreAdamW

    w = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises(ValueError, match="matmul_precision must be .*'tf32x3', got 'fp8'"):
        GaLoreAdamW([w], matmul_precision="fp8")
    GaLoreAdamW([w], matmul_precision="tf32x3")


def test_default_precision_follows_torch_and_device():
    """``matmul_precision=None``: torch's "highest" (the default) is tf32x3 for CUDA
    parameters and ieee for CPU ones; "high" and "medium" are tf32 and bf16 everywhere; a
    fixed ``matmul_precision`` wins."""
    from lowrank_fused import GaLoreAdamW

    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = GaLoreAdamW([w])
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    old = torch.get_float32_matmul_precision()
    try:
        got = {}
        for setting in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(setting)
            got[setting] = (opt.precision(cuda), opt.precision(cpu))
    finally:
        torch.set_float32_matmul_precision(old)
    assert got == {"highest": ("tf32x3", "ieee"), "high": ("tf32", "tf32"),
                   "medium": ("bf16", "bf16")}
    assert GaLoreAdamW([w], matmul_precision="ieee").precision(cuda) == "ieee"
