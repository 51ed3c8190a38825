"""Grouped K1/K3 (``lowrank_fused.ops_grouped``): the Triton op over a group of
same-shape matrices in ONE launch vs the single-matrix eager reference applied per member.

Tolerances (``lowrank_fused.testing.tolerance``): R is fp32 whatever G's dtype (the reference
casts the same G values to fp32; only the summation order differs): 1e-5. K3 writes W in its
own dtype: 1e-5 for fp32, 1e-2 (about one bf16 ulp) for bf16.
"""
import contextlib

import pytest
import torch

from lowrank_fused import ops, ops_grouped
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import DTYPES, basis, count_kernel_runs, ranks_for
from _skip import backends as skip_backends, check_bad_skips, check_skip

SHAPES = [(97, 203), (203, 97), (64, 64), (130, 257)]
CASES = [(s, r) for s in SHAPES for r in ranks_for(s)]
IDS = [f"{s[0]}x{s[1]}-r{r}" for s, r in CASES]


def members(shape, count, dtype, device, scale=1.0):
    """``count`` separate random tensors (fresh allocations, junk allocated in between so the
    offsets between members are irregular)."""
    out, junk = [], []
    for b in range(count):
        out.append((torch.randn(shape, device=device) * scale).to(dtype))
        junk.append(torch.empty(17 * (b + 1), device=device))
    return out


def bases(shape, rank, side, count, device):
    return [basis(shape, rank, side, device) for _ in range(count)]


def scalars(count):
    """Different per-member scalars; member 0 has no decay and no pre-scale (the skipped
    branches), the others both."""
    coef = [0.05 * (b + 1) for b in range(count)]
    pre = [1.0 - 0.01 * b for b in range(count)]
    post = [0.01 * b for b in range(count)]
    return coef, pre, post


def check_project(Gs, Ps, side, **kw):
    want = [ops.project(G, P, side=side, backend="reference") for G, P in zip(Gs, Ps)]
    Rs = [poison(torch.empty_like(w)) for w in want]
    out = ops_grouped.grouped_project(Gs, Ps, Rs, side=side, backend="triton", **kw)
    assert out is Rs or list(out) == Rs
    for b, (R, w) in enumerate(zip(Rs, want)):
        assert_parity(R, w, rtol=tolerance(torch.float32), name=f"R[{b}]")


def check_backproject(Ws, Ps, Ns, side, coef, pre, post):
    dtype = Ws[0].dtype
    want = [W.clone() for W in Ws]
    for W, P, N, c, a, d in zip(want, Ps, Ns, coef, pre, post):
        ops.backproject_update(W, P, N, side=side, coef=c, pre_scale=a, post_decay=d,
                               backend="reference")
    W0 = [W.clone() for W in Ws]
    ops_grouped.grouped_backproject_update(Ws, Ps, Ns, side=side, coef=coef, pre_scale=pre,
                                           post_decay=post, backend="triton")
    for b, (W, w, w0) in enumerate(zip(Ws, want, W0)):
        assert_parity(W, w, rtol=tolerance(dtype), name=f"W[{b}]")
        assert (w.float() - w0.float()).abs().max() > 1e-3, "the update must be real"


@pytest.mark.parametrize("shape,rank", CASES, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_project_matches_reference(shape, rank, side, dtype, device):
    Gs = members(shape, 3, dtype, device)
    check_project(Gs, bases(shape, rank, side, 3, device), side)


@pytest.mark.parametrize("shape,rank", CASES, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_backproject_update_matches_reference(shape, rank, side, dtype, device):
    Ws = members(shape, 3, dtype, device)
    Ns = members(ops.low_rank_shape(shape, rank, side), 3, torch.float32, device)
    check_backproject(Ws, bases(shape, rank, side, 3, device), Ns, side, *scalars(3))


@pytest.mark.parametrize("count", [1, 7])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_sizes(count, side, dtype, device):
    shape, rank = (130, 257), 43
    Gs = members(shape, count, dtype, device)
    Ps = bases(shape, rank, side, count, device)
    check_project(Gs, Ps, side)
    Ns = members(ops.low_rank_shape(shape, rank, side), count, torch.float32, device)
    check_backproject(Gs, Ps, Ns, side, *scalars(count))


def test_views_of_one_buffer_unaligned_and_reversed(device):
    """Members carved from one buffer in reverse order (negative offsets) at odd element
    distances (not 16-byte multiples: the unaligned kernel variant); the gaps between them
    are NaN sentinels that must survive (each program writes only its own member)."""
    shape, rank, count, gap = (97, 203), 19, 3, 6   # 97*203 + 6: odd
    numel = shape[0] * shape[1]
    low = ops.low_rank_shape(shape, rank, "left")

    def carve(buf, size, shp):
        return [buf[gap + (count - 1 - b) * (size + gap):][:size].view(shp) for b in range(count)]

    wbuf = poison(torch.empty(count * (numel + gap) + gap, device=device))
    rbuf = poison(torch.empty(count * (low[0] * low[1] + gap) + gap, device=device))
    Ws = carve(wbuf, numel, shape)
    Rs = carve(rbuf, low[0] * low[1], low)
    from lowrank_fused.kernels._grouped import element_offsets, offsets_table
    offs, aligned = offsets_table([element_offsets("Ws", Ws)], [4], device)
    assert not aligned and offs.min() < 0
    for W in Ws:
        W.copy_(torch.randn(shape, device=device))
    Gs = [W.clone() for W in Ws]
    Ps = bases(shape, rank, "left", count, device)
    want = [ops.project(G, P, backend="reference") for G, P in zip(Gs, Ps)]
    ops_grouped.grouped_project(Gs, Ps, Rs, backend="triton")
    for b in range(count):
        assert_parity(Rs[b], want[b], rtol=tolerance(torch.float32), name=f"R[{b}]")
    Ns = members(low, count, torch.float32, device)
    check_backproject(Ws, Ps, Ns, "left", *scalars(count))
    for buf, size in ((wbuf, numel), (rbuf, low[0] * low[1])):
        written = torch.zeros_like(buf, dtype=torch.bool)
        for b in range(count):
            written[gap + b * (size + gap):][:size] = True
        assert torch.isnan(buf[~written]).all(), "a gap between members was written"
        assert torch.isfinite(buf[written]).all()


@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("side", ["left", "right"])
def test_grouped_project_split_k(split_k, side, device, monkeypatch):
    """The reduction over m cut into slices (what the launcher does on a GPU for a group too
    small to fill it): same R, still one Triton launch (plus torch's sum and copy)."""
    from lowrank_fused.kernels.grouped_project import grouped_project as launch

    shape = (203, 97) if side == "left" else (97, 203)
    Gs = members(shape, 3, torch.bfloat16, device)
    Ps = bases(shape, 19, side, 3, device)
    want = [ops.project(G, P, side=side, backend="reference") for G, P in zip(Gs, Ps)]
    Rs = [poison(torch.empty_like(w)) for w in want]
    canon = (lambda t: t) if side == "left" else (lambda t: t.t())
    launches = count_kernel_runs(monkeypatch)
    launch([canon(G) for G in Gs], [canon(P) for P in Ps], [canon(R) for R in Rs],
           split_k=split_k)
    assert sum(launches.values()) == 1
    for b, (R, w) in enumerate(zip(Rs, want)):
        assert_parity(R, w, rtol=tolerance(torch.float32), name=f"R[{b}]")


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "separate"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_planned_split_k_allocates_nothing(side, stacked, device):
    """A planned launch with split-K (a GPU's choice for a small group) keeps its partial-sum
    buffers: the second call allocates nothing, and R (written straight into a stacked block
    or copied into separate members), ``colsum(G^2)`` (contiguous or strided) and ``||R||^2``
    are right, poisoned before every call."""
    from lowrank_fused.kernels.grouped_project import plan_grouped_project
    from lowrank_fused.testing.trace import AllocationTrace

    shape, rank, count = ((203, 97) if side == "left" else (97, 203)), 19, 3
    Gs = members(shape, count, torch.bfloat16, device)
    Ps = bases(shape, rank, side, count, device)
    low = ops.low_rank_shape(shape, rank, side)
    if stacked:
        block = torch.empty((count,) + low, device=device)
        Rs = list(block.unbind(0))
    else:
        Rs = [torch.empty(low, device=device) for _ in range(count)]
    canon = (lambda t: t) if side == "left" else (lambda t: t.t())
    length = shape[1] if side == "left" else shape[0]
    sq = torch.empty(count, length, device=device) if stacked else \
        torch.empty(length, count, device=device).t()
    rsq = torch.empty(count, device=device)
    launch = plan_grouped_project([canon(G) for G in Gs], [canon(P) for P in Ps],
                                  [canon(R) for R in Rs], split_k=3, col_sumsq=sq,
                                  r_sumsq=rsq)
    want = [ops.project(G, P, side=side, backend="reference") for G, P in zip(Gs, Ps)]
    want_sq = torch.stack([G.float().square().sum(dim=0 if side == "left" else 1) for G in Gs])
    for call in range(3):
        for X in Rs + [sq, rsq]:
            poison(X)
        if call == 1:        # the host half of a call: no allocation (the kernel's run stubbed:
            trace = AllocationTrace()       # the interpreter allocates as it runs one)
            with trace, stub_triton_runs():
                launch(canon(Gs[0]))
            assert trace.sizes == [], trace.sizes
            continue
        launch(canon(Gs[0]))
        for b in range(count):
            assert_parity(Rs[b], want[b], rtol=tolerance(torch.float32), name=f"R[{b}]")
        assert_parity(sq, want_sq, rtol=tolerance(torch.float32), name="colsum")
        assert_parity(rsq, torch.stack([w.double().square().sum() for w in want]).float(),
                      rtol=tolerance(torch.float32), name="r_sumsq")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_equals_single_kernels_bitwise(side, dtype, device):
    """Same tiles, same math: each member's result is bit for bit the single-matrix kernel's
    (K1 with both launchers held to one K-slice; on a GPU the single launcher may split K for
    a small matrix where the group, whose grid is count times larger, does not)."""
    from lowrank_fused.kernels.grouped_project import grouped_project as grouped_launch
    from lowrank_fused.kernels.project import project as single_launch

    shape, rank, count = (130, 257), 43, 3
    canon = (lambda t: t) if side == "left" else (lambda t: t.t())
    Gs = members(shape, count, dtype, device)
    Ps = bases(shape, rank, side, count, device)
    low = ops.low_rank_shape(shape, rank, side)
    R1 = [torch.empty(low, device=device) for _ in range(count)]
    R2 = [torch.empty(low, device=device) for _ in range(count)]
    for G, P, R in zip(Gs, Ps, R1):
        single_launch(canon(G), canon(P), canon(R), split_k=1)
    grouped_launch([canon(G) for G in Gs], [canon(P) for P in Ps], [canon(R) for R in R2],
                   split_k=1)
    assert all(torch.equal(a, b) for a, b in zip(R1, R2))
    coef, pre, post = scalars(count)
    W1 = [G.clone() for G in Gs]
    for W, P, N, c, a, d in zip(W1, Ps, R1, coef, pre, post):
        ops.backproject_update(W, P, N, side=side, coef=c, pre_scale=a, post_decay=d,
                               backend="triton")
    ops_grouped.grouped_backproject_update(Gs, Ps, R1, side=side, coef=coef, pre_scale=pre,
                                           post_decay=post, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(W1, Gs))


@contextlib.contextmanager
def stub_triton_runs():
    """Every Triton launch a no-op (the interpreter's run, or a GPU's ``JITFunction.run``)."""
    import triton

    cls = type(triton.jit(lambda: None))
    real = cls.run
    cls.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        cls.run = real


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_launch_per_group(side, device, monkeypatch):
    shape, rank, count = (97, 203), 11, 7
    Gs = members(shape, count, torch.bfloat16, device)
    Ps = bases(shape, rank, side, count, device)
    launches = count_kernel_runs(monkeypatch)
    Rs = ops_grouped.grouped_project(Gs, Ps, side=side, backend="triton")
    assert sum(launches.values()) == 1
    ops_grouped.grouped_backproject_update(Gs, Ps, Rs, side=side, coef=0.1, post_decay=0.01,
                                           backend="triton")
    assert sum(launches.values()) == 2
    for G, P in zip(Gs, Ps):       # the counter sees per-matrix launches too
        ops.project(G, P, side=side, backend="triton")
    assert sum(launches.values()) == 2 + count


def test_scalars_broadcast_and_empty_group(device):
    shape, rank = (64, 64), 9
    Ws = members(shape, 2, torch.float32, device)
    Ps = bases(shape, rank, "right", 2, device)
    Ns = members(ops.low_rank_shape(shape, rank, "right"), 2, torch.float32, device)
    check_backproject(Ws, Ps, Ns, "right", [0.3, 0.3], [1.0, 1.0], [0.02, 0.02])
    W1 = [W.clone() for W in Ws]
    ops_grouped.grouped_backproject_update(W1, Ps, Ns, side="right", coef=0.3, post_decay=0.02,
                                           backend="triton")
    ops_grouped.grouped_backproject_update(Ws, Ps, Ns, side="right", coef=[0.3, 0.3],
                                           post_decay=(0.02, 0.02), backend="triton")
    for a, b in zip(W1, Ws):
        assert torch.equal(a, b)
    assert ops_grouped.grouped_project([], [], backend="triton") == []
    assert ops_grouped.grouped_backproject_update([], [], [], coef=1.0, backend="triton") == []


def test_grouped_reference_is_the_per_matrix_reference(device):
    shape, rank = (97, 203), 7
    Gs = members(shape, 3, torch.bfloat16, device)
    Ps = bases(shape, rank, "right", 3, device)
    Rs = ops_grouped.grouped_project(Gs, Ps, side="right", backend="reference")
    for G, P, R in zip(Gs, Ps, Rs):
        assert torch.equal(R, ops.project(G, P, side="right", backend="reference"))


def _bad_inputs(device):
    shape, rank = (40, 30), 5
    Gs = members(shape, 3, torch.float32, device)
    Ps = bases(shape, rank, "left", 3, device)
    Ns = members((rank, 30), 3, torch.float32, device)
    return shape, rank, Gs, Ps, Ns


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grouped_ops_reject_bad_input(backend, device):
    shape, rank, Gs, Ps, Ns = _bad_inputs(device)
    W0 = [G.clone() for G in Gs]
    project = ops_grouped.grouped_project
    update = ops_grouped.grouped_backproject_update

    def bad(exc, match, fn, *args, **kw):
        with pytest.raises(exc, match=match):
            fn(*args, backend=backend, **kw)

    # mixed shapes
    bad(ValueError, r"Gs\[1\] must have shape \(40, 30\)", project,
        [Gs[0], torch.randn(40, 31, device=device), Gs[2]], Ps)
    bad(ValueError, r"Ps\[2\] must have shape \(40, 5\)", project,
        Gs, Ps[:2] + [basis(shape, 6, "left", device)])
    bad(ValueError, r"Ns\[1\] must have shape \(5, 30\)", update,
        Gs, Ps, [Ns[0], torch.randn(5, 29, device=device), Ns[2]], coef=1.0)
    # a non-contiguous member (same shape, other strides)
    odd = torch.randn(30, 40, device=device).t()
    bad(ValueError, r"Ws\[2\] has strides \(1, 40\) but Ws\[0\] has \(30, 1\)", update,
        [Gs[0], Gs[1], odd], Ps, Ns, coef=1.0)
    bad(ValueError, r"Gs\[1\] has strides", project, [Gs[0], odd], Ps[:2])
    # mixed dtypes and devices
    bad(TypeError, r"Gs\[1\] is torch.bfloat16", project, [Gs[0], Gs[1].bfloat16()], Ps[:2])
    meta = torch.empty(shape, device="meta")
    bad(ValueError, r"Ws\[1\] is on meta but Ws\[0\] is on", update,
        [Gs[0], meta], Ps[:2], Ns[:2], coef=1.0)
    bad(ValueError, r"Ps\[0\] is on meta", project, Gs[:1],
        [torch.empty(40, 5, device="meta")])
    # lists, outputs, scalars
    bad(ValueError, r"Ps has 2 tensors but Gs has 3", project, Gs, Ps[:2])
    bad(TypeError, r"Gs must be a list or tuple", project, Gs[0], Ps)
    bad(TypeError, r"Rs\[0\] is torch.bfloat16", project, Gs, Ps,
        [torch.empty(rank, 30, device=device, dtype=torch.bfloat16) for _ in range(3)])
    shared = torch.empty(rank, 30, device=device)
    bad(ValueError, r"Rs\[2\] overlaps Rs\[0\]", project, Gs, Ps,
        [shared, torch.empty(rank, 30, device=device), shared])
    bad(ValueError, r"Ws\[1\] overlaps Ws\[0\]", update, [Gs[0], Gs[0]], Ps[:2], Ns[:2],
        coef=1.0)
    bad(ValueError, r"coef\[1\] must be finite", update, Gs, Ps, Ns,
        coef=[1.0, float("inf"), 1.0])
    bad(ValueError, r"post_decay must be a number or hold one value per tensor", update, Gs,
        Ps, Ns, coef=1.0, post_decay=[0.1, 0.2])
    bad(ValueError, r"side must be one of", update, Gs, Ps, Ns, coef=1.0, side="up")
    for G, w in zip(Gs, W0):
        assert torch.equal(G, w), "a rejected call must leave W untouched"


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,rank", [((97, 203), 1), ((130, 257), 43), ((64, 64), 64)],
                         ids=["97x203-r1", "130x257-r43", "64x64-rmin"])
def test_grouped_r_sumsq_matches_reference_and_single_kernel(shape, rank, side, dtype, device):
    """``||R_b||^2`` of every member (AdaRankGrad's exit-rule norm): against the fp64 sum of
    squares of the reference R (fp32 tolerance), and bit for bit the single kernel's side
    output (same tile partials, same fixed-order sum); outputs poisoned first."""
    count = 3
    Gs = members(shape, count, dtype, device)
    Ps = bases(shape, rank, side, count, device)
    low = ops.low_rank_shape(shape, rank, side)
    rsq = poison(torch.empty(count, device=device))
    Rs = ops_grouped.grouped_project(Gs, Ps, side=side, backend="triton", r_sumsq=rsq)
    single = poison(torch.empty(1, device=device))
    for b, (G, P) in enumerate(zip(Gs, Ps)):
        want = ops.project(G, P, side=side, backend="reference").double().square().sum()
        assert_parity(rsq[b:b + 1], want.reshape(1).float(), rtol=tolerance(torch.float32),
                      name=f"r_sumsq[{b}]")
        R = torch.empty(low, device=device)
        ops.project(G, P, R, side=side, backend="triton", r_sumsq=single)
        if device == "cpu":          # one K-slice both ways (a GPU may split the single one)
            assert torch.equal(single, rsq[b:b + 1]) and torch.equal(R, Rs[b])
    ref = torch.empty(count, device=device)
    ops_grouped.grouped_project(Gs, Ps, side=side, backend="reference", r_sumsq=ref)
    assert_parity(rsq, ref, rtol=tolerance(torch.float32), name="r_sumsq vs reference")


def test_grouped_r_sumsq_split_k_strided_and_bad_input(device):
    from lowrank_fused.kernels.grouped_project import grouped_project as launch

    Gs = members((203, 97), 3, torch.float32, device)
    Ps = bases((203, 97), 19, "left", 3, device)
    Rs = [torch.empty(19, 97, device=device) for _ in range(3)]
    want = torch.stack([(P.t() @ G).double().square().sum() for G, P in zip(Gs, Ps)]).float()
    rsq = poison(torch.empty(3, device=device))
    launch(Gs, Ps, Rs, split_k=3, r_sumsq=rsq)
    assert_parity(rsq, want, rtol=tolerance(torch.float32), name="split-K r_sumsq")
    strided = poison(torch.empty(3, 2, device=device))[:, 0]
    launch(Gs, Ps, Rs, r_sumsq=strided)
    assert_parity(strided, want, rtol=tolerance(torch.float32), name="strided r_sumsq")
    with pytest.raises(TypeError, match="r_sumsq must be float32"):
        ops_grouped.grouped_project(Gs, Ps, r_sumsq=torch.empty(3, dtype=torch.float64,
                                                                  device=device))
    with pytest.raises(ValueError, match=r"r_sumsq must have shape \(3,\)"):
        ops_grouped.grouped_project(Gs, Ps, r_sumsq=torch.empty(1, device=device))


# -- AdaMeM's ops: K1 with the colsum(G^2) side output, K3 with the residual term ---------

SUMSQ_CASES = [("left", torch.float32, (97, 203), 1), ("left", torch.bfloat16, (130, 257), 43),
               ("right", torch.float32, (130, 257), 5)]


@pytest.mark.parametrize("side,dtype,shape,rank", SUMSQ_CASES, ids=str)
def test_grouped_project_sumsq_matches_reference_and_single_kernel(side, dtype, shape, rank,
                                                                   device):
    """``sumsq``: row b is ``colsum(G_b^2)`` (left; ``rowsum`` on the right), against the
    reference (fp32 tolerance) and bit for bit the single kernel's side output (CPU: one
    K-slice both ways); R and ``||R||^2`` unchanged by the extra output; poisoned first.
    Rank 43 spans three rank tiles (only the first writes the colsum)."""
    count = 2 if rank > 16 else 3
    Gs = members(shape, count, dtype, device)
    Ps = bases(shape, rank, side, count, device)
    length = shape[1] if side == "left" else shape[0]
    sq = poison(torch.empty(count, length, device=device))
    rsq = poison(torch.empty(count, device=device))
    Rs = ops_grouped.grouped_project(Gs, Ps, side=side, backend="triton", sumsq=sq,
                                     r_sumsq=rsq if side == "left" else None)
    want = torch.empty(count, length, device=device)
    ref_R = ops_grouped.grouped_project(Gs, Ps, side=side, backend="reference", sumsq=want)
    assert_parity(sq, want, rtol=tolerance(torch.float32), name="sumsq vs reference")
    for b, (G, P) in enumerate(zip(Gs, Ps)):
        assert_parity(Rs[b], ref_R[b], rtol=tolerance(torch.float32), name=f"R[{b}]")
        single = poison(torch.empty(length, device=device))
        R = ops.project(G, P, side=side, backend="triton", sumsq=single)
        if device == "cpu":
            assert torch.equal(single, sq[b]) and torch.equal(R, Rs[b])
    if side == "left":
        want_rsq = torch.stack([R.double().square().sum() for R in ref_R]).float()
        assert_parity(rsq, want_rsq, rtol=tolerance(torch.float32), name="r_sumsq")


def test_grouped_project_sumsq_split_k_strided_and_bad_input(device):
    from lowrank_fused.kernels.grouped_project import grouped_project as launch

    shape = (203, 97)
    Gs = members(shape, 3, torch.bfloat16, device)
    Ps = bases(shape, 19, "left", 3, device)
    Rs = [torch.empty(19, 97, device=device) for _ in range(3)]
    want = torch.stack([G.float().square().sum(dim=0) for G in Gs])
    sq = poison(torch.empty(3, 97, device=device))
    launch(Gs, Ps, Rs, split_k=3, col_sumsq=sq)          # per-slice partials, summed after
    assert_parity(sq, want, rtol=tolerance(torch.float32), name="split-K sumsq")
    strided = poison(torch.empty(97, 3, device=device)).t()   # column stride 3
    launch(Gs, Ps, Rs, col_sumsq=strided)
    assert_parity(strided, want, rtol=tolerance(torch.float32), name="strided sumsq")
    for b in range(3):
        assert_parity(Rs[b], Ps[b].t() @ Gs[b].float(), rtol=tolerance(torch.float32),
                      name=f"R[{b}]")
    project = ops_grouped.grouped_project
    with pytest.raises(TypeError, match="sumsq must be float32"):
        project(Gs, Ps, sumsq=torch.empty(3, 97, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"sumsq must have shape \(3, 97\)"):
        project(Gs, Ps, sumsq=torch.empty(97, device=device))
    with pytest.raises(ValueError, match=r"sumsq must have shape \(3, 203\)"):
        project(Gs, bases(shape, 19, "right", 3, device), side="right",
                sumsq=torch.empty(3, 97, device=device))
    with pytest.raises(ValueError, match=r"sumsq\[1\] overlaps sumsq\[0\]"):
        project(Gs, Ps, sumsq=torch.empty(97, device=device).expand(3, 97))
    with pytest.raises(ValueError, match="sumsq is on meta"):
        project(Gs, Ps, sumsq=torch.empty(3, 97, device="meta"))
    with pytest.raises(TypeError, match="sumsq must be a torch.Tensor"):
        project(Gs, Ps, sumsq=[0.0] * 3)


def _residual_case(shape, rank, count, dtype, device, transposed=False):
    """AdaMeM's operands in the canonical left form; ``transposed``: W and G are transposed
    views of tall matrices (as AdaMeM passes them)."""
    def mats(n):
        if transposed:
            return [M.t() for M in members(shape[::-1], n, dtype, device)]
        return members(shape, n, dtype, device)

    Ws, Gs = mats(count), mats(count)
    Ps = bases(shape, rank, "left", count, device)
    Rs = [P.t() @ G.float() for P, G in zip(Ps, Gs)]
    Ns = members((rank, shape[1]), count, torch.float32, device)
    css = [torch.rand(shape[1], device=device) + 0.5 for _ in range(count)]
    coef, pre, post = scalars(count)
    res = [0.03 * (b + 1) for b in range(count)]
    return Ws, Gs, Ps, Rs, Ns, css, dict(coef=coef, res_coef=res, pre_scale=pre,
                                         post_decay=post)


@pytest.mark.parametrize("shape,rank,dtype,transposed",
                         [((97, 203), 1, torch.float32, False),
                          ((130, 257), 43, torch.bfloat16, False),
                          ((97, 203), 7, torch.float32, True)], ids=str)
def test_grouped_residual_backproject_update(shape, rank, dtype, transposed, device,
                                             monkeypatch):
    """AdaMeM's combined update over a group in ONE launch: bit for bit the single residual
    kernel per member (CPU), the per-member reference within tolerance, a real update."""
    from lowrank_fused.dispatch import lookup

    count = 2 if rank > 16 else 3
    Ws, Gs, Ps, Rs, Ns, css, kw = _residual_case(shape, rank, count, dtype, device, transposed)
    W0 = [W.clone() for W in Ws]
    single = [W.clone() for W in Ws]
    for b, W in enumerate(single):
        lookup("residual_backproject_update", "triton")(
            W, Gs[b], Ps[b], Rs[b], Ns[b], css[b], precision="ieee",
            **{k: v[b] for k, v in kw.items()})
    want = [W.clone() for W in Ws]
    ops_grouped.grouped_residual_backproject_update(want, Gs, Ps, Rs, Ns, css, **kw,
                                                    backend="reference")
    launches = count_kernel_runs(monkeypatch)
    out = ops_grouped.grouped_residual_backproject_update(Ws, Gs, Ps, Rs, Ns, css, **kw,
                                                          backend="triton")
    assert all(a is b for a, b in zip(out, Ws)) and sum(launches.values()) == 1
    for b, (W, w, w0) in enumerate(zip(Ws, want, W0)):
        assert_parity(W, w, rtol=tolerance(dtype), name=f"W[{b}]")
        assert (w.float() - w0.float()).abs().max() > 1e-3, "the update must be real"
        if device == "cpu":
            assert torch.equal(W, single[b]), f"W[{b}] differs from the single kernel's"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_grouped_residual_backproject_update_rejects_bad_input(backend, device):
    shape, rank = (40, 30), 5
    Ws, Gs, Ps, Rs, Ns, css, kw = _residual_case(shape, rank, 3, torch.float32, device)
    W0 = [W.clone() for W in Ws]
    update = ops_grouped.grouped_residual_backproject_update

    def bad(exc, match, *args, **over):
        with pytest.raises(exc, match=match):
            update(*args, backend=backend, **{**kw, **over})

    bad(ValueError, r"Gs\[1\] must have shape \(40, 30\)", Ws,
        [Gs[0], torch.randn(40, 31, device=device), Gs[2]], Ps, Rs, Ns, css)
    bad(ValueError, r"Rs\[2\] must have shape \(5, 30\)", Ws, Gs, Ps,
        Rs[:2] + [torch.randn(5, 29, device=device)], Ns, css)
    bad(ValueError, r"col_scales\[0\] must have shape \(30,\)", Ws, Gs, Ps, Rs, Ns,
        [torch.rand(40, device=device)] * 3)
    bad(ValueError, r"col_scales has 2 tensors but Ws has 3", Ws, Gs, Ps, Rs, Ns, css[:2])
    bad(TypeError, r"Gs\[1\] is torch.bfloat16", Ws, [Gs[0], Gs[1].bfloat16(), Gs[2]], Ps,
        Rs, Ns, css)
    bad(ValueError, r"res_coef\[1\] must be finite", Ws, Gs, Ps, Rs, Ns, css,
        res_coef=[0.1, float("nan"), 0.1])
    bad(ValueError, r"Ws\[1\] overlaps Ws\[0\]", [Ws[0], Ws[0], Ws[2]], Gs, Ps, Rs, Ns, css)
    bad(ValueError, r"precision must be one of", Ws, Gs, Ps, Rs, Ns, css, precision="fp8")
    for W, w in zip(Ws, W0):
        assert torch.equal(W, w), "a rejected call must leave W untouched"
    assert update([], [], [], [], [], [], coef=1.0, res_coef=1.0, backend=backend) == []


# -- the on-device skip flag (grouped_backproject_update(..., skip=...)) -----------------------

@pytest.mark.parametrize("backend", skip_backends("grouped_backproject_update"))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_backproject_update_skip_flag(backend, side, dtype, device):
    """skip=True: every W_b keeps its prefilled bits, no host read; skip=False: the bits of a
    call without a flag (3 members with their own scalars)."""
    shape, rank, count = (45, 70), 4, 3
    Ps = bases(shape, rank, side, count, device)
    Ns = members(ops.low_rank_shape(shape, rank, side), count, torch.float32, device)
    coef, pre, post = scalars(count)

    def run(out, skip):
        ops_grouped.grouped_backproject_update(out, Ps, Ns, side=side, coef=coef,
                                               pre_scale=pre, post_decay=post,
                                               backend=backend, skip=skip)

    check_skip(lambda: members(shape, count, dtype, device), run, device)


def test_grouped_backproject_update_skip_rejects_bad_flags(device):
    shape, rank, Gs, Ps, Ns = _bad_inputs(device)
    check_bad_skips(lambda skip: ops_grouped.grouped_backproject_update(
        Gs, Ps, Ns, coef=1.0, backend="reference", skip=skip), device)
    with pytest.raises(TypeError, match="skip"):   # checked for an empty group too
        ops_grouped.grouped_backproject_update([], [], [], coef=1.0, skip=1)
