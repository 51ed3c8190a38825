"""Replaying a captured optimizer step (``LowRankOptimizer.capture``, docs/engine.md).

A captured steady step is a CUDA graph of its launches: the non-finite flags, each class's
grouped K1, K2 and K3, the dense multi-tensor calls. Replaying it still runs the step's host
logic in Python (the checks, the step counters, the per-step scalars, which the host writes
into the pinned staging buffers of the scalar tables, ``lowrank_fused._tables``), but with
every launch of the bound calls suppressed: ``replaying()`` is True then, and each bound call
does its host work and returns before launching; the graph's replay then does all of it, the
tables' copies from their staging buffers included.

Device work that is not a bound call (a method's batched torch ops with fixed tensors and
scalars that the capture key holds) runs through ``unit``: skipped on a replay as a whole.
"""
from __future__ import annotations

import contextlib

_REPLAYING = False
_WAIT = None        # the event of the last replay: staging buffers are rewritten after it
_RECORDER = None    # called with (fn, args, kwargs) of each outermost unit run (tests' tapes)
_DEPTH = 0          # units running now (a unit's own launches are part of it)


def replaying() -> bool:
    """True inside ``replay()``: bound calls skip their launches (the graph makes them)."""
    return _REPLAYING


def last_replay_event():
    return _WAIT


@contextlib.contextmanager
def replay(wait_event=None):
    """The host half of a replayed step: launches suppressed; ``wait_event`` (the previous
    replay's completion) is what a staging buffer waits for before it is rewritten."""
    global _REPLAYING, _WAIT
    saved = (_REPLAYING, _WAIT)
    _REPLAYING, _WAIT = True, wait_event
    try:
        yield
    finally:
        _REPLAYING, _WAIT = saved


def unit(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, device work a captured graph holds as a whole (batched torch
    ops and launches on tensors that stay put; every value it takes by value in the capture
    key): skipped on a replay (returns None then). ``inside_unit()`` is True while it runs."""
    global _DEPTH
    if _REPLAYING:
        return None
    if _RECORDER is not None and _DEPTH == 0:
        _RECORDER(fn, args, kwargs)
    _DEPTH += 1
    try:
        return fn(*args, **kwargs)
    finally:
        _DEPTH -= 1


def inside_unit() -> bool:
    return _DEPTH > 0
