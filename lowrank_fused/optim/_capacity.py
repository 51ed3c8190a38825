"""Capacity buffers for low-rank states whose rank changes at a refresh (K2's runtime rank:
allocate states with capacity r_max and pass r_cur; docs/bytes.md, "Kernel-design notes").

AdaptiveAdamW and AdaRankGrad change a matrix's rank r at a refresh, so its moments change
shape (r x n, or m x r). Without capacity buffers each refresh allocates new moments (the
memory of the current ranks exactly, the default). With them, every moment lives at the start
of one flat buffer sized for the largest rank the matrix can receive, allocated once; the
state tensor is a contiguous view of its first ``r * n`` elements, so the kernels (which take
the rank from the shapes at run time) see exactly the tensors they would see otherwise, and a
rank change writes into the same memory: no allocator traffic at a refresh and fixed
addresses step after step (what a captured CUDA graph or a grouped kernel's cached offset
table needs).

A state tensor placed here keeps its method's shape; ``state_bytes`` counts its whole buffer.
``torch.save`` writes the whole buffer too; ``load_state_dict`` loads compact copies, which
the optimizers place back into buffers (``restore``).
"""
from __future__ import annotations

import torch


def capacity(t: torch.Tensor) -> int:
    """Elements ``t``'s storage holds (0 unless ``t`` starts it)."""
    if t.storage_offset() != 0:
        return 0
    return t.untyped_storage().nbytes() // t.element_size()


def _view(buf: torch.Tensor, shape) -> torch.Tensor:
    """A contiguous tensor of ``shape`` over the start of ``buf``'s storage."""
    return buf.new_empty(0).set_(buf.untyped_storage(), 0, torch.Size(shape))


def zeros(shape, numel_capacity: int, *, dtype, device) -> torch.Tensor:
    """A zero tensor of ``shape`` at the start of a new buffer of ``numel_capacity`` elements
    (at least the shape's)."""
    n = max(int(numel_capacity), torch.Size(shape).numel())
    return _view(torch.zeros(n, dtype=dtype, device=device), shape)


def new_zeros(shape, rank: int, cap, *, dtype, device) -> torch.Tensor:
    """Zeros of ``shape``, a low-rank tensor of rank ``rank`` (one dimension is the rank);
    with a capacity rank ``cap`` (None or 0: none), at the start of a buffer sized for it."""
    if not cap:
        return torch.zeros(shape, dtype=dtype, device=device)
    return zeros(shape, torch.Size(shape).numel() // rank * cap, dtype=dtype, device=device)


def keep(current, value: torch.Tensor, rank: int, cap) -> torch.Tensor:
    """The state tensor that replaces ``current`` with ``value`` (of rank ``rank``, any
    strides): ``value`` contiguous, or with a capacity rank ``cap`` written into
    ``current``'s buffer (``place``) sized for it."""
    if not cap:
        return value.contiguous()
    return place(current, value, value.numel() // rank * cap)


def place(current, value: torch.Tensor, numel_capacity: int) -> torch.Tensor:
    """``value``'s contents in ``current``'s buffer (when it is one of at least
    ``numel_capacity`` elements, same dtype and device), else in a new buffer of that many.
    Returns the new state tensor (shape of ``value``); ``value`` may be any tensor, including
    one computed from ``current`` (it is read completely before the buffer is written)."""
    n = max(int(numel_capacity), value.numel())
    reuse = (current is not None and current.dtype == value.dtype
             and current.device == value.device and capacity(current) >= n)
    if not reuse:
        out = zeros(value.shape, n, dtype=value.dtype, device=value.device)
        return out.copy_(value)
    if value.untyped_storage().data_ptr() == current.untyped_storage().data_ptr():
        if value.storage_offset() == 0 and value.is_contiguous():
            return _view(current, value.shape)      # already in place
        value = value.clone()                       # a view into the buffer itself
    return _view(current, value.shape).copy_(value)
