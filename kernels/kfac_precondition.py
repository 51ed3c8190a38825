"""GaLoreKFACAdamW's KFAC-whitened low-rank momentum (docs/methods/adaptive_adamw.md), left
(canonical) form: R, M, N are r x n, F and its inverse root r x r.

    F  = beta2*F + (1-beta2)*(R R^T)/n      Gram over n: the batched GEMM kernel
                                            (``batched_matmul.py``), then ``_factor_ema``
                                            (its own launch for one matrix; inside the
                                            whitening launch for a group)
    root = (F/c2 + eps_k*I)^(-1/2)          on a recompute step: ``eigh`` (r x r, torch)
    M  = beta1*M + (1-beta1)*R              one pass over the r x n tiles:
    N  = root @ (M/c1)                      ``_kfac_momentum_whiten_kernel``

``_kfac_momentum_whiten_kernel`` owns a slab of BLOCK_N columns and all r rows of it: it reads
the R and M tiles of the slab once, forms the new M in registers (stored in M's dtype; the
stored value, divided by c1, is the GEMM operand, as in the reference), and accumulates
``N[rows, slab] = root[rows, :] @ Mhat[:, slab]`` (K = r over root's columns). The new M tile is
stored on the last row block of the output only, after every read of that tile (a program
touches its own columns only), so M is updated in place with one read and one write while
``r <= BLOCK_M``; a larger rank re-reads R and M once per further row block of N (from L2).
fp32 math throughout, IEEE (FMA) dot: the op has no precision option, and the reference is a
plain fp32 matmul.

The recompute keeps the reference's host read of ``trace(F/c2)`` (it decides the returned
bool, ``F == 0`` -> False); between recomputes a step reads nothing from the device.
"""
import torch
import triton
import triton.language as tl

from lowrank_fused import _capture

from ._common import DOT_IEEE, cdiv, interpreting, mma, skip_flag, to_storage
from ._grouped import KeptTables, check_layout, element_offsets, member_ptr, offsets_table
from ._launch import launch_planned

# One config (the AOT test compiles it for every state dtype under Triton 3.6 and 3.9). fp32
# FMA dot: software pipelining (num_stages=2) takes 254 registers on sm_90 with fp32 states,
# so occupancy hides the load latency instead. At 4 warps Triton 3.6 spilled (128 registers,
# fp32 states); 8 warps halve each thread's share of the 64x32 tile: ~80 registers.
BLOCK_M = 64       # rows of N per pass (r <= 64: M read once)
BLOCK_N = 32       # columns of the slab a program owns
BLOCK_K = 16       # rows of M per GEMM step
NUM_WARPS = 8
NUM_STAGES = 1
BLOCK_F = 256      # elements of F per tile of its update (one per thread at 8 warps)
EMA_PROGRAMS = 64  # programs of the one-matrix factor update (at most)


@triton.jit
def _kfac_momentum_whiten_kernel(
    r_ptr, m_ptr, root_ptr, n_ptr,
    RANK, NCOLS,
    stride_rr, stride_rn, stride_mr, stride_mn, stride_qi, stride_qj, stride_nr, stride_nn,
    beta1, one_minus_beta1, c1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """``M = beta1*M + (1-beta1)*R`` and ``N = root @ (M/c1)`` on columns
    ``[pid*BLOCK_N, (pid+1)*BLOCK_N)``."""
    _whiten_slab(r_ptr, m_ptr, root_ptr, n_ptr, tl.program_id(0), RANK, NCOLS,
                 stride_rr, stride_rn, stride_mr, stride_mn, stride_qi, stride_qj, stride_nr,
                 stride_nn, beta1, one_minus_beta1, c1, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE,
                 INTERPRET)


@triton.jit
def _factor_ema(f_ptr, gram_ptr, pid, nprog, RANK, stride_fi, stride_fj, F_ITERS,
                beta2, one_minus_beta2, ncols, BLOCK_F: tl.constexpr,
                INTERPRET: tl.constexpr):
    """``F = beta2*F + ((1-beta2)*gram)/n`` in place on program ``pid``'s tiles of F's r*r
    elements (tiles pid, pid + nprog, ...; ``F_ITERS`` per program); ``gram`` a contiguous
    fp32 r x r. Each operation rounded in fp32 as the torch expression's (IEEE division),
    the result stored in F's dtype."""
    total = RANK * RANK
    for k in range(0, F_ITERS):
        offs = (k * nprog + pid) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = offs < total
        i = (offs // RANK).to(tl.int64)
        j = (offs % RANK).to(tl.int64)
        fp = f_ptr + i * stride_fi + j * stride_fj
        f = tl.load(fp, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gram_ptr + offs.to(tl.int64), mask=mask, other=0.0)
        new = f * beta2 + tl.div_rn(g * one_minus_beta2, ncols)
        tl.store(fp, to_storage(new, f_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _kfac_factor_ema_kernel(
    f_ptr, gram_ptr, RANK, stride_fi, stride_fj, F_ITERS, beta2, one_minus_beta2, ncols,
    BLOCK_F: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One matrix's factor update (``_factor_ema``) over ``num_programs(0)`` programs."""
    _factor_ema(f_ptr, gram_ptr, tl.program_id(0), tl.num_programs(0), RANK, stride_fi,
                stride_fj, F_ITERS, beta2, one_minus_beta2, ncols, BLOCK_F, INTERPRET)


@triton.jit
def _grouped_kfac_momentum_whiten_kernel(
    r_ptr, m_ptr, root_ptr, n_ptr, f_ptr, gram_ptr, offs_ptr, skip_ptr, scal_ptr,
    GROUP, RANK, NCOLS,
    stride_rr, stride_rn, stride_mr, stride_mn, stride_qi, stride_qj, stride_nr, stride_nn,
    stride_fi, stride_fj, F_ITERS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr, DOT_MODE: tl.constexpr, INTERPRET: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """For member ``program_id(1)`` of a group (offset rows: R, M, root, N, F): the single
    kernel's slab (``_whiten_slab``) and this program's share of the factor update
    (``_factor_ema``; the member's Gram at ``gram_ptr + b*r*r``, a contiguous fp32 stack;
    the whitening reads the cached root, not F, so the two are independent); nothing is
    written when ``skip_ptr`` holds True. The step's scalars (beta1, 1 - beta1, c1, beta2,
    1 - beta2, n) come from the fp32 table at ``scal_ptr`` (one address for every step: what
    a CUDA-graph replay needs)."""
    if tl.load(skip_ptr):
        return
    beta1 = tl.load(scal_ptr)
    one_minus_beta1 = tl.load(scal_ptr + 1)
    c1 = tl.load(scal_ptr + 2)
    b = tl.program_id(1)
    _factor_ema(member_ptr(f_ptr, offs_ptr + 4 * GROUP, b, ALIGNED),
                gram_ptr + b.to(tl.int64) * RANK * RANK, tl.program_id(0), tl.num_programs(0),
                RANK, stride_fi, stride_fj, F_ITERS, tl.load(scal_ptr + 3),
                tl.load(scal_ptr + 4), tl.load(scal_ptr + 5), BLOCK_F, INTERPRET)
    _whiten_slab(member_ptr(r_ptr, offs_ptr, b, ALIGNED),
                 member_ptr(m_ptr, offs_ptr + GROUP, b, ALIGNED),
                 member_ptr(root_ptr, offs_ptr + 2 * GROUP, b, ALIGNED),
                 member_ptr(n_ptr, offs_ptr + 3 * GROUP, b, ALIGNED), tl.program_id(0), RANK,
                 NCOLS, stride_rr, stride_rn, stride_mr, stride_mn, stride_qi, stride_qj,
                 stride_nr, stride_nn, beta1, one_minus_beta1, c1, BLOCK_M, BLOCK_N, BLOCK_K,
                 DOT_MODE, INTERPRET)


@triton.jit
def _whiten_slab(
    r_ptr, m_ptr, root_ptr, n_ptr, pid, RANK, NCOLS,
    stride_rr, stride_rn, stride_mr, stride_mn, stride_qi, stride_qj, stride_nr, stride_nn,
    beta1, one_minus_beta1, c1,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_MODE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One program's slab of columns (the single and grouped kernels share it)."""
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NCOLS
    cols_r = offs_n[None, :].to(tl.int64) * stride_rn
    cols_m = offs_n[None, :].to(tl.int64) * stride_mn
    for m0 in range(0, RANK, BLOCK_M):
        last = m0 + BLOCK_M >= RANK
        offs_i = m0 + tl.arange(0, BLOCK_M)
        mask_i = offs_i < RANK
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, RANK, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < RANK
            tile = mask_k[:, None] & mask_n[None, :]
            rows = offs_k[:, None].to(tl.int64)
            r = tl.load(r_ptr + rows * stride_rr + cols_r, mask=tile, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + rows * stride_mr + cols_m, mask=tile, other=0.0).to(tl.float32)
            m = m * beta1 + one_minus_beta1 * r
            m_st = to_storage(m, m_ptr.dtype.element_ty, INTERPRET)
            if last:
                tl.store(m_ptr + rows * stride_mr + cols_m, m_st, mask=tile)
            mhat = tl.div_rn(m_st.to(tl.float32), c1)
            q = tl.load(root_ptr + offs_i[:, None].to(tl.int64) * stride_qi
                        + offs_k[None, :] * stride_qj,
                        mask=mask_i[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc = mma(q, mhat, acc, DOT_MODE)
        out = to_storage(acc, n_ptr.dtype.element_ty, INTERPRET)
        tl.store(n_ptr + offs_i[:, None].to(tl.int64) * stride_nr
                 + offs_n[None, :].to(tl.int64) * stride_nn, out,
                 mask=mask_i[:, None] & mask_n[None, :])


def _momentum_whiten(R, M, root, N, beta1: float, c1: float) -> None:
    r, n = R.shape
    _kfac_momentum_whiten_kernel[(cdiv(n, BLOCK_N),)](
        R, M, root, N, r, n,
        R.stride(0), R.stride(1), M.stride(0), M.stride(1), root.stride(0), root.stride(1),
        N.stride(0), N.stride(1), float(beta1), 1.0 - float(beta1), float(c1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_MODE=DOT_IEEE,
        INTERPRET=interpreting(), num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def kfac_precondition(R, M, F, root, N, *, beta1: float, beta2: float, c1: float, c2: float,
                      eps_rel: float, recompute: bool) -> bool:
    """Same contract as ``lowrank_fused.reference.kfac_precondition.kfac_precondition_ref``:
    M, F, root and N in place in their own dtypes; False when a recompute found ``F == 0``."""
    from lowrank_fused.subspace import batched_matmul

    r, n = R.shape
    for name, t, shape in (("M", M, (r, n)), ("N", N, (r, n)), ("F", F, (r, r)),
                           ("root", root, (r, r))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for R of shape {(r, n)}, "
                             f"got {tuple(t.shape)}")
    if r == 0 or n == 0:
        from lowrank_fused.reference.kfac_precondition import kfac_precondition_ref

        return kfac_precondition_ref(R, M, F, root, N, beta1=beta1, beta2=beta2, c1=c1, c2=c2,
                                     eps_rel=eps_rel, recompute=recompute)
    Rf = R if R.dtype == torch.float32 else R.float()
    gram = batched_matmul(Rf.unsqueeze(0), Rf.t().unsqueeze(0), backend="triton")[0]
    progs = min(EMA_PROGRAMS, cdiv(r * r, BLOCK_F))
    _kfac_factor_ema_kernel[(progs,)](
        F, gram, r, F.stride(0), F.stride(1), cdiv(r * r, progs * BLOCK_F), float(beta2),
        1.0 - float(beta2), float(n), BLOCK_F=BLOCK_F, INTERPRET=interpreting(),
        num_warps=NUM_WARPS)
    from lowrank_fused.reference.kfac_precondition import recompute_root

    valid = recompute_root(F, root, c2=c2, eps_rel=eps_rel) if recompute else True
    _momentum_whiten(Rf, M, root, N, beta1, c1)
    return valid


def grouped_kfac_precondition(Rs, Ms, Fs, roots, Ns, *, beta1: float, beta2: float,
                              c1: float, c2: float, skip=None, prepared=None,
                              work=None) -> None:
    """The steady step (no recompute of the roots) of ``kfac_precondition`` for a group of
    same-shape members sharing the hyper-parameters, each member's bits the single op's:
    ``Rs`` (count, r, n) fp32 (a stack; any strides), ``Ms``/``Ns`` lists of r x n, ``Fs`` and
    ``roots`` lists of r x r (each list one layout). Two launches: the Grams of all members
    (batched GEMM), then M, N and F of every member (the grouped whitening, whose programs
    also share each member's factor update). ``skip`` (0-dim bool on the device): when
    True, M and F keep their bits (N, a workspace, is not defined then). ``prepared``: what
    ``grouped_kfac_offsets`` returned for these lists (a caller stepping the same tensors
    every step: the checks and the offset table once). ``work``: what ``grouped_kfac_work``
    returned for these lists (the Grams' buffer, reused: a call then allocates nothing);
    the bits are the same either way."""
    count, r, n = Rs.shape
    if prepared is None:
        prepared = grouped_kfac_offsets(Rs, Ms, Fs, roots, Ns)
    if work is None:
        work = grouped_kfac_work(Rs)
    offs, aligned = prepared
    Rf = Rs if Rs.dtype == torch.float32 else Rs.float()
    gram, tables = work
    R0, M0, Q0, N0, F0 = Rf[0], Ms[0], roots[0], Ns[0], Fs[0]
    # the step's scalars in the table kept with the work buffers (refilled in place)
    scal = tables.fill([[float(beta1)], [1.0 - float(beta1)], [float(c1)], [float(beta2)],
                        [1.0 - float(beta2)], [float(n)]])
    if _capture.replaying():          # a replayed CUDA graph makes both launches
        return
    work_matmul(Rf, Rf.transpose(1, 2), gram, owner=tables)
    progs = cdiv(n, BLOCK_N)
    launch_planned(     # kept with the work buffers: the same tensors every step
        tables, _grouped_kfac_momentum_whiten_kernel, (progs, count),
        R0, M0, Q0, N0, F0, gram, offs, skip_flag(skip, Rf.device), scal, count, r, n,
        R0.stride(0), R0.stride(1), M0.stride(0), M0.stride(1), Q0.stride(0), Q0.stride(1),
        N0.stride(0), N0.stride(1), F0.stride(0), F0.stride(1),
        cdiv(r * r, progs * BLOCK_F),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_F=BLOCK_F, DOT_MODE=DOT_IEEE,
        INTERPRET=interpreting(), ALIGNED=aligned, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def work_matmul(A, B, out, owner=None) -> None:
    """``out[b] = A[b] @ B[b]`` (fp32) through the Triton ``batched_matmul`` kernel, into a
    given buffer (``subspace.batched_matmul`` with ``backend="triton"`` allocates it);
    ``owner`` keeps its planned launch (``batched_matmul``'s)."""
    from .batched_matmul import batched_matmul

    batched_matmul(A, B, out, precision="ieee", owner=owner)


def grouped_kfac_work(Rs):
    """The buffers ``grouped_kfac_precondition`` writes besides its outputs, for this stack
    of R: ``(gram, tables)``, the members' Grams (count, r, r) fp32, contiguous, and its
    scalar table (kept at one address: a captured graph reads it)."""
    count, r, _ = Rs.shape
    return (torch.empty(count, r, r, dtype=torch.float32, device=Rs.device),
            KeptTables(Rs.device))


def grouped_kfac_offsets(Rs, Ms, Fs, roots, Ns):
    """``grouped_kfac_precondition``'s checks of its lists and its member offset table
    ``(offs, aligned)`` (R from the stack's fp32 form)."""
    count, r, n = Rs.shape
    for name, lst, shape in (("Ms", Ms, (r, n)), ("Ns", Ns, (r, n)), ("Fs", Fs, (r, r)),
                             ("roots", roots, (r, r))):
        if len(lst) != count:
            raise ValueError(f"{name} has {len(lst)} members for {count} in Rs")
        check_layout(name, lst)
        if tuple(lst[0].shape) != shape:
            raise ValueError(f"{name}[0] must have shape {shape} for Rs of shape "
                             f"{tuple(Rs.shape)}, got {tuple(lst[0].shape)}")
    if count == 0 or r == 0 or n == 0:
        raise ValueError(f"grouped_kfac_precondition needs non-empty members, got Rs of shape "
                         f"{tuple(Rs.shape)}")
    if Rs.dtype != torch.float32:
        raise TypeError(f"Rs must be float32 (the projection), got {Rs.dtype}")
    M0, Q0, N0, F0 = Ms[0], roots[0], Ns[0], Fs[0]
    return offsets_table(
        [element_offsets("Rs", list(Rs.unbind(0))), element_offsets("Ms", Ms),
         element_offsets("roots", roots), element_offsets("Ns", Ns),
         element_offsets("Fs", Fs)],
        [4, M0.element_size(), Q0.element_size(), N0.element_size(), F0.element_size()],
        Rs.device)


def aot_variants():
    """M, root and N in the state dtypes (fp32 / bf16 / fp16); R is the fp32 projection."""
    from lowrank_fused.testing.aot import Variant

    ints = {a: "i32" for a in ("RANK", "NCOLS", "stride_rr", "stride_rn", "stride_mr",
                               "stride_mn", "stride_qi", "stride_qj", "stride_nr", "stride_nn")}
    for s_t in ("fp32", "bf16", "fp16"):
        yield Variant(_kfac_momentum_whiten_kernel,
                      {"r_ptr": "*fp32", "m_ptr": "*" + s_t, "root_ptr": "*" + s_t,
                       "n_ptr": "*" + s_t, **ints, "beta1": "fp32", "one_minus_beta1": "fp32",
                       "c1": "fp32"},
                      dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_MODE=DOT_IEEE,
                           INTERPRET=False),
                      NUM_WARPS, NUM_STAGES)
        f_ints = {"RANK": "i32", "stride_fi": "i32", "stride_fj": "i32", "F_ITERS": "i32"}
        yield Variant(_kfac_factor_ema_kernel,
                      {"f_ptr": "*" + s_t, "gram_ptr": "*fp32", **f_ints, "beta2": "fp32",
                       "one_minus_beta2": "fp32", "ncols": "fp32"},
                      dict(BLOCK_F=BLOCK_F, INTERPRET=False), NUM_WARPS, 3)
        for aligned in (True, False):
            yield Variant(_grouped_kfac_momentum_whiten_kernel,
                          {"r_ptr": "*fp32", "m_ptr": "*" + s_t, "root_ptr": "*" + s_t,
                           "n_ptr": "*" + s_t, "f_ptr": "*" + s_t, "gram_ptr": "*fp32",
                           "offs_ptr": "*i64", "skip_ptr": "*i1", "scal_ptr": "*fp32",
                           "GROUP": "i32", **ints, **f_ints},
                          dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                               BLOCK_F=BLOCK_F, DOT_MODE=DOT_IEEE, INTERPRET=False,
                               ALIGNED=aligned),
                          NUM_WARPS, NUM_STAGES)
