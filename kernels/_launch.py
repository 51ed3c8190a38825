"""A planned kernel launch: the grid, the compile options and the arguments fixed when an
optimizer's plan is made, launched every step without Triton's per-call host work.

``kernel[grid](*args, **meta)`` goes through ``JITFunction.run`` on every call: it binds the
arguments, computes their specialisation (dtypes, alignments, integer properties), builds the
cache key and looks the compiled kernel up before the CUDA launch. That is 9-16 us of Python
per launch on a CPU like the CI machine's (``bench/bench_triton_launch.py``), and a step of
some methods makes 20-40 of them. A bound call of the step engine launches the same kernel
with the same arguments every step, so the lookup's answer cannot change: ``PlannedLaunch``
makes the first launch through ``JITFunction.run`` and keeps the compiled kernel; at the
second call it binds the arguments once more (``JITFunction``'s own binder), and from then on
calls the compiled kernel's launcher directly with those values (what ``JITFunction.run``
itself ends with). A launch made only once (a plan that lives one step) pays nothing extra.

It takes that shortcut only when the answer is provably the same: every argument the same
object as the first call's (a tensor whose storage is not swapped in place by ``set_``: the
plans' tensors are their own), or a tensor with the same address and dtype (the step's
gradient at the planned address, a different tensor object), or an equal number; the current CUDA
device the one it compiled for; and a Triton whose ``JITFunction`` it knows (3.x: the
``device_caches`` binder, ``CompiledKernel.run``). Anything else takes ``JITFunction.run``
again (and the new launch becomes the kept one). Launch hooks (``knobs.runtime``'s
``launch_enter_hook``/``launch_exit_hook``, as profilers set them) are passed as
``JITFunction.run`` passes them. A direct launch that raises sends that launch and every later
one of the call through ``JITFunction.run``, with one warning; ``LOWRANK_FUSED_DIRECT_LAUNCH=0``
sends every launch there. Under the interpreter every call is ``kernel[grid](...)``.

``tests/test_planned_launch.py`` checks, without a GPU (the kernels compiled for sm_90 and the
CUDA launch call replaced by a recorder), that the direct launches hand the launcher exactly
the arguments ``JITFunction.run`` hands it, under the installed Triton and the GPU machines'.
"""
import operator
import os
import warnings

import torch

from ._common import interpreting

# LOWRANK_FUSED_DIRECT_LAUNCH=0: every planned launch through JITFunction.run (for debugging a
# Triton whose launch path differs from the one checked here)
_ENABLED = os.environ.get("LOWRANK_FUSED_DIRECT_LAUNCH", "1") not in ("0", "")
_WARNED = []


# > 0 while a planned launch goes through ``JITFunction.run`` (or the interpreter): lets a
# recorder of launches (bench/bench_triton_launch.py) tell planned launches from the others
_THROUGH_RUN = [0]


def in_planned_launch() -> bool:
    return _THROUGH_RUN[0] > 0


class PlannedLaunch:
    """``launch(*args)`` = ``kernel[grid](*args, **meta)``, the host work after the first call
    skipped while the arguments stay what they were (see the module docstring)."""

    __slots__ = ("kernel", "grid", "meta", "_args", "_fast", "_compiled", "_misses", "_plain")

    # after this many calls in a row whose arguments could not take the direct path, the
    # launch stops preparing it (a call site whose arguments change every call)
    MAX_MISSES = 2

    def __init__(self, kernel, grid, meta):
        self.kernel, self.grid, self.meta = kernel, tuple(grid), dict(meta)
        self._args = None
        self._fast = None
        self._compiled = None     # the last ordinary launch's kernel, until a second call
        self._misses = 0
        # an interpreted kernel (or a stand-in without JITFunction's caches): every call is
        # an ordinary launch, decided once
        self._plain = (not _ENABLED or interpreting()
                       or not hasattr(kernel, "device_caches"))

    def __call__(self, *args):
        if self._plain:
            self._ordinary(args)
            return
        fast = self._fast
        if fast is None and self._compiled is not None:
            # a second call: the direct path prepared now (a launch made once, as by a plan
            # that lives one step, never pays for it)
            fast = self._fast = _Direct.make(self.kernel, self._compiled, self.grid,
                                             self._args, self.meta)
            self._compiled = None
            if fast is None:                 # a Triton whose internals are not known here
                self._plain = True
        if fast is not None:
            if all(map(operator.is_, args, self._args)):
                values = fast.values
            else:                            # e.g. this step's gradient, at the planned address
                values = fast.rebind(args)
                if values is not None:
                    self._args, fast.values = args, values
            if values is not None:
                try:
                    launched = fast.launch(values)
                except Exception as e:       # noqa: BLE001  (a launcher it does not know)
                    self._give_up(e)
                    launched = False
                if launched:
                    self._misses = 0
                    return
            self._misses += 1
            self._fast = None
        compiled = self._ordinary(args)
        self._args = args
        if self._misses >= self.MAX_MISSES:
            self._plain = True
        else:
            self._compiled = compiled

    def _give_up(self, error):
        """The direct launch raised before launching (an argument its launcher rejects): this
        launch goes through ``JITFunction.run`` from now on, with a warning once per process."""
        self._plain = True
        if not _WARNED:
            _WARNED.append(error)
            warnings.warn(f"lowrank_fused: a planned Triton launch of {self.kernel} failed on "
                          f"its direct path ({type(error).__name__}: {error}); it and any "
                          f"other that fails go through JITFunction.run",
                          RuntimeWarning, stacklevel=3)

    def _ordinary(self, args):
        _THROUGH_RUN[0] += 1
        try:
            return self.kernel[self.grid](*args, **self.meta)
        finally:
            _THROUGH_RUN[0] -= 1


class _Direct:
    """The compiled kernel and its bound argument values, launched through its launcher."""

    __slots__ = ("compiled", "values", "positions", "grid", "device", "get_device",
                 "get_stream", "knobs")

    @classmethod
    def make(cls, jit_fn, compiled, grid, args, meta):
        """None where this Triton's internals are not the ones known here (then every call
        takes ``JITFunction.run``)."""
        try:
            from triton import knobs
            from triton.runtime import driver

            if compiled is None or not callable(getattr(compiled, "run", None)):
                return None
            get_device = driver.active.get_current_device
            device = get_device()
            binder = jit_fn.device_caches[device][4]
            bound, _, _ = binder(*args, **meta)
            values = list(bound.values())
            if len(values) < len(args) or any(v is not a for v, a in zip(values, args)):
                return None                  # positional arguments not first, in order
            self = cls()
            self.compiled, self.values, self.grid = compiled, values, grid
            self.positions = range(len(args))
            self.device, self.get_device = device, get_device
            self.get_stream = driver.active.get_current_stream
            self.knobs = knobs.runtime
            return self
        except Exception:                    # an unknown Triton: the slow path, correct
            return None

    def rebind(self, args):
        """The bound values with ``args`` in place of the first call's, or None when one of
        them could specialise differently."""
        values = list(self.values)
        for i, a, b in zip(self.positions, args, values):
            if a is b:
                continue
            if isinstance(a, torch.Tensor):
                if not (isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                        and a.dtype == b.dtype):
                    return None
            elif type(a) is not type(b) or a != b:
                return None
            values[i] = a
        return values

    def launch(self, values) -> bool:
        if self.get_device() != self.device:
            return False
        stream = self.get_stream(self.device)
        c, grid, knobs = self.compiled, self.grid, self.knobs
        enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
        metadata = c.launch_metadata(grid, stream, *values) if enter is not None else None
        c.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
              c.function, c.packed_metadata, metadata, enter, leave, *values)
        return True


def launch_planned(owner, kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)`` as a ``PlannedLaunch`` kept on ``owner`` (a bound call
    object) per (kernel, grid, meta): for call sites whose compile options take a few values
    (an alignment, a precision's tiles), each combination planned once."""
    cache = owner.__dict__.get("_planned_launches")
    if cache is None:
        cache = owner.__dict__["_planned_launches"] = {}
    key = (kernel, grid, tuple(meta.items()))
    launch = cache.get(key)
    if launch is None:
        launch = cache[key] = PlannedLaunch(kernel, grid, meta)
    launch(*args)
