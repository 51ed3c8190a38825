"""K2 low-rank moment update: Triton vs the eager reference."""
import pytest
import torch

from lowrank_fused import ops
from lowrank_fused.testing import assert_parity, poison, tolerance

from _skip import backends as skip_backends, check_bad_skips, check_skip

SHAPES = [(8, 203), (97, 40), (1, 1), (33, 1025)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("eps_mode", ["hf", "torch"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("step", [1, 7])
def test_adam_moments_matches_reference(shape, eps_mode, state_dtype, step, device):
    R = torch.randn(shape, device=device)
    M0 = (0.1 * torch.randn(shape, device=device)).to(state_dtype)
    V0 = (0.01 * torch.rand(shape, device=device) + 1e-4).to(state_dtype)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-6, step=step, eps_mode=eps_mode)
    M1, V1, N1 = M0.clone(), V0.clone(), torch.empty_like(M0)
    ops.adam_moments(R, M1, V1, N1, backend="reference", **kw)
    M2, V2, N2 = M0.clone(), V0.clone(), poison(torch.empty_like(M0))
    ops.adam_moments(R, M2, V2, N2, backend="triton", **kw)
    tol = tolerance(state_dtype)
    assert_parity(M2, M1, rtol=tol, name="M")
    assert_parity(V2, V1, rtol=tol, name="V")
    assert_parity(N2, N1, rtol=tol, name="N")


@pytest.mark.parametrize("shape", SHAPES + [(64, 700)], ids=str)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_moments_sumsq_side_output(shape, state_dtype, device):
    """``sumsq`` receives sum(N^2) of the stored N (the limiter's norm,
    docs/methods/adaptive_adamw.md) from the kernel's own pass: against ``(N.float()**2).sum()`` of
    the kernel's N (fp32 sums in another order: 1e-5; (64, 700) spans 44 programs, so the partial
    sums are added), and the reference's side output against the same formula."""
    R = torch.randn(shape, device=device)
    M0 = (0.1 * torch.randn(shape, device=device)).to(state_dtype)
    V0 = (0.01 * torch.rand(shape, device=device) + 1e-4).to(state_dtype)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-6, step=3, eps_mode="hf")
    for backend in ("reference", "triton"):
        M, V, N = M0.clone(), V0.clone(), poison(torch.empty_like(M0))
        sumsq = poison(torch.empty(1, device=device))
        ops.adam_moments(R, M, V, N, sumsq=sumsq, backend=backend, **kw)
        assert_parity(sumsq, (N.float() ** 2).sum().reshape(1), rtol=1e-5,
                      name=f"sumsq ({backend})")
        M2, V2, N2 = M0.clone(), V0.clone(), torch.empty_like(M0)
        ops.adam_moments(R, M2, V2, N2, backend=backend, **kw)
        assert torch.equal(N2, N) and torch.equal(M2, M) and torch.equal(V2, V), \
            f"{backend}: sumsq changed the moments or N"


def test_adam_moments_sumsq_non_contiguous_and_checked(device):
    R = torch.randn(40, 30, device=device).t()
    M, V = torch.randn(40, 30, device=device).t(), torch.rand(40, 30, device=device).t()
    N = poison(torch.empty(40, 30, device=device)).t()
    sumsq = poison(torch.empty((), device=device))        # a 0-dim buffer is one element too
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, step=2, eps_mode="torch")
    ops.adam_moments(R, M, V, N, sumsq=sumsq, backend="triton", **kw)
    assert_parity(sumsq, (N.float() ** 2).sum(), rtol=1e-5, name="sumsq")
    for bad in (torch.zeros(2, device=device), torch.zeros(1, device=device,
                                                           dtype=torch.float64)):
        with pytest.raises(TypeError, match="sumsq must be a 1-element float32"):
            ops.adam_moments(R, M, V, N, sumsq=bad, backend="reference", **kw)


def test_adam_moments_formula(device):
    """The reference itself against the formula of docs/conventions.md, written out in fp64."""
    R = torch.randn(5, 7, device=device, dtype=torch.float64)
    M, V = torch.randn(5, 7, device=device, dtype=torch.float64), torch.rand(5, 7, device=device, dtype=torch.float64)
    b1, b2, eps, t = 0.8, 0.95, 1e-3, 3
    m = b1 * M + (1 - b1) * R
    v = b2 * V + (1 - b2) * R * R
    hf = m / (v.sqrt() + eps)
    to = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    for mode, want in (("hf", hf), ("torch", to)):
        Mf, Vf, N = M.float(), V.float(), torch.empty(5, 7, device=device)
        ops.adam_moments(R.float(), Mf, Vf, N, beta1=b1, beta2=b2, eps=eps, step=t, eps_mode=mode,
                         backend="reference")
        assert_parity(N, want, rtol=1e-6, name=f"N ({mode})")


def test_adam_moments_non_contiguous(device):
    R = torch.randn(40, 30, device=device).t()
    M, V = torch.randn(40, 30, device=device).t(), torch.rand(40, 30, device=device).t()
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, step=2, eps_mode="torch")
    M1, V1, N1 = M.clone(), V.clone(), torch.empty(30, 40, device=device)
    ops.adam_moments(R, M1, V1, N1, backend="reference", **kw)
    N2 = poison(torch.empty(30, 40, device=device))
    ops.adam_moments(R, M, V, N2, backend="triton", **kw)
    assert_parity(M, M1, rtol=1e-5, name="M")
    assert_parity(N2, N1, rtol=1e-5, name="N")


def test_adam_moments_rejects_bad_input(device):
    R = torch.randn(3, 4, device=device)
    with pytest.raises(ValueError, match="M must have shape"):
        ops.adam_moments(R, torch.zeros(4, 3), R.clone(), R.clone(), beta1=0.9, beta2=0.9,
                         eps=1e-8, step=1, backend="reference")
    with pytest.raises(ValueError, match="eps_mode"):
        ops.adam_moments(R, R.clone(), R.clone(), R.clone(), beta1=0.9, beta2=0.9, eps=1e-8,
                         step=1, eps_mode="tf", backend="reference")
    with pytest.raises(ValueError, match="step must be >= 1"):
        ops.adam_moments(R, R.clone(), R.clone(), R.clone(), beta1=0.9, beta2=0.9, eps=1e-8,
                         step=0, eps_mode="torch", backend="reference")


# -- the on-device skip flag (ops.adam_moments(..., skip=...)) ---------------------------------

@pytest.mark.parametrize("backend", skip_backends("adam_moments"))
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_moments_skip_flag(backend, state_dtype, device):
    """skip=True: M, V, N and sumsq keep their prefilled bits, no host read; skip=False: the
    bits of a call without a flag. (37, 61): an odd size over several Triton programs; the
    transposed views take the backends' non-contiguous path (contiguous copies written
    back)."""
    R = torch.randn(37, 61, device=device)
    kw = dict(beta1=0.9, beta2=0.99, eps=1e-8, step=3, eps_mode="torch", backend=backend)

    def make():
        return [torch.randn(37, 61, device=device).to(state_dtype),
                torch.rand(37, 61, device=device).to(state_dtype),
                torch.randn(37, 61, device=device).to(state_dtype),
                torch.randn(1, device=device)]

    def run(out, skip):
        ops.adam_moments(R, *out[:3], sumsq=out[3], skip=skip, **kw)

    check_skip(make, run, device)

    def run_t(out, skip):
        ops.adam_moments(R.t(), *(t.t() for t in out[:3]), sumsq=out[3], skip=skip, **kw)

    check_skip(make, run_t, device)


def test_adam_moments_skip_rejects_bad_flags(device):
    R = torch.randn(3, 4, device=device)
    check_bad_skips(lambda skip: ops.adam_moments(
        R, R.clone(), R.clone(), R.clone(), beta1=0.9, beta2=0.9, eps=1e-8, step=1,
        backend="reference", skip=skip), device)
