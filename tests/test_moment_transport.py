"""K8 moment transport (docs/methods/adaptive_adamw.md A4, docs/methods/ldadam.md lines 4 + 6):
the Triton ops (kernels/moment_transport.py) vs their eager references (lowrank_fused/reference/
moment_transport.py, moment_transport_linear.py, ldadam_moment_transport.py) on fresh random
inputs: orthonormal bases from QR of randn, M = randn, V = randn^2; odd shapes, r_new != r_old,
ranks 1 .. min(m, n), fp32 and bf16 moments. Every output is compared everywhere, so an
unwritten element (NaN in a poisoned output, garbage in a new one) fails."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, poison, tolerance

TRANSPORTS = ("moment_transport", "moment_transport_linear")
# (m, n, r_new, r_old): n in {1, 33, 130}, ranks 1 .. min(m, n), both directions of a change
CASES = [(37, 1, 1, 1), (37, 1, 5, 1), (37, 1, 1, 5), (37, 33, 33, 33), (37, 33, 16, 32),
         (256, 33, 5, 16), (256, 33, 32, 32), (256, 130, 32, 5), (300, 130, 130, 130),
         (300, 130, 1, 32), (300, 33, 33, 16)]
LDADAM_CASES = [(37, 1, 1), (37, 33, 5), (256, 33, 32), (256, 130, 16), (300, 130, 130)]
BC1, BC2 = 1 - 0.9 ** 3, 1 - 0.999 ** 3


def orthonormal(m, r, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))[0].float() \
        .to(device)


def moments(r, n, device, seed, dtype=torch.float32, n_v=None):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(r, n, generator=g)
    V = torch.randn(r, n if n_v is None else n_v, generator=g) ** 2
    return M.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)


def check_transport(op, P_new, P_old, M, V, **kw):
    want = lookup(op, "reference")(P_new, P_old, M, V)
    got = lookup(op, "triton")(P_new, P_old, M, V, **kw)
    for name, a, b in zip(("M", "V"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        assert_parity(a, b, rtol=tolerance(b.dtype), name=f"{op} {name}")
    return got


def run_ldadam(backend, P_new, P_old, M, V, M_tr, **kw):
    """Copies of the mutated tensors (same strides) after one call; M must stay untouched."""
    V = torch.empty_strided(V.shape, V.stride(), dtype=V.dtype, device=V.device).copy_(V)
    M_tr = poison(torch.empty_strided(M_tr.shape, M_tr.stride(), dtype=M_tr.dtype,
                                      device=M_tr.device))
    M0 = M.clone()
    lookup("ldadam_moment_transport", backend)(P_new, P_old, M, V, M_tr, bc1=BC1, bc2=BC2, **kw)
    assert torch.equal(M, M0), "M must be left untouched"
    return M_tr, V


def check_ldadam(P_new, P_old, M, V, M_tr=None, precision="ieee", **kw):
    M_tr = torch.empty_like(M) if M_tr is None else M_tr
    want = run_ldadam("reference", P_new, P_old, M, V, M_tr)
    got = run_ldadam("triton", P_new, P_old, M, V, M_tr, precision=precision, **kw)
    for name, a, b in zip(("M_tr", "V"), got, want):
        assert a.dtype == b.dtype
        assert_parity(a, b, rtol=tolerance(b.dtype, precision=precision), name=name)
    assert (got[1] >= 0).all()
    return got


@pytest.mark.parametrize("case", CASES, ids=[f"{m}x{n}-r{a}<-r{b}" for m, n, a, b in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", TRANSPORTS)
def test_transport_matches_reference(op, case, dtype, device):
    m, n, r_new, r_old = case
    P_new = orthonormal(m, r_new, device, seed=r_new)
    P_old = orthonormal(m, r_old, device, seed=100 + r_old)
    M, V = moments(r_old, n, device, seed=m + n, dtype=dtype)
    M_new, V_new = check_transport(op, P_new, P_old, M, V)
    if op == "moment_transport":
        assert (V_new >= 0).all()          # invariant 9: C*C keeps V non-negative


@pytest.mark.parametrize("case", LDADAM_CASES, ids=[f"{m}x{n}-r{r}" for m, n, r in LDADAM_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ldadam_transport_matches_reference(case, dtype, device):
    m, n, r = case
    P_new = orthonormal(m, r, device, seed=r)
    P_old = orthonormal(m, r, device, seed=100 + r)
    M, V = moments(r, n, device, seed=m + n, dtype=dtype)
    check_ldadam(P_new, P_old, M, V)


def test_ldadam_variance_part_can_be_negative_abs_is_applied(device):
    """V/bc2 - M^2/bc1^2 < 0 (a small V under a large M): the result is the abs of the
    transported sum, as in the reference, not a clamp."""
    m, r, n = 64, 8, 40
    P_new, P_old = orthonormal(m, r, device, 1), orthonormal(m, r, device, 2)
    M, V = moments(r, n, device, seed=3)
    V = V * 1e-3
    check_ldadam(P_new, P_old, M, V)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_ldadam_reduced_precision(precision, device):
    P_new, P_old = orthonormal(130, 17, device, 1), orthonormal(130, 17, device, 2)
    M, V = moments(17, 130, device, seed=5)
    check_ldadam(P_new, P_old, M, V, precision=precision)


def test_narrow_bases_and_half_moments(device):
    """faithful_dtypes: bf16 bases; fp16 moments; a fp32/bf16 basis pair (cast to fp32)."""
    m, n, r = 97, 41, 9
    Pn, Po = orthonormal(m, r, device, 1), orthonormal(m, r + 4, device, 2)
    for pn, po, dt in ((Pn.bfloat16(), Po.bfloat16(), torch.bfloat16),
                       (Pn, Po.bfloat16(), torch.float32), (Pn.bfloat16(), Po, torch.float32),
                       (Pn, Po, torch.float16)):
        M, V = moments(r + 4, n, device, seed=7, dtype=dt)
        for op in TRANSPORTS:
            check_transport(op, pn, po, M, V)
    M, V = moments(r, n, device, seed=8, dtype=torch.bfloat16)
    Po = orthonormal(m, r, device, 2)
    check_ldadam(Pn.bfloat16(), Po.bfloat16(), M, V)


def test_moments_with_different_column_counts(device):
    """AdaMeM transports its r x 1 row statistics as V next to the r x n momentum."""
    m, n, r_new, r_old = 120, 77, 6, 9
    P_new, P_old = orthonormal(m, r_new, device, 1), orthonormal(m, r_old, device, 2)
    M, V = moments(r_old, n, device, seed=3, n_v=1)
    for op in TRANSPORTS:
        check_transport(op, P_new, P_old, M, V)
    M, V = moments(r_old, 1, device, seed=4, n_v=70)
    check_transport("moment_transport", P_new, P_old, M, V)


def test_non_contiguous_inputs(device):
    """The right form's transposed views (Q^T bases, M^T, V^T), a column slice, and LDAdam's
    in-place V and M_tr as transposed views."""
    m, n, r_new, r_old = 150, 57, 12, 7
    t = lambda x: x.t().contiguous().t()    # noqa: E731  same values, transposed strides
    P_new, P_old = t(orthonormal(m, r_new, device, 1)), t(orthonormal(m, r_old, device, 2))
    M, V = moments(r_old, n, device, seed=3)
    wide = torch.randn(r_old, n + 9, device=device)[:, 4:4 + n]
    wide.copy_(M)
    for op in TRANSPORTS:
        check_transport(op, P_new, P_old, wide, t(V))
    P_old = t(orthonormal(m, r_new, device, 2))
    M, V = moments(r_new, n, device, seed=4)
    check_ldadam(P_new, P_old, t(M), t(V), M_tr=t(torch.empty_like(M)))


def test_small_tiles_many_programs(device):
    """GPU-like tiling on the interpreter: many r_new tiles and column slabs (LDAdam's new V
    then goes through a temporary, since programs of a slab read rows others write)."""
    import importlib

    mod = importlib.import_module("lowrank_fused.kernels.moment_transport")
    cfg = mod.TransportConfig(16, 16, 16, 4, 1)
    m, n, r = 90, 45, 37
    P_new, P_old = orthonormal(m, r, device, 1), orthonormal(m, r - 3, device, 2)
    M, V = moments(r - 3, n, device, seed=3)
    for op in TRANSPORTS:
        check_transport(op, P_new, P_old, M, V, config=cfg)
    P_old = orthonormal(m, r, device, 2)
    M, V = moments(r, n, device, seed=4)
    check_ldadam(P_new, P_old, M, V, config=cfg)


def test_ldadam_output_aliasing_momentum(device):
    """M_tr may be M itself (the reference computes before it writes): the same result."""
    m, n, r = 80, 30, 40
    P_new, P_old = orthonormal(m, r, device, 1), orthonormal(m, r, device, 2)
    M, V = moments(r, n, device, seed=3)
    want_M, want_V = M.clone(), V.clone()
    lookup("ldadam_moment_transport", "reference")(P_new, P_old, want_M, want_V, want_M,
                                                   bc1=BC1, bc2=BC2)
    lookup("ldadam_moment_transport", "triton")(P_new, P_old, M, V, M, bc1=BC1, bc2=BC2)
    assert_parity(M, want_M, rtol=tolerance(torch.float32), name="M_tr = M")
    assert_parity(V, want_V, rtol=tolerance(torch.float32), name="V")


def test_matmul_precision_setting_is_honoured(device):
    """No precision argument (the reference's signature): torch's fp32 matmul setting picks
    the operand precision, as it does for the reference's matmuls."""
    P_new, P_old = orthonormal(64, 16, device, 1), orthonormal(64, 16, device, 2)
    M, V = moments(16, 40, device, seed=3)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = lookup("moment_transport", "triton")(P_new, P_old, M, V)
    finally:
        torch.set_float32_matmul_precision(old)
    want = lookup("moment_transport", "reference")(P_new, P_old, M, V)
    for a, b in zip(got, want):
        assert_parity(a, b, rtol=tolerance(torch.float32, precision="bf16"))


@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (20, 0, 3, 5), (20, 4, 0, 5), (20, 4, 3, 0)],
                         ids=["m0", "n0", "rnew0", "rold0"])
def test_empty(shape, device):
    m, n, r_new, r_old = shape
    P_new = torch.randn(m, r_new, device=device)
    P_old = torch.randn(m, r_old, device=device)
    M, V = moments(r_old, n, device, seed=1)
    for op in TRANSPORTS:
        want = lookup(op, "reference")(P_new, P_old, M, V)
        got = lookup(op, "triton")(P_new, P_old, M, V)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.equal(a, b)
    if m * n * r_new:       # LDAdam keeps its rank: no empty case with r_old = 0 alone
        return
    P_old = torch.randn(m, r_new, device=device)
    M, V = moments(r_new, n, device, seed=2)
    want = run_ldadam("reference", P_new, P_old, M, V, torch.empty_like(M))
    got = run_ldadam("triton", P_new, P_old, M, V, torch.empty_like(M))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", TRANSPORTS + ("ldadam_moment_transport",))
@pytest.mark.parametrize("bad,match", [
    ("P_old_rows", "P_old must have P_new's 40 rows"), ("M_rows", "M must have r_old"),
    ("V_rows", "V must have r_old"), ("M_1d", "M must be a matrix"),
    ("V_int", "V must be float32"), ("P_new_list", "P_new must be a torch.Tensor")])
def test_bad_input_names_the_argument(op, bad, match, device):
    m, n, r = 40, 20, 6
    args = dict(P_new=orthonormal(m, r, device, 1), P_old=orthonormal(m, r, device, 2),
                M=torch.randn(r, n, device=device), V=torch.rand(r, n, device=device))
    if bad == "P_old_rows":
        args["P_old"] = orthonormal(m + 1, r, device, 2)
    elif bad == "M_rows":
        args["M"] = torch.randn(r + 1, n, device=device)
    elif bad == "V_rows":
        args["V"] = torch.rand(r - 1, n, device=device)
    elif bad == "M_1d":
        args["M"] = torch.randn(r * n, device=device)
    elif bad == "V_int":
        args["V"] = torch.ones(r, n, dtype=torch.int32, device=device)
    elif bad == "P_new_list":
        args["P_new"] = args["P_new"].tolist()
    fn = lookup(op, "triton")
    with pytest.raises((ValueError, TypeError), match=match):
        if op == "ldadam_moment_transport":
            fn(**args, M_tr=torch.empty(r, n, device=device), bc1=BC1, bc2=BC2)
        else:
            fn(**args)


def test_ldadam_bad_shapes(device):
    m, n, r = 40, 20, 6
    Pn, Po = orthonormal(m, r, device, 1), orthonormal(m, r, device, 2)
    M, V = torch.randn(r, n, device=device), torch.rand(r, n, device=device)
    fn = lookup("ldadam_moment_transport", "triton")
    with pytest.raises(ValueError, match="M_tr must have M's shape"):
        fn(Pn, Po, M, V, torch.empty(r, n + 1, device=device), bc1=BC1, bc2=BC2)
    with pytest.raises(ValueError, match="V must have M's shape"):
        fn(Pn, Po, M, torch.rand(r, n - 1, device=device), torch.empty_like(M), bc1=BC1, bc2=BC2)
    with pytest.raises(ValueError, match="P_new must have r_old"):
        fn(orthonormal(m, r + 2, device, 3), Po, M, V, torch.empty(r + 2, n, device=device),
           bc1=BC1, bc2=BC2)
