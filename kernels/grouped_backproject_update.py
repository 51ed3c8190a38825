"""K3 back-projection fused with the weight update and weight decay for a whole group of
same-shape matrices in one launch (issue 4; ALGORITHMS.md section 4.3 lines 11-13, section 1.4,
section 10 K3).

Left (canonical) form, in place on every member b: ``W_b = W_b*pre_scale_b;
W_b -= coef_b*(P_b @ N_b); W_b -= post_decay_b*W_b``, the math and the epilogue of
``kernels/backproject_update.py`` (no m x n temporary; W read and written once, rounded to
nearest in its dtype). The members are separate tensors addressed as offsets from the first
(``kernels/_grouped.py``) and share one shape, dtype and set of strides; the per-member scalars
(each layer's learning rate and its own bias correction) come from one small fp32 table
(3 x count: coef, pre_scale, post_decay). The tiling is the single kernel's (its
``choose_config``); the grid adds a member axis: (row tiles, column tiles, member).
"""
import triton
import triton.language as tl

from ._common import cdiv, dot_mode, interpreting, to_storage
from ._grouped import check_layout, element_offsets, member_ptr, offsets_table, scalar_table
from .backproject_update import choose_config, configs_for, pn_tile

MAX_GRID_Z = 65535   # CUDA's limit on the third grid dimension (members)


@triton.jit
def _grouped_backproject_update_kernel(
    w_ptr, p_ptr, n_ptr, offs_ptr, scal_ptr,
    GROUP, M, N, RANK,
    stride_wm, stride_wn, stride_pm, stride_pr, stride_nr, stride_nn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2)
    w_ptr = member_ptr(w_ptr, offs_ptr, pid_b, ALIGNED)
    p_ptr = member_ptr(p_ptr, offs_ptr + GROUP, pid_b, ALIGNED)
    n_ptr = member_ptr(n_ptr, offs_ptr + 2 * GROUP, pid_b, ALIGNED)
    # from here on the single-matrix kernel (kernels/backproject_update.py), in place
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = pn_tile(p_ptr, n_ptr, offs_m, offs_n, mask_m, mask_n, RANK, stride_pm, stride_pr,
                  stride_nr, stride_nn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
    # the member's scalars are loaded after the GEMM loop (fewer live registers in it)
    coef = tl.load(scal_ptr + pid_b)
    pre_scale = tl.load(scal_ptr + GROUP + pid_b)
    post_decay = tl.load(scal_ptr + 2 * GROUP + pid_b)
    mask = mask_m[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    # selects, not the single kernel's branches (which made ptxas spill here); the same
    # values: a factor 1 or a decay 0 is not applied at all, so an inf in W stays inf
    w = tl.where(pre_scale != 1.0, w * pre_scale, w)
    w = w - coef * acc
    w = tl.where(post_decay != 0.0, w - post_decay * w, w)
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def grouped_backproject_update(Ws, Ps, Ns, *, coef, pre_scale, post_decay,
                               precision: str = "ieee", config=None) -> None:
    """In place on every ``Ws[b]``, in one kernel launch. Lists of left-form tensors, each list
    sharing one shape, dtype and strides; ``coef``, ``pre_scale``, ``post_decay``: one float
    per member (sequences of ``len(Ws)``)."""
    count = len(Ws)
    if count == 0:
        return
    for name, lst in (("Ws", Ws), ("Ps", Ps), ("Ns", Ns)):
        check_layout(name, lst)
    if count > MAX_GRID_Z:
        raise ValueError(f"a group of {count} matrices exceeds the grid limit {MAX_GRID_Z}: "
                         f"split the group")
    W0, P0, N0 = Ws[0], Ps[0], Ns[0]
    m, n = W0.shape
    rank = P0.shape[1]
    if m == 0 or n == 0:
        return
    device = W0.device
    mode = dot_mode(precision, device)
    cfg = config or choose_config(m, n, rank, mode)
    offs, aligned = offsets_table(
        [element_offsets("Ws", Ws), element_offsets("Ps", Ps), element_offsets("Ns", Ns)],
        [W0.element_size(), P0.element_size(), N0.element_size()], device)
    scal = scalar_table([[float(x) for x in coef], [float(x) for x in pre_scale],
                         [float(x) for x in post_decay]], device)
    grid = (cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N), count)
    _grouped_backproject_update_kernel[grid](
        W0, P0, N0, offs, scal, count, m, n, rank,
        W0.stride(0), W0.stride(1), P0.stride(0), P0.stride(1), N0.stride(0), N0.stride(1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode,
        INTERPRET=interpreting(), ALIGNED=aligned,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def aot_variants():
    """Every (dtype, config, precision, alignment) compilation ``grouped_backproject_update``
    can launch on a GPU: the single kernel's in-place dtype pairs (W; P and N) and configs."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("GROUP", "M", "N", "RANK", "stride_wm", "stride_wn", "stride_pm",
                               "stride_pr", "stride_nr", "stride_nn")}
    for w_t, s_t in (("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16"), ("fp16", "fp32")):
        for mode in (0, 1, 2):
            for cfg in configs_for(mode):
                for aligned in (True, False):
                    yield Variant(_grouped_backproject_update_kernel,
                                  {"w_ptr": "*" + w_t, "p_ptr": "*" + s_t, "n_ptr": "*" + s_t,
                                   "offs_ptr": "*i64", "scal_ptr": "*fp32", **ints},
                                  dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                       BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, INTERPRET=False,
                                       ALIGNED=aligned),
                                  cfg.num_warps, cfg.num_stages)
