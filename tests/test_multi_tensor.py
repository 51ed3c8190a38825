"""Multi-tensor ops (csrc/multi_tensor.h): the CPU twin (one OpenMP loop over every
(tensor, chunk)) and, on a GPU, the CUDA kernel (one launch) against the eager reference, a
loop over the single-op references.

Tolerances as in test_adamw_step_csrc.py: every operation is one IEEE-rounded fp32 operation
in the reference's order, so M and V match bit for bit on the CPU (1 ulp on CUDA, as a guard);
N and W may differ by a few fp32 ulp because torch's vectorised CPU sqrt (and its CUDA
division by a scalar) is not correctly rounded, i.e. by at most 1 ulp when stored as bf16.
The norms are sums in a different order: relative 1e-5.
"""
import zlib

import pytest
import torch

from lowrank_fused import _ext, ops, ops_multi
from lowrank_fused.dispatch import lookup

from _skip import check_bad_skips, check_skip

needs_cpu_ext = pytest.mark.skipif(_ext.why_no_cpu() is not None,
                                   reason=str(_ext.why_no_cpu()))
_WHY_NO_CUDA = _ext.why_no_cuda()
needs_cuda_ext = pytest.mark.skipif(_WHY_NO_CUDA is not None, reason=str(_WHY_NO_CUDA))

F32, BF16 = torch.float32, torch.bfloat16
DT = {"fp32": F32, "bf16": BF16}
SHAPES = [(1,), (97,), (4097,), (97, 203), (3, 5, 7), (0, 4), (33, 1000), (2,), (130, 257)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def ulps(a, b):
    def ordered(t):
        if t.dtype == F32:
            bits, mask = t.view(torch.int32).long(), 0x7FFFFFFF
        else:
            bits, mask = t.view(torch.int16).long(), 0x7FFF
        mag = bits & mask
        return torch.where(bits < 0, -mag, mag)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return 0
    a, b = a.cpu(), b.cpu()
    d = (ordered(a) - ordered(b)).abs()
    return int(torch.where(a.isnan() & b.isnan(), 0, d).max())  # NaN payloads may differ


def assert_close_fp(name, a, b, rtol=1e-6):
    """fp32: within rtol relative (a few ulp); bf16: within 1 ulp."""
    if a.dtype == BF16:
        assert ulps(a, b) <= 1, f"{name}: {ulps(a, b)} bf16 ulp"
        return
    err = (a.double() - b.double()).abs()
    tol = rtol * b.double().abs() + 1e-30
    assert bool(((err <= tol) | (a.isnan() & b.isnan())).all()), f"{name}: worst err/tol {(err / tol).max().item():.3g}"


def per_tensor_scalars(count, gen):
    """Differing groups: betas, eps and steps vary per tensor."""
    b1 = [0.9 - 0.05 * (i % 3) for i in range(count)]
    b2 = [0.999 - 0.004 * (i % 2) for i in range(count)]
    eps = [1e-8 if i % 2 else 1e-6 for i in range(count)]
    steps = [1 + (i % 4) * 3 for i in range(count)]
    return b1, b2, eps, steps


def make_moments(count, s_dt, n_dt, gen, device="cpu"):
    Rs, Ms, Vs, Ns = [], [], [], []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        Rs.append(torch.randn(shape, generator=gen).to(device))
        Ms.append((0.1 * torch.randn(shape, generator=gen)).to(device=device, dtype=s_dt))
        Vs.append((0.01 * torch.randn(shape, generator=gen) ** 2 + 1e-4).to(device=device,
                                                                             dtype=s_dt))
        Ns.append(torch.full(shape, float("nan"), dtype=n_dt, device=device))
    return Rs, Ms, Vs, Ns


def clone_all(*lists):
    return [[t.clone() for t in ts] for ts in lists]


def moments_kernel_scalars(count, gen, eps_mode):
    b1, b2, eps, steps = per_tensor_scalars(count, gen)
    c = [ops._eps_mode_divisors(eps_mode, b1[i], b2[i], steps[i]) for i in range(count)]
    return dict(beta1=b1, beta2=b2, eps=eps, c1=[x[0] for x in c], c2=[x[1] for x in c])


def run_moments(backend, device, s_dt, n_dt, eps_mode, count=len(SHAPES) + 4, nan_at=None):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((s_dt, n_dt, eps_mode)).encode()))
    state = make_moments(count, s_dt, n_dt, gen, device)
    if nan_at is not None:
        state[0][nan_at].view(-1)[-1] = float("nan")
    ours, ref = clone_all(*state), clone_all(*state)
    kw = moments_kernel_scalars(count, gen, eps_mode)
    norms = torch.full((count,), -1.0, device=device)
    norms_ref = torch.zeros(count, device=device)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    flag_ref = torch.zeros(1, dtype=torch.int32, device=device)
    lookup("adam_moments_multi", backend)(*ours, norms=norms, nonfinite=flag, **kw)
    lookup("adam_moments_multi", "reference")(*ref, norms=norms_ref, nonfinite=flag_ref, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    return ours, ref, norms, norms_ref, flag, flag_ref


@needs_cpu_ext
@pytest.mark.parametrize("s_dt,n_dt", [(s, n) for s in DT for n in DT])
@pytest.mark.parametrize("eps_mode", ["hf", "torch"])
def test_moments_cpu_matches_reference(s_dt, n_dt, eps_mode):
    ours, ref, norms, norms_ref, flag, flag_ref = run_moments("cpu", "cpu", DT[s_dt], DT[n_dt],
                                                             eps_mode)
    for i in range(len(ours[0])):
        assert torch.equal(ours[0][i], ref[0][i])  # R untouched
        for k, name in ((1, "M"), (2, "V")):
            assert ulps(ours[k][i], ref[k][i]) == 0, f"{name}[{i}]"
        assert_close_fp(f"N[{i}]", ours[3][i], ref[3][i])
    torch.testing.assert_close(norms, norms_ref, rtol=1e-5, atol=1e-30)
    assert int(flag) == 0 and int(flag_ref) == 0


@needs_cpu_ext
@pytest.mark.parametrize("s_dt,n_dt", [(s, n) for s in DT for n in DT])
def test_single_adam_moments_cpu_matches_reference(s_dt, n_dt):
    """The single ``adam_moments`` op's CPU twin (the multi-tensor pass with one entry, what
    ``auto`` runs on the CPU): odd shapes, a non-contiguous (transposed) case, ``sumsq``;
    N poisoned first."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"single{s_dt}{n_dt}".encode()))
    s_dt, n_dt = DT[s_dt], DT[n_dt]
    for shape, transpose in [((1,), False), ((97, 203), False), ((130, 257), True),
                             ((4099,), False)]:
        R = torch.randn(shape, generator=gen)
        M = (0.1 * torch.randn(shape, generator=gen)).to(s_dt)
        V = torch.rand(shape, generator=gen).to(s_dt)
        if transpose:
            R, M, V = R.t(), M.t().contiguous(), V.t()
        for mode, step in (("hf", 1), ("torch", 3)):
            ours = [R, M.clone(), V.clone(), torch.full(R.shape, float("nan"), dtype=n_dt)]
            ref = [R, M.clone(), V.clone(), torch.full(R.shape, float("nan"), dtype=n_dt)]
            sq, sq_ref = torch.full((1,), -1.0), torch.zeros(1)
            ops.adam_moments(*ours, beta1=0.9, beta2=0.999, eps=1e-6, step=step,
                             eps_mode=mode, sumsq=sq, backend="cpu")
            ops.adam_moments(*ref, beta1=0.9, beta2=0.999, eps=1e-6, step=step,
                             eps_mode=mode, sumsq=sq_ref, backend="reference")
            for k, name in ((1, "M"), (2, "V")):
                assert ulps(ours[k], ref[k]) == 0, name
            assert not ours[3].isnan().any()
            assert_close_fp("N", ours[3], ref[3])
            torch.testing.assert_close(sq, sq_ref, rtol=1e-5, atol=1e-30)
    with pytest.raises(TypeError, match=r"R must be float32"):
        lookup("adam_moments", "cpu")(R.bfloat16(), M, V, torch.empty(R.shape), beta1=0.9,
                                      beta2=0.9, eps=1e-6, c1=1.0, c2=1.0)


@needs_cpu_ext
def test_moments_nonfinite_flag():
    *_, flag, flag_ref = run_moments("cpu", "cpu", F32, F32, "hf", nan_at=3)
    assert int(flag) == 1 and int(flag_ref) == 1
    # the flag is only ever set: a clean call leaves a set flag set
    Rs, Ms, Vs, Ns = make_moments(3, F32, BF16, torch.Generator().manual_seed(0))
    flag = torch.ones(1, dtype=torch.int32)
    kw = dict(beta1=[0.9] * 3, beta2=[0.999] * 3, eps=[1e-8] * 3, c1=[1.0] * 3, c2=[1.0] * 3)
    lookup("adam_moments_multi", "cpu")(Rs, Ms, Vs, Ns, nonfinite=flag, **kw)
    assert int(flag) == 1
    Rs[2][0] = float("inf")
    flag.zero_()
    lookup("adam_moments_multi", "cpu")(Rs, Ms, Vs, Ns, nonfinite=flag, **kw)
    assert int(flag) == 1


@needs_cpu_ext
def test_moments_threads_agree_and_no_optional_outputs():
    gen = torch.Generator().manual_seed(5)
    Rs, Ms, Vs, Ns = make_moments(3, F32, F32, gen)
    Rs = [torch.randn((1 << 16) + 7, generator=gen), torch.randn(5, generator=gen),
          torch.randn(40000, generator=gen)]
    Ms, Vs, Ns = ([torch.rand(r.shape, generator=gen) for r in Rs] for _ in range(3))
    kw = dict(beta1=[0.9, 0.8, 0.7], beta2=[0.999, 0.99, 0.9], eps=[1e-8] * 3,
              c1=[0.5, 1.0, 0.3], c2=[0.1, 1.0, 0.2])
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            st = clone_all(Rs, Ms, Vs, Ns)
            norms = torch.zeros(3)
            lookup("adam_moments_multi", "cpu")(*st, norms=norms, **kw)
            results.append(st + [[norms]])
    finally:
        torch.set_num_threads(old)
    for la, lb in zip(*results):
        for a, b in zip(la, lb):
            assert torch.equal(a, b)
    st = clone_all(Rs, Ms, Vs, Ns)
    lookup("adam_moments_multi", "cpu")(*st, **kw)  # no norms, no flag
    for a, b in zip(st[3], results[0][3]):
        assert torch.equal(a, b)


# --- adamw_step_multi --------------------------------------------------------------------------

def adamw_kernel_scalars(count, eps_mode, wd_mode):
    b1, b2, eps, steps = per_tensor_scalars(count, None)
    out = {k: [] for k in ("lr", "beta1", "beta2", "eps", "c1", "c2", "pre_scale",
                           "post_decay")}
    for i in range(count):
        lr, wd = 1e-2 * (1 + i % 3), 0.1 * (i % 2)
        c1, c2 = ops._eps_mode_divisors(eps_mode, b1[i], b2[i], steps[i])
        step_size = lr if eps_mode == "torch" else ops.hf_step_size(lr, b1[i], b2[i], steps[i])
        pre, post = ops.decay_coefficients(lr, wd, wd_mode)
        for k, v in (("lr", step_size), ("beta1", b1[i]), ("beta2", b2[i]), ("eps", eps[i]),
                     ("c1", c1), ("c2", c2), ("pre_scale", pre), ("post_decay", post)):
            out[k].append(v)
    return out


def make_adamw(count, w_dt, g_dt, s_dt, gen, device="cpu"):
    Ws, Gs, Ms, Vs = [], [], [], []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        Ws.append(torch.randn(shape, generator=gen).to(device=device, dtype=w_dt))
        Gs.append(torch.randn(shape, generator=gen).to(device=device, dtype=g_dt))
        Ms.append((0.1 * torch.randn(shape, generator=gen)).to(device=device, dtype=s_dt))
        Vs.append((0.01 * torch.randn(shape, generator=gen) ** 2 + 1e-4).to(device=device,
                                                                             dtype=s_dt))
    return Ws, Gs, Ms, Vs


def check_adamw(ours, ref, kw, exact_moments=True):
    for i in range(len(ours[0])):
        for k, name in ((2, "M"), (3, "V")):
            d = ulps(ours[k][i], ref[k][i])
            assert d <= (0 if exact_moments else 1), f"{name}[{i}] differs by {d} ulp"
        W, W_ref = ours[0][i], ref[0][i]
        if W.dtype == F32:
            m, v = ref[2][i].double(), ref[3][i].double()
            upd = (kw["lr"][i] * (m / kw["c1"][i]) / ((v / kw["c2"][i]).sqrt()
                                                       + kw["eps"][i])).abs()
            tol = 1e-6 * (W_ref.double().abs() + upd) + 1e-30
            assert bool(((W.double() - W_ref.double()).abs() <= tol).all()), f"W[{i}]"
        else:
            assert ulps(W, W_ref) <= 1, f"W[{i}]"


def run_adamw(backend, device, w_dt, g_dt, s_dt, eps_mode, wd_mode, count=len(SHAPES) + 2,
              nan_at=None):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((w_dt, g_dt, s_dt, eps_mode, wd_mode)).encode()))
    state = make_adamw(count, w_dt, g_dt, s_dt, gen, device)
    if nan_at is not None:
        state[1][nan_at].view(-1)[0] = float("inf")
    ours, ref = clone_all(*state), clone_all(*state)
    kw = adamw_kernel_scalars(count, eps_mode, wd_mode)
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    flag_ref = torch.zeros(1, dtype=torch.int32, device=device)
    lookup("adamw_step_multi", backend)(*ours, nonfinite=flag, **kw)
    lookup("adamw_step_multi", "reference")(*ref, nonfinite=flag_ref, **kw)
    if device == "cuda":
        torch.cuda.synchronize()
    return ours, ref, kw, flag, flag_ref


@needs_cpu_ext
@pytest.mark.parametrize("w_dt,g_dt,s_dt", [(w, g, s) for w in DT for g in DT for s in DT])
@pytest.mark.parametrize("eps_mode,wd_mode", [("torch", "pre"), ("hf", "post")])
def test_adamw_cpu_matches_reference(w_dt, g_dt, s_dt, eps_mode, wd_mode):
    ours, ref, kw, flag, flag_ref = run_adamw("cpu", "cpu", DT[w_dt], DT[g_dt], DT[s_dt],
                                              eps_mode, wd_mode)
    check_adamw(ours, ref, kw)
    assert int(flag) == 0 and int(flag_ref) == 0


@needs_cpu_ext
@pytest.mark.parametrize("g_dt", ["fp32", "bf16"])
def test_adamw_nonfinite_flag(g_dt):
    *_, flag, flag_ref = run_adamw("cpu", "cpu", F32, DT[g_dt], F32, "torch", "pre", nan_at=4)
    assert int(flag) == 1 and int(flag_ref) == 1


@needs_cpu_ext
def test_mixed_dtypes_in_one_call():
    """Each tensor has its own storage dtypes; still one call."""
    gen = torch.Generator().manual_seed(7)
    Ws, Gs, Ms, Vs = [], [], [], []
    for i, (w, g, s) in enumerate([(F32, F32, F32), (BF16, F32, BF16), (BF16, BF16, F32),
                                   (F32, BF16, BF16)]):
        a = make_adamw(1, w, g, s, gen)
        for lst, t in zip((Ws, Gs, Ms, Vs), a):
            lst.append(t[0].reshape(-1)[:1] if i == 0 else torch.cat([t[0].reshape(-1)] * 3))
    kw = adamw_kernel_scalars(4, "hf", "post")
    ours, ref = clone_all(Ws, Gs, Ms, Vs), clone_all(Ws, Gs, Ms, Vs)
    lookup("adamw_step_multi", "cpu")(*ours, **kw)
    lookup("adamw_step_multi", "reference")(*ref, **kw)
    check_adamw(ours, ref, kw)


@needs_cpu_ext
def test_public_ops_match_single_ops():
    """ops_multi derives the per-tensor scalars exactly as ops.adam_moments / ops.adamw_step."""
    gen = torch.Generator().manual_seed(11)
    count = 5
    Ws, Gs, Ms, Vs = make_adamw(count, BF16, F32, F32, gen)
    lrs, wds, steps = [1e-3, 2e-3, 1e-2, 5e-3, 1e-3], [0.0, 0.1, 0.0, 0.01, 0.1], [1, 2, 3, 4, 9]
    for eps_mode, wd_mode in (("torch", "pre"), ("hf", "post")):
        ours, ref = clone_all(Ws, Gs, Ms, Vs), clone_all(Ws, Gs, Ms, Vs)
        out = ops_multi.adamw_step_multi(*ours, lr=lrs, beta1=0.9, beta2=0.999, eps=1e-8,
                                         step=steps, weight_decay=wds, eps_mode=eps_mode,
                                         wd_mode=wd_mode, backend="cpu")
        assert out is ours[0]
        for i in range(count):
            ops.adamw_step(ref[0][i], ref[1][i], ref[2][i], ref[3][i], lr=lrs[i], beta1=0.9,
                           beta2=0.999, eps=1e-8, step=steps[i], weight_decay=wds[i],
                           eps_mode=eps_mode, wd_mode=wd_mode, backend="reference")
        for a, b in zip(ours[0], ref[0]):
            assert ulps(a, b) <= 1
        for k in (2, 3):
            for a, b in zip(ours[k], ref[k]):
                assert torch.equal(a, b)
    Rs, Ms, Vs, Ns = make_moments(count, F32, BF16, gen)
    for eps_mode in ("hf", "torch"):
        ours, ref = clone_all(Rs, Ms, Vs, Ns), clone_all(Rs, Ms, Vs, Ns)
        norms = torch.zeros(count)
        ops_multi.adam_moments_multi(*ours, beta1=[0.9, 0.8, 0.9, 0.7, 0.9], beta2=0.999,
                                     eps=1e-8, step=steps, eps_mode=eps_mode, norms=norms,
                                     backend="cpu")
        for i in range(count):
            ops.adam_moments(*(x[i] for x in ref), beta1=[0.9, 0.8, 0.9, 0.7, 0.9][i],
                             beta2=0.999, eps=1e-8, step=steps[i], eps_mode=eps_mode,
                             backend="reference")
            assert torch.equal(ours[1][i], ref[1][i]) and torch.equal(ours[2][i], ref[2][i])
            assert ulps(ours[3][i], ref[3][i]) <= 1
            torch.testing.assert_close(norms[i], ref[3][i].float().square().sum(), rtol=1e-5,
                                       atol=0)


@needs_cpu_ext
def test_empty_lists_are_a_no_op():
    for backend in ("cpu", "reference"):
        ops_multi.adam_moments_multi([], [], [], [], beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                     backend=backend)
        ops_multi.adamw_step_multi([], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                   step=1, backend=backend)


# --- errors ----------------------------------------------------------------------------------

def _lists(count=4, shape=(4, 3)):
    return [[torch.randn(shape) for _ in range(count)] for _ in range(4)]


def _mkw(count=4):
    return dict(beta1=[0.9] * count, beta2=[0.999] * count, eps=[1e-8] * count,
                c1=[1.0] * count, c2=[1.0] * count)


@needs_cpu_ext
def test_errors_name_the_argument_and_index():
    impl = lookup("adam_moments_multi", "cpu")

    def call(i=None, k=None, t=None, count=4, **kw):
        lists = _lists(count)
        if i is not None:
            lists[k][i] = t
        impl(*lists, **{**_mkw(count), **kw})

    with pytest.raises(TypeError, match=r"Rs\[1\] must be float32, got torch.bfloat16"):
        call(1, 0, torch.randn(4, 3, dtype=BF16))
    with pytest.raises(TypeError, match=r"Ms\[2\] must be float32 or bfloat16.*float16"):
        call(2, 1, torch.randn(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"Vs\[3\] must have the shape of Rs\[3\] \(4, 3\)"):
        call(3, 2, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"Ns\[1\] must be contiguous"):
        call(1, 3, torch.randn(3, 4).t())
    with pytest.raises(TypeError, match=r"Ms\[0\] and Vs\[0\] must have one dtype"):
        call(0, 2, torch.randn(4, 3, dtype=BF16))
    with pytest.raises(ValueError, match=r"Ns\[2\] must be a CPU tensor, got device meta"):
        call(2, 3, torch.empty(4, 3, device="meta"))
    with pytest.raises(TypeError, match=r"Ms\[1\] must be a torch.Tensor"):
        call(1, 1, [1.0])
    shared = torch.randn(4, 3)
    lists = _lists()
    lists[1][2] = lists[3][2] = shared
    with pytest.raises(ValueError, match=r"Ns\[2\] and Ms\[2\] share memory"):
        impl(*lists, **_mkw())
    lists = _lists()
    with pytest.raises(ValueError, match=r"Vs has 3 tensors but Rs has 4"):
        impl(lists[0], lists[1], lists[2][:3], lists[3], **_mkw())
    with pytest.raises(ValueError, match=r"beta2 must hold one value per tensor \(4\), got 2"):
        impl(*lists, **{**_mkw(), "beta2": [0.9, 0.9]})
    with pytest.raises(ValueError, match=r"norms must be a contiguous tensor of 4"):
        impl(*lists, norms=torch.zeros(3), **_mkw())
    with pytest.raises(TypeError, match=r"nonfinite must be torch.int32"):
        impl(*lists, nonfinite=torch.zeros(1), **_mkw())
    with pytest.raises(ValueError, match=r"Rs\[0\] must be a CUDA tensor"):
        lookup("adam_moments_multi", "cuda")(*lists, **_mkw())
    awimpl = lookup("adamw_step_multi", "cpu")
    lists = _lists()
    lists[1][3] = torch.randn(5)
    akw = dict(lr=[1e-3] * 4, pre_scale=[1.0] * 4, post_decay=[0.0] * 4, **_mkw())
    with pytest.raises(ValueError, match=r"adamw_step_multi.*Gs\[3\] must have the shape of "
                                         r"Ws\[3\]"):
        awimpl(*lists, **akw)
    with pytest.raises(ValueError, match=r"Ws\[0\] must be a CUDA tensor"):
        lookup("adamw_step_multi", "cuda")(*_lists(), **akw)
    # the public wrappers
    with pytest.raises(ValueError, match=r"step must be a number or hold one value per tensor"):
        ops_multi.adamw_step_multi(*_lists(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                   step=[1, 2], backend="cpu")
    with pytest.raises(TypeError, match=r"Gs\[2\] must be float32, bfloat16 or float16"):
        lists = _lists()
        lists[1][2] = torch.zeros(4, 3, dtype=torch.float64)
        ops_multi.adamw_step_multi(*lists, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                   backend="cpu")
    with pytest.raises(TypeError, match=r"Ms\[1\] must be float32 or bfloat16"):
        lists = _lists()
        lists[1][1] = torch.zeros(4, 3, dtype=torch.float16)
        ops_multi.adam_moments_multi(*lists, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                     backend="cpu")


@needs_cpu_ext
def test_extension_rejects_bad_tables():
    mod = _ext.load()
    t = torch.zeros(4)
    p = t.data_ptr()
    kw = _mkw(1)
    with pytest.raises(ValueError, match=r"M\[0\] dtype code 7"):
        mod.adam_moments_multi_cpu([p] * 4, [4], [0, 7, 7, 0], **kw)
    with pytest.raises(ValueError, match=r"N\[0\] pointer is null"):
        mod.adam_moments_multi_cpu([p, p, p, 0], [4], [0] * 4, **kw)
    with pytest.raises(ValueError, match=r"4 entries per tensor"):
        mod.adam_moments_multi_cpu([p] * 3, [4], [0] * 4, **kw)
    with pytest.raises(ValueError, match=r"lr must hold one value per tensor"):
        mod.adamw_step_multi_cpu([p] * 4, [4], [0] * 4, lr=[], pre_scale=[1.0],
                                 post_decay=[0.0], **kw)


@needs_cpu_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_launch_without_gpu_raises_cleanly():
    mod = _ext.load()
    t = torch.zeros(4)
    p = t.data_ptr()
    with pytest.raises(RuntimeError, match=r"adam_moments_multi"):
        mod.adam_moments_multi_cuda([p] * 4, [4], [0] * 4, device=0, stream=0, **_mkw(1))
    with pytest.raises(RuntimeError, match=r"adamw_step_multi"):
        mod.adamw_step_multi_cuda([p] * 4, [4], [0] * 4, lr=[1e-3], pre_scale=[1.0],
                                  post_decay=[0.0], device=0, stream=0, **_mkw(1))


# --- CUDA (skipped without a GPU and a CUDA build) --------------------------------------------

@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("s_dt,n_dt", [(s, n) for s in DT for n in DT])
def test_moments_cuda_matches_reference(s_dt, n_dt):
    for eps_mode in ("hf", "torch"):
        for nan_at in (None, 3):
            ours, ref, norms, norms_ref, flag, flag_ref = run_moments(
                "cuda", "cuda", DT[s_dt], DT[n_dt], eps_mode, count=40, nan_at=nan_at)
            for i in range(len(ours[0])):
                assert ulps(ours[1][i], ref[1][i]) <= 1 and ulps(ours[2][i], ref[2][i]) <= 1
                assert_close_fp(f"N[{i}]", ours[3][i], ref[3][i], rtol=2e-6)
            if nan_at is None:
                torch.testing.assert_close(norms, norms_ref, rtol=1e-5, atol=1e-30)
            assert int(flag) == int(flag_ref) == (0 if nan_at is None else 1)


@pytest.mark.gpu
@needs_cuda_ext
@pytest.mark.parametrize("w_dt,g_dt,s_dt", [(w, g, s) for w in DT for g in DT for s in DT])
def test_adamw_cuda_matches_reference(w_dt, g_dt, s_dt):
    for eps_mode, wd_mode in (("torch", "pre"), ("hf", "post")):
        ours, ref, kw, flag, flag_ref = run_adamw("cuda", "cuda", DT[w_dt], DT[g_dt], DT[s_dt],
                                                  eps_mode, wd_mode, count=30)
        check_adamw(ours, ref, kw, exact_moments=False)
        assert int(flag) == int(flag_ref) == 0
    *_, flag, flag_ref = run_adamw("cuda", "cuda", DT[w_dt], DT[g_dt], DT[s_dt], "torch", "pre",
                                   nan_at=7)
    assert int(flag) == int(flag_ref) == 1


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_many_tensors_in_batches():
    """More tensors than one launch's argument struct holds (~300): several launches, same
    results; the norms land in the right slots."""
    ours, ref, norms, norms_ref, flag, flag_ref = run_moments("cuda", "cuda", F32, BF16, "torch",
                                                             count=750, nan_at=None)
    for i in range(len(ours[0])):
        assert ulps(ours[1][i], ref[1][i]) <= 1 and ulps(ours[3][i], ref[3][i]) <= 1
    torch.testing.assert_close(norms, norms_ref, rtol=1e-5, atol=1e-30)
    ours, ref, kw, flag, flag_ref = run_adamw("cuda", "cuda", F32, F32, F32, "hf", "post",
                                              count=700, nan_at=650)
    assert int(flag) == int(flag_ref) == 1


@needs_cpu_ext
def test_cpu_many_tensors():
    ours, ref, norms, norms_ref, flag, flag_ref = run_moments("cpu", "cpu", F32, F32, "hf",
                                                             count=400, nan_at=None)
    for i in range(len(ours[0])):
        assert torch.equal(ours[1][i], ref[1][i]) and torch.equal(ours[2][i], ref[2][i])
    torch.testing.assert_close(norms, norms_ref, rtol=1e-5, atol=1e-30)


# --- the on-device skip flag (ops_multi.*(..., skip=...)) ------------------------------------

SKIP_BACKENDS = [pytest.param("reference", "cpu", id="reference"),
                 pytest.param("cpu", "cpu", id="cpu", marks=needs_cpu_ext),
                 pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, needs_cuda_ext])]
SKIP_SHAPES = [(97, 203), (0, 4), (1,), (130, 257)]   # (130, 257): three CPU chunks


def _random_like_shapes(gen, dtypes, device, positive=False):
    out = []
    for shape, dt in zip(SKIP_SHAPES, dtypes):
        t = torch.randn(shape, generator=gen)
        out.append((t.abs() if positive else t).to(device=device, dtype=dt))
    return out


@pytest.mark.parametrize("backend,device", SKIP_BACKENDS)
def test_moments_multi_skip_flag(backend, device):
    """skip=True: every M_i, V_i, N_i and the norms keep their prefilled bits, no host read;
    skip=False: the bits of a call without a flag. fp32 and bf16 states in one call."""
    gen = torch.Generator().manual_seed(21)
    count = len(SKIP_SHAPES)
    s_dts, n_dts = [F32, BF16, BF16, F32], [BF16, F32, BF16, F32]
    Rs = _random_like_shapes(gen, [F32] * count, device)

    def make():
        return (_random_like_shapes(gen, s_dts, device)
                + _random_like_shapes(gen, s_dts, device, positive=True)
                + _random_like_shapes(gen, n_dts, device)
                + [torch.randn(count, generator=gen).to(device),
                   torch.zeros(1, dtype=torch.int32, device=device)])

    def run(out, skip):
        ops_multi.adam_moments_multi(Rs, out[:count], out[count:2 * count],
                                     out[2 * count:3 * count], beta1=[0.9, 0.8, 0.9, 0.7],
                                     beta2=0.999, eps=1e-8, step=[1, 2, 3, 4], eps_mode="torch",
                                     norms=out[-2], nonfinite=out[-1], backend=backend,
                                     skip=skip)

    check_skip(make, run, device)


@pytest.mark.parametrize("backend,device", SKIP_BACKENDS)
def test_adamw_multi_skip_flag(backend, device):
    """skip=True: every W_i, M_i, V_i keeps its prefilled bits, no host read; skip=False: the
    bits of a call without a flag. fp32 and bf16 weights, gradients and states in one call."""
    gen = torch.Generator().manual_seed(22)
    count = len(SKIP_SHAPES)
    w_dts, s_dts = [BF16, F32, BF16, F32], [F32, BF16, BF16, F32]
    Gs = _random_like_shapes(gen, [F32, BF16, F32, BF16], device)

    def make():
        return (_random_like_shapes(gen, w_dts, device) + _random_like_shapes(gen, s_dts, device)
                + _random_like_shapes(gen, s_dts, device, positive=True)
                + [torch.zeros(1, dtype=torch.int32, device=device)])

    def run(out, skip):
        ops_multi.adamw_step_multi(out[:count], Gs, out[count:2 * count],
                                   out[2 * count:3 * count], lr=[1e-2, 1e-3, 1e-2, 5e-3],
                                   beta1=0.9, beta2=0.999, eps=1e-8, step=[1, 2, 3, 4],
                                   weight_decay=0.1, eps_mode="hf", wd_mode="post",
                                   nonfinite=out[-1], backend=backend, skip=skip)

    check_skip(make, run, device)


@pytest.mark.parametrize("backend,device", SKIP_BACKENDS)
def test_multi_skip_still_reports_nonfinite(backend, device):
    """A skipped call still sets ``nonfinite`` from its inputs (as documented): a NaN in R_3
    (its last CPU chunk) and an inf in a bf16 G_0; a clean skipped call leaves it at 0."""
    gen = torch.Generator().manual_seed(23)
    count = len(SKIP_SHAPES)
    yes = torch.ones((), dtype=torch.bool, device=device)
    Rs = _random_like_shapes(gen, [F32] * count, device)
    Ms = _random_like_shapes(gen, [F32, BF16, F32, BF16], device)
    Vs = _random_like_shapes(gen, [F32, BF16, F32, BF16], device, positive=True)
    Ns = _random_like_shapes(gen, [BF16] * count, device)
    norms = torch.randn(count, generator=gen).to(device)
    before = [t.clone() for t in Ms + Vs + Ns + [norms]]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, step=1, norms=norms, backend=backend, skip=yes)
    for bad in (False, True):
        if bad:
            Rs[3].view(-1)[-1] = float("nan")
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        ops_multi.adam_moments_multi(Rs, Ms, Vs, Ns, nonfinite=flag, **kw)
        assert int(flag) == int(bad)
        assert all(torch.equal(a, b) for a, b in zip(Ms + Vs + Ns + [norms], before))
    Ws = _random_like_shapes(gen, [BF16, F32, F32, BF16], device)
    Gs = _random_like_shapes(gen, [BF16, F32, BF16, F32], device)
    Gs[0].view(-1)[5] = float("inf")
    before = [t.clone() for t in Ws + Ms + Vs]
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                               step=1, nonfinite=flag, backend=backend, skip=yes)
    assert int(flag) == 1
    assert all(torch.equal(a, b) for a, b in zip(Ws + Ms + Vs, before))


def test_multi_skip_rejects_bad_flags():
    Rs, Ms, Vs, Ns = _lists()
    check_bad_skips(lambda skip: ops_multi.adam_moments_multi(
        Rs, Ms, Vs, Ns, beta1=0.9, beta2=0.999, eps=1e-8, step=1, backend="reference",
        skip=skip), "cpu")
    check_bad_skips(lambda skip: ops_multi.adamw_step_multi(
        Rs, Ms, Vs, [v.abs() for v in Ns], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
        backend="reference", skip=skip), "cpu")
    with pytest.raises(TypeError, match="skip"):   # checked for empty lists too
        ops_multi.adam_moments_multi([], [], [], [], beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                     skip=1)
    with pytest.raises(TypeError, match="skip"):
        ops_multi.adamw_step_multi([], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                   step=1, skip=1)


@needs_cpu_ext
def test_multi_skip_checked_by_the_compiled_backend():
    """The extension's glue checks a flag handed to it directly (not through ops_multi)."""
    Rs, Ms, Vs, Ns = _lists()
    with pytest.raises(TypeError, match=r"adam_moments_multi \(backend 'cpu'\): skip must"):
        lookup("adam_moments_multi", "cpu")(Rs, Ms, Vs, Ns, skip=torch.zeros(()), **_mkw())
    with pytest.raises(ValueError, match=r"adamw_step_multi \(backend 'cpu'\): skip is on meta"):
        lookup("adamw_step_multi", "cpu")(Rs, Ms, Vs, Ns, lr=[1e-3] * 4, pre_scale=[1.0] * 4,
                                          post_decay=[0.0] * 4,
                                          skip=torch.zeros((), dtype=torch.bool,
                                                           device="meta"), **_mkw())
