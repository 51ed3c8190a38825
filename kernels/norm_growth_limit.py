"""Norm-growth limiter of AdaptiveAdamW (docs/methods/adaptive_adamw.md; Fira / APOLLO), fused.

``z = ||N||``; the first call records ``nl_prev = z``; afterwards
``f = max(z/(nl_prev + 1e-8), gamma)/gamma`` (``f = 1`` where ``nl_prev == 0``),
``N = N/f`` and ``nl_prev = z/f``. Everything stays on the device (no host read):

  1. only without ``sumsq``: ``_sumsq_partials_kernel`` writes per-program partial sums of
     ``N^2``. With ``sumsq`` (K2's side output, ``adam_moments(..., sumsq=)``) N is not read
     for its norm: this pass is skipped.
  2. ``_limiter_factor_kernel`` (one program): adds the partials (or reads ``sumsq``) in a
     fixed order, computes f into a 1-element buffer and updates ``nl_prev``.
  3. ``_limiter_scale_kernel``: ``N = N/f`` in place (not on the first call).

Bytes between refreshes with ``sumsq``: N read and written once (2sS) against three passes over
N for the eager reference (norm, divide, copy back). All math fp32, IEEE-rounded division and
square root; N stored in its own dtype.
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture
from lowrank_fused.reference.norm_growth_limit import NL_TINY

from ._common import (ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, interpreting, skip_flag,
                      sum_fp32, to_storage)
from ._launch import PlannedLaunch, launch_planned

SUM_BLOCK = 1024   # the factor kernel's chunk over the partial sums


@triton.jit
def _sumsq_partials_kernel(n_ptr, part_ptr, numel, BLOCK: tl.constexpr):
    """``part[pid] = sum(N^2)`` over one block of the flat N."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(n_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid, tl.sum(n * n, axis=0))


@triton.jit
def _limiter_factor_kernel(part_ptr, count, prev_ptr, f_ptr, gamma, tiny,
                           FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``z = sqrt(sum(part[0:count]))``; FIRST: ``nl_prev = z``; else
    ``f[0] = f`` and ``nl_prev = z/f``."""
    z = tl.sqrt_rn(sum_fp32(part_ptr, count, BLOCK))
    if FIRST:
        tl.store(prev_ptr, z.to(prev_ptr.dtype.element_ty))
    else:
        prev = tl.load(prev_ptr).to(tl.float32)
        f = tl.div_rn(tl.maximum(tl.div_rn(z, prev + tiny), gamma,
                                 propagate_nan=tl.PropagateNan.ALL), gamma)
        f = tl.where(prev > 0, f, 1.0)
        tl.store(f_ptr, f)
        tl.store(prev_ptr, tl.div_rn(z, f).to(prev_ptr.dtype.element_ty))


@triton.jit
def _limiter_scale_kernel(n_ptr, f_ptr, numel, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """``N = N / f[0]`` over one block of the flat N."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    f = tl.load(f_ptr)
    n = tl.load(n_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(n_ptr + offs, to_storage(tl.div_rn(n, f), n_ptr.dtype.element_ty, INTERPRET),
             mask=mask)


@triton.jit
def _grouped_sumsq_partials_kernel(n_ptr, part_ptr, numel, stride_b, BLOCK: tl.constexpr):
    """``_sumsq_partials_kernel`` on member ``program_id(1)`` of a stack (members
    ``stride_b`` elements apart, each contiguous): its partials at ``b * blocks``."""
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(n_ptr + b * stride_b + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(part_ptr + b * tl.num_programs(0) + pid, tl.sum(n * n, axis=0))


@triton.jit
def _grouped_sumsq_kernel(part_ptr, out_ptr, count, BLOCK: tl.constexpr):
    """``out[b] = sum(part[b*count:(b+1)*count])`` in ``_limiter_factor_kernel``'s fixed
    order (one program per member)."""
    b = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + b, sum_fp32(part_ptr + b * count, count, BLOCK))


def grouped_sumsq_part(Ns) -> torch.Tensor:
    """The buffer of ``grouped_sumsq``'s partial sums for a stack shaped as ``Ns`` (a caller
    stepping the same stack keeps it: a call then allocates nothing)."""
    numel = Ns[0].numel() if Ns.shape[0] else 0
    return torch.empty(Ns.shape[0] * cdiv(numel, ELEMENTWISE_BLOCK), dtype=torch.float32,
                       device=Ns.device)


def grouped_sumsq(Ns, out, part=None, owner=None) -> None:
    """``out[b] = ||Ns[b]||^2`` (fp32) for a stack ``Ns`` (count, ...) of contiguous members,
    each value the bits ``norm_growth_limit`` computes for member b alone without ``sumsq``
    (the same partials, summed in the same order): two launches for the whole stack.
    ``part``: ``grouped_sumsq_part(Ns)``, reused (else allocated per call). ``owner``: an
    object of a caller that makes this call on the same tensors every step (its launches are
    then planned and kept there: ``kernels/_launch.py``)."""
    count = Ns.shape[0]
    numel = Ns[0].numel() if count else 0
    if out.dtype != torch.float32 or tuple(out.shape) != (count,) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape ({count},), got "
                         f"{out.dtype} of shape {tuple(out.shape)}")
    if count == 0:
        return
    if numel == 0 or not Ns[0].is_contiguous():
        raise ValueError(f"Ns must hold non-empty contiguous members, got shape "
                         f"{tuple(Ns.shape)} with strides {Ns.stride()}")
    blocks = cdiv(numel, ELEMENTWISE_BLOCK)
    if part is None:
        part = torch.empty(count * blocks, dtype=torch.float32, device=Ns.device)
    elif part.dtype != torch.float32 or part.numel() < count * blocks or \
            not part.is_contiguous() or part.device != Ns.device:
        raise ValueError(f"part must be a contiguous float32 tensor of at least "
                         f"{count * blocks} elements on {Ns.device}, got {part.dtype} with "
                         f"{part.numel()} elements on {part.device}")
    if _capture.replaying():          # a replayed CUDA graph makes these launches
        return
    if owner is not None:
        launch_planned(owner, _grouped_sumsq_partials_kernel, (blocks, count), Ns, part, numel,
                       Ns.stride(0), BLOCK=ELEMENTWISE_BLOCK, num_warps=ELEMENTWISE_WARPS)
        launch_planned(owner, _grouped_sumsq_kernel, (count,), part, out, blocks,
                       BLOCK=SUM_BLOCK, num_warps=4)
        return
    _grouped_sumsq_partials_kernel[(blocks, count)](Ns, part, numel, Ns.stride(0),
                                                    BLOCK=ELEMENTWISE_BLOCK,
                                                    num_warps=ELEMENTWISE_WARPS)
    _grouped_sumsq_kernel[(count,)](part, out, blocks, BLOCK=SUM_BLOCK, num_warps=4)


@triton.jit
def _grouped_limiter_factor_kernel(norm_ptr, prev_ptr, offs_ptr, f_ptr, skip_ptr, count,
                                   gamma, tiny, BLOCK: tl.constexpr):
    """``_limiter_factor_kernel`` (not FIRST, norm given) for BLOCK members per program:
    ``z = sqrt(norm[b])``, ``f[b] = f``, and member b's memory (at ``prev_ptr + offs[b]``)
    ``= z/f`` unless the step's skip flag holds True."""
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = b < count
    z = tl.sqrt_rn(tl.load(norm_ptr + b, mask=mask, other=0.0))
    p_ptr = prev_ptr + tl.load(offs_ptr + b, mask=mask, other=0)
    prev = tl.load(p_ptr, mask=mask, other=0.0).to(tl.float32)
    f = tl.div_rn(tl.maximum(tl.div_rn(z, prev + tiny), gamma,
                             propagate_nan=tl.PropagateNan.ALL), gamma)
    f = tl.where(prev > 0, f, 1.0)
    tl.store(f_ptr + b, f, mask=mask)
    keep = tl.where(tl.load(skip_ptr), False, mask)    # a skipped step keeps every memory
    tl.store(p_ptr, tl.div_rn(z, f).to(prev_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _grouped_limiter_scale_kernel(n_ptr, f_ptr, numel, stride_b, BLOCK: tl.constexpr,
                                  INTERPRET: tl.constexpr):
    """``_limiter_scale_kernel`` on member ``program_id(1)`` of a stack (members ``stride_b``
    elements apart, each contiguous): ``N_b = N_b / f[b]``."""
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    f = tl.load(f_ptr + b)
    ptr = n_ptr + b * stride_b + offs
    n = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, to_storage(tl.div_rn(n, f), n_ptr.dtype.element_ty, INTERPRET), mask=mask)


FACTOR_BLOCK = 128   # members per program of the grouped factor kernel


class BoundGroupedNormGrowthLimit:
    """``norm_growth_limit`` (not the first call, ``sumsq`` given) on every member of a stack
    at once, for fixed tensors checked once, here: ``Ns`` (count, ...) of contiguous members
    (a view of consecutive slices, as the step engine's workspaces are), ``norms`` (count,)
    fp32 with each member's ``||N_b||^2`` (K2's side output), ``prevs`` the members' 0-dim or
    1-element fp32 memories (separate tensors, addressed through an offset table). A call
    ``(gamma, skip=None)`` makes two launches (the factors of all members, then ``N_b /= f_b``)
    and allocates nothing; member b gets the bits of ``norm_growth_limit(Ns[b], prevs[b],
    gamma=gamma, first=False, sumsq=norms[b:b+1])``. ``skip`` (0-dim bool on the device):
    when True every memory keeps its bits (N, a workspace, is divided regardless)."""

    def __init__(self, Ns, norms, prevs):
        from ._grouped import element_offsets, offsets_table

        prevs = list(prevs)
        count = Ns.shape[0] if Ns.dim() else 0
        if count == 0 or Ns[0].numel() == 0 or not Ns[0].is_contiguous():
            raise ValueError(f"Ns must be a non-empty stack of contiguous members, got shape "
                             f"{tuple(Ns.shape)} with strides {Ns.stride()}")
        if norms.dtype != torch.float32 or tuple(norms.shape) != (count,) \
                or not norms.is_contiguous():
            raise ValueError(f"norms must be a contiguous float32 tensor of shape ({count},), "
                             f"got {norms.dtype} of shape {tuple(norms.shape)}")
        if len(prevs) != count:
            raise ValueError(f"prevs has {len(prevs)} memories for {count} members in Ns")
        for i, t in enumerate(prevs):
            if t.dtype != torch.float32 or t.numel() != 1 or t.device != Ns.device:
                raise ValueError(f"prevs[{i}] must be a 1-element float32 tensor on "
                                 f"{Ns.device}, got {t.dtype} with {t.numel()} elements on "
                                 f"{t.device}")
        if norms.device != Ns.device:
            raise ValueError(f"norms must be on {Ns.device}, got {norms.device}")
        self.Ns, self.norms, self.prevs = Ns, norms, prevs
        self.count, self.numel = count, Ns[0].numel()
        self.offs = offsets_table([element_offsets("prevs", prevs)], [4], Ns.device)[0]
        self.f = torch.empty(count, dtype=torch.float32, device=Ns.device)
        self.blocks = cdiv(self.numel, ELEMENTWISE_BLOCK)
        self.interpret = interpreting()
        self._factor = PlannedLaunch(_grouped_limiter_factor_kernel,
                                     (cdiv(self.count, FACTOR_BLOCK),),
                                     dict(BLOCK=FACTOR_BLOCK, num_warps=4))
        self._scale = PlannedLaunch(_grouped_limiter_scale_kernel, (self.blocks, self.count),
                                    dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=self.interpret,
                                         num_warps=ELEMENTWISE_WARPS))

    def __call__(self, gamma: float, *, skip=None, scale: bool = True) -> None:
        """``scale=False``: only the factors (into ``self.f``) and the memories; N is left
        undivided for a consumer that divides as it reads (the grouped K3's ``divisor``)."""
        gamma = float(gamma)
        if not gamma >= 1.0:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if _capture.replaying():          # a replayed CUDA graph makes these launches
            return
        Ns = self.Ns
        self._factor(self.norms, self.prevs[0], self.offs, self.f, skip_flag(skip, Ns.device),
                     self.count, gamma, NL_TINY)
        if scale:
            self._scale(Ns, self.f, self.numel, Ns.stride(0))


def grouped_norm_growth_limit(Ns, norms, prevs, *, gamma: float, skip=None) -> None:
    """``BoundGroupedNormGrowthLimit(Ns, norms, prevs)(gamma, skip=skip)``: the same contract
    as ``lowrank_fused.reference.norm_growth_limit.grouped_norm_growth_limit_ref``."""
    BoundGroupedNormGrowthLimit(Ns, norms, prevs)(gamma, skip=skip)


def norm_growth_limit(N, nl_prev, *, gamma: float, first: bool, sumsq=None) -> None:
    """Same contract as ``lowrank_fused.reference.norm_growth_limit``: in place on ``N`` (any
    shape) and the 1-element memory ``nl_prev``; ``sumsq`` (optional, 1-element fp32) is
    ``||N||^2`` already computed."""
    if nl_prev.numel() != 1:
        raise ValueError(f"nl_prev must hold one element, got shape {tuple(nl_prev.shape)}")
    if sumsq is not None and (sumsq.dtype != torch.float32 or sumsq.numel() != 1):
        raise TypeError(f"sumsq must be a 1-element float32 tensor, got {sumsq.dtype} with "
                        f"{sumsq.numel()} elements")
    if not N.is_contiguous():
        work = N.contiguous()
        norm_growth_limit(work, nl_prev, gamma=gamma, first=first, sumsq=sumsq)
        N.copy_(work)
        return
    numel = N.numel()
    if sumsq is None and numel == 0:   # nothing to launch; the reference defines it
        from lowrank_fused.reference.norm_growth_limit import norm_growth_limit_ref

        norm_growth_limit_ref(N, nl_prev, gamma=gamma, first=first)
        return
    blocks = cdiv(numel, ELEMENTWISE_BLOCK)
    if sumsq is None:
        part, count = torch.empty(blocks, dtype=torch.float32, device=N.device), blocks
        _sumsq_partials_kernel[(blocks,)](N, part, numel, BLOCK=ELEMENTWISE_BLOCK,
                                          num_warps=ELEMENTWISE_WARPS)
    else:
        part, count = sumsq, 1
    f = nl_prev if first else torch.empty(1, dtype=torch.float32, device=N.device)
    _limiter_factor_kernel[(1,)](part, count, nl_prev, f, float(gamma), NL_TINY,
                                 FIRST=bool(first), BLOCK=SUM_BLOCK, num_warps=4)
    if not first and numel > 0:
        _limiter_scale_kernel[(blocks,)](N, f, numel, BLOCK=ELEMENTWISE_BLOCK,
                                         INTERPRET=interpreting(), num_warps=ELEMENTWISE_WARPS)


def aot_variants():
    """N dtype (the state dtypes) for the partial sums and the scale; FIRST for the factor."""
    from lowrank_fused.testing.aot import Variant

    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_sumsq_partials_kernel,
                      {"n_ptr": "*" + s_t, "part_ptr": "*fp32", "numel": "i32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK), ELEMENTWISE_WARPS, 3)
        yield Variant(_limiter_scale_kernel, {"n_ptr": "*" + s_t, "f_ptr": "*fp32", "numel": "i32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
    for first in (False, True):
        yield Variant(_limiter_factor_kernel,
                      {"part_ptr": "*fp32", "count": "i32", "prev_ptr": "*fp32", "f_ptr": "*fp32",
                       "gamma": "fp32", "tiny": "fp32"},
                      dict(FIRST=first, BLOCK=SUM_BLOCK), 4, 3)
    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_grouped_sumsq_partials_kernel,
                      {"n_ptr": "*" + s_t, "part_ptr": "*fp32", "numel": "i32", "stride_b": "i32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK), ELEMENTWISE_WARPS, 3)
    yield Variant(_grouped_sumsq_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32", "count": "i32"},
                  dict(BLOCK=SUM_BLOCK), 4, 3)
    yield Variant(_grouped_limiter_factor_kernel,
                  {"norm_ptr": "*fp32", "prev_ptr": "*fp32", "offs_ptr": "*i64", "f_ptr": "*fp32",
                   "skip_ptr": "*i1", "count": "i32", "gamma": "fp32", "tiny": "fp32"},
                  dict(BLOCK=FACTOR_BLOCK), 4, 3)
    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_grouped_limiter_scale_kernel,
                      {"n_ptr": "*" + s_t, "f_ptr": "*fp32", "numel": "i32", "stride_b": "i32"},
                      dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False), ELEMENTWISE_WARPS, 3)
