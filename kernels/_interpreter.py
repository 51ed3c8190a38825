"""A faster Triton CPU interpreter (``TRITON_INTERPRET=1``) for kernels that call
``@triton.jit`` helpers.

The interpreter patches ``triton.language`` into its numpy implementation when a kernel is
launched (``GridExecutor.__call__`` -> ``_patch_lang``) and restores it when the launch ends.
But every call of a device function inside the kernel (``InterpretedFunction.__call__``)
patches the language again, although it is already patched: ``_patch_lang`` walks every member
of ``triton.language``, its ``tensor`` and ``math`` with ``inspect.getmembers`` (about 0.5 ms),
once per helper call, per program, per loop iteration. For a kernel whose inner loop calls a
helper (the small Cholesky's column loop, the tile loaders) that was most of the interpreted
time.

``install()`` makes a launch patch both language modules a helper can see
(``triton.language`` and ``triton.language.core``; the interpreter's own patch at a launch
takes only those in the kernel's module, and a helper holding the other patched it at each
call, never restoring it) and restore both when it ends, and makes the helper calls inside the
launch skip the patch: they run against exactly the patched language they would have patched
again. Outside a launch the interpreter's own ``_patch_lang`` runs as before.

``install()`` also turns off the interpreter's integer-overflow sanitizer
(``InterpreterOptions.sanitize_overflow``, on by default there) unless its ``debug`` option is
on: it widens every int32 add, subtract and multiply to int64 and builds the range check, about
a quarter of an interpreted step's time (offset arithmetic is most of a kernel's integer work),
and then drops the check (``device_assert`` is a no-op without ``debug``, which the interpreter
leaves off). A compiled kernel checks only when built with ``debug=True`` too; int32 wraps as on
the GPU either way.

``register_twin`` lets a kernel whose interpreted programs are a long loop of small tile
steps (the small Cholesky: a few thousand interpreted ops per program) launch a numpy
transcription of itself instead, batched over its programs and bit-identical to the
interpreted kernel (checked by that kernel's tests, which interpret the kernel itself inside
``interpreted_only()``).

Nothing changes on a GPU (the interpreter is not used there), and an interpreter of another
shape (a Triton version without these functions) is left alone.
"""
from __future__ import annotations

import threading

_STATE = threading.local()        # per thread: the languages the running launch patched
_TWINS = {}                       # a kernel's Python function -> its numpy twin (see below)
_TWINS_OFF = [0]                  # > 0: every launch interpreted (``interpreted_only``)
_LANGS = {}                       # function -> the language modules its globals hold
_installed = False
_original_patch = None            # the interpreter's own _patch_lang


def _languages(fn):
    """The ``triton.language`` modules in ``fn``'s globals (as ``_patch_lang`` finds them)."""
    langs = _LANGS.get(fn)
    if langs is None:
        import inspect

        import triton.language as tl

        langs = _LANGS[fn] = frozenset(
            id(v) for v in fn.__globals__.values()
            if inspect.ismodule(v) and v in (tl, tl.core))
    return langs


class _NoScope:
    """What a skipped patch returns: nothing to restore."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Install the shortcut into ``triton.runtime.interpreter`` (once). False when the
    interpreter does not have the expected shape (then it is left as it is)."""
    global _installed, _original_patch
    if _installed:
        return True
    try:
        import triton.runtime.interpreter as interp
    except Exception:
        return False
    grid_executor = getattr(interp, "GridExecutor", None)
    original_patch = getattr(interp, "_patch_lang", None)
    if grid_executor is None or original_patch is None or \
            getattr(interp, "InterpretedFunction", None) is None:
        return False
    original_launch = grid_executor.__call__
    _original_patch = original_patch
    no_scope = _NoScope()

    import types

    import triton.language as tl

    # the launch patches both language modules (a kernel's module usually holds only
    # ``triton.language``; the library's own helpers, ``tl.sum``'s combine functions, hold
    # ``triton.language.core``, which the interpreter would patch at their first call and
    # never restore), so every helper call inside it finds its language patched
    both = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})
    covered_by_both = frozenset((id(tl), id(tl.core)))

    def patch_lang(fn):
        covered = getattr(_STATE, "covered", None)
        if covered is not None and _languages(fn) <= covered:
            return no_scope           # inside a launch that patched these languages already
        if getattr(_STATE, "launching", False) and covered is None:
            scope = _original_patch(both)       # the launch's own patch, restored by it
            _STATE.covered = covered_by_both
            return scope
        return _original_patch(fn)

    def launch(self, *args, **kwargs):
        twin = _TWINS.get(self.fn) if _TWINS and not _TWINS_OFF[0] else None
        if twin is not None and not callable(self.grid):
            return twin(self.grid, *args, **kwargs)
        outer = (getattr(_STATE, "launching", False), getattr(_STATE, "covered", None))
        _STATE.launching, _STATE.covered = True, None
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            _STATE.launching, _STATE.covered = outer

    interp._patch_lang = patch_lang
    grid_executor.__call__ = launch
    _cache_builtins(interp)
    _cache_np_dtypes(interp)
    _overflow_check(interp)
    _installed = True
    return True


def register_twin(kernel, twin) -> None:
    """Run ``twin(grid, *args, **meta)`` instead of interpreting ``kernel`` (a ``@triton.jit``
    function) at its launches, unless ``LOWRANK_FUSED_INTERPRET_TWINS=0`` or inside
    ``interpreted_only()``. A twin is the kernel's numpy transcription, batched over the
    programs, op for op (the interpreter's own numpy ops, in the same order), so its outputs
    are the interpreted kernel's bit for bit; its module's tests interpret the kernel itself
    and compare the two on random and edge-case inputs. For kernels whose programs run a long
    loop of small register-tile steps (the interpreter's cost is per op and per program)."""
    import os

    if os.environ.get("LOWRANK_FUSED_INTERPRET_TWINS", "1") in ("0", ""):
        return
    # a launch runs the interpreter's rewrite of the function (``InterpretedFunction.rewrite``,
    # cached per function); both it and the function itself are keys
    _TWINS[getattr(kernel, "fn", kernel)] = twin
    rewrite = getattr(kernel, "rewrite", None)
    if callable(rewrite):
        _TWINS[rewrite()] = twin


class interpreted_only:
    """Within it every launch is interpreted, twins or not (their tests; traffic counts)."""

    def __enter__(self):
        _TWINS_OFF[0] += 1
        return self

    def __exit__(self, *exc):
        _TWINS_OFF[0] -= 1


def _cache_builtins(interp) -> bool:
    """Make the patch of a launch find each language module's builtins from a list made once
    (``_patch_builtin`` ran ``inspect.getmembers`` over ``triton.language``, its ``tensor``,
    ``math`` and ``core`` at every launch: about 0.6 ms each). The list is taken from the
    module as it is outside a launch (every builtin unpatched) and retaken if the module's
    namespace changes size; True when the interpreter has that function."""
    import inspect

    original = getattr(interp, "_patch_builtin", None)
    patch_attr = getattr(interp, "_patch_attr", None)
    is_builtin = getattr(getattr(getattr(interp, "tl", None), "core", None), "is_builtin", None)
    if original is None or patch_attr is None or is_builtin is None:
        return False
    cache = {}

    def patch_builtin(pkg, builder, scope):
        size = len(vars(pkg))
        entry = cache.get(id(pkg))
        if entry is None or entry[0] is not pkg or entry[1] != size:
            members = [(name, member) for name, member in inspect.getmembers(pkg)
                       if is_builtin(member)]
            entry = cache[id(pkg)] = (pkg, size, members)
        for name, member in entry[2]:
            patch_attr(pkg, name, member, builder, scope)

    interp._patch_builtin = patch_builtin
    return True


def _cache_np_dtypes(interp) -> bool:
    """Memoize ``_get_np_dtype`` (the numpy dtype of a Triton type: it built a dict of twenty
    entries at each of its calls, several per interpreted op) by the scalar type, which is all
    its answer depends on; True when the interpreter has that function."""
    import triton.language as tl

    original = getattr(interp, "_get_np_dtype", None)
    if original is None:
        return False
    cache = {}

    def get_np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        try:
            return cache[scalar]
        except KeyError:
            out = cache[scalar] = original(scalar)
            return out
        except TypeError:               # an unhashable type (pointers): as before
            return original(tt_dtype)

    interp._get_np_dtype = get_np_dtype
    return True


def _overflow_check(interp) -> bool:
    """The interpreter's integer-overflow sanitizer on exactly when its asserts are (its
    ``debug`` option); True when the options have that shape."""
    import dataclasses

    builder = getattr(interp, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not dataclasses.is_dataclass(options) or \
            not hasattr(options, "sanitize_overflow") or not hasattr(options, "debug"):
        return False
    on = bool(options.debug)
    if options.sanitize_overflow != on:
        builder.options = dataclasses.replace(options, sanitize_overflow=on)
    return True
