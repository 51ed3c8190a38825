"""Lazy loader of the compiled extension ``lowrank_fused._C`` (built from ``csrc/``).

Nothing here runs at ``import lowrank_fused``: the module is imported on the first ``load()``
(the dispatch table calls ``why_no_cpu``/``why_no_cuda`` only when the "cpu" or "cuda"
backend is asked for). A failed import is remembered, never raised; the ``why_*`` functions
say, in words, why a backend cannot run.
"""
from __future__ import annotations

import importlib
import threading

_lock = threading.Lock()
_tried = False
_module = None
_error: str | None = None
_cuda_status: str | None = None  # cached _C.cuda_runtime_status()


def load():
    """The extension module, or None when it cannot be imported (see ``why_no_cpu``)."""
    global _tried, _module, _error
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                _module = importlib.import_module("lowrank_fused._C")
            except Exception as exc:  # ImportError, or an OSError from the dynamic loader
                _module = None
                _error = f"{type(exc).__name__}: {exc}"
            _tried = True
    return _module


def load_error() -> str | None:
    """Why the import failed, None if it has not failed."""
    load()
    return _error


def why_no_cpu() -> str | None:
    """None if the extension (and so its CPU twins) loaded, else the reason."""
    if load() is not None:
        return None
    return (f"lowrank_fused._C is not built: run `make build` "
            f"(or `pip install --no-build-isolation -e .`); importing it failed with {_error}")


def _arch_matches(archs: str, major: int, minor: int) -> bool:
    """Whether code built for ``archs`` ("90a", "80,90", ...) runs on capability major.minor.

    "90a" (architecture-specific) runs only on 9.0; a plain "80" has SASS for 8.x (x >= 0) and
    PTX that the driver compiles for anything newer.
    """
    cap = major * 10 + minor
    for arch in archs.replace(";", ",").split(","):
        arch = arch.strip().lower()
        if arch.startswith(("sm_", "compute_")):
            arch = arch.split("_", 1)[1]
        digits = "".join(ch for ch in arch if ch.isdigit())
        if not digits:
            continue
        num = int(digits)
        if arch.endswith("a"):
            if cap == num:
                return True
        elif arch.endswith("f"):
            if major == num // 10 and cap >= num:
                return True
        elif cap >= num:
            return True
    return False


def why_no_cuda() -> str | None:
    """None if the CUDA kernels can run here, else the reason.

    Needs: the extension built with CUDA, ``torch.cuda.is_available()``, the CUDA runtime
    linked into the extension seeing a device, and the current device's architecture among
    those compiled.
    """
    global _cuda_status
    mod = load()
    if mod is None:
        return why_no_cpu()
    if not mod.has_cuda():
        info = mod.build_info()
        reason = info.get("no_cuda_reason") or "built without CUDA"
        return (f"lowrank_fused._C was {reason}; to get the CUDA kernels rebuild "
                f"(`make build`) with nvcc available and LOWRANK_FUSED_NO_CUDA unset")
    import torch

    if not torch.cuda.is_available():
        return ("torch.cuda.is_available() is False (no GPU, no driver, or a CPU-only torch "
                f"{torch.__version__})")
    if _cuda_status is None:
        _cuda_status = mod.cuda_runtime_status()
    if _cuda_status != "ok":
        return f"the CUDA runtime linked into lowrank_fused._C does not work: {_cuda_status}"
    archs = mod.build_info().get("cuda_archs", "")
    major, minor = torch.cuda.get_device_capability()
    if archs and not _arch_matches(archs, major, minor):
        return (f"lowrank_fused._C was compiled for CUDA architectures {archs}, which cannot "
                f"run on this GPU (sm_{major}{minor}); rebuild with "
                f"LOWRANK_FUSED_CUDA_ARCHS={major}{minor}")
    return None
