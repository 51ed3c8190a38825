"""What a piece of torch code does behind the ops: which tensors it allocates
(``AllocationTrace``: the check that a fused step makes no full-size m x n temporary,
docs/bytes.md) and how often it reads a value to the host (``HostReads``)."""
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AllocationTrace(TorchDispatchMode):
    """Records ``(op name, numel)`` of every tensor an aten op returns that does not share
    storage with one of its inputs (a fresh allocation). Triton launches are not aten ops:
    what a fused kernel writes in place is invisible here, as it should be."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(a)]
        ptrs = {a.untyped_storage().data_ptr() for a in inputs}
        for o in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(o) and o.untyped_storage().data_ptr() not in ptrs:
                self.sizes.append((func.__name__, o.numel()))
        return out

    def at_least(self, numel):
        return [s for s in self.sizes if s[1] >= numel]


# aten ops that read a tensor's value to the host (``.item()``, ``bool(t)``, ``torch.equal``)
HOST_READS = ("_local_scalar_dense", "is_nonzero", "equal")


class HostReads(TorchDispatchMode):
    """Counts, per op name, the host reads (``HOST_READS``) dispatched inside the mode: each
    is a device synchronisation on CUDA."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in HOST_READS:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))
