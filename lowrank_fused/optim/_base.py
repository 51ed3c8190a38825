"""What every lowrank_fused optimizer shares: backend resolution, argument checks, the step
loop, exact-dtype state round trips and state accounting."""
from __future__ import annotations

import functools
import itertools
import math
import operator
import os
import sys
import warnings

import torch

from lowrank_fused import _capture, ops, ops_grouped, ops_multi, sharded
from lowrank_fused.dispatch import (CHOICES, AutoBackend, BackendUnavailable, choose_backend,
                                    resolve_backend)

_TORCH_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "bf16"}
# group keys that are labels, not hyperparameters: torch's own, an LR scheduler's, a user's name
_LABEL_KEYS = frozenset({"params", "param_names", "initial_lr", "name"})


class IgnoredGroupKeyWarning(UserWarning):
    """A param group sets a key that its optimizer never reads there: not a key of the method
    (a typo, another method's key), or a low-rank key in a group that is not low-rank."""


class CaptureFailedWarning(UserWarning):
    """``capture = True`` could not capture a step into a CUDA graph (an op in it is not
    capturable on this machine): the step ran eagerly and capture is switched off."""


class LowRankNotEnabledWarning(IgnoredGroupKeyWarning):
    """LDAdamW: a group sets low-rank keys (``rank``, ...) but not ``enable_lowrank``, so it
    runs dense AdamW (the official code's convention)."""


_INTERNAL = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.optim.__file__)) + os.sep)


def _caller_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised in the caller of this function,
    that points at the first frame outside lowrank_fused and torch.optim (the user's line)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
_CHECKPOINT_KEY = "lowrank_fused"
NONFINITE = ("raise", "skip", "ignore")
# what the compiled multi-tensor kernels store (lowrank_fused/_ext_ops.py): contiguous fp32 or
# bf16 buffers; other tensors keep the per-tensor op (which copies or refuses them itself)
_FUSED_MULTI_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:                       # torch built without distributed
        return None
    return DTensor


_DTYPE = ops_multi._DTYPE
_LAYOUT = torch.Tensor.layout.__get__
_GRAD = torch.Tensor.grad.__get__
# a list of tensors' autograd version counters, bumped in one C loop (what
# torch.autograd.graph.increment_version calls)
_increment_version = getattr(torch._C, "_increment_version", None) or \
    torch.autograd.graph.increment_version


_SCALARS = (int, float, str, type(None))


def _picker(positions):
    """A function list -> list of the items at ``positions`` (one C call per use)."""
    if len(positions) == 1:
        i = positions[0]
        return lambda items: [items[i]]
    get = operator.itemgetter(*positions)
    return lambda items: list(get(items))


def _snapshot_state(st: dict) -> dict:
    """A per-parameter state's values, nested dicts copied (tensors and other values by
    reference: a step writes its tensors on the device, not on the host)."""
    return {k: (_snapshot_state(v) if isinstance(v, dict) else v) for k, v in st.items()}


def _restore_into(live: dict, snap: dict):
    """``live`` (in place) back to ``snap``: keys added since dropped, nested dicts restored
    in place (their identity kept), every other value put back."""
    for k in [k for k in live if k not in snap]:
        del live[k]
    for k, v in snap.items():
        cur = live.get(k)
        if isinstance(v, dict) and isinstance(cur, dict):
            _restore_into(cur, v)
        else:
            live[k] = v


def _host_snapshot(opt):
    """The host state a step advances: the optimizer's number-valued attributes (its step
    counts, flags) and every parameter's state."""
    return ({k: v for k, v in opt.__dict__.items() if isinstance(v, _SCALARS)},
            [(st, _snapshot_state(st)) for st in opt.state.values()])


def _host_restore(opt, saved):
    attrs, states = saved
    for st, snap in states:
        _restore_into(st, snap)
    opt.__dict__.update(attrs)


def is_sharded(t) -> bool:
    """True for a DTensor (an FSDP2 ``fully_shard`` parameter or gradient)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t):
    """The local shard of a DTensor (in place updates reach the parameter), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def check_number(name, value, *, low=None, high=None, high_open=False):
    """Raise ValueError naming ``name`` unless ``value`` is a finite real in range (a number
    or a one-element CPU tensor; not a string or a bool). A hyper-parameter is read on the
    host at every step, so a tensor on a device is refused: reading it would synchronise the
    host with the device at every step."""
    if isinstance(value, (str, bytes, bool)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        raise ValueError(f"{name} must be a number or a CPU tensor, got a tensor on "
                         f"{value.device}: the optimizer reads it on the host at every step, "
                         f"which would wait for the device each time")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and x < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and (x >= high if high_open else x > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return x


def check_int(name, value, low):
    """Raise ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_bool(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def multi_backend(op, backend, device):
    """Where the multi-tensor version of ``op`` (``ops_multi.<op>_multi``) runs for tensors on
    ``device`` whose per-tensor ``op`` runs on ``backend`` (a resolved name or an
    ``AutoBackend``), or None when the optimizer keeps the per-tensor loop: the backend has no
    multi-tensor op (``triton``), or ``auto`` would run it on the eager reference while the
    single op has a fused kernel there (a CUDA device without the compiled extension)."""
    name = "auto" if backend == "auto" else str(backend)
    try:
        multi = choose_backend(name, device, (op + "_multi",))
        single = choose_backend(name, device, (op,))
    except BackendUnavailable:
        return None
    if multi == "reference" and single != "reference":
        return None
    return multi


def check_betas(betas):
    """A pair of floats in [0, 1); returns it as a tuple of floats."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair of floats, got {betas!r}")
    check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return (float(betas[0]), float(betas[1]))


# The options every method shares, with their defaults: declared here once; each method's
# constructor takes them as keywords (``**options``) and its ``OPTIONS`` names those it reads.
SHARED_OPTIONS = {"backend": "auto", "nonfinite": "raise", "faithful_dtypes": False,
                  "sign_canon": True, "matmul_precision": None}


class LowRankOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement ``_check_group``, ``_ops_needed`` and ``_step_param``,
    and may hook ``_check_grads`` (method-specific gradient checks), ``_before_updates`` (a global
    phase, e.g. a joint refresh of all layers) and ``_after_updates`` (e.g. a global counter).

    ``step`` validates every group and every gradient before it touches any parameter or
    state, so bad input (a scheduler writing a bad value, a NaN gradient) raises with the
    weights and the state as they were.

    The options every method shares (keywords of every constructor; docs/conventions.md,
    "Names and options every method shares"):

    * ``backend``: ``"auto" | "reference" | "triton" | "cuda" | "cpu"`` (lowrank_fused.dispatch;
      default ``"auto"``, the fused kernels where they run).
    * ``nonfinite``: what a non-finite gradient does (below; default ``"raise"``).
    * ``faithful_dtypes``: keep moments and the basis in the parameter dtype, as the official
      codes do (default False: fp32). Methods whose state is fp32 by definition do not take it.
    * ``sign_canon``: make the largest-magnitude entry of every singular vector (basis column)
      positive, so refreshes are reproducible across SVD libraries (default True). Methods
      with no basis do not take it.
    * ``matmul_precision``: ``"ieee" | "tf32" | "bf16" | "tf32x3"`` for the fused GEMMs, or None
      (default) to follow ``torch.get_float32_matmul_precision()`` at every step ("high" ->
      tf32, "medium" -> bf16; "highest" -> tf32x3 for CUDA parameters, ieee for CPU ones;
      docs/precision.md). Methods with no GEMM do not take it.

    A method's ``OPTIONS`` lists those it reads; passing another is a ``TypeError``, as for
    any unknown keyword.

    ``nonfinite`` says what a NaN or Inf in any gradient does:
    ``"raise"`` (default) raises ``FloatingPointError`` naming the parameter and the step,
    with nothing written; ``"skip"`` skips the whole step (weights and every state tensor stay
    bit-identical) and counts it in ``skipped_steps``; ``"ignore"`` does no check (no host
    read per step; a non-finite gradient then reaches the moments, as in the official code).
    The check is one multi-tensor max-abs reduction over the gradients and one flag read.

    Multi-tensor apply: within ``step`` the dense AdamW step of every non-projected
    parameter (``_dense_adamw_step``) is collected and run at the end of the loop as one
    ``ops_multi.adamw_step_multi`` call per set of parameters sharing a device, a backend and
    the method's conventions (per-parameter lr, betas, eps, weight decay and step counters
    ride along); that is one CUDA launch (``cuda`` backend, what ``auto`` picks for it on a
    GPU) or one OpenMP loop (``cpu``) instead of one per parameter, with the same math
    (docs/methods/adamw.md). The per-tensor loop remains where the backend has no multi-tensor op
    (``backend="triton"``), for tensors the compiled kernels do not take (float16, not
    contiguous), in per-layer mode (one parameter at a time by design) and when the attribute
    ``multi_tensor`` is set to False (default True; a setting, not checkpointed state).

    Parameters must be float32, bfloat16 or float16 (``PARAM_DTYPES``), dense, and on one
    device. Messages name parameters by module path when groups carry torch's
    ``param_names`` (``make_optimizer`` sets them) or after ``set_param_names``.
    """

    PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
    # FSDP2 (DTensor) parameters, dim-0 shards: a method that sets this runs them in its
    # per-parameter step with the collectives of lowrank_fused/sharded.py; others refuse them
    SUPPORTS_SHARDED = False

    # the shared options this method reads (SHARED_OPTIONS); a subclass narrows it
    OPTIONS = frozenset(SHARED_OPTIONS)

    def __init__(self, params, defaults, **options):
        unknown = sorted(set(options) - self.OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument "
                            f"{unknown[0]!r}")
        options = {**SHARED_OPTIONS, **options}
        backend, nonfinite = options["backend"], options["nonfinite"]
        faithful_dtypes, sign_canon = options["faithful_dtypes"], options["sign_canon"]
        matmul_precision = options["matmul_precision"]
        check_choice("nonfinite", nonfinite, NONFINITE)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.step_calls = 0
        self._param_names = {}
        self._label_index = {}
        if matmul_precision is not None and matmul_precision not in ops.PRECISIONS:
            raise ValueError("matmul_precision must be None, 'ieee', 'tf32', 'bf16' or 'tf32x3', "
                             f"got {matmul_precision!r}")
        if backend not in CHOICES:
            raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
        self.backend = backend
        self.faithful_dtypes = check_bool("faithful_dtypes", faithful_dtypes)
        self.sign_canon = check_bool("sign_canon", sign_canon)
        self.matmul_precision = matmul_precision
        self._resolved = {}
        self._multi_resolved = {}
        self.multi_tensor = True
        # the step engine (optim/_engine.py); False: every parameter takes the method's own
        # per-parameter step (what the engine's parity tests compare with). A setting.
        self.engine = True
        # CUDA-graph capture of the steady step (docs/engine.md); False: every step eager.
        # A setting; ``graphs_captured`` counts the captures.
        self.capture = False
        self.graphs_captured = 0
        self._graph = None
        self._graph_key_held = None
        self._class_generation = 0
        self._engine_plan = None
        self._skip_flag = None      # this step's on-device non-finite flag (_defer_nonfinite)
        self._classes_stale = True
        self._batch = None          # during step(): the batched calls collected so far
        super().__init__(params, defaults)
        for group in self.param_groups:   # fail at construction, not at the first step
            for p in group["params"]:
                self._backend_for(group, p)

    def add_param_group(self, param_group):
        given = set(param_group) if isinstance(param_group, dict) else set()
        super().add_param_group(param_group)
        try:
            self._check_tensors(self.param_groups[-1])
            self._check_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()       # a refused group leaves the optimizer as it was
            raise
        self._warn_ignored_keys(self.param_groups[-1], given)
        self._invalidate_plan()

    # -- group keys that would be ignored ---------------------------------------------------
    # OPTIONAL_GROUP_KEYS: keys a group may set beyond ``defaults``; LOWRANK_GROUP_KEYS: keys
    # only a low-rank group reads (``_is_lowrank_group``); a subclass sets both.
    OPTIONAL_GROUP_KEYS = frozenset()
    LOWRANK_GROUP_KEYS = frozenset()
    LOWRANK_RULE = "a group is low-rank when it sets 'rank'"

    def _lowrank_group_keys(self) -> set:
        return set(self.LOWRANK_GROUP_KEYS)

    def _is_lowrank_group(self, group) -> bool:
        return "rank" in group

    def _ignored_group_keys(self, group, given) -> dict:
        """{key: why it has no effect} for the keys the caller set on ``group``."""
        cls = type(self).__name__
        known = set(self.defaults) | set(self.OPTIONAL_GROUP_KEYS) | self._lowrank_group_keys()
        out = {k: f"it is not a param-group key of {cls}" for k in given - known - _LABEL_KEYS}
        if not self._is_lowrank_group(group):
            for k in sorted(given & self._lowrank_group_keys()):
                out.setdefault(k, f"only low-rank groups read it and this one is not low-rank "
                                  f"({self.LOWRANK_RULE})")
        return out

    def _ignored_key_category(self, group, given, key):
        return IgnoredGroupKeyWarning

    def _warn_ignored_keys(self, group, given):
        """One warning per ignored key and reason per optimizer (naming the first group that
        sets it), pointing at the caller's line."""
        ignored = self._ignored_group_keys(group, given)
        warned = self.__dict__.setdefault("_warned_group_keys", set())
        index = len(self.param_groups) - 1
        n = len(group["params"])
        first = (self.param_label(group["params"][0]) + (f" and {n - 1} more" if n > 1 else "")
                 if n else "no parameters")
        for key in sorted(ignored):
            if (key, ignored[key]) in warned:
                continue
            warned.add((key, ignored[key]))
            warnings.warn(f"{type(self).__name__}: param group {index} (holding {first}) "
                          f"sets {key!r}, which has no effect: {ignored[key]}",
                          self._ignored_key_category(group, given, key),
                          stacklevel=_caller_stacklevel())

    def _check_tensors(self, group):
        """Every parameter floating (``PARAM_DTYPES``), dense, and on the optimizer's device."""
        first = next((p for g in self.param_groups for p in g["params"]), None)
        for p in group["params"]:
            if p.dtype not in self.PARAM_DTYPES:
                raise TypeError(
                    f"{type(self).__name__} supports parameters of dtype "
                    f"{', '.join(str(d).replace('torch.', '') for d in self.PARAM_DTYPES)}; "
                    f"{self.param_label(p)} has dtype {p.dtype}")
            if is_sharded(p) and not self.SUPPORTS_SHARDED:
                raise ValueError(
                    f"{type(self).__name__} does not support FSDP2 / DTensor-sharded parameters "
                    f"({self.param_label(p)} is sharded as {p.placements}); use DDP for it "
                    "(docs/distributed.md lists the methods FSDP2 runs)")
            if p.layout != torch.strided:
                raise TypeError(f"{type(self).__name__} supports dense parameters only; "
                                f"{self.param_label(p)} has layout {p.layout}")
            if p.device != first.device:
                raise ValueError(
                    f"{type(self).__name__} needs every parameter on one device: "
                    f"{self.param_label(first)} is on {first.device}, {self.param_label(p)} "
                    f"is on {p.device} (make one optimizer per device)")
        if any(is_sharded(p) for p in group["params"]):
            self._check_sharding(group)

    def _check_sharding(self, group):
        """Sharded parameters must be split on dim 0 over a 1-D mesh (FSDP2's default)."""
        from torch.distributed.tensor import Shard

        for p in group["params"]:
            if is_sharded(p):
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                    raise ValueError(
                        f"{type(self).__name__} supports parameters sharded on dim 0 over a "
                        f"1-D mesh (FSDP2's fully_shard); {self.param_label(p)} has placements "
                        f"{p.placements} on a {p.device_mesh.ndim}-D mesh")

    def set_param_names(self, names):
        """Use module names in messages: ``names`` is a module (its ``named_parameters``) or
        a mapping or iterable of ``(name, parameter)``. Returns self."""
        if isinstance(names, torch.nn.Module):
            names = names.named_parameters()
        elif isinstance(names, dict):
            names = names.items()
        self._param_names = {id(p): str(n) for n, p in names}
        return self

    def param_label(self, p) -> str:
        """How messages name a parameter: its name (``param_names`` of its group, or
        ``set_param_names``) or its index in the optimizer, and its shape."""
        if len(self._label_index) != sum(len(g["params"]) for g in self.param_groups):
            self._label_index = {}
            for group in self.param_groups:
                for i, q in enumerate(group["params"]):
                    names = group.get("param_names")
                    self._label_index[id(q)] = (len(self._label_index),
                                                names[i] if names else None)
        index, group_name = self._label_index.get(id(p), (None, None))
        name = self._param_names.get(id(p), group_name)
        where = f"'{name}'" if name is not None else (
            f"parameter {index}" if index is not None else "a parameter")
        return f"{where} (shape {tuple(p.shape)})"

    def resolved_backend(self, device) -> str:
        """The backend this optimizer prefers for tensors on ``device`` (with ``auto``, an op
        that has no implementation there yet runs its reference)."""
        return resolve_backend(self.backend, device)

    def _backend_for(self, group, p) -> str:
        """The backend one parameter's ops run on. ``auto``: an ``AutoBackend`` for the
        parameter's device, resolved per op (each op takes its fastest implementation there,
        so the fused hot path of a method runs fused while an op without a kernel yet runs
        its reference). An explicit backend must implement every op the parameter needs,
        else ``BackendUnavailable`` (checked at construction)."""
        ops = tuple(self._ops_needed(group, p))
        key = (p.device, ops)
        if key not in self._resolved:
            if self.backend == "auto":
                self._resolved[key] = AutoBackend(p.device)
            else:
                self._resolved[key] = choose_backend(self.backend, p.device, ops)
        return self._resolved[key]

    def precision(self, device=None) -> str:
        """The fused GEMMs' operand precision for parameters on ``device``:
        ``matmul_precision`` when set, else torch's fp32 matmul setting ("high" -> tf32,
        "medium" -> bf16); "highest", torch's default, gives "tf32x3" on CUDA (fp32 accuracy
        within a small factor, and no longer compute-bound: docs/precision.md) and "ieee"
        elsewhere (without tensor cores the split only costs time)."""
        if self.matmul_precision is not None:
            return self.matmul_precision
        precision = _TORCH_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")
        if precision == "ieee" and device is not None and torch.device(device).type == "cuda":
            return "tf32x3"
        return precision

    def _state_dtype(self, p):
        return p.dtype if self.faithful_dtypes else torch.float32

    def _dense_adamw_step(self, p, group, backend, *, eps_mode, wd_mode, bias_correction=True,
                          step=None):
        """The dense AdamW step (docs/methods/adamw.md) for a parameter off the low-rank path:
        torch conventions (``eps_mode="torch", wd_mode="pre"``) or HF/GaLore ones
        (``"hf", "post"``). The bias correction uses the parameter's own counter, or ``step``
        when the method has a global one (LDAdam). Within ``step()`` the update joins the
        step's ``adamw_step_multi`` call (see the class docstring); otherwise it runs now."""
        state = self.state[p]
        W, G = local(p), local(p.grad)      # FSDP2: this rank's shard; states are local too
        if "exp_avg" not in state:
            if step is None:
                state["step"] = 0
            state["exp_avg"] = torch.zeros_like(W, dtype=self._state_dtype(p),
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        t = state["step"] + 1 if step is None else step
        beta1, beta2 = group["betas"]
        M, V = state["exp_avg"], state["exp_avg_sq"]
        batch = None
        if self.multi_tensor:
            batch = self._batch_for("adamw_step", backend, (W, G, M, V), self._flush_adamw,
                                    eps_mode, wd_mode, bool(bias_correction))
        if batch is not None:
            batch.append((W, G, M, V, group["lr"], beta1, beta2, group["eps"],
                          group["weight_decay"], t, state if step is None else None))
            return
        ops.adamw_step(W, G, M, V, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       step=t, weight_decay=group["weight_decay"], eps_mode=eps_mode,
                       wd_mode=wd_mode, bias_correction=bias_correction, backend=backend)
        if step is None:
            state["step"] = t

    def _flush_adamw(self, backend, eps_mode, wd_mode, bias_correction, items):
        """The collected dense AdamW steps of one set: one ``adamw_step_multi`` call, then the
        parameters' own counters advance (as the per-tensor step does, after its update)."""
        Ws, Gs, Ms, Vs, lrs, b1s, b2s, epss, wds, steps, states = (list(x) for x in zip(*items))
        ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, lr=lrs, beta1=b1s, beta2=b2s, eps=epss,
                                   step=steps, weight_decay=wds, eps_mode=eps_mode,
                                   wd_mode=wd_mode, bias_correction=bias_correction, backend=backend)
        for state, t in zip(states, steps):
            if state is not None:
                state["step"] = t

    def _batch_for(self, op, backend, tensors, flush, *key):
        """The list one multi-tensor call of ``op`` collects into during this step, or None
        when ``op`` runs per tensor now: outside ``step()`` (per-layer mode), without a
        multi-tensor op for ``backend`` (``multi_backend``), or for tensors the compiled
        kernels do not take. ``key`` (hashable) separates the calls that cannot share one
        (e.g. eps and weight-decay conventions); at the end of the loop ``step`` calls
        ``flush(backend, *key, items)`` once per list."""
        if self._batch is None or self._multi_where(op, backend, tensors) is None:
            return None
        return self._collect((op, tensors[0].device, str(backend)) + key,
                             functools.partial(flush, backend, *key))

    def _multi_where(self, op, backend, tensors):
        """The backend of ``<op>_multi`` for these tensors (``multi_backend``, resolved once
        per device), or None when they keep the per-tensor op: no multi-tensor op there, or
        a compiled one that does not take them (float16, not contiguous)."""
        device = tensors[0].device
        where = self._resolved_once((op, str(backend), device),
                                    lambda: multi_backend(op, backend, device))
        if where is None or (where != "reference" and not all(
                t.dtype in _FUSED_MULTI_DTYPES and t.is_contiguous() for t in tensors)):
            return None
        return where

    GROUPED_OPS = ("grouped_project", "grouped_backproject_update")

    def _grouped_available(self, group, p) -> bool:
        """Whether the parameter's backend runs the method's grouped ops (``GROUPED_OPS``) on
        its device (every backend but the compiled extension's, which has no GEMMs); resolved
        once per backend and device."""
        backend = self._backend_for(group, p)

        def resolve():
            try:
                return choose_backend("auto" if backend == "auto" else str(backend), p.device,
                                      self.GROUPED_OPS)
            except BackendUnavailable:
                return None

        return self._resolved_once(("grouped", str(backend), p.device), resolve) is not None

    def _resolved_once(self, key, resolve):
        """``resolve()``, computed once per ``key`` (a backend choice for this optimizer's
        devices; reset with the rest of the resolution cache on ``load_state_dict``)."""
        if key not in self._multi_resolved:
            self._multi_resolved[key] = resolve()
        return self._multi_resolved[key]

    def _collect(self, key, flush):
        """The list of this step's batched call ``key`` (created with its ``flush``, which
        ``_run_batches`` calls with the list at the end of the loop)."""
        if key not in self._batch:
            self._batch[key] = (flush, [])
        return self._batch[key][1]

    def _run_batches(self):
        """Run the multi-tensor calls collected during the loop (in the order their first
        tensor came); anything they call runs per tensor (the collection is closed)."""
        batches, self._batch = self._batch, None
        for flush, items in batches.values():
            flush(items)

    @staticmethod
    def _as_matrix(p, shape):
        """(W, G, write_back): 2-D views of a parameter and its gradient (trailing dims
        flattened). ``write_back`` copies W into p when a view was impossible. An FSDP2
        parameter gives this rank's rows (``local``: in-place updates reach the parameter),
        so W has ``W.shape[0] < shape[0]`` there."""
        if is_sharded(p):
            W, G = local(p), local(p.grad)
            cols = shape[1]                    # not -1: a rank may hold no rows
            return W.reshape(W.shape[0], cols), G.reshape(G.shape[0], cols), lambda W: None
        if p.dim() == 2:
            return p, p.grad, lambda W: None
        G = p.grad.reshape(shape)
        try:
            W = p.view(shape)
            return W, G, lambda W: None
        except RuntimeError:
            W = p.reshape(shape).clone()
            return W, G, lambda W: p.copy_(W.view(p.shape))

    def _check_grad(self, p):
        """One gradient's layout, shape, device and dtype."""
        g = p.grad
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{type(self).__name__} does not support sparse "
                               f"gradients ({self.param_label(p)}, layout {g.layout})")
        if g.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match "
                             f"parameter shape of {self.param_label(p)}")
        if g.device != p.device:
            raise ValueError(f"gradient of {self.param_label(p)} is on {g.device}, "
                             f"the parameter on {p.device}")
        if g.dtype not in self.PARAM_DTYPES:
            raise TypeError(f"gradient of {self.param_label(p)} has dtype {g.dtype}")

    def _validate_step(self):
        """Every group and every gradient checked before anything is written. Returns False
        when the step is to be skipped (a non-finite gradient with ``nonfinite="skip"``)."""
        self.__dict__.pop("_validated_plan", None)     # set below for this step only
        for group in self.param_groups:
            self._check_group(group)
        params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
        grads = list(map(_GRAD, params))
        if not all(map(operator.is_not, grads, itertools.repeat(None))):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        key = tuple(map(id, params))
        # this step's parameters with a gradient and their gradients, read once: the plan's
        # classes and dense sets take theirs from this list by position (_step_grads)
        self._step_params = (key, grads)
        self._stepped = params
        self._check_grad_layouts(key, params, grads)
        self._skip_flag = None
        if self.nonfinite != "ignore":
            if self._defer_nonfinite(grads):   # the flag stays on the device: no host read
                self._check_grads()
                return True
            if bool(self._global_flag(grads)):                      # one host read
                if self.nonfinite == "skip":
                    return False
                self._raise_nonfinite(written="no parameter or state was updated (nonfinite="
                                              "'skip' skips such steps)")
        self._check_grads()
        return True

    # renewed by _check_grad_layouts whenever a gradient's layout changes (None before the
    # first step's check: a bound call given None checks every call)
    _layout_token = None

    def _check_grad_layouts(self, key, params, grads):
        """Each gradient's shape, dtype, device and (dense) layout, as ``_check_grad``. The
        parameters' values are kept per set of parameters with gradients (``key``: their
        ids), so a steady step compares four lists (C loops) instead of checking tensor by
        tensor in Python; any difference runs the full check, which names the gradient."""
        known = self.__dict__.get("_grad_layouts")
        if known is not None and known[0] == key:
            _, shapes, dtypes, devices, dense, strides = known
            try:
                # only strided tensors have strides (others raise) that are not all 0 (a
                # sparse COO tensor's): where every recorded gradient has a nonzero stride,
                # equal strides mean strided tensors, and the layouts are not compared
                same = (list(map(torch.Tensor.stride, grads)) == strides
                        and list(map(torch.Tensor.size, grads)) == shapes
                        and list(map(_DTYPE, grads)) == dtypes
                        and list(map(torch.Tensor.get_device, grads)) == devices
                        and (dense is None or list(map(_LAYOUT, grads)) == dense))
            except RuntimeError:
                same = False
            if same:
                return
        for p in params:
            self._check_grad(p)
        strides = [g.stride() for g in grads]
        self._grad_layouts = (key, [p.shape for p in params], [p.dtype for p in params],
                              [p.get_device() for p in params],
                              None if all(map(any, strides)) else [torch.strided] * len(params),
                              strides)
        # every gradient's layout (shape, strides, dtype, device) is unchanged from the last
        # step for as long as this token is: the bound calls given it check theirs once per
        # token instead of once per call (``ops_grouped.BoundGroupedProject``)
        self._layout_token = (self._layout_token or 0) + 1

    # -- non-finite gradients without a host read (docs/engine.md) --------------------------
    # A method whose every state-writing op of a steady step takes the on-device ``skip``
    # flag sets this; the engine then passes the flag instead of reading it
    DEVICE_SKIP = False

    def _lagged_nonfinite(self, device) -> bool:
        """Whether the flag is left on the device and read at the next step: the
        ``lagged_nonfinite`` setting, or by default on CUDA (a read there stalls the host
        until the GPU has caught up; on the CPU reading it costs nothing)."""
        lagged = getattr(self, "lagged_nonfinite", None)
        return device.type == "cuda" if lagged is None else bool(lagged)

    def _defer_nonfinite(self, grads) -> bool:
        """On a step the engine runs whole with the on-device skip (``DEVICE_SKIP``, no
        per-parameter fallback, no refresh due), compute the per-tensor non-finite flags on
        the device, hand the step-wide flag to the ops as ``skip`` and keep a host copy
        (asynchronous on CUDA) for ``nonfinite_check``. False: the caller reads the flag now."""
        if not (self.DEVICE_SKIP and self.engine and grads and
                self._lagged_nonfinite(grads[0].device)):
            return False
        plan = self._validated_plan = self._current_plan()
        # sharded parameters (FSDP2) and every other per-parameter step are in plan.legacy
        if plan is None or plan.legacy or self._refresh_pending(plan):
            return False
        params = plan.params
        flags = plan.flags
        if flags is None or flags.count != len(params):
            flags = plan.flags = ops_multi.BoundNonfiniteFlags([p.grad for p in params])
        # the flags are launched with the step's other launches (_launch_flags), into one
        # buffer at a fixed address: its any-flag is the ops' skip
        self._skip_flag = flags.any
        bad = flags.per_tensor
        if bad.is_cuda:
            # one pinned buffer, reused: nonfinite_check waited for the last copy into it
            host = self.__dict__.get("_flag_host")
            if host is None or host.shape != bad.shape:
                host = self._flag_host = torch.empty(bad.shape, dtype=torch.bool,
                                                     pin_memory=True)
        else:
            host = bad
        self._flags_due = (flags, params, host)
        # the event (CUDA) is recorded after the step's launches (_device_step)
        self._pending_nonfinite = [host, None, plan, params, self.step_calls + 1]
        return True

    def _launch_flags(self):
        """This step's per-tensor non-finite flags (one launch), and on CUDA their copy to the
        pinned host buffer, when ``_defer_nonfinite`` left them to the step."""
        due = self.__dict__.pop("_flags_due", None)
        if due is None:
            return
        flags, params, host = due
        plan = self.__dict__.get("_engine_plan")
        grads = (self._step_grads(params, plan.extra) if plan is not None
                 and plan.params is params else [p.grad for p in params])
        flags(grads, layout_token=self._layout_token)
        if host is not flags.per_tensor and not _capture.replaying():
            host.copy_(flags.per_tensor, non_blocking=True)

    def _refresh_pending(self, plan) -> bool:
        """Hook: True when a routed matrix refreshes on this step (its basis is computed
        from the gradient, which must then be finite: the flag is read). Default: none."""
        return False

    def nonfinite_check(self):
        """Act on the non-finite flag of the last step when it was left on the device (on
        CUDA, with ``nonfinite`` "raise" or "skip", on steps the engine runs whole): called
        at the start of every ``step()`` and by ``state_dict()``; call it yourself to learn
        earlier. When that step had a NaN or Inf gradient, its updates were skipped on the
        device; here its step counters are rolled back and it is counted in
        ``skipped_steps``, and with "raise" ``FloatingPointError`` names the parameter and
        the step. Weights and state are then exactly as before that step."""
        pending = self.__dict__.pop("_pending_nonfinite", None)
        if pending is None:
            self._settle_lagged(False)
            return
        host, event, plan, params, step_number = pending
        if event is not None:
            event.synchronize()        # the copy of a step the GPU has long finished
        bad = host.numpy() if host.numel() else ()
        hit = next((i for i, b in enumerate(bad) if b), None)
        self._settle_lagged(hit is not None)
        if hit is None:
            return
        for state in plan.counters:
            state["step"] -= 1
        if self.nonfinite == "skip":
            self.skipped_steps += 1
        else:
            self.step_calls -= 1          # as a step that raised: it did not happen
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient of {self.param_label(params[hit])} had "
                f"non-finite entries at step {step_number} (found at the next step() or "
                f"nonfinite_check()); that step was skipped on the device: no parameter or "
                f"state was updated")

    def _settle_lagged(self, skipped: bool):
        """Hook: host decisions of the last step that were left to be read with its
        non-finite flag (AdaRankGrad's exit tests); ``skipped``: that step was skipped on the
        device, so they are dropped. Default: none."""

    def _global_flag(self, grads):
        """The non-finite flag of this rank's gradients; with sharded parameters the ranks
        hold different shards, so the flag is all-reduced (every rank skips or raises
        together)."""
        sharded = [g for g in grads if is_sharded(g)]
        flag = ops.nonfinite_flag([local(g) for g in grads])
        if sharded:
            import torch.distributed as dist

            f = flag.to(torch.int32).reshape(1)
            dist.all_reduce(f, op=dist.ReduceOp.MAX, group=sharded[0].device_mesh.get_group())
            flag = f[0].bool()
        return flag

    def _raise_nonfinite(self, params=None, written="no parameter or state was updated"):
        """The slow path after the flag: find and name the first bad gradient."""
        if params is None:
            params = [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None or p.grad.numel() == 0:
                continue
            g = local(p.grad)
            nan = int(torch.isnan(g).sum())
            inf = int(torch.isinf(g).sum())
            if nan or inf:
                raise FloatingPointError(
                    f"{type(self).__name__}: the gradient of {self.param_label(p)} has "
                    f"non-finite entries ({nan} NaN, {inf} Inf) at step {self.step_calls + 1}; "
                    f"{written}")
        raise FloatingPointError(                  # the flag came from another rank's shard
            f"{type(self).__name__}: a gradient shard on another rank has non-finite entries "
            f"at step {self.step_calls + 1}; {written}")

    def _check_grads(self):
        """Hook: method-specific checks of the gradients before the step (default: none)."""

    def _require_finite(self, p, when):
        """With ``nonfinite="ignore"`` (no step-wide check), a method whose next computation
        on ``p``'s gradient cannot take NaN/Inf (an SVD, a refit) refuses it here, before the
        step writes anything; otherwise the step's check has already covered it."""
        if self.nonfinite != "ignore":
            return
        bad = not bool(torch.isfinite(local(p.grad)).all())
        rows = sharded.rows_of(p)
        if rows is not None:            # an FSDP2 shard: every rank raises, or none does
            bad = rows.any_(bad)
        if bad:
            where = " (in some rank's shard)" if rows is not None else ""
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient of {self.param_label(p)} has non-finite "
                f"entries {when}{where}; no parameter was updated")

    def _before_updates(self):
        """Hook: a global phase after validation, before the per-parameter updates."""

    def _after_updates(self):
        """Hook: after every parameter has been updated."""

    @torch.no_grad()
    def step(self, closure=None):
        self.nonfinite_check()              # the previous step's flag, when it was left on the device
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            proceed = self._validate_step()
            self.step_calls += 1
            if not proceed:
                self.skipped_steps += 1
                return loss
            self._device_step()
            # the kernels write the parameters through their addresses, which autograd does
            # not see: their version counters are bumped here, once per step (one C loop), so
            # a graph saved before the step and run after it refuses, as after torch's
            # optimizers, instead of using the new weights silently
            _increment_version(self._stepped)
        finally:
            self.__dict__.pop("_step_params", None)      # this step's only
            self.__dict__.pop("_stepped", None)
            self.__dict__.pop("_flags_due", None)
        self._after_updates()
        return loss

    def _step_work(self):
        """Everything a step launches: the non-finite flags, the global phase, the engine's
        classes and dense sets, the batched per-parameter calls."""
        self._launch_flags()
        self._before_updates()
        self._batch = {}
        try:
            self._engine_step()
            self._run_batches()
        finally:
            self._batch = None

    # -- CUDA-graph capture of the steady step (docs/engine.md) -----------------------------
    def _device_step(self):
        """``_step_work``: eagerly, or with ``capture`` on a CUDA device, captured into a CUDA
        graph at the second consecutive steady step of one structure and replayed after."""
        key = self._graph_key() if self.capture else None
        graph = self._graph
        done = self.__dict__.get("_graph_event")
        used_graph = False
        if key is not None and graph is not None and key == self._graph_key_held:
            with _capture.replay(done):
                self._step_work()            # the host half: checks, counters, scalars
            graph.replay()
            used_graph = True
        else:
            if done is not None:             # staging buffers the last replay may still read
                done.synchronize()
                self._graph_event = None
            if key is not None and key == self.__dict__.get("_graph_key_seen"):
                # the previous step ran eagerly with this key
                used_graph = self._capture_or_run(key)
            else:
                self._graph = self._graph_key_held = None
                self._step_work()
            self._graph_key_seen = key
        pending = self.__dict__.get("_pending_nonfinite")
        flag_copy = pending is not None and pending[1] is None and pending[0].is_pinned()
        if used_graph or flag_copy:
            event = torch.cuda.Event()
            event.record()
            if used_graph:
                self._graph_event = event
            if flag_copy:
                pending[1] = event

    def _capture_or_run(self, key) -> bool:
        """``_capture_graph``; when the capture fails (an op in the step that cannot be
        captured here: it synchronises, or its library does not support stream capture),
        the host state the capture advanced (step counters, flags: every non-tensor value
        of the optimizer and of its per-parameter states) is put back, capture is switched
        off with a ``CaptureFailedWarning`` and the step runs eagerly. A failed capture ran
        nothing on the device, so the eager step is the step. True when captured."""
        saved = _host_snapshot(self)
        try:
            self._capture_graph(key)
            return True
        except Exception as exc:            # noqa: BLE001 (any capture error: fall back)
            _host_restore(self, saved)
            self.capture = False
            self._graph = self._graph_key_held = None
            warnings.warn(f"{type(self).__name__}: CUDA-graph capture of the step failed "
                          f"({type(exc).__name__}: {exc}); the step ran eagerly and "
                          f"capture is now off for this optimizer", CaptureFailedWarning,
                          stacklevel=4)
            self._step_work()
            return False

    def _capture_graph(self, key):
        """Capture ``_step_work`` into a new CUDA graph (its launches are recorded, not run)
        and replay it once to run this step. One synchronisation per capture: the staging
        buffers of the scalar tables must be idle when the capture writes them."""
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._step_work()
        graph.replay()
        self._graph, self._graph_key_held = graph, key
        self.graphs_captured += 1

    def _graph_key(self):
        """What a captured step depends on, or None when this step cannot be captured: CUDA,
        the step's flag left on the device (no refresh due, every parameter on the engine),
        classes already built, every class and dense set on capturable calls."""
        due = self.__dict__.get("_flags_due")
        plan = self.__dict__.get("_validated_plan")
        if (not self.CAPTURABLE or due is None or plan is None or self._classes_stale
                or plan.legacy):
            return None
        params = due[1]
        if not params or not params[0].is_cuda:
            return None
        if not all(d.where is not None for d in plan.dense.values()):
            return None
        if not all(self._class_capturable(c) for c in plan.classes.values()):
            return None
        return (id(plan), self._class_generation, self.precision(params[0].device),
                tuple(map(torch.Tensor.data_ptr, (p.grad for p in params))),
                self._captured_values())

    def _captured_values(self) -> tuple:
        """Hook: the values a captured step's launches take by value rather than from a
        scalar table (a change of any of them makes the next step eager and re-captures).
        Default: none."""
        return ()

    # a method whose steady step makes only launches of the engine's bound calls (those a
    # replay suppresses: the flags, grouped K1/K3, the multi-tensor calls) and no other
    # device work sets this; any other launch would run twice on a replay
    CAPTURABLE = False

    def _class_capturable(self, cls) -> bool:
        """Hook: whether a class's steady step makes only launches that a replay can
        suppress (bound grouped and multi-tensor calls). Default: no."""
        return False

    # -- the step engine (optim/_engine.py) -------------------------------------------------
    def _route(self, p, group):
        """Hook: the engine route of a parameter (``_engine.DenseRoute``, ``ClassRoute``) or
        None for the method's own per-parameter step (``_step_param``). Default: None."""
        return None

    def _invalidate_plan(self):
        """The structure changed (groups, loaded state, a replaced state tensor): the next
        step builds a new plan."""
        self._engine_plan = None
        self._classes_stale = True

    def _current_plan(self):
        """The plan of this step (built when the set of parameters with a gradient or the
        structure changed), or None when no parameter has a gradient."""
        key = (self.__dict__.get("_step_params") or (None,))[0]
        pairs = None
        if key is None:
            pairs = self._params_with_grads()
            key = tuple(map(id, (p for p, _ in pairs)))
        plan = self.__dict__.get("_engine_plan")
        # the layout token: gradients in another layout (strides) than the plan's may take
        # another route (the compiled multi-tensor ops take contiguous tensors only)
        signature = (self.engine, self.multi_tensor, key, self._layout_token,
                     tuple(tuple(g.get(k) for k in self.LAYOUT_KEYS) for g in self.param_groups))
        if plan is not None and plan.signature == signature:
            self._live = plan.live
            return plan
        if pairs is None:
            pairs = self._params_with_grads()
        live = [(p, g) for p, g in pairs if p.numel()]   # an empty tensor has nothing to do
        self._live = live
        if not live:
            return None
        plan = self._engine_plan = self._build_routes(live, signature)
        plan.live = live
        plan.params = [p for p, _ in live]
        # each live parameter's position in the step's list of gradients (_step_grads)
        plan.positions = {pid: i for i, pid in enumerate(key)}
        self._classes_stale = True
        return plan

    def _params_with_grads(self):
        """(parameter, group) of every parameter with a gradient, in the groups' order."""
        return [(p, group) for group in self.param_groups for p in group["params"]
                if p.grad is not None]

    def _step_grads(self, params, holder):
        """The gradients of ``params`` (members of the current plan) on this step: picked by
        position from the list ``_validate_step`` read (a picker kept in the dict ``holder``
        for as long as the plan is the same; that list itself when ``params`` are all of
        its parameters, in order), or read from the parameters outside a step."""
        plan = self.__dict__.get("_engine_plan")
        step = self.__dict__.get("_step_params")
        if step is None or plan is None or plan.positions is None:
            return [p.grad for p in params]
        cached = holder.get("_pick")
        if cached is None or cached[0] is not plan:
            at = [plan.positions[id(p)] for p in params]
            cached = holder["_pick"] = (plan, None if at == list(range(len(step[1])))
                                        else _picker(at))
        return step[1] if cached[1] is None else cached[1](step[1])

    def _engine_step(self):
        """One step over every parameter with a gradient, by the plan."""
        plan = self.__dict__.pop("_validated_plan", None) or self._current_plan()
        if plan is None:
            return
        precision = self.precision(self._live[0][0].device)  # every parameter is on one device
        for p, group in plan.legacy:
            self._step_param(p, group, self._backend_for(group, p), precision)
        if plan.routed:
            if self._refresh_classes(plan.routed) or self._classes_stale:
                self._build_classes(plan)
            for cls in plan.classes.values():
                self._class_step(cls, precision)
        for dense in plan.dense.values():
            self._dense_set_step(dense)

    def _build_routes(self, live, signature):
        from lowrank_fused.optim import _engine

        plan = _engine.Plan(signature=signature)
        for p, group in live:
            route = None if is_sharded(p) or not self.engine else self._route(p, group)
            if route is None:
                plan.legacy.append((p, group))
            elif isinstance(route, _engine.DenseRoute):
                self._add_dense(plan, p, group, route)
            else:
                if p.dim() != 2:
                    try:                      # a 2-D view must exist (no copy-back per step)
                        p.view(route.shape)
                    except RuntimeError:
                        plan.legacy.append((p, group))
                        continue
                plan.routed.append((p, group, route, self.state[p]))
        return plan

    def _add_dense(self, plan, p, group, route):
        from lowrank_fused.optim import _engine

        backend = self._backend_for(group, p)
        state = self.state[p]
        if "exp_avg" not in state:
            if not route.global_step:
                state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=self._state_dtype(p),
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        M, V = state["exp_avg"], state["exp_avg_sq"]
        where = self._multi_where("adamw_step", backend, (p, p.grad, M, V)) \
            if self.multi_tensor else None
        key = (route, str(backend), p.device, where)
        dense = plan.dense.get(key)
        if dense is None:
            dense = plan.dense[key] = _engine.DenseSet(route=route, backend=backend, where=where)
        dense.params.append(p)
        dense.groups.append(group)
        dense.states.append(state)
        dense.Ws.append(p)
        dense.Ms.append(M)
        dense.Vs.append(V)

    def _dense_step_number(self):
        """The global counter's next value for ``DenseRoute(global_step=True)``."""
        raise NotImplementedError

    def _dense_set_step(self, dense):
        """The dense AdamW step of one set: one ``adamw_step_multi`` call (or one
        ``adamw_step`` per tensor where no multi-tensor op takes them), then the counters."""
        from lowrank_fused.optim._engine import per_member

        route = dense.route
        Gs = self._step_grads(dense.params, dense.extra)
        if route.global_step:
            ts = [self._dense_step_number()] * len(Gs)
        else:
            ts = [st["step"] + 1 for st in dense.states]
        def hyper_of(g):
            return (g["lr"], g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"])

        if dense.where is not None:
            if dense.bound is None:
                dense.bound = ops_multi.BoundAdamWStepMulti(
                    dense.Ws, Gs, dense.Ms, dense.Vs, eps_mode=route.eps_mode,
                    wd_mode=route.wd_mode, bias_correction=route.bias_correction,
                    backend=dense.backend)
            group = dense.extra.get("group", dense)
            if group is dense:                  # the one group of every member, or None
                distinct = {id(g): g for g in dense.groups}
                group = dense.extra["group"] = (next(iter(distinct.values()))
                                                if len(distinct) == 1 else None)
            if group is not None and ts.count(ts[0]) == len(ts):
                rows = [hyper_of(group) + (ts[0],)] * len(ts)   # one row, shared
            else:
                rows = [h + (t,) for h, t in zip(per_member(dense.groups, hyper_of), ts)]
            dense.bound(Gs, rows, skip=self._skip_flag, layout_token=self._layout_token)
        else:
            hyper = per_member(dense.groups, hyper_of)
            lrs, b1s, b2s, epss, wds = zip(*hyper)
            for W, G, M, V, lr, b1, b2, e, wd, t in zip(dense.Ws, Gs, dense.Ms, dense.Vs,
                                                        lrs, b1s, b2s, epss, wds, ts):
                ops.adamw_step(W, G, M, V, lr=lr, beta1=b1, beta2=b2, eps=e, step=t,
                               weight_decay=wd, eps_mode=route.eps_mode,
                               wd_mode=route.wd_mode, bias_correction=route.bias_correction,
                               backend=dense.backend, skip=self._skip_flag)
        if not route.global_step:
            for st, t in zip(dense.states, ts):
                st["step"] = t

    def _refresh_classes(self, routed) -> bool:
        """Hook: the refreshes due on this step for the class members ``routed`` ((p, group,
        route, state) entries), run before the classes step; True when a state tensor was replaced
        (the classes are then rebuilt)."""
        raise NotImplementedError

    def _build_classes(self, plan):
        """The classes of the routed matrices: members grouped by (route, dtypes, strides,
        backend), each class's tensor lists, and workspace views for R and N."""
        from lowrank_fused import ops as _ops
        from lowrank_fused.optim import _engine

        classes = {}
        for p, group, route, state in plan.routed:
            backend = self._backend_for(group, p)
            W = p if p.dim() == 2 else p.view(route.shape)
            P = state[self.BASIS_KEY]
            M = state[self.MOMENT_KEY]
            key = (route, W.dtype, P.dtype, M.dtype, W.stride(), P.stride(), str(backend),
                   id(backend)) + self._class_key_extra(p, group, state)
            cls = classes.get(key)
            if cls is None:
                cls = classes[key] = _engine.MatrixClass(key=key, route=route, backend=backend)
            cls.members.append(_engine.Member(p=p, group=group, state=state, W=W))
            cls.Ws.append(W)
            cls.Ps.append(P)
        workspace = self.__dict__.setdefault("_workspace", _engine.Workspace())
        need = {}
        for cls in classes.values():
            low = _ops.low_rank_shape(cls.route.shape, cls.route.rank, cls.route.side)
            count = len(cls.members)
            for dtype in {torch.float32, cls.key[3]}:
                k = (dtype, cls.Ws[0].device)
                need[k] = max(need.get(k, 0), math.prod(low) * count * (
                    2 if dtype == torch.float32 == cls.key[3] else 1))
        for (dtype, device), numel in need.items():
            workspace.reserve(dtype, device, numel)
        for cls in classes.values():
            low = _ops.low_rank_shape(cls.route.shape, cls.route.rank, cls.route.side)
            count = len(cls.members)
            device = cls.Ws[0].device
            if cls.key[3] == torch.float32:      # R and N from one fp32 buffer, disjoint
                both = workspace.views(torch.float32, device, low, 2 * count)
                cls.Rs, cls.Ns = both[:count], both[count:]
            else:
                cls.Rs = workspace.views(torch.float32, device, low, count)
                cls.Ns = workspace.views(cls.key[3], device, low, count)
            # the members' state dicts, and their one group when they share it
            cls.extra["states"] = [m.state for m in cls.members]
            cls.extra["group"] = _engine.shared_group(cls.members)
            self._class_lists(cls)
        plan.classes = classes
        self._class_generation += 1      # a captured step of the old classes is stale
        self._classes_stale = False

    BASIS_KEY = "basis"
    MOMENT_KEY = "exp_avg"   # the state tensor whose dtype is the N workspace's

    def _class_key_extra(self, p, group, state) -> tuple:
        """Hook: what else separates classes for the method (default nothing)."""
        return ()

    def _class_lists(self, cls):
        """Hook: the method's own per-class lists (``cls.extra``) at plan time."""

    def _class_step(self, cls, precision):
        """Hook: one class's step (K1, the middle, K3)."""
        raise NotImplementedError

    # what a method's _class_step calls for the class-wide GEMMs
    def _class_grads(self, cls):
        """The members' gradients as 2-D matrices (views)."""
        params = cls.extra.get("_params")
        if params is None:
            params = cls.extra["_params"] = [m.p for m in cls.members]
            cls.extra["_all_2d"] = all(p.dim() == 2 for p in params)
        if cls.extra["_all_2d"]:
            return self._step_grads(params, cls.extra)
        shape = cls.route.shape
        return [p.grad if p.dim() == 2 else p.grad.reshape(shape) for p in params]

    def _class_project(self, cls, Gs, precision, **side_outputs):
        """K1 of every member into the class's R workspace (one grouped launch; the call is
        checked and resolved once per plan)."""
        k1 = cls.extra.get("k1")
        if k1 is None:
            k1 = cls.extra["k1"] = ops_grouped.BoundGroupedProject(
                Gs, cls.Ps, cls.Rs, side=cls.route.side, backend=cls.backend)
        k1(Gs, precision=precision, layout_token=self._layout_token,
           **side_outputs)
        return cls.Rs

    def _class_k3(self, cls):
        """The class's bound K3 (made at its first use, kept with the class)."""
        k3 = cls.extra.get("k3")
        if k3 is None:
            k3 = cls.extra["k3"] = ops_grouped.BoundGroupedBackprojectUpdate(
                cls.Ws, cls.Ps, cls.Ns, side=cls.route.side, backend=cls.backend)
        return k3

    def _class_update(self, cls, coefs, post_decays, precision, pre_scales=1.0,
                      divisor=None):
        """K3 of every member from the class's N workspace: ``W = W*pre_scale; W -= coef *
        back(N); W -= post_decay*W`` (one grouped launch), skipped on the device with the
        step's non-finite flag. ``divisor``: N read as ``N_b / divisor[b]`` (the class
        limiter's factors; ``_class_k3(cls).takes_divisor`` only)."""
        self._class_k3(cls)(coef=coefs, pre_scale=pre_scales, post_decay=post_decays,
                            precision=precision, skip=self._skip_flag,
                            **({} if divisor is None else {"divisor": divisor}))

    # -- per-layer mode (lowrank_fused.per_layer) -------------------------------------------
    def _per_layer_defers(self) -> bool:
        """True when this step has a phase over all gradients at once (a joint refresh): in
        per-layer mode the gradients are then kept and the whole step runs at the end of
        backward. Default: never."""
        return False

    def _per_layer_begin(self):
        """The first gradient of a backward pass has arrived."""
        if self.nonfinite == "skip":
            raise ValueError("nonfinite='skip' skips a whole step, which per-layer mode cannot "
                             "do (earlier layers are already updated); use 'raise' or 'ignore'")
        for group in self.param_groups:
            self._check_group(group)
        self._pl_defer = self._per_layer_defers()
        self._pl_stepped = []
        self._pl_group = {id(q): g for g in self.param_groups for q in g["params"]}
        if not self._pl_defer:
            self._per_layer_before()

    @torch.no_grad()
    def _per_layer_param(self, p) -> bool:
        """Step one parameter whose gradient is complete; True when it was stepped (its
        gradient may then be freed), False when the step is deferred to the end."""
        if self._pl_defer or not p.numel():
            return False
        self._check_grad(p)
        if self.nonfinite == "raise" and bool(ops.nonfinite_flag([local(p.grad)])):
            self._raise_nonfinite([p], written="it was not updated (per-layer mode: the "
                                               "layers whose gradients came earlier were)")
        group = self._pl_group[id(p)]
        self._step_param(p, group, self._backend_for(group, p), self.precision(p.device))
        self._pl_stepped.append(p)
        return True

    def _per_layer_end(self):
        """After backward: the deferred whole step, or the end of a per-layer step."""
        if self._pl_defer:
            self.step()
            return True
        self._after_per_layer(self._pl_stepped)
        self._after_updates()
        self.step_calls += 1
        return False

    def _per_layer_before(self):
        """Hook: the global phase before per-layer updates (default ``_before_updates``)."""
        self._before_updates()

    def _after_per_layer(self, stepped):
        """Hook: what ``_before_updates`` would have done from knowing which parameters had
        gradients (AdaptiveAdamW's group counters)."""

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state: the storage of every state tensor, each storage
        once (a capacity buffer counts whole, ``optim._capacity``)."""
        seen = {}
        for st in self.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    s = v.untyped_storage()
                    seen[(v.device, s.data_ptr())] = s.nbytes()
        return sum(seen.values())

    def state_dict(self):
        """torch's state dict plus what identifies it: the optimizer class and the shapes of
        its parameters, so a checkpoint cannot load silently into another method or model.
        Plain data only (tensors, numbers, strings): ``torch.load(weights_only=True)`` works."""
        self.nonfinite_check()          # a step skipped on the device: its counters back
        sd = super().state_dict()
        sd[_CHECKPOINT_KEY] = {
            "optimizer": type(self).__name__,
            "param_shapes": [list(p.shape) for g in self.param_groups for p in g["params"]],
            "step_calls": self.step_calls,
            "skipped_steps": self.skipped_steps,
        }
        return sd

    # group keys that fix the shapes and meaning of the state: a checkpoint whose groups differ
    # in one of them is refused (torch would silently take the saved value)
    LAYOUT_KEYS = ("rank", "proj_type", "enable_lowrank", "block", "rank_ratio", "transposed",
                   "head_dim", "qkv_sizes")

    def _check_checkpoint(self, state_dict):
        meta = state_dict.get(_CHECKPOINT_KEY)
        if meta is None:            # a plain torch state dict: torch's own checks apply
            return
        self._check_checkpoint_params(meta)
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} parameter groups, this "
                             f"optimizer has {len(self.param_groups)}")

        def norm(v):
            return [norm(x) for x in v] if isinstance(v, (tuple, list)) else v

        missing = object()
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            for key in self.LAYOUT_KEYS:
                a, b = saved.get(key, missing), group.get(key, missing)
                if norm(a) != norm(b):
                    show = lambda v: "(unset)" if v is missing else repr(v)   # noqa: E731
                    raise ValueError(
                        f"checkpoint's parameter group {i} has {key}={show(a)}, this "
                        f"optimizer's has {key}={show(b)}: the state layout differs, so it is "
                        "not loaded (build the optimizer with the checkpoint's settings)")

    def _check_checkpoint_params(self, meta):
        if meta["optimizer"] != type(self).__name__:
            raise ValueError(f"checkpoint was saved by {meta['optimizer']}; it cannot be loaded "
                             f"into {type(self).__name__}")
        shapes = [list(p.shape) for g in self.param_groups for p in g["params"]]
        if meta["param_shapes"] != shapes:
            diff = next((i for i, (a, b) in enumerate(zip(meta["param_shapes"], shapes))
                         if a != b), min(len(shapes), len(meta["param_shapes"])))
            raise ValueError(
                f"checkpoint was saved for {len(meta['param_shapes'])} parameters, this optimizer "
                f"has {len(shapes)}; first difference at parameter {diff}: saved "
                f"{meta['param_shapes'][diff] if diff < len(meta['param_shapes']) else None}, "
                f"here {shapes[diff] if diff < len(shapes) else None}")

    # keys an earlier version of the method stored under another name (docs/conventions.md,
    # "Names and options every method shares"): {"state": {old: new}, "group": {old: new}};
    # load_state_dict renames them (with the renames every method shares, _RENAMED_ALL), so
    # such a checkpoint still loads
    RENAMED_KEYS = {"state": {}, "group": {}}
    _RENAMED_ALL = {"state": {"ortho": "basis"}, "group": {"correct_bias": "bias_correction"}}

    @classmethod
    def renamed_keys(cls):
        """``{"state": {old: new}, "group": {old: new}}``: every key an earlier version of
        this method stored under another name (the renames all methods share and its own)."""
        return {k: {**cls._RENAMED_ALL[k], **cls.RENAMED_KEYS[k]} for k in ("state", "group")}

    def _renamed(self, state_dict):
        """``state_dict`` with the keys of ``renamed_keys()`` under their current names (a new
        dict; the given one is not changed)."""
        names = self.renamed_keys()
        state_map, group_map = names["state"], names["group"]

        def rename(d, names):
            if not any(k in names for k in d):
                return d
            return {(names[k] if k in names and names[k] not in d else k): v
                    for k, v in d.items()}

        out = dict(state_dict)
        if group_map and "param_groups" in out:
            out["param_groups"] = [rename(g, group_map) for g in out["param_groups"]]
        if state_map and "state" in out:
            out["state"] = {i: rename(st, state_map) for i, st in out["state"].items()}
        return out

    def load_state_dict(self, state_dict):
        """As torch's, after checking the checkpoint belongs to this optimizer class and these
        parameter shapes; every state tensor keeps its saved dtype (torch casts floating state
        to the parameter dtype, which would round fp32 moments of bf16 parameters) and moves to
        its parameter's device. Keys an earlier version stored under another name
        (``renamed_keys()``) are renamed first."""
        state_dict = self._renamed(state_dict)
        self._check_checkpoint(state_dict)
        meta = state_dict.get(_CHECKPOINT_KEY) or {}
        state_dict = {k: v for k, v in state_dict.items() if k != _CHECKPOINT_KEY}
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in saved.items():
            p = params[int(idx)]
            for key, value in st.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        self.step_calls = int(meta.get("step_calls", 0))
        self.skipped_steps = int(meta.get("skipped_steps", 0))
        self._resolved = {}
        self._multi_resolved = {}
        self._invalidate_plan()
        self.__dict__.pop("_pending_nonfinite", None)   # a flag of the state just replaced
        self._settle_lagged(True)                        # and its lagged decisions
        self._after_load()

    def _after_load(self):
        """Hook: the state was just loaded (compact copies of the saved tensors)."""
