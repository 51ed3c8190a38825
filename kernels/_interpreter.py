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

``install()`` also memoizes what each interpreted op recomputes about its result's type (the
shape tuples, element counts and names of ``block_type`` and ``tensor``, by the values they
depend on) and lets the interpreter's broadcast return two blocks of one shape as they are:
about a third of an interpreted op's time went to building those objects (``_cache_types``).

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
_TYPE_ORIGINALS = {}              # "block_type"/"tensor" -> its own __init__ (see _cache_types)


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
    _cache_types(interp)
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
    ``math`` and ``core`` at every launch: about 0.6 ms each). A launch meets a namespace in
    more than one state (``tensor`` again after its own patch has added members), so the list
    is kept per module and namespace size, taken the first time that state is seen, and
    retaken when a module's namespace has a size not seen before; True when the interpreter
    has that function."""
    import inspect

    original = getattr(interp, "_patch_builtin", None)
    patch_attr = getattr(interp, "_patch_attr", None)
    is_builtin = getattr(getattr(getattr(interp, "tl", None), "core", None), "is_builtin", None)
    if original is None or patch_attr is None or is_builtin is None:
        return False
    cache = {}

    def patch_builtin(pkg, builder, scope):
        key = (id(pkg), len(vars(pkg)))
        entry = cache.get(key)
        if entry is None or entry[0] is not pkg:
            members = [(name, member) for name, member in inspect.getmembers(pkg)
                       if is_builtin(member)]
            entry = cache[key] = (pkg, members)
        for name, member in entry[1]:
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


def _cache_types(interp) -> bool:
    """Memoize what every interpreted op recomputes about its result's type, by the values it
    depends on alone (about a third of an interpreted op's time):

    - ``block_type(element_ty, shape)``: its shape (a ``tl.tuple``), element count and name, by
      the element type's name and the shape's integers (scalar and pointer element types);
    - ``tensor(handle, type)``: its shape (a ``tl.tuple`` of ``constexpr``) and element count,
      by the type's shape (``dtype`` is still ``type.scalar``, the handle and type its own);
    - the interpreter's ``broadcast_impl_value`` returns two blocks of one shape as they are
      (what its general path ends with for them, after building and comparing shape tuples).

    The memoized values are immutable in use (nothing in the language assigns into a shape).
    Each cache is installed only when a first construction sets exactly the attributes it
    restores (checked here on a sample), so a Triton whose classes have another shape keeps
    its own; True when all three are installed."""
    import builtins

    core = getattr(getattr(interp, "tl", None), "core", None)
    semantic = getattr(interp, "interpreter_semantic", None)
    block_type = getattr(core, "block_type", None)
    tensor = getattr(core, "tensor", None)
    constexpr = getattr(core, "constexpr", None)
    if None in (block_type, tensor, constexpr, semantic) or \
            getattr(type(semantic), "broadcast_impl_value", None) is None:
        return False
    installed = 0
    _TYPE_ORIGINALS.update(block_type=block_type.__init__, tensor=tensor.__init__)

    # block types of scalar and pointer element types: name, shape tuple, element count
    named = (core.dtype, core.pointer_type)
    sequences = (list, core.tuple)     # what the language accepts as a shape (its own tuple)
    original_bt = block_type.__init__
    sample = block_type(core.float32, [2, 4])
    if set(vars(sample)) == {"element_ty", "shape", "numel", "name"}:
        bt_cache = {}

        def bt_init(self, element_ty, shape):
            key = None
            if element_ty.__class__ in named and shape.__class__ in sequences:
                try:
                    key = (element_ty.name, builtins.tuple(
                        s.value if s.__class__ is constexpr else s for s in shape))
                    hit = bt_cache.get(key)
                except TypeError:           # a shape that is not a sequence of hashables
                    key = hit = None
                if hit is not None:
                    self.element_ty = element_ty
                    self.shape, self.numel, self.name = hit
                    return
            original_bt(self, element_ty, shape)
            if key is not None:
                bt_cache[key] = (self.shape, self.numel, self.name)

        block_type.__init__ = bt_init
        installed += 1

    # tensors: shape tuple of constexpr and element count by the type's shape
    original_t = tensor.__init__
    probe = tensor(None, block_type(core.float32, [2, 4]))
    if set(vars(probe)) == {"handle", "shape", "numel", "type", "dtype"}:
        t_cache = {}

        def t_init(self, handle, type):
            is_block = type.is_block()
            try:
                key = builtins.tuple(type.shape) if is_block else ()
                hit = t_cache.get(key)
            except TypeError:
                key = hit = None
            if hit is not None:
                self.handle = handle
                self.type = type
                self.dtype = type.scalar
                self.shape, self.numel = hit
                return
            original_t(self, handle, type)
            if key is not None:
                t_cache[key] = (self.shape, self.numel)

        tensor.__init__ = t_init
        installed += 1

    # broadcasting two blocks of one shape: nothing to do
    if not isinstance(getattr(sample.shape, "values", None), list):
        return False
    general = type(semantic).broadcast_impl_value

    def broadcast_impl_value(lhs, rhs):
        lt, rt = lhs.type, rhs.type
        if lt.__class__ is block_type and rt.__class__ is block_type and \
                lt.shape.values == rt.shape.values:
            return lhs, rhs
        return general(semantic, lhs, rhs)

    semantic.broadcast_impl_value = broadcast_impl_value
    installed += 1
    return installed == 3


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
