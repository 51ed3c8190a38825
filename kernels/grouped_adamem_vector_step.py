"""AdaMeM's Adafactor step of its 1-D parameters (norm weights, biases: the unfactored,
bias-corrected Adafactor with a fixed beta2, docs/methods/adamem.md, "Routing") for a whole
set of same-size vectors in one launch, with the on-device ``skip`` flag.

Per member b, in place, all math fp32: ``V_b = beta2_b*V_b + (1-beta2_b)*(g^2 + eps1_b)``;
``W_b = W_b*pre_b`` (when ``pre_b != 1``); ``W_b -= lr_b*g/(sqrt(V_b/c2_b) + eps_b)``;
``W_b -= post_b*W_b`` (when ``post_b != 0``). The kernel is ``_adafactor_bc_vec_kernel``
(``kernels/adafactor_bc_step.py``, the single-vector launcher ``adafactor_bc_unfactored_step``)
with a member axis: the same expression, the same IEEE-rounded division and square root, the
scalars as the same fp32 values (from one table, 8 x count: lr, beta2, 1 - beta2, eps1, eps,
c2, pre_scale, post_decay), so every member's bits equal the single launcher's.

Members are addressed as element offsets from the first of each list (``kernels/_grouped.py``):
W_b and G_b contiguous, one dtype per list, V_b contiguous fp32, all with the same number of
elements. ``skip`` (a 0-dim bool tensor on the device): every program loads it and returns
before any store when it holds True, so every W_b and V_b keeps its bits; the host never reads
it. Grid: (blocks of ``ELEMENTWISE_BLOCK`` elements, members).
"""
import numpy as np
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture

from ._common import ELEMENTWISE_BLOCK, ELEMENTWISE_WARPS, cdiv, interpreting, skip_flag, \
    to_storage
from ._grouped import element_offsets, member_ptr, offsets_table
from ._launch import launch_planned

_DTYPE = torch.Tensor.dtype.__get__

SCALARS = ("lr", "beta2", "one_minus_beta2", "eps1", "eps", "c2", "pre_scale", "post_decay")


@triton.jit
def _g_vec_kernel(
    w_ptr, g_ptr, v_ptr, offs_ptr, scal_ptr, skip_ptr, GROUP, numel,
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    """Block ``program_id(0)`` of member ``program_id(1)``; nothing is written when
    ``skip_ptr`` holds True."""
    if tl.load(skip_ptr):
        return
    pid = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1)
    w_ptr = member_ptr(w_ptr, offs_ptr, pid_b, ALIGNED)
    g_ptr = member_ptr(g_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    v_ptr = member_ptr(v_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    lr = tl.load(scal_ptr + pid_b)
    beta2 = tl.load(scal_ptr + GROUP + pid_b)
    one_minus_beta2 = tl.load(scal_ptr + 2 * GROUP + pid_b)
    eps1 = tl.load(scal_ptr + 3 * GROUP + pid_b)
    eps = tl.load(scal_ptr + 4 * GROUP + pid_b)
    c2 = tl.load(scal_ptr + 5 * GROUP + pid_b)
    pre_scale = tl.load(scal_ptr + 6 * GROUP + pid_b)
    post_decay = tl.load(scal_ptr + 7 * GROUP + pid_b)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=1.0)
    v = v * beta2 + one_minus_beta2 * (g * g + eps1)
    tl.store(v_ptr + offs, v, mask=mask)
    nrm = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, c2)) + eps)
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * nrm
    if post_decay != 0.0:
        w = w - post_decay * w
    tl.store(w_ptr + offs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


class GroupedAdamemVectorStep:
    """The step of a fixed set of vectors (lists ``Ws``, ``Gs`` like, ``Vs``), checked and
    addressed once, here; a call takes the step's gradients (the same tensors or others of
    the same layout), one ``(lr, beta2, eps1, eps, c2, pre_scale, post_decay)`` row per
    member and the ``skip`` flag, and launches one kernel."""

    def __init__(self, Ws, Gs, Vs):
        count = len(Ws)
        if count == 0 or len(Gs) != count or len(Vs) != count:
            raise ValueError("Ws, Gs and Vs need one tensor per member (and at least one)")
        numel = Ws[0].numel()
        for name, lst in (("Ws", Ws), ("Gs", Gs), ("Vs", Vs)):
            for i, t in enumerate(lst):
                if (t.numel() != numel or t.dtype != lst[0].dtype or t.device != Ws[0].device
                        or not t.is_contiguous()):
                    raise ValueError(f"{name}[{i}] ({t.dtype}, {t.numel()} elements on "
                                     f"{t.device}) must be contiguous with {name}[0]'s dtype "
                                     f"and Ws[0]'s {numel} elements and device")
        if Vs[0].dtype != torch.float32:
            raise TypeError(f"Vs must be fp32 statistics, got {Vs[0].dtype}")
        self.count, self.numel, self.device = count, numel, Ws[0].device
        self.Ws, self.Vs = list(Ws), list(Vs)
        self._w_offs = element_offsets("Ws", self.Ws)
        self._v_offs = element_offsets("Vs", self.Vs)
        self._g_ptrs = None
        self._bind_grads(Gs)
        from lowrank_fused._tables import StagedTable

        # the per-member scalars: one table at one address for the life of the set
        self.table = StagedTable(8, count, self.device)
        self.column = np.empty((8, 1))     # one number per row: one broadcast write

    def _bind_grads(self, Gs):
        self.g_like = (Gs[0].dtype, Gs[0].device)
        self.offs, self.aligned = offsets_table(
            [self._w_offs, element_offsets("Gs", Gs), self._v_offs],
            (self.Ws[0].element_size(), Gs[0].element_size(), 4), self.device)
        self._g_ptrs = (tuple(map(torch.Tensor.data_ptr, Gs)), list(map(torch.Tensor.size, Gs)),
                        list(map(_DTYPE, Gs)))

    def __call__(self, Gs, rows, skip=None):
        if len(Gs) != self.count or len(rows) != self.count:
            raise ValueError(f"Gs and rows need one entry per member ({self.count}), got "
                             f"{len(Gs)} and {len(rows)}")
        if skip is not None:
            from lowrank_fused.ops import _check_skip

            _check_skip(skip, self.device)
        ptrs = (tuple(map(torch.Tensor.data_ptr, Gs)), list(map(torch.Tensor.size, Gs)),
                list(map(_DTYPE, Gs)))                  # the last call's tensors?
        if ptrs != self._g_ptrs:          # other gradient tensors: checked and addressed
            for i, G in enumerate(Gs):
                if (G.numel() != self.numel or (G.dtype, G.device) != self.g_like
                        or not G.is_contiguous()):
                    raise ValueError(f"Gs[{i}] ({G.dtype}, {G.numel()} elements) must be "
                                     f"contiguous like the bound gradients")
            self._bind_grads(Gs)
        if self.numel == 0:
            return
        if rows.count(rows[0]) == self.count:            # one set: each row one number
            lr, b2, eps1, eps, c2, pre, post = (float(x) for x in rows[0])
            self.column[:, 0] = (lr, b2, 1.0 - b2, eps1, eps, c2, pre, post)
            table = self.column
        else:
            table = [[float(r[0]) for r in rows], [float(r[1]) for r in rows],
                     [1.0 - float(r[1]) for r in rows], [float(r[2]) for r in rows],
                     [float(r[3]) for r in rows], [float(r[4]) for r in rows],
                     [float(r[5]) for r in rows], [float(r[6]) for r in rows]]
        scal = self.table.fill(table)
        if _capture.replaying():           # a replayed CUDA graph makes the launch
            return
        launch_planned(
            self, _g_vec_kernel, (cdiv(self.numel, ELEMENTWISE_BLOCK), self.count),
            self.Ws[0], Gs[0], self.Vs[0], self.offs, scal, skip_flag(skip, self.device),
            self.count, self.numel,
            BLOCK=ELEMENTWISE_BLOCK, INTERPRET=interpreting(), ALIGNED=self.aligned,
            num_warps=ELEMENTWISE_WARPS,
        )


def aot_variants():
    """W/G dtype (the parameter dtypes AdaMeM accepts), both alignments."""
    from lowrank_fused.testing.aot import Variant

    for x in ("fp32", "bf16", "fp16"):
        for aligned in (True, False):
            yield Variant(_g_vec_kernel,
                          {"w_ptr": "*" + x, "g_ptr": "*" + x, "v_ptr": "*fp32",
                           "offs_ptr": "*i64", "scal_ptr": "*fp32", "skip_ptr": "*i1",
                           "GROUP": "i32", "numel": "i32"},
                          dict(BLOCK=ELEMENTWISE_BLOCK, INTERPRET=False, ALIGNED=aligned),
                          ELEMENTWISE_WARPS, 3)
