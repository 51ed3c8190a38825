"""Every Triton kernel, in every variant its launcher can choose, compiles for sm_90
(``GPUTarget("cuda", 90, 32)``, no GPU needed) and ``ptxas -v`` reports no register spills,
under two Tritons: the installed one (3.9 here) and ``GPU_TRITON`` (3.6, what the GPU
machines and torch 2.11's CUDA wheels run), each with its own bundled ptxas. Register
allocation differs between the two, so a tile that fits under one can spill under the other.

This is what the CPU interpreter cannot check: GPU-only rules (``tl.dot`` dims >= 16),
layouts, shared-memory pipelining, and API drift between Triton versions. The compiles run in
subprocesses without ``TRITON_INTERPRET``; ``GPU_TRITON`` is installed from the package index
on first use into a cache folder (``aot.triton_dir``) and put first on their ``PYTHONPATH``.
Without it (no network) its half is skipped, with pip's reason."""
import os
import pkgutil

import pytest
import triton

from lowrank_fused.testing.aot import (GPU_TRITON, KERNEL_MODULES, all_variants, ensure_triton,
                                       find_ptxas, run_compile, triton_dir)

NAMES = [v.name for v in all_variants()]
INSTALLED = triton.__version__
TRITONS = ("installed", "gpu_triton")  # not "gpu": conftest skips that keyword on CPU


@pytest.fixture(scope="module")
def installed_report():
    """The installed Triton's compiles: one process per core (at most 4)."""
    return run_compile()


@pytest.fixture(scope="module")
def gpu_triton_report():
    """The same compiles under Triton ``GPU_TRITON``."""
    if INSTALLED == GPU_TRITON:
        pytest.skip(f"the installed Triton is {GPU_TRITON}: checked by the 'installed' items")
    where, reason = ensure_triton(GPU_TRITON)
    if where is None:
        pytest.skip(f"Triton {GPU_TRITON} not available: {reason}")
    return run_compile(where, GPU_TRITON)


def test_every_kernel_module_is_covered():
    import lowrank_fused.kernels as k

    mods = {m.name for m in pkgutil.iter_modules(k.__path__) if not m.name.startswith("_")}
    assert mods == set(KERNEL_MODULES), "add new kernel modules to aot.KERNEL_MODULES"


@pytest.mark.parametrize("which", TRITONS)
def test_compiles_with_the_expected_triton(which, request):
    """The compile processes ran the Triton they were given, with that Triton's own ptxas,
    and compiled every variant."""
    report = request.getfixturevalue(f"{which}_report")
    if which == "gpu_triton":
        assert report["triton"] == GPU_TRITON
        assert report["triton_file"].startswith(triton_dir(GPU_TRITON) + os.sep), report
        assert report["ptxas"].startswith(triton_dir(GPU_TRITON) + os.sep), report
    else:
        assert (report["triton"], report["triton_file"]) == (INSTALLED, triton.__file__)
    assert sorted(report["variants"]) == sorted(NAMES)


@pytest.mark.parametrize("which", TRITONS)
@pytest.mark.parametrize("name", NAMES)
def test_compiles_for_sm90_without_spills(name, which, request):
    rec = request.getfixturevalue(f"{which}_report")["variants"][name]
    assert rec["ok"], rec.get("error")
    assert rec["target_ok"] and rec["cubin"]
    if "regs" not in rec:
        pytest.skip("ptxas not found (neither Triton's bundled one nor the CUDA toolkit's)")
    assert rec["regs"] <= 255
    assert rec["spill_stores"] == 0 and rec["spill_loads"] == 0, rec


def test_ptxas_is_available():
    assert find_ptxas() is not None, "ptxas missing: the spill check above cannot run"
