"""Refresh failures and degenerate gradients: an SVD that raises or returns non-finite values
falls back (randomized SVD, else the previous basis, else a fixed one) with one
RefreshFallbackWarning naming the parameter; zero and rank-deficient gradients keep a valid
orthonormal basis; no NaN ever reaches weights or state."""
import warnings

import pytest
import torch

import lowrank_fused.subspace as subspace
from lowrank_fused.linalg import RefreshFallbackWarning, canonical_svd_basis
from lowrank_fused.routing import METHODS

from _methods import backward, model, optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

BASIS_KEYS = ("basis", "P", "basis", "L")
# the methods whose refresh calls torch.linalg.svd / svdvals on the gradient (and the options
# that make it so)
SVD_METHODS = [("galore", {}), ("adaptive_adamw", {}), ("gha", {}), ("galore_kfac", {}),
               ("adamem", {}), ("ldadam", {"proj_method": "svd"}), ("ldadam", {})]


def bases(opt):
    return {(i, k): v for i, st in enumerate(opt.state[p] for g in opt.param_groups
                                            for p in g["params"])
            for k, v in st.items() if k in BASIS_KEYS and torch.is_tensor(v)}


def assert_healthy(net, opt, what):
    for name, p in net.named_parameters():
        assert torch.isfinite(p).all(), f"{what}: weight {name} is not finite"
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all(), f"{what}: state {k} is not finite"
    found = bases(opt)
    for (i, k), B in found.items():
        B = B.double()
        gram = B.t() @ B if B.shape[0] >= B.shape[1] else B @ B.t()
        err = (gram - torch.eye(gram.shape[0], dtype=gram.dtype)).abs().max().item()
        assert err < 1e-5, f"{what}: basis {k} of parameter {i} is not orthonormal ({err:.1e})"
    return found


def _failing(real, mode):
    """torch.linalg.svd / svdvals stand-in that fails on the gradient-sized inputs (>= 32
    rows and columns: every projected matrix here) and works on small ones."""
    def f(A, *args, **kwargs):
        if A.shape[-1] >= 32 and A.shape[-2] >= 32:
            if mode == "raise":
                raise torch.linalg.LinAlgError("forced failure to converge")
            out = real(A, *args, **kwargs)
            if torch.is_tensor(out):
                return torch.full_like(out, float("nan"))
            return tuple(torch.full_like(t, float("nan")) for t in out)
        return real(A, *args, **kwargs)
    return f


def _steps(net, opt, ts):
    for t in ts:
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["raise", "nan"])
@pytest.mark.parametrize("method,kw", SVD_METHODS, ids=[m + ("-svd" if k else "")
                                                        for m, k in SVD_METHODS])
def test_failed_svd_falls_back_with_a_warning_naming_the_parameter(method, kw, mode,
                                                                   monkeypatch):
    net = model()
    opt = optimizer(net, method, **kw)
    monkeypatch.setattr(torch.linalg, "svd", _failing(torch.linalg.svd, mode))
    monkeypatch.setattr(torch.linalg, "svdvals", _failing(torch.linalg.svdvals, mode))
    with pytest.warns(RefreshFallbackWarning, match=r"'model\.layers\.0\.[a-z_.]+weight'"):
        _steps(net, opt, range(5))                 # crosses refreshes at steps 0, 2, 4
    assert_healthy(net, opt, f"{method} {mode}")


def test_fallback_basis_captures_the_top_subspace():
    """The randomized fallback is not a placeholder: on a decaying spectrum it spans the
    same top-r subspace as the exact SVD."""
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))[0]
    G = (U[:, :80] * 0.7 ** torch.arange(80.0, dtype=torch.float64) @ V.t()).float()
    exact = canonical_svd_basis(G, 6, "left")
    real = torch.linalg.svd
    try:
        torch.linalg.svd = _failing(real, "raise")
        with pytest.warns(RefreshFallbackWarning, match="randomized SVD"):
            fb = canonical_svd_basis(G, 6, "left", label="'w'")
    finally:
        torch.linalg.svd = real
    assert torch.allclose(fb.t() @ exact, torch.eye(6), atol=1e-4)   # same vectors, same signs


@pytest.mark.parametrize("method", ["galore", "adamem"])
def test_everything_failing_keeps_the_previous_basis(method, monkeypatch):
    net = model()
    opt = optimizer(net, method)
    _steps(net, opt, range(2))                      # first refresh worked
    before = {k: v.clone() for k, v in bases(opt).items()}

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("forced")
    monkeypatch.setattr(torch.linalg, "svd", broken)
    monkeypatch.setattr(subspace, "randomized_svd", broken)
    with pytest.warns(RefreshFallbackWarning, match="previous basis"):
        _steps(net, opt, range(2, 3))               # step 2 refreshes
    after = assert_healthy(net, opt, method)
    for k, B in before.items():
        assert torch.allclose(after[k], B, atol=1e-6), f"{method}: basis {k} changed"


def test_everything_failing_at_the_first_refresh_gives_a_fixed_orthonormal_basis(monkeypatch):
    net = model()
    opt = optimizer(net, "galore")

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("forced")
    monkeypatch.setattr(torch.linalg, "svd", broken)
    monkeypatch.setattr(subspace, "randomized_svd", broken)
    with pytest.warns(RefreshFallbackWarning, match="fixed orthonormal basis"):
        _steps(net, opt, range(1))
    assert_healthy(net, opt, "galore first refresh")


def _degenerate(net, kind):
    for p in net.parameters():
        if kind == "zero":
            p.grad.zero_()
        elif p.dim() == 2:                          # 2 nonzero rows and columns < rank 4
            keep = torch.zeros_like(p.grad)
            keep[:2, :2] = 1
            p.grad.mul_(keep)


@pytest.mark.parametrize("kind", ["zero", "two_rows"])
@pytest.mark.parametrize("method", METHODS)
def test_degenerate_gradients_keep_valid_bases(method, kind):
    net = model()
    opt = optimizer(net, method)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RefreshFallbackWarning)   # no failure to fall back from
        for t in range(5):
            backward(net, t)
            if t in (0, 2):                         # a first refresh and a later one
                _degenerate(net, kind)
            opt.step()
            opt.zero_grad(set_to_none=True)
    found = assert_healthy(net, opt, f"{method} {kind}")
    assert found or method in ("adamw", "adafactor")


def test_ldadam_power_iteration_overflow_keeps_the_basis(monkeypatch):
    """A non-finite power iteration (overflow of the momentum mix) keeps the previous basis,
    chosen on the device, and warns once per step naming the parameter. The explicit form
    keeps the per-matrix power-iteration op this test poisons (the engine's batched power
    iteration has the same guard: tests/test_optim_ldadam_engine.py)."""
    import lowrank_fused.optim.ldadam as ldadam_mod

    net = model()
    opt = optimizer(net, "ldadam", form="explicit")
    _steps(net, opt, range(2))
    before = {k: v.clone() for k, v in bases(opt).items()}
    real = ldadam_mod.lookup

    def poisoned(op, backend):
        fn = real(op, backend)
        if op != "ldadam_power_iteration":
            return fn

        def run(A, P_old, M, Y, **kw):
            fn(A, P_old, M, Y, **kw)
            Y[0, 0] = float("inf")
        return run
    monkeypatch.setattr(ldadam_mod, "lookup", poisoned)
    with pytest.warns(RefreshFallbackWarning, match=r"'model\.layers\.0\..*power iteration"):
        _steps(net, opt, range(2, 3))
    after = assert_healthy(net, opt, "ldadam")
    for k, B in before.items():
        assert torch.equal(after[k], B), f"basis {k} changed"
