"""Build and install lowrank_fused.

Installs the package ``lowrank_fused`` and, from the top-level folder ``kernels/``, its
subpackage ``lowrank_fused.kernels`` (the Triton kernels); ``bench`` and ``tests`` stay out.
The one compiled module, ``lowrank_fused._C``, is built from ``csrc/`` by CMake + Ninja in
``build/cmake-<python>-<cuda|nocuda>/`` (kept between builds, so rebuilds are incremental) and
copied to where setuptools wants it (the source tree for editable/inplace builds).

Environment:
  LOWRANK_FUSED_NO_CUDA=1          build without the CUDA kernels even if nvcc is present
  LOWRANK_FUSED_CUDA_ARCHS="90a"   CUDA architectures (CMake syntax, e.g. "90a;80")
  CUDA_HOME / CUDA_PATH            where to look for nvcc first (then PATH, /usr/local/cuda)
  CMAKE_BUILD_PARALLEL_LEVEL       parallel compile jobs (default: the machine's CPU count)

CUDA is compiled whenever nvcc is found; whether this machine has a GPU does not matter.
Needs cmake (>= 3.24) on PATH and the ``ninja`` and ``pybind11`` Python packages
(``pip install --no-build-isolation`` uses the ones already installed).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def find_nvcc():
    """(path to nvcc or None, why not)."""
    if _env_flag("LOWRANK_FUSED_NO_CUDA"):
        return None, "built without CUDA (LOWRANK_FUSED_NO_CUDA was set at build time)"
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c), None
    return None, ("built without CUDA (nvcc not found at build time: looked in CUDA_HOME, "
                  "CUDA_PATH, PATH and /usr/local/cuda/bin)")


def find_cmake():
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as cmake_pkg  # the `cmake` Python package, if installed
            cmake = str(Path(cmake_pkg.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            raise RuntimeError("building lowrank_fused._C needs cmake >= 3.24 on PATH "
                               "(or `pip install cmake`)") from None
    return cmake


def find_ninja():
    try:
        import ninja
    except ImportError:
        found = shutil.which("ninja")
        if found is None:
            raise RuntimeError("building lowrank_fused._C needs the `ninja` Python package "
                               "(`pip install ninja`)") from None
        return found
    return str(Path(ninja.BIN_DIR) / "ninja")


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """build_ext that configures and builds the CMake project, then copies the module."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        suffix = target.name[len(ext.name.rpartition(".")[2]):]  # ".cpython-311-...so"
        nvcc, no_cuda_reason = find_nvcc()
        archs = os.environ.get("LOWRANK_FUSED_CUDA_ARCHS", "").strip() or "90a"
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{sysconfig.get_platform()}"
        build_dir = ROOT / "build" / f"cmake-{tag}-{'cuda' if nvcc else 'nocuda'}"
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-S{ext.sourcedir}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={find_ninja()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLOWRANK_FUSED_EXT_SUFFIX={suffix}",
        ]
        if nvcc:
            args += ["-DLOWRANK_FUSED_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DLOWRANK_FUSED_CUDA_ARCHS={archs}"]
        else:
            args += ["-DLOWRANK_FUSED_CUDA=OFF", f"-DLOWRANK_FUSED_NO_CUDA_REASON={no_cuda_reason}"]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "").strip()
        if not jobs:  # build_ext -j N, else every CPU (2 on the CI machine)
            explicit = self.parallel if isinstance(self.parallel, int) and not isinstance(
                self.parallel, bool) and self.parallel > 0 else None
            jobs = explicit or os.cpu_count() or 1

        cmake = find_cmake()
        print(f"lowrank_fused: building _C in {build_dir} "
              f"({'CUDA ' + archs + ' with ' + nvcc if nvcc else no_cuda_reason}; {jobs} jobs)",
              flush=True)
        subprocess.run([cmake, *args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)

        built = build_dir / "out" / f"_C{suffix}"
        if not built.is_file():
            raise RuntimeError(f"CMake did not produce {built}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(built, tmp)
        shutil.copymode(built, tmp)
        os.replace(tmp, target)  # atomic: a process that has the old module loaded keeps it


packages = find_packages(include=["lowrank_fused", "lowrank_fused.*"])
if "lowrank_fused.kernels" not in packages:
    packages.append("lowrank_fused.kernels")

setup(
    name="lowrank_fused",
    version="0.1.0",
    description="Fused kernels for memory-efficient low-rank optimizers (GaLore-style)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"lowrank_fused.kernels": "kernels"},
    install_requires=["torch", "triton", "numpy"],
    ext_modules=[CMakeExtension("lowrank_fused._C", sourcedir=ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
