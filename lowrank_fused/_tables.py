"""Per-step scalar tables: small fp32 tables a kernel reads its per-member scalars from, kept
at one device address for the life of their owner.

A bound call (the step engine's grouped and multi-tensor launches) keeps one ``StagedTable``
and refills it every step: the kernels then see the same arguments at every step, only the
table's contents change, which is what replaying a captured CUDA graph requires. On CUDA the
host writes the new values into a pinned staging buffer and the stream copies them to the
device table without blocking the host (inside the graph when the step is captured, where the
copy node reads the staging buffer at every replay); the staging buffer is rewritten only
after the previous copy from it has completed (an event recorded after it, long done by the
next step). On the CPU the table is host memory, written in place.
"""
from __future__ import annotations

import torch


class StagedTable:
    """A ``(rows, count)`` fp32 table on ``device`` with its pinned staging (on CUDA)."""

    def __init__(self, rows: int, count: int, device):
        device = torch.device(device)
        self.shape = (rows, count)
        self.device = device
        self.table = torch.empty(self.shape, dtype=torch.float32, device=device)
        self.staging = (torch.empty(self.shape, dtype=torch.float32, pin_memory=True)
                        if device.type == "cuda" else None)
        self._host = (self.staging if self.staging is not None else self.table).numpy()
        self._event = None

    def fill(self, values) -> torch.Tensor:
        """Write ``values`` (anything numpy assigns to a ``(rows, count)`` float32 array, or a
        list of rows, each one number for every member or ``count`` numbers; each Python
        float or float64 value is rounded once to the nearest fp32) and return the table (the
        same tensor every call)."""
        if self.staging is None:
            self._write(values)
            return self.table
        from lowrank_fused import _capture

        if _capture.replaying():      # the graph copies the staging buffer at its replay
            done = _capture.last_replay_event()
            if done is not None:
                done.synchronize()    # the previous replay's copy, long done
            self._write(values)
            return self.table
        capturing = torch.cuda.is_current_stream_capturing()
        if self._event is not None and not capturing:   # (a capture starts on an idle stream)
            self._event.synchronize()        # the previous step's copy, long done
        self._write(values)
        self.table.copy_(self.staging, non_blocking=True)
        if not capturing:
            self._event = torch.cuda.Event()
            self._event.record()
        return self.table

    def _write(self, values):
        if isinstance(values, (list, tuple)) and len(values) == self.shape[0]:
            host = self._host
            for i, row in enumerate(values):     # a number broadcasts along its row
                host[i] = row
        else:
            self._host[...] = values

