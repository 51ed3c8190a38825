"""The dispatch table: backend resolution, auto per op set, explicit backends never fall back."""
import pytest
import torch

from lowrank_fused import dispatch
from lowrank_fused.dispatch import BackendUnavailable, choose_backend, register, resolve_backend


@pytest.fixture
def reference_only_op():
    name = "_test_reference_only_op"
    register(name, "reference")(lambda x: x + 1)
    yield name
    dispatch._TABLE.pop(name, None)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", "cpu")


def test_auto_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", "cpu") == "triton"


def test_auto_on_cpu_takes_the_compiled_twin_only_for_its_listed_ops(monkeypatch):
    """``dispatch.AUTO_ON_CPU``: the ops with a faster C++ twin run it under ``auto`` on the
    CPU when the extension is built (after Triton under the interpreter, where Triton has the
    op); every other op keeps the reference there, and so does every op without the
    extension."""
    twin = "cpu" if dispatch.available("cpu", "cpu") else "reference"
    for interp in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        for op in ("adamw_step_multi", "adam_moments_multi"):
            assert choose_backend("auto", "cpu", (op,)) == twin, op
        for op in ("adamw_step", "small_cholesky_inverse"):
            assert choose_backend("auto", "cpu", (op,)) == (
                "triton" if interp == "1" else twin), op
        assert choose_backend("auto", "cpu", ("project",)) == (
            "triton" if interp == "1" else "reference")
    monkeypatch.setattr(dispatch, "_why_unavailable",
                        lambda b, d: "not built" if b == "cpu" else None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for op in sorted(dispatch.AUTO_ON_CPU):
        assert choose_backend("auto", "cpu", (op,)) == "reference", op


@pytest.mark.skipif(not dispatch.available("cpu", "cpu"), reason="extension not built")
def test_auto_runs_the_reference_for_calls_the_twin_does_not_take(monkeypatch):
    """float16 (which the compiled kernels do not store) and non-contiguous lists: ``auto``
    takes the reference for that call, while ``backend="cpu"`` raises as before."""
    from lowrank_fused import ops, ops_multi

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(0)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=2, weight_decay=0.1)
    W = torch.randn(33, 17, generator=gen).half()
    G = torch.randn(33, 17, generator=gen).half()
    states = [torch.zeros(33, 17, dtype=torch.half) for _ in range(4)]
    W0, W_ref = W.clone(), W.clone()
    ops.adamw_step(W, G, states[0], states[1], backend="auto", **kw)
    ops.adamw_step(W_ref, G, states[2], states[3], backend="reference", **kw)
    assert torch.equal(W, W_ref) and not torch.equal(W, W0)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.adamw_step(W, G, states[0], states[1], backend="cpu", **kw)
    Ws = [torch.randn(8, 6, generator=gen).t()]      # not contiguous
    Gs = [torch.randn(6, 8, generator=gen)]
    Ms, Vs = [torch.zeros(6, 8)], [torch.zeros(6, 8)]
    W0 = Ws[0].clone()
    ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, backend="auto", **kw)
    ref = [W0, Gs[0], torch.zeros(6, 8), torch.zeros(6, 8)]
    ops.adamw_step(*ref, backend="reference", **kw)
    assert torch.equal(Ws[0], ref[0]) and torch.equal(Ms[0], ref[2])
    with pytest.raises(ValueError, match="contiguous"):
        ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, backend="cpu", **kw)


def test_auto_takes_the_fastest_backend_that_has_every_op(reference_only_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("auto", "cpu", ("project", "adam_moments")) == "triton"
    assert choose_backend("auto", "cpu", ("project", reference_only_op)) == "reference"
    assert dispatch.implementation(reference_only_op, "auto", "cpu")(1) == 2


def test_explicit_backend_without_the_op_raises(reference_only_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match="has no 'triton' implementation"):
        choose_backend("triton", "cpu", (reference_only_op,))


def test_explicit_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        resolve_backend("cuda", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_is_triton():
    assert resolve_backend("auto", "cuda") == "triton"


def test_import_is_lazy():
    """Importing the package loads neither Triton nor the compiled extension."""
    import subprocess
    import sys

    code = ("import sys, lowrank_fused; "
            "print(any(m == 'triton' or m.startswith('triton.') for m in sys.modules), "
            "'lowrank_fused._C' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/")
    assert out.stdout.split() == ["False", "False"]


def test_auto_backend_resolves_per_op(reference_only_op, monkeypatch):
    """What optimizers hand to their ops under backend='auto': each op takes its fastest
    implementation on the device, so a method whose other ops have no kernel yet still runs
    its fused ops fused."""
    from lowrank_fused.dispatch import AutoBackend, lookup

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    auto = AutoBackend("cpu")
    assert auto == "auto"
    assert lookup("project", auto) is lookup("project", "triton")
    assert lookup(reference_only_op, auto) is lookup(reference_only_op, "reference")
    with pytest.raises(ValueError, match="needs a device"):
        lookup("project", "auto")
