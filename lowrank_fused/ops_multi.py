"""Multi-tensor versions of the public ops: one call (one CUDA launch, one OpenMP
loop on the CPU twin) updates every tensor of the lists.

``adam_moments_multi`` is ``ops.adam_moments`` over lists (R_i, M_i, V_i, N_i);
``adamw_step_multi`` is ``ops.adamw_step`` over lists (W_i, G_i, M_i, V_i). Every scalar
argument (and ``step``) may be one value for all tensors or a sequence with one value per
tensor (parameter groups with their own learning rates, betas, ...); the per-tensor kernel
scalars are derived exactly as the single ops derive them (``ops.bias_corrections``,
``ops.hf_step_size``, ``ops.decay_coefficients`` and the eps-mode divisors).

Optional outputs: ``norms`` (fp32, one element per tensor) receives ``sum(N_i^2)`` for the
norm-growth limiter; ``nonfinite`` (int32, one element) is set to 1 when an input R_i (G_i)
holds a NaN or an infinity and is otherwise left alone, so the caller zeroes it once, may
collect several calls into it, and reads it once.

``skip`` (optional, a 0-dim torch.bool tensor on the tensors' device, e.g.
``ops.nonfinite_flag(...)``): when it holds True, no state, weight or ``norms`` entry is
written (every one keeps its bits), while ``nonfinite`` still reports the inputs exactly as
without a flag (set to 1 when an input R_i / G_i holds a NaN or an infinity). The flag is read
on the device only, never on the host.
"""
from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch

from lowrank_fused import ops
from lowrank_fused.dispatch import implementation

__all__ = ["adam_moments_multi", "adamw_step_multi", "nonfinite_flags", "BoundNonfiniteFlags"]


def _as_list(name, t):
    if not isinstance(t, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(t).__name__}")
    return list(t)


def _check_lists(lists: dict):
    """Same lengths, float tensors, shapes of the first list, one device. Returns the count."""
    names = list(lists)
    count = len(lists[names[0]])
    for name in names[1:]:
        if len(lists[name]) != count:
            raise ValueError(f"{name} has {len(lists[name])} tensors but {names[0]} has {count}")
    device = None
    for i in range(count):
        like = lists[names[0]][i]
        for name in names:
            t = lists[name][i]
            ops._check_float(f"{name}[{i}]", t)
            if tuple(t.shape) != tuple(like.shape):
                raise ValueError(f"{name}[{i}] must have the shape of {names[0]}[{i}] "
                                 f"{tuple(like.shape)}, got {tuple(t.shape)}")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {names[0]}[0] is on "
                                 f"{device}; all tensors must be on one device")
    return count, device


def _per_tensor(name, value, count):
    """One value per tensor from a scalar or a sequence of ``count`` values."""
    kind = type(value)
    if kind is float or kind is int or (isinstance(value, (Real, torch.Tensor)) and not (
            isinstance(value, torch.Tensor) and value.dim() > 0)):
        return [float(value)] * count
    vals = list(value)
    if len(vals) != count:
        raise ValueError(f"{name} must be a number or hold one value per tensor ({count}), "
                         f"got {len(vals)} values")
    return list(map(float, vals))


def _per_tensor_step(step, count):
    steps = _per_tensor("step", step, count)
    for i, s in enumerate(steps):
        if s != int(s):
            raise ValueError(f"step[{i}] must be an integer, got {s}")
    return [int(s) for s in steps]


def adam_moments_multi(Rs, Ms, Vs, Ns, *, beta1, beta2, eps, step, eps_mode="hf", norms=None,
                       nonfinite=None, backend="auto", skip=None):
    """K2 in place on every (R_i, M_i, V_i, N_i): the math of ``ops.adam_moments`` per tensor.

    Returns ``Ns``. ``norms``/``nonfinite``/``skip``: see the module docstring (with ``skip``
    True the Ms, Vs, Ns and ``norms`` keep their bits; ``nonfinite`` is still set).
    """
    lists = {name: _as_list(name, t)
             for name, t in (("Rs", Rs), ("Ms", Ms), ("Vs", Vs), ("Ns", Ns))}
    count, device = _check_lists(lists)
    b1 = _per_tensor("beta1", beta1, count)
    b2 = _per_tensor("beta2", beta2, count)
    ep = _per_tensor("eps", eps, count)
    steps = _per_tensor_step(step, count)
    c1, c2 = [], []
    for i in range(count):
        a, b = ops._eps_mode_divisors(eps_mode, b1[i], b2[i], steps[i])
        c1.append(float(a))
        c2.append(float(b))
    kw = {}
    if skip is not None:
        ops._check_skip(skip, device)
        kw["skip"] = skip
    if count == 0:
        return Ns
    impl = implementation("adam_moments_multi", backend, device)
    impl(lists["Rs"], lists["Ms"], lists["Vs"], lists["Ns"], beta1=b1, beta2=b2, eps=ep,
         c1=c1, c2=c2, norms=norms, nonfinite=nonfinite, **kw)
    return Ns


def adamw_step_multi(Ws, Gs, Ms, Vs, *, lr, beta1, beta2, eps, step, weight_decay=0.0,
                     eps_mode="torch", wd_mode="pre", bias_correction=True, nonfinite=None,
                     backend="auto", skip=None):
    """Dense AdamW step in place on every (W_i, M_i, V_i): the math of ``ops.adamw_step`` per
    tensor. Returns ``Ws``. ``nonfinite``/``skip``: see the module docstring (with ``skip``
    True the Ws, Ms and Vs keep their bits; ``nonfinite`` is still set)."""
    lists = {name: _as_list(name, t)
             for name, t in (("Ws", Ws), ("Gs", Gs), ("Ms", Ms), ("Vs", Vs))}
    count, device = _check_lists(lists)
    lrs = _per_tensor("lr", lr, count)
    b1 = _per_tensor("beta1", beta1, count)
    b2 = _per_tensor("beta2", beta2, count)
    ep = _per_tensor("eps", eps, count)
    wds = _per_tensor("weight_decay", weight_decay, count)
    steps = _per_tensor_step(step, count)
    kw = {k: [] for k in ("lr", "c1", "c2", "pre_scale", "post_decay")}
    for i in range(count):
        c1, c2 = ops._eps_mode_divisors(eps_mode, b1[i], b2[i], steps[i])
        if eps_mode == "torch":
            step_size = lrs[i]
        else:
            step_size = ops.hf_step_size(lrs[i], b1[i], b2[i], steps[i], bias_correction)
        pre_scale, post_decay = ops.decay_coefficients(lrs[i], wds[i], wd_mode)
        for k, v in (("lr", step_size), ("c1", c1), ("c2", c2), ("pre_scale", pre_scale),
                     ("post_decay", post_decay)):
            if not math.isfinite(v):
                raise ValueError(f"{k}[{i}] must be finite, got {v}")
            kw[k].append(float(v))
    if skip is not None:
        ops._check_skip(skip, device)
        kw["skip"] = skip
    if count == 0:
        return Ws
    impl = implementation("adamw_step_multi", backend, device)
    impl(lists["Ws"], lists["Gs"], lists["Ms"], lists["Vs"], beta1=b1, beta2=b2, eps=ep,
         nonfinite=nonfinite, **kw)
    return Ws


# -- bound calls: fixed lists checked once, called every step ---------------------------------

def _bind(op, backend, device, lists: dict, dynamic=None):
    """``run(dynamic_list, **scalars)`` for ``op`` on fixed ``lists`` (checked by the caller):
    the compiled extension's ``PackedMulti`` where the call goes there, else the resolved
    implementation called with the lists."""
    from lowrank_fused.dispatch import resolve_call

    chosen, impl = resolve_call(op, backend, device, *lists.values())
    if chosen in ("cpu", "cuda"):
        from lowrank_fused import _ext_ops

        # the extension's registered function: its packed fast path (a table entry replaced
        # by a wrapper, as tests do, is called as it is)
        if impl is getattr(_ext_ops, f"{op}_{chosen}", None):
            return _ext_ops.PackedMulti(op, chosen, lists, dynamic)
    names = list(lists)

    def run(dyn=None, **kw):
        args = [dyn if name == dynamic else lists[name] for name in names]
        impl(*args, **kw)
    return run


_DTYPE = torch.Tensor.dtype.__get__


def _table_for(run, rows, count, device):
    """A per-step scalar table for a bound call that goes to the compiled extension (whose
    kernels then read their scalars from it: the same arguments every step), else None."""
    from lowrank_fused import _ext_ops

    if isinstance(run, _ext_ops.PackedMulti):
        from lowrank_fused._tables import StagedTable

        return StagedTable(rows, count, device)
    return None


def _memo_rows(rows, derive):
    """``[derive(*row) for row in rows]`` with each distinct row derived once."""
    memo = {}
    out = []
    for row in rows:
        v = memo.get(row)
        if v is None:
            v = memo[row] = derive(*row)
        out.append(v)
    return out


class BoundAdamMomentsMulti:
    """``adam_moments_multi`` on fixed lists (R, M, V, N): checked and resolved once, here; a
    call takes one ``(beta1, beta2, eps, step)`` row per tensor and the ``skip`` flag."""

    _last = (None, None)     # ((eps_mode, row), its scalars): the last one-row call's

    def __init__(self, Rs, Ms, Vs, Ns, *, eps_mode="hf", backend="auto"):
        lists = {name: _as_list(name, t)
                 for name, t in (("Rs", Rs), ("Ms", Ms), ("Vs", Vs), ("Ns", Ns))}
        self.count, self.device = _check_lists(lists)
        if self.count == 0:
            raise ValueError("a bound call needs at least one tensor")
        if eps_mode not in ("hf", "torch"):
            raise ValueError(f"eps_mode must be 'hf' or 'torch', got {eps_mode!r}")
        self.eps_mode = eps_mode
        self.run = _bind("adam_moments_multi", backend, self.device, lists)
        self.table = _table_for(self.run, 7, self.count, self.device)
        self._skip = None                                 # the last checked skip flag

    def _scalars(self, b1, b2, eps, t):
        if t != int(t):
            raise ValueError(f"step must be an integer, got {t}")
        c1, c2 = ops._eps_mode_divisors(self.eps_mode, b1, b2, int(t))
        return float(b1), float(b2), float(eps), float(c1), float(c2)

    def __call__(self, rows, *, norms=None, skip=None):
        """``rows``: one ``(beta1, beta2, eps, step)`` per tensor, or one such tuple for all."""
        if isinstance(rows, tuple):
            if len(rows) != 4:
                raise ValueError(f"a row for every tensor must be (beta1, beta2, eps, step), "
                                 f"got {rows!r}")
            key = (self.eps_mode, rows)
            memo = BoundAdamMomentsMulti._last   # a step's classes share their row
            if memo[0] == key:
                one = memo[1]
            else:
                one = self._scalars(*rows)
                BoundAdamMomentsMulti._last = (key, one)
            cols = [[v] for v in one] if self.table is not None else \
                [[v] * self.count for v in one]
        elif len(rows) != self.count:
            raise ValueError(f"rows must hold one (beta1, beta2, eps, step) per tensor "
                             f"({self.count}), got {len(rows)}")
        else:
            cols = [list(x) for x in zip(*_memo_rows(rows, self._scalars))]
        self._skip = ops.checked_skip(skip, self.device, self._skip)
        if self.table is not None:        # the scalars from a table at a fixed address
            if isinstance(rows, tuple):   # one value per row, rounded once to fp32
                b1, b2, eps, c1, c2 = one
            else:
                b1, b2, eps, c1, c2 = (np.asarray(c, dtype=np.float64) for c in cols)
            self.run(None, table=self.table.fill([b1, 1.0 - b1, b2, 1.0 - b2, eps, c1, c2]),
                     norms=norms, skip=skip)
            return
        b1, b2, eps, c1, c2 = cols
        self.run(None, beta1=b1, beta2=b2, eps=eps, c1=c1, c2=c2, norms=norms, skip=skip)


class BoundAdamWStepMulti:
    """``adamw_step_multi`` on fixed lists (W, M, V) with the gradients given per call:
    checked and resolved once, here (the gradients of a call must have the dtypes and shapes
    of ``G_like``); a call takes one ``(lr, beta1, beta2, eps, weight_decay, step)`` row per
    tensor and the ``skip`` flag."""

    def __init__(self, Ws, G_like, Ms, Vs, *, eps_mode="torch", wd_mode="pre",
                 bias_correction=True, backend="auto"):
        lists = {name: _as_list(name, t)
                 for name, t in (("Ws", Ws), ("Gs", G_like), ("Ms", Ms), ("Vs", Vs))}
        self.count, self.device = _check_lists(lists)
        if self.count == 0:
            raise ValueError("a bound call needs at least one tensor")
        self.eps_mode, self.wd_mode, self.bias_correction = eps_mode, wd_mode, bool(bias_correction)
        # the cheap check of a call: three list comparisons (C loops)
        self._like_lists = ([G.shape for G in lists["Gs"]], [G.dtype for G in lists["Gs"]],
                            [G.get_device() for G in lists["Gs"]])
        self.run = _bind("adamw_step_multi", backend, self.device, lists, dynamic="Gs")
        self.table = _table_for(self.run, 12, self.count, self.device)
        self._token = None        # the layout_token of the last call whose Gs were checked
        self._skip = None         # the last checked skip flag

    def _check_grads(self, Gs):
        shapes, dtypes, devices = self._like_lists
        if not (list(map(torch.Tensor.size, Gs)) == shapes
                and list(map(_DTYPE, Gs)) == dtypes
                and list(map(torch.Tensor.get_device, Gs)) == devices):
            for i, (G, shape, dtype, device) in enumerate(zip(Gs, shapes, dtypes, devices)):
                ops._check_float(f"Gs[{i}]", G)
                if (G.shape, G.dtype, G.get_device()) != (shape, dtype, device):
                    raise ValueError(f"Gs[{i}] ({tuple(G.shape)}, {G.dtype}, {G.device}) differs "
                                     f"from the bound gradient ({tuple(shape)}, {dtype}, "
                                     f"{self.device})")

    def _scalars(self, lr, b1, b2, eps, wd, t):
        if t != int(t):
            raise ValueError(f"step must be an integer, got {t}")
        t = int(t)
        c1, c2 = ops._eps_mode_divisors(self.eps_mode, b1, b2, t)
        step_size = lr if self.eps_mode == "torch" else ops.hf_step_size(lr, b1, b2, t,
                                                                         self.bias_correction)
        pre_scale, post_decay = ops.decay_coefficients(lr, wd, self.wd_mode)
        out = (float(step_size), float(b1), float(b2), float(eps), float(c1), float(c2),
               float(pre_scale), float(post_decay))
        for name, v in zip(("lr", "beta1", "beta2", "eps", "c1", "c2", "pre_scale",
                            "post_decay"), out):
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        return out

    def __call__(self, Gs, rows, *, skip=None, layout_token=None):
        """``layout_token``: as ``ops_grouped.BoundGroupedProject``'s (the check of ``Gs``
        once per token)."""
        if len(rows) != self.count or len(Gs) != self.count:
            raise ValueError(f"Gs and rows must hold one entry per tensor ({self.count}), got "
                             f"{len(Gs)} and {len(rows)}")
        if layout_token is None or layout_token != self._token:
            self._check_grads(Gs)
            self._token = layout_token
        if rows.count(rows[0]) == len(rows):   # one row for every tensor (the common case)
            one = self._scalars(*rows[0])
            cols = [[v] * self.count for v in one] if self.table is None else None
        else:
            one = None
            cols = [list(x) for x in zip(*_memo_rows(rows, self._scalars))]
        self._skip = ops.checked_skip(skip, self.device, self._skip)
        if self.table is not None:        # the scalars from a table at a fixed address
            lr, b1, b2, eps, c1, c2, pre, post = (
                (np.float64(v) for v in one) if one is not None else
                (np.asarray(c, dtype=np.float64) for c in cols))
            self.run(Gs, table=self.table.fill([lr, b1, 1.0 - b1, b2, 1.0 - b2, eps, c1, c2,
                                                pre, post, pre != 1.0, post != 0.0]),
                     skip=skip, layout_token=layout_token)
            return
        self.run(Gs, lr=cols[0], beta1=cols[1], beta2=cols[2], eps=cols[3], c1=cols[4],
                 c2=cols[5], pre_scale=cols[6], post_decay=cols[7], skip=skip)


# -- per-tensor non-finite flags: one call for every gradient of a step ----------------------

class BoundNonfiniteFlags:
    """Per-tensor non-finite flags of a fixed list of tensors (a step's gradients), into one
    persistent device buffer: ``flags`` (torch.bool, ``count + 1``): ``flags[i]`` is True when
    tensor i holds a NaN or an infinity, ``flags[count]`` (``any``, a 0-dim view) when any
    does. Every call rewrites the whole buffer at the same address and reads nothing back to
    the host: the optimizers hand ``any`` to their ops as the on-device ``skip`` flag and copy
    ``per_tensor`` to the host asynchronously, to name the parameter later.

    Bound once to the tensors' count, sizes, dtypes and device (``like``); a call takes the
    step's tensors, which must match them. Where the compiled extension serves the device
    (``backend="auto"``, every tensor contiguous float32/bfloat16/float16/float64) a call is
    one OpenMP loop on the CPU or one kernel launch on CUDA (per ~1200 tensors); otherwise
    (``backend="reference"``, a non-contiguous tensor, no extension) torch's multi-tensor
    max-abs reduction per dtype (``torch._foreach_norm`` with ``ord=inf``, which propagates
    NaN) and a scatter by precomputed device indices. Empty tensors are never flagged."""

    _CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

    def __init__(self, like, *, backend="auto"):
        like = _as_list("like", like)
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend must be 'auto' or 'reference', got {backend!r}")
        if not like:
            raise ValueError("a bound call needs at least one tensor")
        device = like[0].device
        for i, t in enumerate(like):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"like[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in self._CODES:
                raise TypeError(f"like[{i}] has dtype {t.dtype}; the flags take float32, "
                                f"bfloat16, float16 or float64 tensors")
            if t.device != device:
                raise ValueError(f"like[{i}] is on {t.device} but like[0] is on {device}")
        self.count, self.device = len(like), device
        self.sizes = [t.numel() for t in like]
        self.dtypes = [t.dtype for t in like]
        self.codes = [self._CODES[d] for d in self.dtypes]
        self.flags = torch.zeros(self.count + 1, dtype=torch.bool, device=device)
        self.any = self.flags[self.count]
        self.per_tensor = self.flags[:self.count]
        self.where = "reference"
        if backend == "auto":
            from lowrank_fused import _ext

            why = _ext.why_no_cpu() if device.type == "cpu" else (
                _ext.why_no_cuda() if device.type == "cuda" else "no compiled backend")
            if why is None:
                self.where = device.type
        self._groups = None           # the reference path's (indices on the device, positions)

    def _reference_groups(self):
        if self._groups is None:
            by_dtype = {}
            for i, (n, d) in enumerate(zip(self.sizes, self.dtypes)):
                if n:
                    by_dtype.setdefault(d, []).append(i)
            self._groups = [(torch.tensor(pos, dtype=torch.int64).to(self.device), pos)
                            for pos in by_dtype.values()]
        return self._groups

    # the layout token of the last call whose tensors were checked (see ``__call__``)
    _token = None
    _contiguous = False

    def __call__(self, tensors, *, layout_token=None):
        """The flags of ``tensors`` (shapes' element counts and dtypes as bound); returns
        ``any`` (a 0-dim view of the buffer). ``layout_token``: as
        ``ops_grouped.BoundGroupedProject``'s, a value that stays the same for as long as
        every tensor's layout (shape, strides, dtype, device) does; the element counts,
        dtypes and contiguity are then checked once per token instead of at every call."""
        if len(tensors) != self.count:
            raise ValueError(f"tensors must hold {self.count} tensors (as bound), got "
                             f"{len(tensors)}")
        if layout_token is None or layout_token != self._token:
            self._token = None
            if (list(map(torch.Tensor.numel, tensors)) != self.sizes
                    or list(map(_DTYPE, tensors)) != self.dtypes):
                for i, t in enumerate(tensors):
                    if t.numel() != self.sizes[i] or t.dtype != self.dtypes[i]:
                        raise ValueError(f"tensors[{i}] ({t.numel()} elements, {t.dtype}) "
                                         f"differs from the bound tensor ({self.sizes[i]} "
                                         f"elements, {self.dtypes[i]})")
            self._contiguous = all(map(torch.Tensor.is_contiguous, tensors))
            self._token = layout_token
        from lowrank_fused import _capture

        if _capture.replaying():       # a replayed CUDA graph makes the launch
            return self.any
        if self.where != "reference" and self._contiguous:
            from lowrank_fused import _ext_ops

            _ext_ops.nonfinite_flags_multi(self.where, list(map(torch.Tensor.data_ptr, tensors)),
                                           self.sizes, self.codes, self.flags)
            return self.any
        self.flags.zero_()
        for index, pos in self._reference_groups():
            maxima = torch._foreach_norm([tensors[i] for i in pos], ord=math.inf)
            self.per_tensor.index_copy_(0, index, ~torch.isfinite(torch.stack(maxima)))
        torch.any(self.per_tensor, dim=0, keepdim=True, out=self.flags[self.count:])
        return self.any


def nonfinite_flags(tensors, *, backend="auto"):
    """Per-tensor non-finite flags: a torch.bool tensor of ``len(tensors) + 1`` on the
    tensors' device, entry i True when ``tensors[i]`` holds a NaN or an infinity, the last
    entry True when any does (``BoundNonfiniteFlags`` for a list checked every step)."""
    tensors = _as_list("tensors", tensors)
    if not tensors:
        return torch.zeros(1, dtype=torch.bool)
    bound = BoundNonfiniteFlags(tensors, backend=backend)
    bound(tensors)
    return bound.flags
