"""The step engine: one planned path per step, shared by every method.

A method says, per parameter, which *route* its update takes (``LowRankOptimizer._route``):

* ``DenseRoute``: the dense AdamW step with the method's conventions. Every dense parameter of a
  step that shares a device, a backend and the conventions runs in one multi-tensor call.
* ``ClassRoute``: a projected matrix of a *class* (side, rank, 2-D shape, dtypes, strides).
  Every class runs as one grouped projection (K1), the method's middle step on the whole
  class (R -> N and K3's coefficients, in the method's ``_class_step``) and one grouped
  back-projection with the weight update (K3). A class of one matrix is just a small class.
  Methods without a projection pair (AdaPM, Adafactor, AdaMeM's Adafactor parameters) group
  their parameters into classes of their own kinds by the same rules.
* None: the method's own per-parameter step (``_step_param``), for what the engine does not
  plan (FSDP2 shards, parameters whose 2-D view needs a copy, per-layer mode).

The plan (routes, classes, their tensors and workspaces) is built once and kept while the
structure stays: the same parameters with gradients, the same state tensors. It is rebuilt
after ``add_param_group``, ``load_state_dict``, or when a method replaces a state tensor (e.g. a
refresh that changes a rank); a refresh that keeps the shape writes the new basis in place, so
a steady step reuses the plan, its tensor lists and its workspaces, and allocates nothing.

Workspaces: a class needs its projected gradients R (fp32) and normalised steps N (state dtype)
for all its members at once. Classes run one after the other, so one pair of buffers, sized for
the largest class, serves them all (``Workspace``); that memory is held between steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch


@dataclass(frozen=True)
class DenseRoute:
    """The dense AdamW step: ``eps_mode``/``wd_mode``/``bias_correction`` as ``ops.adamw_step``;
    ``global_step``: the bias correction uses the optimizer's own counter (LDAdam) instead of
    the parameter's."""
    eps_mode: str
    wd_mode: str
    bias_correction: bool = True
    global_step: bool = False


@dataclass(frozen=True)
class ClassRoute:
    """A projected matrix: its side, rank and 2-D shape (trailing dims flattened)."""
    side: str
    rank: int
    shape: tuple


@dataclass
class Member:
    """One matrix of a class: its parameter, group, state and 2-D view of the weight."""
    p: Any
    group: dict
    state: dict
    W: torch.Tensor


@dataclass
class MatrixClass:
    """The matrices of one class, with their lists of tensors (fixed while the plan lives)
    and the workspace views the step writes R and N into."""
    key: tuple
    route: ClassRoute
    backend: Any
    members: List[Member] = field(default_factory=list)
    Ws: list = field(default_factory=list)
    Ps: list = field(default_factory=list)
    Rs: list = field(default_factory=list)
    Ns: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # the method's own lists (moments, ...)


@dataclass
class DenseSet:
    """The dense parameters sharing one multi-tensor call."""
    route: DenseRoute
    backend: Any
    where: Optional[str]              # the multi-tensor op's backend, None: per tensor
    params: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    states: list = field(default_factory=list)
    Ws: list = field(default_factory=list)
    Ms: list = field(default_factory=list)
    Vs: list = field(default_factory=list)
    bound: Any = None                  # the multi-tensor call, bound at the first step
    extra: dict = field(default_factory=dict)   # what the optimizer keeps per set


class Workspace:
    """Flat buffers per dtype, grown to the largest request and reused by every class."""

    def __init__(self):
        self._buffers = {}

    def views(self, dtype, device, shape, count):
        """``count`` disjoint, contiguous ``shape`` views of the ``dtype`` buffer."""
        numel = math.prod(shape)
        need = numel * count
        key = (dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < need:
            buf = torch.empty(need, dtype=dtype, device=device)
            self._buffers[key] = buf
        return list(buf[:need].view((count,) + tuple(shape)).unbind(0))

    def reserve(self, dtype, device, numel):
        key = (dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass
class Plan:
    """What a steady step runs: the per-parameter fallbacks, the classes and the dense sets."""
    signature: tuple
    legacy: list = field(default_factory=list)        # (p, group)
    classes: dict = field(default_factory=dict)       # key -> MatrixClass
    dense: dict = field(default_factory=dict)         # key -> DenseSet
    routed: list = field(default_factory=list)        # (p, group, route, state): classes
    flags: Any = None     # the per-tensor non-finite flags (ops_multi.BoundNonfiniteFlags)
    live: list = field(default_factory=list)          # (p, group) of every planned parameter
    params: list = field(default_factory=list)        # their parameters, in that order
    # id(parameter) -> position in the step's list of gradients (``_step_params``)
    positions: Any = None
    extra: dict = field(default_factory=dict)   # what the optimizer keeps per plan

    @property
    def counters(self):
        """The state dicts whose ``"step"`` counter an engine step advances by one."""
        out = [st for d in self.dense.values() if not d.route.global_step for st in d.states]
        return out + [st for _, _, _, st in self.routed]


def shared_group(members):
    """The param group every member of a class belongs to, or None when they span several
    (a class's scalars are then derived once for the whole class)."""
    groups = {id(m.group): m.group for m in members}
    return next(iter(groups.values())) if len(groups) == 1 else None


def per_member(groups, value):
    """``[value(g) for g in groups]`` with ``value`` evaluated once per distinct group."""
    memo = {}
    out = []
    for g in groups:
        k = id(g)
        v = memo.get(k)
        if v is None:
            v = memo[k] = value(g)
        out.append(v)
    return out
