"""K3 back-projection fused with the weight update and weight decay for a whole group of
same-shape matrices in one launch (docs/methods/galore.md; K3 in
docs/bytes.md).

Left (canonical) form, in place on every member b: ``W_b = W_b*pre_scale_b;
W_b -= coef_b*(P_b @ N_b); W_b -= post_decay_b*W_b``, the math and the epilogue of
``kernels/backproject_update.py`` (no m x n temporary; W read and written once, rounded to
nearest in its dtype). The members are separate tensors addressed as offsets from the first
(``kernels/_grouped.py``) and share one shape, dtype and set of strides; the per-member scalars
(each layer's learning rate and its own bias correction) come from one small fp32 table
(3 x count: coef, pre_scale, post_decay). The tiling is the single kernel's (its
``choose_config``); the grid adds a member axis: (row tiles, column tiles, member).

``HAS_RESIDUAL`` (AdaMeM, update lines 8-9, K5 pass 2): the single kernel's residual
epilogue per member, ``W_b -= res_coef_b * G_b * col_scale_b[None, :]`` before the decay, with
two more member lists (G_b m x n in its storage dtype, col_scale_b n fp32 contiguous) and a
fourth row of scalars (res_coef). ``grouped_residual_backproject_update.py`` builds the
folded low-rank factors and launches it.

``DIVIDE_N`` (the AdaptiveAdamW family's class limiter, fused): the GEMM's operand is
``N_b / divisor_b`` (``divisor`` one fp32 per member, the limiter's factors), each element
divided and rounded to N's dtype as it is loaded, so W gets the bits it gets when the
limiter's scale kernel divides N in place first (``tests/test_grouped_norm_growth_limit.py``);
N itself is not written.

``skip`` (a 0-dim bool tensor on the device, ``lowrank_fused.ops``): every program loads it in the
epilogue and masks its store of W_b with it (as the single kernel does, and for the same
register reason), so a skipped step leaves every W_b's bits; the host never reads it. Without
one the launcher passes a cached False flag (``skip_flag``): one compiled kernel either way.
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture
from lowrank_fused._tables import StagedTable

from ._common import cdiv, config_mode, dot_mode, interpreting, skip_flag, to_storage
from ._grouped import check_layout, element_offsets, member_ptr, offsets_table
from ._launch import PlannedLaunch
from .backproject_update import CONFIG_FMA_DIVIDE, CONFIGS_FMA, choose_config, configs_for, pn_tile

MAX_GRID_Z = 65535   # CUDA's limit on the third grid dimension (members)


@triton.jit
def _grouped_backproject_update_kernel(
    w_ptr, p_ptr, n_ptr, offs_ptr, scal_ptr, g_ptr, cs_ptr, skip_ptr, div_ptr,
    GROUP, M, N, RANK,
    stride_wm, stride_wn, stride_pm, stride_pr, stride_nr, stride_nn, stride_gm, stride_gn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, INTERPRET: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, DIVIDE_N: tl.constexpr,
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
    divisor = 1.0
    if DIVIDE_N:       # the class limiter's factor of this member (N_b / f_b, fused)
        divisor = tl.load(div_ptr + pid_b)
    acc = pn_tile(p_ptr, n_ptr, offs_m, offs_n, mask_m, mask_n, RANK, stride_pm, stride_pr,
                  stride_nr, stride_nn, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE, divisor,
                  DIVIDE_N, INTERPRET)
    # the member's scalars are loaded after the GEMM loop (fewer live registers in it)
    coef = tl.load(scal_ptr + pid_b)
    pre_scale = tl.load(scal_ptr + GROUP + pid_b)
    post_decay = tl.load(scal_ptr + 2 * GROUP + pid_b)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:   # res_coef * G * col_scale (G read once, in its storage dtype), formed
        # before W's tile is loaded: the G pointers die before W's are made (no spills)
        g_ptr = member_ptr(g_ptr, offs_ptr + 3 * GROUP, pid_b, ALIGNED)
        cs_ptr = member_ptr(cs_ptr, offs_ptr + 4 * GROUP, pid_b, ALIGNED)
        res_coef = tl.load(scal_ptr + 3 * GROUP + pid_b)
        g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        cs = tl.load(cs_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        res = res_coef * (g * cs[None, :])
    w_ptrs = w_ptr + offs_m[:, None] * stride_wm + offs_n[None, :] * stride_wn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    # selects, not the single kernel's branches (which made ptxas spill here); the same
    # values: a factor 1 or a decay 0 is not applied at all, so an inf in W stays inf
    w = tl.where(pre_scale != 1.0, w * pre_scale, w)
    w = w - coef * acc
    if HAS_RESIDUAL:   # the single kernel's order: ((W*pre) - coef*PN) - res
        w = w - res
    w = tl.where(post_decay != 0.0, w - post_decay * w, w)
    mask = tl.where(tl.load(skip_ptr), False, mask)   # a skipped step writes no W_b
    tl.store(w_ptrs, to_storage(w, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def grouped_backproject_update(Ws, Ps, Ns, *, coef, pre_scale, post_decay,
                               precision: str = "ieee", config=None, residuals=None,
                               col_scales=None, res_coef=None, skip=None,
                               prepared=None, divisor=None) -> None:
    """In place on every ``Ws[b]``, in one kernel launch. Lists of left-form tensors, each list
    sharing one shape, dtype and strides; ``coef``, ``pre_scale``, ``post_decay``: one float
    per member (sequences of ``len(Ws)``). With ``residuals`` (m x n each), ``col_scales``
    (n each, fp32, contiguous) and ``res_coef`` (one float per member), the epilogue also
    subtracts ``res_coef[b] * residuals[b] * col_scales[b][None, :]`` before the decay (the
    single kernel's ``residual`` term). ``skip`` (optional 0-dim bool on the device): when True,
    no W_b is written (read on the device only). ``prepared`` (a bound caller's): {list name:
    its element offsets} for lists whose layout the caller checked once (not re-checked).
    ``divisor`` (optional, fp32 (count,) contiguous on the device): member b's GEMM operand is
    ``N_b / divisor[b]`` (``DIVIDE_N``; not with ``residuals``)."""
    if not len(Ws):
        return
    launch = plan_grouped_backproject_update(Ws, Ps, Ns, precision=precision, config=config,
                                             residuals=residuals, col_scales=col_scales,
                                             prepared=prepared, divisor=divisor)
    if launch is not None:
        launch(coef, pre_scale, post_decay, skip=skip, res_coef=res_coef,
               G0=residuals[0] if residuals is not None else None)


def plan_grouped_backproject_update(Ws, Ps, Ns, *, precision="ieee", config=None,
                                    residuals=None, col_scales=None, prepared=None,
                                    divisor=None):
    """Everything ``grouped_backproject_update`` does on the host before its launch, done
    once: returns ``launch(coef, pre_scale, post_decay, *, skip=None, res_coef=None,
    G0=None)``, which fills the persistent scalar table (same address every call) and makes
    the launch; ``G0``: the first residual (the base of the residuals' offsets, for residuals
    at the planned addresses). The closure holds no residual. None for an empty matrix."""
    count = len(Ws)
    has_res = residuals is not None
    if divisor is not None:
        if has_res:
            raise ValueError("divisor is not supported with residuals")
        if (not isinstance(divisor, torch.Tensor) or divisor.dtype != torch.float32
                or tuple(divisor.shape) != (count,) or not divisor.is_contiguous()
                or divisor.device != Ws[0].device):
            raise ValueError(f"divisor must be a contiguous float32 ({count},) tensor on "
                             f"{Ws[0].device}, got {getattr(divisor, 'dtype', type(divisor))} "
                             f"{tuple(getattr(divisor, 'shape', ()))}")
    lists = [("Ws", Ws), ("Ps", Ps), ("Ns", Ns)]
    if has_res:
        lists += [("residuals", residuals), ("col_scales", col_scales)]
        for i, c in enumerate(col_scales):
            if c.dtype != torch.float32 or c.dim() != 1 or c.stride(0) != 1:
                raise ValueError(f"col_scales[{i}] must be a contiguous fp32 vector")
    prepared = prepared or {}
    for name, lst in lists:
        if name not in prepared:
            check_layout(name, lst)
    if count > MAX_GRID_Z:
        raise ValueError(f"a group of {count} matrices exceeds the grid limit {MAX_GRID_Z}: "
                         f"split the group")
    W0, P0, N0 = Ws[0], Ps[0], Ns[0]
    m, n = W0.shape
    rank = P0.shape[1]
    if m == 0 or n == 0:
        return None
    device = W0.device
    mode = dot_mode(precision, device)
    cfg = config or choose_config(m, n, rank, config_mode(precision, device))
    if config is None and divisor is not None and cfg in CONFIGS_FMA:
        cfg = CONFIG_FMA_DIVIDE
    rows = [prepared.get(name) or element_offsets(name, lst) for name, lst in lists]
    offs, aligned = offsets_table(rows, [lst[0].element_size() for _, lst in lists], device)
    C0 = col_scales[0] if has_res else W0
    g_strides = (residuals[0].stride(0), residuals[0].stride(1)) if has_res else \
        (W0.stride(0), W0.stride(1))
    grid = (cdiv(m, cfg.BLOCK_M), cdiv(n, cfg.BLOCK_N), count)
    args = (count, m, n, rank, W0.stride(0), W0.stride(1), P0.stride(0), P0.stride(1),
            N0.stride(0), N0.stride(1)) + g_strides
    meta = dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode,
                INTERPRET=interpreting(), ALIGNED=aligned, HAS_RESIDUAL=has_res,
                DIVIDE_N=divisor is not None, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    div = divisor if divisor is not None else W0

    table = StagedTable(4 if has_res else 3, count, device)   # one address for the plan's life
    k3 = PlannedLaunch(_grouped_backproject_update_kernel, grid, meta)

    def launch(coef, pre_scale, post_decay, *, skip=None, res_coef=None, G0=None):
        # each scalar one number for every member (written along its row) or one per member
        scal = table.fill([coef, pre_scale, post_decay] + ([res_coef] if has_res else []))
        if _capture.replaying():       # a replayed CUDA graph makes the launch
            return
        k3(W0, P0, N0, offs, scal, G0 if has_res else W0, C0, skip_flag(skip, device), div,
           *args)
    return launch


def aot_variants():
    """Every (dtype, config, precision, alignment) compilation ``grouped_backproject_update``
    can launch on a GPU: the single kernel's in-place dtype pairs (W; P and N) and configs,
    and the residual epilogue (AdaMeM) for fp32 and bf16 weights (the gradient in the
    weight's dtype, fp32 bases, factors and column scales); the non-residual ones also with
    the limiter's divisor (``DIVIDE_N``)."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("GROUP", "M", "N", "RANK", "stride_wm", "stride_wn", "stride_pm",
                               "stride_pr", "stride_nr", "stride_nn", "stride_gm", "stride_gn")}
    combos = [(w_t, s_t, False, div) for w_t, s_t in (("fp32", "fp32"), ("bf16", "fp32"),
                                                       ("bf16", "bf16"), ("fp16", "fp32"))
              for div in (False, True)]
    combos += [("fp32", "fp32", True, False), ("bf16", "fp32", True, False)]
    for w_t, s_t, has_res, div in combos:
        g_t, c_t = (w_t, "fp32") if has_res else (w_t, w_t)
        d_t = "fp32" if div else w_t
        for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
            cfgs = configs_for(mode)
            if div and cfgs == CONFIGS_FMA:
                cfgs = (CONFIG_FMA_DIVIDE,)
            for cfg in cfgs:
                for aligned in (True, False):
                    yield Variant(_grouped_backproject_update_kernel,
                                  {"w_ptr": "*" + w_t, "p_ptr": "*" + s_t, "n_ptr": "*" + s_t,
                                   "offs_ptr": "*i64", "scal_ptr": "*fp32", "g_ptr": "*" + g_t,
                                   "cs_ptr": "*" + c_t, "skip_ptr": "*i1",
                                   "div_ptr": "*" + d_t, **ints},
                                  dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                                       BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, INTERPRET=False,
                                       ALIGNED=aligned, HAS_RESIDUAL=has_res, DIVIDE_N=div),
                                  cfg.num_warps, cfg.num_stages)
