"""Measured memory traffic of the Triton kernels: the bytes every ``tl.load`` / ``tl.store``
requests, counted under the Triton interpreter (``TRITON_INTERPRET=1``).

    with TrafficCounter() as tc:          # optionally inside kernels._common.gpu_tiling()
        ops.project(G, P, R)
    for launch in tc.launches:            # one Launch per kernel launch, in order
        print(launch.kernel, launch.grid, launch.loaded, launch.stored)
        for t in launch.tensors:          # one TensorTraffic per distinct argument memory
            print(t.names, t.nbytes, t.loaded, t.stored, t.reads)

What is counted: every element an interpreted load or store moves with its mask on (masked-off
elements excluded), at the element size of the pointer's dtype. Each address is attributed to
the kernel argument tensor whose memory holds it (the smallest one when arguments overlap;
arguments that are the same memory, e.g. a launcher's dummy pointers, share one entry with all
their names). ``TensorTraffic.reads`` = bytes loaded / the tensor's bytes: 1.0 is a single
pass, 2.0 a tensor read twice (re-read by several programs). This is what the kernel asks of
the memory system, before caches: a GPU's L2 may serve a re-read. Atomic operations count as
a load and a store of their elements.

``TensorTraffic.window_loaded`` says which re-reads a GPU's L2 can serve by when they are
made: the bytes loaded with each element counted once per window of ``WINDOW_PROGRAMS``
consecutive programs in GPU launch order (the grid's first axis fastest; about one program per
SM runs at a time, and programs that run together share L2), for tensors larger than
``L2_RESIDENT`` (smaller ones stay in L2 whenever they are re-read). A K1 whose rank tiles
of one column slab are consecutive programs reads G from DRAM once however many rank tiles
there are; a re-read by programs far apart in the grid counts again.

With ``count_eager=True`` the counter also models the aten ops that run outside the kernels
(``eager_bytes`` / ``eager_ops``): each op's tensor inputs read once and outputs written once,
views and allocations free. That is a model of eager traffic, not a measurement.

How: the interpreter's builder performs every load and store through
``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (plain loads and stores
call these with an all-true mask), and every launch through ``GridExecutor.__call__``, which
converts the argument tensors to host tensors (``_init_args_hst``) and sets the grid
(``InterpreterBuilder.set_grid_dim``). These are wrapped while a counter is active. On first
use a canary kernel with a known count runs under the counter, so an interpreter whose API
moved raises ``RuntimeError`` instead of counting zero.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# programs that run side by side on an H100 (one per SM: a lower bound, so re-reads further
# apart count as DRAM), and the size up to which a tensor's re-reads are L2 hits however far
# apart (half an H100's L2); larger tensors' re-reads are tracked by window
WINDOW_PROGRAMS = 132
L2_RESIDENT = 25 << 20

# the interpreter hooks and their expected signatures (Triton 3.x)
_HOOKS = {
    "create_masked_load": ("self", "ptrs", "mask", "other", "cache_policy", "is_volatile"),
    "create_masked_store": ("self", "ptrs", "value", "mask", "cache_policy"),
    "set_grid_dim": None,
    "set_grid_idx": None,
}


@dataclass
class TensorTraffic:
    """One kernel argument's memory in one launch."""
    names: Tuple[str, ...]          # the argument names that pass this memory
    dtype: str
    shape: Tuple[int, ...]
    nbytes: int                     # numel x element size
    loaded: int = 0                 # bytes requested by loads
    stored: int = 0                 # bytes requested by stores
    touched: int = 0                # distinct bytes loaded or stored at least once
    # bytes loaded, each element counted once per window of ``WINDOW_PROGRAMS`` consecutive
    # programs in GPU launch order that loads it (programs that run side by side share L2);
    # None when not tracked (a tensor of at most ``L2_RESIDENT``, or a launch of more
    # than 64 windows)
    window_loaded: Optional[int] = None

    @property
    def name(self) -> str:
        return "/".join(self.names)

    @property
    def reads(self) -> float:
        """Bytes loaded per byte of the tensor (1.0: read once)."""
        return self.loaded / self.nbytes if self.nbytes else 0.0

    @property
    def writes(self) -> float:
        return self.stored / self.nbytes if self.nbytes else 0.0

    def as_dict(self) -> dict:
        return dict(names=list(self.names), dtype=self.dtype, shape=list(self.shape),
                    nbytes=self.nbytes, loaded=self.loaded, stored=self.stored,
                    touched=self.touched, reads=round(self.reads, 4),
                    writes=round(self.writes, 4), window_loaded=self.window_loaded)


@dataclass
class Launch:
    """One kernel launch: its name, grid and per-argument traffic."""
    kernel: str
    grid: Tuple[int, int, int] = (1, 1, 1)
    tensors: List[TensorTraffic] = field(default_factory=list)
    unattributed: int = 0           # bytes at addresses outside every argument tensor

    @property
    def loaded(self) -> int:
        return sum(t.loaded for t in self.tensors)

    @property
    def stored(self) -> int:
        return sum(t.stored for t in self.tensors)

    @property
    def requested(self) -> int:
        return self.loaded + self.stored + self.unattributed

    def tensor(self, name: str) -> TensorTraffic:
        """The entry whose names include the argument ``name``."""
        for t in self.tensors:
            if name in t.names:
                return t
        raise KeyError(f"launch of {self.kernel} has no tensor argument {name!r}; "
                       f"arguments: {[t.name for t in self.tensors]}")

    def rereads(self, threshold: float = 1.0 + 1e-9) -> List[TensorTraffic]:
        """The argument tensors loaded more than once over (bytes loaded > their size)."""
        return [t for t in self.tensors if t.reads > threshold]

    def as_dict(self) -> dict:
        return dict(kernel=self.kernel, grid=list(self.grid), loaded=self.loaded,
                    stored=self.stored, unattributed=self.unattributed,
                    tensors=[t.as_dict() for t in self.tensors])


class _Region:
    """The memory of one (set of aliasing) argument tensor(s) of a launch."""
    __slots__ = ("lo", "hi", "elsize", "traffic", "seen", "windows")

    def __init__(self, lo, hi, elsize, traffic):
        self.lo, self.hi, self.elsize, self.traffic = lo, hi, elsize, traffic
        self.seen = None            # bitmap of elements touched, made on first access
        # per element, a bit per window of programs that loaded it (tensors larger than
        # L2_RESIDENT only); False once a launch has more windows than bits
        self.windows = None if traffic.nbytes > L2_RESIDENT else False

    def _size(self):
        return (self.hi - self.lo + self.elsize - 1) // self.elsize

    def mark(self, addrs):
        if self.seen is None:
            self.seen = np.zeros(self._size(), bool)
        self.seen[(addrs - self.lo) // self.elsize] = True

    def mark_window(self, addrs, window):
        if self.windows is False:
            return
        if window >= 64:
            self.windows = False
            return
        if self.windows is None:
            self.windows = np.zeros(self._size(), np.uint64)
        self.windows[(addrs - self.lo) // self.elsize] |= np.uint64(1 << window)


class _ActiveLaunch:
    def __init__(self, launch: Launch, regions: List[_Region]):
        self.launch = launch
        # smallest region first: an address inside several overlapping arguments belongs to
        # the most specific one
        self.regions = sorted(regions, key=lambda r: r.hi - r.lo)

    def record(self, ptrs, mask, kind: str, window: int = 0):
        addrs = np.asarray(ptrs.data).astype(np.uint64, copy=False)
        if mask is not None:
            m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
            addrs = addrs[m]
        else:
            addrs = addrs.reshape(-1)
        if addrs.size == 0:
            return
        elsize = ptrs.get_element_ty().primitive_bitwidth // 8
        left = addrs
        for reg in self.regions:
            inside = (left >= reg.lo) & (left < reg.hi)
            count = int(np.count_nonzero(inside))
            if count == 0:
                continue
            hit = left[inside]
            reg.mark(hit)
            if kind == "load":
                reg.traffic.loaded += count * elsize
                reg.mark_window(hit, window)
            else:
                reg.traffic.stored += count * elsize
            left = left[~inside]
            if left.size == 0:
                return
        self.launch.unattributed += int(left.size) * elsize

    def finish(self):
        for reg in self.regions:
            if reg.seen is not None:
                reg.traffic.touched += int(np.count_nonzero(reg.seen)) * reg.elsize
            reg.seen = None
            if isinstance(reg.windows, np.ndarray):
                reg.traffic.window_loaded = \
                    int(np.bitwise_count(reg.windows).sum(dtype=np.int64)) * reg.elsize
            elif reg.windows is None:              # tracked, never loaded
                reg.traffic.window_loaded = 0
            reg.windows = None


def program_window(grid_idx, grid_dim) -> int:
    """The window of ``WINDOW_PROGRAMS`` consecutive programs, in GPU launch order (the
    first grid axis fastest), that the program at ``grid_idx`` falls in."""
    x, y, z = grid_idx
    nx, ny, _ = grid_dim
    return (x + nx * (y + ny * z)) // WINDOW_PROGRAMS


_STATE = {"counter": None, "launch": None, "installed": None, "verified": False}


def _interp():
    try:
        from triton.runtime import interpreter as interp
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        raise RuntimeError(f"traffic counting needs triton's interpreter: {exc}") from exc
    return interp


def _check_api(interp):
    import triton
    problems = []
    builder = getattr(interp, "InterpreterBuilder", None)
    executor = getattr(interp, "GridExecutor", None)
    if builder is None or executor is None:
        problems.append("InterpreterBuilder / GridExecutor missing")
    else:
        for name, params in _HOOKS.items():
            fn = getattr(builder, name, None)
            if fn is None:
                problems.append(f"InterpreterBuilder.{name} missing")
            elif params is not None and tuple(inspect.signature(fn).parameters) != params:
                problems.append(f"InterpreterBuilder.{name}{inspect.signature(fn)} is not "
                                f"({', '.join(params)})")
        for name in ("__call__", "_init_args_hst"):
            if not callable(getattr(executor, name, None)):
                problems.append(f"GridExecutor.{name} missing")
    if problems:
        raise RuntimeError(f"cannot count kernel traffic: triton {triton.__version__}'s "
                           f"interpreter API changed ({'; '.join(problems)})")


def _regions_of(arg_names, args_hst, kwargs_hst) -> Tuple[List[_Region], List[TensorTraffic]]:
    named = list(zip(arg_names, args_hst)) + list(kwargs_hst.items())
    by_range: Dict[Tuple[int, int], _Region] = {}
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        elsize = t.element_size()
        lo = t.data_ptr()
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
        hi = lo + span * elsize
        reg = by_range.get((lo, hi))
        if reg is None:
            traffic = TensorTraffic((name,), str(t.dtype).removeprefix("torch."),
                                    tuple(t.shape), t.numel() * elsize)
            by_range[(lo, hi)] = _Region(lo, hi, elsize, traffic)
        else:
            reg.traffic.names += (name,)
    regions = list(by_range.values())
    return regions, [r.traffic for r in regions]


def _install():
    """Wrap the interpreter's load, store, grid and launch entry points (once per process;
    the wrappers do nothing while no counter is active)."""
    if _STATE["installed"] is not None:
        return
    interp = _interp()
    _check_api(interp)
    B, E = interp.InterpreterBuilder, interp.GridExecutor
    orig = dict(load=B.create_masked_load, store=B.create_masked_store,
                grid=B.set_grid_dim, call=E.__call__, init=E._init_args_hst,
                rmw=getattr(B, "create_atomic_rmw", None),
                cas=getattr(B, "create_atomic_cas", None),
                dload=getattr(B, "create_descriptor_load", None),
                dstore=getattr(B, "create_descriptor_store", None))

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        active = _STATE["launch"]
        if active is not None:
            active.record(ptrs, mask, "load", program_window(self.grid_idx, self.grid_dim))
        return orig["load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        active = _STATE["launch"]
        if active is not None:
            active.record(ptrs, mask, "store")
        return orig["store"](self, ptrs, value, mask, cache_policy)

    def set_grid_dim(self, *dims):
        active = _STATE["launch"]
        if active is not None:
            active.launch.grid = tuple(int(d) for d in dims)
        return orig["grid"](self, *dims)

    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig["init"](self, args_dev, kwargs)
        active = _STATE["launch"]
        if active is not None and not active.regions:
            regions, tensors = _regions_of(self.arg_names, args_hst, kwargs_hst)
            active.regions = sorted(regions, key=lambda r: r.hi - r.lo)
            active.launch.tensors = tensors
        return args_hst, kwargs_hst

    def __call__(self, *args, **kwargs):
        counter = _STATE["counter"]
        if counter is None or _STATE["launch"] is not None:
            return orig["call"](self, *args, **kwargs)
        active = _ActiveLaunch(Launch(getattr(self.fn, "__name__", str(self.fn))), [])
        _STATE["launch"] = active
        try:
            return orig["call"](self, *args, **kwargs)
        finally:
            _STATE["launch"] = None
            active.finish()
            counter.launches.append(active.launch)

    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        active = _STATE["launch"]
        if active is not None:
            active.record(ptr, mask, "load", program_window(self.grid_idx, self.grid_dim))
            active.record(ptr, mask, "store")
        return orig["rmw"](self, rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        active = _STATE["launch"]
        if active is not None:
            active.record(ptr, None, "load", program_window(self.grid_idx, self.grid_dim))
            active.record(ptr, None, "store")
        return orig["cas"](self, ptr, cmp, val, sem, scope)

    def _uncounted(which):
        def fn(self, *args, **kwargs):
            if _STATE["launch"] is not None:
                raise NotImplementedError(f"traffic counting: tensor-descriptor {which}s are "
                                          f"not counted (kernel {_STATE['launch'].launch.kernel})")
            return orig["d" + which](self, *args, **kwargs)
        return fn

    B.create_masked_load = create_masked_load
    B.create_masked_store = create_masked_store
    B.set_grid_dim = set_grid_dim
    E._init_args_hst = _init_args_hst
    E.__call__ = __call__
    if orig["rmw"] is not None:
        B.create_atomic_rmw = create_atomic_rmw
    if orig["cas"] is not None:
        B.create_atomic_cas = create_atomic_cas
    if orig["dload"] is not None:
        B.create_descriptor_load = _uncounted("load")
    if orig["dstore"] is not None:
        B.create_descriptor_store = _uncounted("store")
    _STATE["installed"] = orig


def uninstall():
    """Put the interpreter's own methods back (tests; counters install them again on use)."""
    orig = _STATE["installed"]
    if orig is None or _STATE["counter"] is not None:
        return
    interp = _interp()
    B, E = interp.InterpreterBuilder, interp.GridExecutor
    B.create_masked_load, B.create_masked_store = orig["load"], orig["store"]
    B.set_grid_dim = orig["grid"]
    E.__call__, E._init_args_hst = orig["call"], orig["init"]
    for key, name in (("rmw", "create_atomic_rmw"), ("cas", "create_atomic_cas"),
                      ("dload", "create_descriptor_load"), ("dstore", "create_descriptor_store")):
        if orig[key] is not None:
            setattr(B, name, orig[key])
    _STATE["installed"] = None
    _STATE["verified"] = False


# --------------------------------------------------------------------------------------------
# the canary: a kernel with a known count, run once under the hooks

def _canary_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _traffic_canary(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        s = tl.load(x_ptr)                      # unmasked scalar load
        tl.store(y_ptr + offs, x + s, mask=mask)

    return _traffic_canary


def _verify():
    if _STATE["verified"]:
        return
    kernel = _canary_kernel()
    x = torch.arange(11, dtype=torch.float32)
    y = torch.zeros(11, dtype=torch.float16)
    counter = TrafficCounter.__new__(TrafficCounter)
    counter.launches, counter.count_eager = [], False
    _STATE["counter"] = counter
    try:
        kernel[(2,)](x, y, 11, BLOCK=8)
    finally:
        _STATE["counter"] = None
    got = [(ln.kernel, ln.grid, ln.tensor("x_ptr").loaded, ln.tensor("y_ptr").stored,
            ln.unattributed) for ln in counter.launches]
    want = [("_traffic_canary", (2, 1, 1), 4 * (11 + 2), 2 * 11, 0)]
    if got != want or not torch.equal(y, (x + x[0]).half()):
        import triton
        raise RuntimeError(f"cannot count kernel traffic with triton {triton.__version__}: the "
                           f"canary kernel counted {got}, expected {want} (the interpreter's "
                           f"load/store/launch path changed)")
    _STATE["verified"] = True


# --------------------------------------------------------------------------------------------
# eager ops (model)

_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_",
             "detach", "alias", "lift_fresh", "_to_copy_meta", "resize_", "size", "stride",
             "sym_size", "sym_stride", "is_same_size", "record_stream"}
_WRITE_ONLY = {"zero_", "fill_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
               "normal_", "uniform_", "randn", "rand", "arange", "eye", "scalar_tensor"}


class _EagerModel(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _STATE["launch"] is not None:   # the interpreter's own host copies
            return out
        name = func.overloadpacket.__name__
        if name in _FREE_OPS or getattr(func, "is_view", False):
            return out
        leaves = torch.utils._pytree.tree_leaves
        outs = [o for o in leaves(out) if torch.is_tensor(o)]
        ins = [] if name in _WRITE_ONLY else [
            a for a in leaves((args, kwargs)) if torch.is_tensor(a)]
        if name.endswith("_") and ins and outs and ins[0] is outs[0]:
            ins = ins[1:] if name in ("copy_",) else ins   # in place: read, then write
        nbytes = sum(t.numel() * t.element_size() for t in ins + outs)
        self.counter.eager_bytes += nbytes
        self.counter.eager_ops[name] = self.counter.eager_ops.get(name, 0) + nbytes
        return out


class TrafficCounter(contextlib.AbstractContextManager):
    """Counts the bytes every interpreted Triton load and store requests, per launch
    (``launches``), while the context is open. Needs ``TRITON_INTERPRET=1`` set before the
    kernels were imported. Not reentrant."""

    def __init__(self, count_eager: bool = False):
        self.launches: List[Launch] = []
        self.count_eager = count_eager
        self.eager_bytes = 0
        self.eager_ops: Dict[str, int] = {}
        self._mode: Optional[_EagerModel] = None

    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise RuntimeError("TrafficCounter counts interpreted kernels: set TRITON_INTERPRET=1 "
                               "before the first import of triton and the kernels")
        if _STATE["counter"] is not None:
            raise RuntimeError("a TrafficCounter is already active (counters do not nest)")
        _install()
        _verify()
        from lowrank_fused.kernels._interpreter import interpreted_only

        self._interpreted = interpreted_only()    # every kernel's loads and stores counted,
        self._interpreted.__enter__()             # none run by a numpy twin
        _STATE["counter"] = self
        if self.count_eager:
            self._mode = _EagerModel(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
                self._mode = None
        finally:
            _STATE["counter"] = None
            self._interpreted.__exit__(*exc)
        return False

    # summaries
    @property
    def loaded(self) -> int:
        return sum(ln.loaded for ln in self.launches)

    @property
    def stored(self) -> int:
        return sum(ln.stored for ln in self.launches)

    @property
    def requested(self) -> int:
        """Bytes requested by every load and store of every launch."""
        return sum(ln.requested for ln in self.launches)

    @property
    def unattributed(self) -> int:
        return sum(ln.unattributed for ln in self.launches)

    def by_kernel(self) -> Dict[str, int]:
        """Requested bytes per kernel name (launches of one kernel added)."""
        out: Dict[str, int] = {}
        for ln in self.launches:
            out[ln.kernel] = out.get(ln.kernel, 0) + ln.requested
        return out

    def rereads(self, threshold: float = 1.0 + 1e-9):
        """``(launch, tensor)`` pairs where a launch loads a tensor more than once over."""
        return [(ln, t) for ln in self.launches for t in ln.rereads(threshold)]

    def as_dict(self) -> dict:
        return dict(requested=self.requested, loaded=self.loaded, stored=self.stored,
                    unattributed=self.unattributed, eager_bytes=self.eager_bytes,
                    launches=[ln.as_dict() for ln in self.launches])
