"""The CUDA sources compile for Hopper (sm_90a) wherever nvcc exists, GPU or not, and a built
extension has its CUDA kernels whenever nvcc was there to build them."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lowrank_fused import _ext

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))


def find_nvcc():
    """nvcc as setup.py looks for it: CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda/bin."""
    candidates = [Path(os.environ[v]) / "bin" / "nvcc"
                  for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if shutil.which("nvcc"):
        candidates.append(Path(shutil.which("nvcc")))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, "
                                                     "PATH, /usr/local/cuda/bin)")


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files in {CSRC / 'cuda'}"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_cuda_source_compiles_for_sm90a(cu, tmp_path):
    cmd = [NVCC, "-arch=sm_90a", "-std=c++17", "-O3", "--fmad=false", f"-I{CSRC}",
           "-DLOWRANK_FUSED_WITH_CUDA", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0


@needs_nvcc
def test_built_extension_has_cuda():
    if os.environ.get("LOWRANK_FUSED_NO_CUDA", "").strip().lower() not in ("", "0", "false",
                                                                            "no", "off"):
        pytest.skip("LOWRANK_FUSED_NO_CUDA is set: the build leaves CUDA out on purpose")
    mod = _ext.load()
    if mod is None:
        pytest.skip(_ext.why_no_cpu())
    info = mod.build_info()
    if "LOWRANK_FUSED_NO_CUDA" in str(info.get("no_cuda_reason")):
        pytest.skip(f"lowrank_fused._C was {info['no_cuda_reason']}")
    assert mod.has_cuda(), (f"nvcc is at {NVCC} but lowrank_fused._C was "
                            f"{info.get('no_cuda_reason')}: rebuild (`make build`)")
    assert info["cuda"] and info["cuda_archs"]


def test_extension_does_not_link_libcuda():
    """Only the static CUDA runtime: no libcuda.so / libcudart.so in the module's NEEDED."""
    mod = _ext.load()
    if mod is None:
        pytest.skip(_ext.why_no_cpu())
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    out = subprocess.run([readelf, "-d", mod.__file__], capture_output=True, text=True,
                         check=True).stdout
    needed = [line for line in out.splitlines() if "(NEEDED)" in line]
    assert needed
    assert not [line for line in needed if "libcuda" in line or "libtorch" in line
                or "libc10" in line], "\n".join(needed)
