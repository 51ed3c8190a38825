"""Addressing for the grouped kernels: many same-shape matrices in one launch.

The matrices of a group are separate allocations. A grouped kernel receives, per operand list,
one base pointer (the list's first tensor) and an int64 table of element offsets of every
member from it, ``(t.data_ptr() - base.data_ptr()) // element_size``; the program for member
``b`` adds ``offs[list, b]`` to the base pointer. The offsets may be negative and span unrelated
allocations: the Triton interpreter works on raw addresses and accepts that (checked with
Triton 3.9, as is the alternative of int64 addresses cast with ``.to(tl.pointer_type(...))``),
and both forms compile for sm_90. Members share shape and strides, so one set of strides
serves the whole group.

Alignment: the JIT specialises a base pointer that is 16-byte aligned, but an offset loaded at
run time tells the compiler nothing, so without a hint every load of a member falls back to
element-wise accesses (sm_90 PTX: ``ld.global.b16`` instead of ``ld.global.v4.b32`` for bf16).
When every offset is a multiple of 16 bytes (always so for separate CUDA allocations, which are
512-byte aligned) the launcher sets ``ALIGNED`` and the kernel asserts it with
``tl.multiple_of``, recovering the single-matrix kernels' 16-byte ``cp.async`` and vector loads
(compared in the sm_90 PTX); views at odd offsets in one buffer get the unaligned variant.

The offset tables depend only on where the members lie relative to each other, so they are
cached per device: an optimizer calling every step with the same tensors pays no host-to-device
copy for them after the first step.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from lowrank_fused._tables import StagedTable

ALIGN_BYTES = 16
_CACHE_SIZE = 256
_OFFSETS = OrderedDict()   # (device, sizes, offsets) -> (int64 tensor on the device, aligned)


def check_layout(name: str, tensors) -> None:
    """Every member of ``tensors`` has the first one's shape, strides and dtype."""
    like = tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != like.shape or t.stride() != like.stride() or t.dtype != like.dtype:
            raise ValueError(f"{name}[{i}] (shape {tuple(t.shape)}, strides {t.stride()}, "
                             f"{t.dtype}) differs from {name}[0] (shape {tuple(like.shape)}, "
                             f"strides {like.stride()}, {like.dtype}): a group shares one "
                             f"layout")


def element_offsets(name: str, tensors) -> list:
    """Element offsets of every tensor of ``tensors`` from ``tensors[0]`` (one dtype)."""
    base = tensors[0].data_ptr()
    size = tensors[0].element_size()
    out = []
    for i, t in enumerate(tensors):
        delta = t.data_ptr() - base
        if delta % size:
            raise ValueError(f"{name}[{i}] starts {delta} bytes from {name}[0], not a multiple of "
                             f"the element size {size}: a group is addressed in elements from "
                             f"its first member")
        out.append(delta // size)
    return out


def regular_offsets(count: int, step: int) -> list:
    """Offsets of ``count`` equal slices of one buffer, ``step`` elements apart."""
    return [b * step for b in range(count)]


def offsets_table(rows, element_sizes, device):
    """``(offs, aligned)``: the int64 (len(rows), count) table on ``device`` (cached) and
    whether every offset is a multiple of ``ALIGN_BYTES`` bytes."""
    key = (str(device), tuple(element_sizes), tuple(tuple(row) for row in rows))
    entry = _OFFSETS.get(key)
    if entry is None:
        aligned = all((o * size) % ALIGN_BYTES == 0
                      for row, size in zip(rows, element_sizes) for o in row)
        entry = _OFFSETS[key] = (torch.tensor(rows, dtype=torch.int64).to(device), aligned)
        if len(_OFFSETS) > _CACHE_SIZE:
            _OFFSETS.popitem(last=False)
    else:
        _OFFSETS.move_to_end(key)
    return entry


_TABLES = OrderedDict()    # key -> StagedTable


def scalar_table(rows, device, key=None) -> torch.Tensor:
    """Per-member fp32 scalars (``len(rows)`` x count) on ``device``; on CUDA staged in pinned
    memory and copied without blocking the host.

    With ``key`` (hashable; the caller's identity, e.g. its first output's address) the table
    is kept and refilled in place on every call with that key (``lowrank_fused._tables``):
    the kernel then sees the same address at every step (what a CUDA-graph replay needs)."""
    device = torch.device(device)
    if key is None:
        t = torch.tensor(rows, dtype=torch.float32)
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t
    shape = (len(rows), len(rows[0]) if rows else 0)
    full = (str(device), shape) + tuple(key)
    entry = _TABLES.get(full)
    if entry is None:
        entry = _TABLES[full] = StagedTable(shape[0], shape[1], device)
        if len(_TABLES) > _CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(full)
    return entry.fill(rows)


class KeptTables:
    """Per-step scalar tables owned by one caller (a bound call of the step engine): one
    ``StagedTable`` per table shape, kept at its address for the life of the owner. What a
    captured CUDA graph reads must stay where it was captured; ``scalar_table``'s keyed cache
    may evict a table (and free its memory) when a process uses more than its size."""

    def __init__(self, device):
        self.device = torch.device(device)
        self._tables = {}

    def fill(self, rows) -> torch.Tensor:
        """``rows`` (as ``scalar_table``'s) into the owner's table of their shape."""
        shape = (len(rows), len(rows[0]) if rows else 0)
        table = self._tables.get(shape)
        if table is None:
            table = self._tables[shape] = StagedTable(shape[0], shape[1], self.device)
        return table.fill(rows)


@triton.jit
def member_ptr(base_ptr, offs_ptr, index, ALIGNED: tl.constexpr):
    """``base_ptr`` moved to member ``index`` of its group (offset table row ``offs_ptr``)."""
    off = tl.load(offs_ptr + index)
    if ALIGNED:
        off = tl.multiple_of(off, 16 // (base_ptr.dtype.element_ty.primitive_bitwidth // 8))
    return base_ptr + off
