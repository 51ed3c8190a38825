"""One table: op name -> {backend -> implementation}.

Backends:
  reference  eager PyTorch (``lowrank_fused/reference``), any device; the oracle.
  triton     Triton kernels (``lowrank_fused.kernels``); CUDA tensors, or CPU tensors
             under ``TRITON_INTERPRET=1`` (slow, for testing).
  cuda       the compiled extension's CUDA kernels (``csrc/cuda``); CUDA tensors.
  cpu        the compiled extension's CPU twins (``csrc/cpu``); CPU tensors.

``resolve_backend`` turns the user's choice (``"auto"`` or an explicit name) into one backend
for a device. An explicit backend that cannot run there raises; nothing falls back silently.
Implementations register themselves lazily: the first lookup imports the backend's module,
so importing ``lowrank_fused`` never imports Triton or loads the extension.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")
CHOICES = ("auto",) + BACKENDS

# backend -> module whose import registers that backend's implementations
_PROVIDERS = {
    "reference": "lowrank_fused.reference",
    "triton": "lowrank_fused.kernels",
    "cuda": "lowrank_fused._ext_ops",
    "cpu": "lowrank_fused._ext_ops",
}
_VERSION = [0]      # bumped by every change of the table or the guards: the cache key


class _Impls(dict):
    """One op's {backend: implementation}; a change invalidates ``implementation``'s cache
    (tests wrap entries with ``monkeypatch.setitem``, which goes through here)."""

    def __setitem__(self, key, value):
        _VERSION[0] += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _VERSION[0] += 1
        super().__delitem__(key)

    def pop(self, *args):
        _VERSION[0] += 1
        return super().pop(*args)


class _Table(dict):
    def __missing__(self, op):
        raise KeyError(op)

    def setdefault(self, op, default=None):
        if op not in self:
            _VERSION[0] += 1
            super().__setitem__(op, _Impls(default or {}))
        return self[op]

    def __setitem__(self, op, impls):
        _VERSION[0] += 1
        super().__setitem__(op, _Impls(impls))

    def pop(self, *args):
        _VERSION[0] += 1
        return super().pop(*args)


_TABLE: Dict[str, Dict[str, Callable]] = _Table()
# (op, backend, device, interpreting, version) -> implementation
_IMPL_CACHE: Dict[tuple, Callable] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (not built, wrong device, ...)."""


class AutoBackend(str):
    """``"auto"`` bound to a device. Optimizers hand it to their ops: ``lookup`` resolves it
    per op, so an op with a fused kernel on that device runs fused while an op without one
    (yet) runs its reference."""

    def __new__(cls, device):
        obj = super().__new__(cls, "auto")
        obj.device = torch.device(device)
        return obj


def register(op: str, backend: str):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _TABLE.setdefault(op, {})[backend] = fn
        return fn

    return deco


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _why_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            return None if interpreting() else (
                "Triton kernels need a CUDA device; on CPU set TRITON_INTERPRET=1 before "
                "importing lowrank_fused (slow, for testing)")
        return f"Triton has no support for device type {device.type!r}"
    from lowrank_fused import _ext  # local: loads the extension only when asked

    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend needs CUDA tensors, got device {device}"
        return _ext.why_no_cuda()
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend needs CPU tensors, got device {device}"
        return _ext.why_no_cpu()
    raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")


def available(backend: str, device) -> bool:
    return _why_unavailable(backend, torch.device(device)) is None


# Ops whose compiled CPU twin ``auto`` takes on the CPU when the extension is built (every
# other op keeps the reference there; without the extension everything does), each because it
# is faster (bench/bench_adamw_cpu.py measures them side by side):
#   small_cholesky_inverse: a batch of small factorizations is dominated by torch's per-matrix
#     call overhead (LAPACK per matrix plus a triangular solve), which the C++ loop does not
#     have (~3.5x on 16 x 40 x 40);
#   adamw_step, adamw_step_multi, adam_moments, adam_moments_multi: one vectorised,
#     multi-threaded pass over the buffers instead of ~10 eager ops, each a full read and
#     write of a temporary (2x on a 4K-element tensor, ~40x at 16M elements).
# The twins take float32 and bfloat16 storage only: a call they do not take (e.g. float16) runs
# the reference under ``auto`` (``register_auto_guard``); an explicit ``backend="cpu"`` raises.
AUTO_ON_CPU = frozenset({"small_cholesky_inverse", "adamw_step", "adamw_step_multi",
                         "adam_moments", "adam_moments_multi"})

# (op, backend) -> predicate(*args, **kwargs): whether that backend's implementation takes the
# call's arguments; ``auto`` runs the reference for the calls it does not take.
_AUTO_GUARDS: Dict[tuple, Callable] = {}
_GUARDED: Dict[tuple, Callable] = {}


def register_auto_guard(op: str, backend: str):
    """Decorator: ``fn(*args, **kwargs) -> bool`` says whether ``backend``'s implementation of
    ``op`` takes a call; under ``auto`` a call it does not take runs the reference instead."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _AUTO_GUARDS[(op, backend)] = fn
        _GUARDED.pop((op, backend), None)
        _VERSION[0] += 1
        return fn

    return deco


def _auto_candidates(device: torch.device, ops=()):
    """Backends ``auto`` tries on ``device`` for ``ops``, fastest first."""
    if device.type == "cuda":
        return ("triton", "cuda", "reference")
    twin = ("cpu",) if ops and all(op in AUTO_ON_CPU for op in ops) else ()
    if device.type == "cpu" and interpreting():
        return ("triton",) + twin + ("reference",)
    return twin + ("reference",)


def resolve_backend(backend: str, device) -> str:
    """Pick the backend for tensors on ``device``.

    ``auto``: Triton on CUDA devices (and on CPU under ``TRITON_INTERPRET=1``), else the
    eager reference (per op, ``choose_backend`` may take a CPU twin, ``AUTO_ON_CPU``). An explicit backend that cannot run on ``device`` raises
    ``BackendUnavailable`` naming the reason.
    """
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        for cand in _auto_candidates(device):
            if available(cand, device):
                return cand
        return "reference"
    why = _why_unavailable(backend, device)
    if why is not None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable on {device}: {why}")
    return backend


def choose_backend(backend: str, device, ops=()) -> str:
    """The one backend that runs all of ``ops`` on ``device``.

    ``auto``: the fastest backend that can run on the device *and* implements every op in
    ``ops`` (a method whose ops have no fused kernel yet runs on the reference). An explicit
    backend raises ``BackendUnavailable`` if it cannot run there or lacks one of the ops.
    """
    device = torch.device(device)
    if backend == "auto":
        for cand in _auto_candidates(device, ops):
            if available(cand, device) and all(_has(op, cand) for op in ops):
                return cand
        return "reference"
    backend = resolve_backend(backend, device)
    for op in ops:
        lookup(op, backend)
    return backend


def implementation(op: str, backend: str, device) -> Callable:
    """The implementation of ``op`` that ``backend`` (possibly ``auto``) runs on ``device``.
    Under ``auto``, an implementation with a guard (``register_auto_guard``) comes wrapped:
    the calls it does not take run the reference. Resolved once per (op, backend, device)
    and cached until the table changes (or ``TRITON_INTERPRET`` does)."""
    key = (op, str(backend), device, interpreting(), _VERSION[0])
    impl = _IMPL_CACHE.get(key)
    if impl is None:
        impl = _IMPL_CACHE[key] = _implementation(op, backend, device)
        if len(_IMPL_CACHE) > 4096:            # old versions' entries
            _IMPL_CACHE.clear()
            _IMPL_CACHE[key] = impl
    return impl


def _implementation(op: str, backend: str, device) -> Callable:
    chosen = choose_backend(backend, device, (op,))
    impl = lookup(op, chosen)
    if backend != "auto" or chosen == "reference" or (op, chosen) not in _AUTO_GUARDS:
        return impl
    key = (op, chosen)
    wrapped = _GUARDED.get(key)
    if wrapped is None:
        takes = _AUTO_GUARDS[key]

        def wrapped(*args, **kwargs):
            which = chosen if takes(*args, **kwargs) else "reference"
            return lookup(op, which)(*args, **kwargs)

        wrapped.__name__ = f"{op}_auto_{chosen}_or_reference"
        _GUARDED[key] = wrapped
    return wrapped


def resolve_call(op: str, backend: str, device, *args, **kwargs):
    """``(backend name, implementation)`` that a call of ``op`` with these arguments runs on
    ``device``: ``implementation``'s choice with the ``auto`` guard evaluated once, here, for
    these arguments (a bound call keeps the answer for the tensors it was bound to)."""
    device = torch.device(device)
    chosen = choose_backend(backend, device, (op,))
    if backend == "auto" and chosen != "reference":
        takes = _AUTO_GUARDS.get((op, chosen))
        if takes is not None and not takes(*args, **kwargs):
            chosen = "reference"
    return chosen, lookup(op, chosen)


def _has(op: str, backend: str) -> bool:
    try:
        lookup(op, backend)
    except BackendUnavailable:
        return False
    except ImportError:
        return False
    return True


def lookup(op: str, backend: str) -> Callable:
    """The implementation of ``op`` for ``backend``: a resolved name, or an ``AutoBackend``
    (resolved per op for its device)."""
    if backend == "auto":
        device = getattr(backend, "device", None)
        if device is None:
            raise ValueError("lookup(op, 'auto') needs a device: use implementation(op, 'auto', "
                             "device) or an AutoBackend")
        return implementation(op, "auto", device)
    if backend not in _TABLE.get(op, {}):
        importlib.import_module(_PROVIDERS[backend])
    impls = _TABLE.get(op, {})
    if backend not in impls:
        have = sorted(impls) or ["none"]
        raise BackendUnavailable(
            f"op {op!r} has no {backend!r} implementation (it has: {', '.join(have)})")
    return impls[backend]


def implementations(op: str) -> Dict[str, Callable]:
    """All registered implementations of ``op`` (imports every importable provider)."""
    for mod in set(_PROVIDERS.values()):
        try:
            importlib.import_module(mod)
        except Exception:
            pass
    return dict(_TABLE.get(op, {}))
