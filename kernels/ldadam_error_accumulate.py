"""LDAdam's error-feedback accumulation (docs/methods/ldadam.md, line 3: ``A = E + G``, the
official code's ``p.grad += error``) for a whole class of same-shape matrices in one launch,
with the on-device ``skip`` flag: ``E_i += G_i`` in place for every member, nothing written
when ``skip`` holds True.

The step engine passes the flag to every op that writes state (docs/engine.md); a plain
``torch._foreach_add_`` cannot take it, and the error buffer is the one state tensor LDAdam
writes before anything else of its step, so without this a step with a NaN gradient would
leave ``E + G`` behind. The sum is one fp32 addition rounded once to E's dtype
(round-to-nearest-even), which is what torch's ``add_`` computes: the bits equal
``torch._foreach_add_(Es, Gs)`` (the reference, ``lowrank_fused.reference
.ldadam_error_accumulate``).

Members are addressed as element offsets from the first of each list (``kernels/_grouped.py``);
every E_i and every G_i is contiguous with the same number of elements (E may be fp32 with a
narrower G: ``ef_dtype="fp32"``). Grid: (blocks of ``ELEMENTWISE_BLOCK`` elements, members).
"""
import torch
import triton
import triton.language as tl

from ._common import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, interpreting, skip_flag, \
    to_storage
from ._grouped import element_offsets, member_ptr, offsets_table
from ._launch import launch_planned

_DTYPE = torch.Tensor.dtype.__get__


@triton.jit
def _error_accumulate_kernel(
    e_ptr, g_ptr, offs_ptr, skip_ptr, GROUP, numel,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    """``E_b += G_b`` over block ``program_id(0)`` of member ``program_id(1)``; nothing is
    written when ``skip_ptr`` holds True."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    e_ptr = member_ptr(e_ptr, offs_ptr, pid_b, ALIGNED)
    g_ptr = member_ptr(g_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(e_ptr + offs, to_storage(e + g, e_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check(Es, Gs):
    if len(Es) != len(Gs):
        raise ValueError(f"Es and Gs must have one entry per member, got {len(Es)} and "
                         f"{len(Gs)}")
    for name, lst in (("Es", Es), ("Gs", Gs)):
        like = lst[0]
        for i, t in enumerate(lst):
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be a floating tensor, got {t.dtype}")
            if t.dtype != like.dtype or t.device != like.device:
                raise ValueError(f"{name}[{i}] ({t.dtype}, {t.device}) differs from {name}[0] "
                                 f"({like.dtype}, {like.device})")
    numel = Es[0].numel()
    for name, lst in (("Es", Es), ("Gs", Gs)):
        for i, t in enumerate(lst):
            if t.numel() != numel or t.device != Es[0].device:
                raise ValueError(f"{name}[{i}] has {t.numel()} elements on {t.device}; Es[0] "
                                 f"has {numel} on {Es[0].device}")


def ldadam_error_accumulate(Es, Gs, *, skip=None) -> None:
    """``E_i += G_i`` in place for every member (same contract as
    ``lowrank_fused.reference.ldadam_error_accumulate``); ``skip``: None or a 0-dim bool
    tensor on the members' device, never read on the host."""
    Es, Gs = list(Es), list(Gs)
    if not Es and not Gs:
        return
    _check(Es, Gs)
    from lowrank_fused.ops import _check_skip

    _check_skip(skip, Es[0].device)
    if not all(t.is_contiguous() for t in Es + Gs):
        from lowrank_fused.reference.ldadam_error_accumulate import ldadam_error_accumulate_ref

        ldadam_error_accumulate_ref(Es, Gs, skip=skip)
        return
    numel = Es[0].numel()
    if numel == 0:
        return
    device = Es[0].device
    offs, aligned = offsets_table([element_offsets("Es", Es), element_offsets("Gs", Gs)],
                                  (Es[0].element_size(), Gs[0].element_size()), device)
    _error_accumulate_kernel[(cdiv(numel, ELEMENTWISE_BLOCK), len(Es))](
        Es[0], Gs[0], offs, skip_flag(skip, device), len(Es), numel,
        BLOCK=ELEMENTWISE_BLOCK, INTERPRET=interpreting(), ALIGNED=aligned,
        num_warps=ELEMENTWISE_WARPS,
    )


class BoundErrorAccumulate:
    """``ldadam_error_accumulate`` on a fixed list of error buffers (a class's, the same
    tensors every step): checked and addressed once, here; a call takes the step's gradients
    (checked and addressed again only when they are other tensors than the last call's) and
    the ``skip`` flag, and launches one kernel."""

    def __init__(self, Es, Gs):
        Es, Gs = list(Es), list(Gs)
        if not Es:
            raise ValueError("a bound call needs at least one error buffer")
        _check(Es, Gs)
        if not all(t.is_contiguous() for t in Es):
            raise ValueError("the bound error buffers must be contiguous")
        self.Es, self.count, self.numel = Es, len(Es), Es[0].numel()
        self.device = Es[0].device
        self._e_offs = element_offsets("Es", Es)
        self._g_ptrs = None

    _token = None

    def __call__(self, Gs, *, skip=None, layout_token=None):
        """``layout_token``: as ``ops_grouped.BoundGroupedProject``'s, a value that stays the
        same for as long as every gradient's layout (shape, strides, dtype, device) does:
        while it does, a call compares only the gradients' addresses with the last call's."""
        if (layout_token is not None and layout_token == self._token
                and self._g_ptrs is not None):
            ptrs = (tuple(map(torch.Tensor.data_ptr, Gs)),) + self._g_ptrs[1:]
        else:
            self._token = None
            ptrs = (tuple(map(torch.Tensor.data_ptr, Gs)), list(map(torch.Tensor.size, Gs)),
                    list(map(_DTYPE, Gs)))              # the last call's tensors?
        if ptrs != self._g_ptrs:
            Gs = list(Gs)
            _check(self.Es, Gs)
            if not all(G.is_contiguous() for G in Gs):
                from lowrank_fused.reference.ldadam_error_accumulate import (
                    ldadam_error_accumulate_ref)

                self._g_ptrs = None
                ldadam_error_accumulate_ref(self.Es, Gs, skip=skip)
                return
            self.offs, self.aligned = offsets_table(
                [self._e_offs, element_offsets("Gs", Gs)],
                (self.Es[0].element_size(), Gs[0].element_size()), self.device)
            self._g_ptrs = ptrs
        self._token = layout_token
        if skip is not None:
            from lowrank_fused.ops import _check_skip

            _check_skip(skip, self.device)
        if self.numel == 0:
            return
        launch_planned(
            self, _error_accumulate_kernel, (cdiv(self.numel, ELEMENTWISE_BLOCK), self.count),
            self.Es[0], Gs[0], self.offs, skip_flag(skip, self.device), self.count, self.numel,
            BLOCK=ELEMENTWISE_BLOCK, INTERPRET=interpreting(), ALIGNED=self.aligned,
            num_warps=ELEMENTWISE_WARPS)


def aot_variants():
    """(E dtype, G dtype): the parameter dtypes with ``ef_dtype="param"`` and with fp32 E,
    aligned and unaligned members."""
    from lowrank_fused.testing.aot import Variant

    pairs = [(x, x) for x in ("fp32", "bf16", "fp16")] + [("fp32", "bf16"), ("fp32", "fp16")]
    for e_t, g_t in pairs:
        for aligned in (True, False):
            yield Variant(_error_accumulate_kernel,
                          {"e_ptr": "*" + e_t, "g_ptr": "*" + g_t, "offs_ptr": "*i64",
                           "skip_ptr": "*i1", "GROUP": "i32", "numel": "i32"},
                          dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False, ALIGNED=aligned),
                          ELEMENTWISE_WARPS, 3)
