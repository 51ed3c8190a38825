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
    """``dispatch.AUTO_ON_CPU``: the batched small Cholesky runs the C++ twin under ``auto``
    on the CPU (with or without the interpreter); every other op keeps the reference there."""
    for interp in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        want = "cpu" if dispatch.available("cpu", "cpu") else "reference"
        assert choose_backend("auto", "cpu", ("small_cholesky_inverse",)) == want
        assert choose_backend("auto", "cpu", ("adamw_step",)) == (
            "triton" if interp == "1" else "reference")


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
