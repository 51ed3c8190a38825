"""Replaying a captured optimizer step (``LowRankOptimizer.capture``, docs/engine.md).

A captured steady step is a CUDA graph of its launches: the non-finite flags, each class's
grouped K1, K2 and K3, the dense multi-tensor calls. Replaying it still runs the step's host
logic in Python (the checks, the step counters, the per-step scalars, which the host writes
into the pinned staging buffers of the scalar tables, ``lowrank_fused._tables``), but with
every launch of the bound calls suppressed: ``replaying()`` is True then, and each bound call
does its host work and returns before launching; the graph's replay then does all of it, the
tables' copies from their staging buffers included.
"""
from __future__ import annotations

import contextlib

_REPLAYING = False
_WAIT = None        # the event of the last replay: staging buffers are rewritten after it


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
