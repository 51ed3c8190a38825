"""The compiled AdamW step (csrc/: CPU twin and CUDA kernel) against the eager reference.

Tolerances. The kernel does every operation as one IEEE-rounded fp32 operation in the
reference's order, no FMA. The moments use only multiplies and adds, which torch also rounds
exactly, so M and V must match bit for bit on the CPU (and within 1 ulp on CUDA, as a guard).
W may differ slightly because the reference itself is not IEEE-exact everywhere: torch's
vectorised CPU ``sqrt`` is off by up to 1 ulp (measured with torch 2.13: ~15% of elements), and
torch's CUDA division by a Python scalar multiplies by the reciprocal (<= 1.5 ulp). Either
perturbs the update term ``lr*u`` by a few ulp relative (<= ~5e-7), so for fp32 W we allow
``|W - W_ref| <= 1e-6 * (|W_ref| + |lr*u|) + tiny``: about 8 ulp of the operands of the final
subtraction, which is where the rounding happens. For bf16 W, the same tiny fp32 differences can
only flip the final rounding when the fp32 value lies almost exactly between two bf16 values:
at most 1 bf16 ulp, on a small fraction of elements.
"""
import os
import subprocess
import sys
import zlib

import pytest
import torch

from lowrank_fused import _ext
from lowrank_fused import ops
from lowrank_fused.dispatch import BackendUnavailable, lookup, resolve_backend
from lowrank_fused.reference.adamw_step import adamw_step_ref

needs_cpu_ext = pytest.mark.skipif(_ext.why_no_cpu() is not None,
                                   reason=str(_ext.why_no_cpu()))
_WHY_NO_CUDA = _ext.why_no_cuda()
needs_cuda_ext = pytest.mark.skipif(_WHY_NO_CUDA is not None, reason=str(_WHY_NO_CUDA))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPES = [(1,), (97, 203), (4097,), (3, 5, 7), (300, 257)]  # 300*257 runs multi-threaded
BETA1, BETA2, EPS, BASE_LR, WD = 0.9, 0.999, 1e-8, 1e-2, 0.1


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: torch's intra-op threads only cost time here (x100 on a loaded 2-core
    CI machine). test_cpu_threads_agree sets its own thread counts."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers whose differences count ulps between floats of t's dtype."""
    if t.dtype == torch.float32:
        bits, mask = t.view(torch.int32).long(), 0x7FFFFFFF
    elif t.dtype == torch.bfloat16:
        bits, mask = t.view(torch.int16).long(), 0x7FFF
    else:
        raise TypeError(t.dtype)
    mag = bits & mask
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    assert a.dtype == b.dtype and a.shape == b.shape
    return (ordered_bits(a.cpu()) - ordered_bits(b.cpu())).abs()


def step_scalars(eps_mode, wd_mode, step):
    """The kernel's scalars for one step, as ops.adamw_step derives them."""
    c1, c2 = ops._eps_mode_divisors(eps_mode, BETA1, BETA2, step)
    lr = BASE_LR if eps_mode == "torch" else ops.hf_step_size(BASE_LR, BETA1, BETA2, step)
    pre_scale, post_decay = ops.decay_coefficients(BASE_LR, WD, wd_mode)
    return dict(lr=lr, beta1=BETA1, beta2=BETA2, eps=EPS, c1=c1, c2=c2,
                pre_scale=pre_scale, post_decay=post_decay)


def make_state(shape, w_dtype, s_dtype, device, gen):
    def randn():
        return torch.randn(shape, generator=gen).to(device)

    W = randn().to(w_dtype)
    M = (0.1 * randn()).to(s_dtype)
    V = (0.01 * randn() ** 2 + 1e-4).to(s_dtype)  # positive, as after earlier steps
    return W, M, V


def check_step(ours, ref, kw, *, exact_moments):
    """Compare (W, M, V) after one step; see the module docstring for the tolerances."""
    W, M, V = ours
    W_ref, M_ref, V_ref = ref
    for name, a, b in (("M", M, M_ref), ("V", V, V_ref)):
        d = int(ulp_distance(a, b).max())
        assert d <= (0 if exact_moments else 1), f"{name} differs by {d} ulp"
    if W.dtype == torch.float32:
        m, v = M_ref.double(), V_ref.double()
        upd = (kw["lr"] * (m / kw["c1"]) / ((v / kw["c2"]).sqrt() + kw["eps"])).abs()
        tol = 1e-6 * (W_ref.double().abs() + upd) + 1e-30
        err = (W.double() - W_ref.double()).abs()
        bad = (err > tol).sum().item()
        assert bad == 0, (f"W: {bad} elements out of tolerance, worst err/tol "
                          f"{(err / tol).max().item():.3g}")
    else:
        d = ulp_distance(W, W_ref)
        assert int(d.max()) <= 1, f"W differs by {int(d.max())} bf16 ulp"
        if d.numel() >= 1000:
            assert (d > 0).float().mean().item() <= 0.01, "W: too many 1-ulp differences"


def run_case(backend, device, shape, w_dt, g_dt, s_dt, eps_mode, wd_mode, steps=3):
    impl = lookup("adamw_step", backend)
    seed = zlib.crc32(repr((shape, w_dt, g_dt, s_dt, eps_mode, wd_mode)).encode())
    gen = torch.Generator().manual_seed(seed)
    W, M, V = make_state(shape, DTYPES[w_dt], DTYPES[s_dt], device, gen)
    W_ref, M_ref, V_ref = W.clone(), M.clone(), V.clone()
    for step in range(1, steps + 1):
        G = torch.randn(shape, generator=gen).to(device=device, dtype=DTYPES[g_dt])
        kw = step_scalars(eps_mode, wd_mode, step)
        impl(W, G, M, V, **kw)
        adamw_step_ref(W_ref, G, M_ref, V_ref, **kw)
        check_step((W, M, V), (W_ref, M_ref, V_ref), kw, exact_moments=(device == "cpu"))
        # resynchronise so every step is checked from identical inputs
        W.copy_(W_ref), M.copy_(M_ref), V.copy_(V_ref)


MATRIX = pytest.mark.parametrize("w_dt,g_dt,s_dt", [
    (w, g, s) for w in DTYPES for g in DTYPES for s in DTYPES])
MODES = pytest.mark.parametrize("eps_mode,wd_mode", [
    ("torch", "pre"), ("torch", "post"), ("hf", "pre"), ("hf", "post")])


@needs_cpu_ext
@MATRIX
@MODES
def test_cpu_matches_reference(w_dt, g_dt, s_dt, eps_mode, wd_mode):
    for shape in SHAPES:
        run_case("cpu", "cpu", shape, w_dt, g_dt, s_dt, eps_mode, wd_mode)


@needs_cpu_ext
def test_cpu_threads_agree():
    """The OpenMP split changes nothing (elementwise, no reductions)."""
    impl = lookup("adamw_step", "cpu")
    kw = step_scalars("torch", "pre", 2)
    gen = torch.Generator().manual_seed(1)
    state = make_state((1 << 17) + 3, torch.float32, torch.bfloat16, "cpu", gen)
    G = torch.randn(state[0].shape, generator=gen)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            W, M, V = (t.clone() for t in state)
            impl(W, G, M, V, **kw)
            results.append((W, M, V))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_cpu_ext
def test_cpu_non_contiguous():
    impl = lookup("adamw_step", "cpu")
    kw = step_scalars("hf", "post", 4)
    gen = torch.Generator().manual_seed(2)
    W0 = torch.randn(203, 97, generator=gen)
    G0 = torch.randn(97, 406, generator=gen)
    M0 = (0.1 * torch.randn(97, 203, 2, generator=gen)).to(torch.bfloat16)
    V0 = (0.01 * torch.randn(97, 203, 2, generator=gen) ** 2 + 1e-4).to(torch.bfloat16)
    W, G, M, V = W0.clone().t(), G0[:, ::2], M0.clone()[..., 1], V0.clone()[..., 0]
    W_base = W._base if W._base is not None else W
    assert not any(t.is_contiguous() for t in (W, G, M, V))
    ref = [t.clone() for t in (W, M, V)]
    impl(W, G, M, V, **kw)
    adamw_step_ref(ref[0], G.clone(), ref[1], ref[2], **kw)
    check_step((W, M, V), tuple(ref), kw, exact_moments=True)
    assert not torch.equal(W_base.t(), W0.t())  # written through the view, in place
    assert W.data_ptr() == W_base.data_ptr()


@needs_cpu_ext
def test_public_op_cpu_backend():
    gen = torch.Generator().manual_seed(3)
    for eps_mode, wd_mode in (("torch", "pre"), ("hf", "post")):
        W, M, V = make_state((64, 33), torch.bfloat16, torch.float32, "cpu", gen)
        G = torch.randn(64, 33, generator=gen, dtype=torch.float32)
        ours = [t.clone() for t in (W, M, V)]
        ref = [t.clone() for t in (W, M, V)]
        kw = dict(lr=BASE_LR, beta1=BETA1, beta2=BETA2, eps=EPS, step=5, weight_decay=WD,
                  eps_mode=eps_mode, wd_mode=wd_mode)
        out = ops.adamw_step(ours[0], G, ours[1], ours[2], backend="cpu", **kw)
        assert out is ours[0]
        ops.adamw_step(ref[0], G, ref[1], ref[2], backend="reference", **kw)
        check_step(tuple(ours), tuple(ref), step_scalars(eps_mode, wd_mode, 5),
                   exact_moments=True)


@needs_cpu_ext
def test_empty_is_a_no_op():
    W, G, M, V = (torch.empty(0, 5) for _ in range(4))
    lookup("adamw_step", "cpu")(W, G, M, V, **step_scalars("torch", "pre", 1))


@needs_cpu_ext
def test_cpu_instruction_sets_agree_bit_for_bit():
    """The twin's loops are compiled for the x86-64 baseline, AVX2 and AVX-512 and one is
    picked at run time (``_C.cpu_isa``). IEEE vector operations round as the scalar ones and
    nothing is contracted, so every instruction set this CPU runs must give the same bits:
    single and multi-tensor AdamW for every dtype mix and both weight-decay modes, the moments
    with their norms, on lengths that leave vector tails."""
    mod = _ext.load()
    isas = mod.cpu_isas()
    assert mod.cpu_isa() == isas[0] and isas[-1] == "baseline"
    gen = torch.Generator().manual_seed(11)
    sizes = [1, 15, 17, 4099, (1 << 14) + 33]  # the last spans two multi-tensor chunks
    cases = []
    for w_dt in DTYPES.values():
        for g_dt in DTYPES.values():
            for s_dt in DTYPES.values():
                for wd_mode, eps_mode in (("pre", "torch"), ("post", "hf")):
                    cases.append((w_dt, g_dt, s_dt, step_scalars(eps_mode, wd_mode, 3)))
    inputs = []
    for w_dt, g_dt, s_dt, kw in cases:
        tensors = [make_state((n,), w_dt, s_dt, "cpu", gen) for n in sizes]
        grads = [torch.randn(n, generator=gen).to(g_dt) for n in sizes]
        inputs.append((tensors, grads, kw))
    R = [torch.randn(n, generator=gen) for n in sizes]
    MV = [(0.1 * torch.randn(n, generator=gen), torch.rand(n, generator=gen)) for n in sizes]

    def run():
        out = []
        for tensors, grads, kw in inputs:
            single = [[t.clone() for t in s] for s in tensors]
            for (W, M, V), G in zip(single, grads):
                lookup("adamw_step", "cpu")(W, G, M, V, **kw)
            multi = [[t.clone() for t in s] for s in tensors]
            Ws, Ms, Vs = (list(x) for x in zip(*multi))
            lookup("adamw_step_multi", "cpu")(Ws, grads, Ms, Vs,
                                              **{k: [v] * len(sizes) for k, v in kw.items()})
            out += [t for s in single + multi for t in s]
        Ms, Vs = [m.clone() for m, _ in MV], [v.clone() for _, v in MV]
        Ns, norms = [torch.empty_like(r) for r in R], torch.empty(len(R))
        n = len(R)
        lookup("adam_moments_multi", "cpu")(R, Ms, Vs, Ns, beta1=[0.9] * n, beta2=[0.99] * n,
                                            eps=[1e-6] * n, c1=[0.3] * n, c2=[0.2] * n,
                                            norms=norms)
        return out + Ms + Vs + Ns + [norms]

    old = mod.cpu_isa()
    try:
        results = {}
        for isa in isas:
            mod.set_cpu_isa(isa)
            assert mod.cpu_isa() == isa
            results[isa] = run()
    finally:
        mod.set_cpu_isa(old)
    for isa in isas[1:]:
        for k, (a, b) in enumerate(zip(results[isas[0]], results[isa])):
            assert torch.equal(a, b), f"{isa} differs from {isas[0]} in output {k}"
    with pytest.raises(ValueError, match="cpu isa must be one this CPU runs.*'sse9'"):
        mod.set_cpu_isa("sse9")


@needs_cpu_ext
def test_compiled_nonfinite_flag():
    """``ops.nonfinite_flag`` on CPU tensors takes the compiled pass over the exponent bits:
    NaN, +-Inf anywhere (first, last, a vector tail, the second chunk) in any of the four
    dtypes sets it; the largest finite values do not."""
    from lowrank_fused import _ext_ops

    gen = torch.Generator().manual_seed(5)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    sizes = (1, 33, (1 << 14) + 7)
    base = [torch.randn(n, generator=gen).to(dt) for dt in dtypes for n in sizes]
    assert _ext_ops.nonfinite_flag_cpu(base) is not None
    assert not bool(ops.nonfinite_flag(base))
    big = [t.clone() for t in base]
    for t in big:
        t[-1] = torch.finfo(t.dtype).max
        t[0] = -torch.finfo(t.dtype).max
    assert not bool(ops.nonfinite_flag(big))
    for i, t in enumerate(base):
        for pos in {0, t.numel() // 2, t.numel() - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                ts = [x.clone() for x in base]
                ts[i][pos] = bad
                assert bool(ops.nonfinite_flag(ts)), (t.dtype, t.numel(), pos, bad)
                assert bool(_ext_ops.nonfinite_flag_cpu(ts))
    nc = torch.randn(8, 6, generator=gen).t()
    assert _ext_ops.nonfinite_flag_cpu([nc]) is None  # not contiguous: the torch path
    nc[1, 2] = float("nan")
    assert bool(ops.nonfinite_flag([nc]))


# --- errors ----------------------------------------------------------------------------------

def _args(shape=(4, 3), **over):
    t = dict(W=torch.randn(shape), G=torch.randn(shape), M=torch.randn(shape),
             V=torch.rand(shape))
    t.update(over)
    return t


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_errors_name_the_parameter(backend):
    impl = lookup("adamw_step", backend)
    kw = step_scalars("torch", "pre", 1)

    def call(**over):
        a = _args(**over)
        impl(a["W"], a["G"], a["M"], a["V"], **kw)

    if backend == "cuda":  # CPU tensors given to the CUDA backend
        with pytest.raises(ValueError, match=r"W must be a CUDA tensor"):
            call()
        return
    with pytest.raises(TypeError, match=r"\bW must be float32 or bfloat16.*float16"):
        call(W=torch.randn(4, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"\bG must be float32 or bfloat16.*float64"):
        call(G=torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"\bM and V must have one dtype"):
        call(V=torch.rand(4, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\bG must have the shape of W \(4, 3\), got \(3, 4\)"):
        call(G=torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\bV must have the shape of W"):
        call(V=torch.rand(12))
    with pytest.raises(ValueError, match=r"\bM must be a CPU tensor, got device meta"):
        call(M=torch.empty(4, 3, device="meta"))
    with pytest.raises(TypeError, match=r"\bV must be a torch.Tensor"):
        call(V=[1.0, 2.0])
    shared = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\bM and W share memory"):
        call(W=shared, M=shared)


def test_public_op_rejects_float16_for_cpu_backend():
    if _ext.why_no_cpu() is not None:
        pytest.skip(_ext.why_no_cpu())
    a = _args(W=torch.randn(4, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match=r"\bW must be float32 or bfloat16"):
        ops.adamw_step(a["W"], a["G"], a["M"], a["V"], lr=1e-3, beta1=0.9, beta2=0.999,
                       eps=1e-8, step=1, backend="cpu")


@needs_cpu_ext
def test_extension_rejects_bad_dtype_codes():
    mod = _ext.load()
    t = torch.zeros(4)
    p = t.data_ptr()
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, c1=1.0, c2=1.0, pre_scale=1.0,
              post_decay=0.0)
    with pytest.raises(ValueError, match="W dtype code 7"):
        mod.adamw_step_cpu(p, p, p, p, 4, 7, 0, 0, **kw)
    with pytest.raises(ValueError, match="G pointer is null"):
        mod.adamw_step_cpu(p, 0, p, p, 4, 0, 0, 0, **kw)


# --- availability on a machine without CUDA --------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda_here_is_explained():
    why = _ext.why_no_cuda()
    assert isinstance(why, str) and why
    for device in ("cpu", "cuda:0"):
        with pytest.raises(BackendUnavailable, match="backend='cuda' is unavailable"):
            resolve_backend("cuda", device)


@needs_cpu_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_launch_without_gpu_raises_cleanly():
    """No driver / no device: a Python exception naming the CUDA error, not a crash."""
    mod = _ext.load()
    t = torch.zeros(4)
    p = t.data_ptr()
    with pytest.raises(RuntimeError, match=r"adamw_step|built without CUDA"):
        mod.adamw_step_cuda(p, p, p, p, 4, 0, 0, 0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            c1=1.0, c2=1.0, pre_scale=1.0, post_decay=0.0, device=0, stream=0)
    status = mod.cuda_runtime_status()
    assert isinstance(status, str) and status != "ok"


def test_import_does_not_load_the_extension():
    code = ("import sys, lowrank_fused; "
            "bad = [m for m in ('lowrank_fused._C', 'lowrank_fused._ext', 'triton') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# --- CUDA (skipped without a GPU and a CUDA build) --------------------------------------------

@pytest.mark.gpu
@needs_cuda_ext
@MATRIX
@MODES
def test_cuda_matches_reference(w_dt, g_dt, s_dt, eps_mode, wd_mode):
    for shape in SHAPES + [(1 << 20) + 17]:
        run_case("cuda", "cuda", shape, w_dt, g_dt, s_dt, eps_mode, wd_mode)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda_ext
def test_cuda_non_contiguous_and_stream():
    impl = lookup("adamw_step", "cuda")
    kw = step_scalars("torch", "pre", 3)
    gen = torch.Generator().manual_seed(4)
    W0 = torch.randn(203, 97, generator=gen).cuda()
    G = torch.randn(97, 406, generator=gen).cuda()[:, ::2]
    M = 0.1 * torch.randn(97, 203, generator=gen).cuda()
    V = (0.01 * torch.randn(97, 203, generator=gen) ** 2 + 1e-4).cuda()
    W = W0.clone().t()
    ref = [W.clone(), M.clone(), V.clone()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        impl(W, G, M, V, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    adamw_step_ref(ref[0], G, ref[1], ref[2], **kw)
    torch.cuda.synchronize()
    check_step((W, M, V), tuple(ref), kw, exact_moments=False)


# --- the on-device skip flag ------------------------------------------------------------------

@pytest.mark.parametrize("backend", [
    pytest.param("cpu", marks=needs_cpu_ext),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda_ext])])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
def test_compiled_skip_flag(backend, strided):
    """The compiled step with a skip flag: bf16 W and G, fp32 states, (300, 257) (several
    OpenMP threads on the CPU: two torch threads here), and a transposed view (the contiguous
    copies written back): skip=True keeps every bit with no host read, skip=False gives the
    bits of a call without a flag."""
    from _skip import check_skip

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(31)
    shape = (257, 300) if strided else (300, 257)
    G = torch.randn(shape, generator=gen).to(device=backend, dtype=torch.bfloat16)
    kw = step_scalars("hf", "post", 3)

    def make():
        W = torch.randn(shape, generator=gen).to(device=backend, dtype=torch.bfloat16)
        M = torch.randn(shape, generator=gen).to(backend)
        V = torch.rand(shape, generator=gen).to(backend)
        return [W, M, V]

    def run(out, skip):
        W, M, V = (t.t() for t in out) if strided else out
        lookup("adamw_step", backend)(W, G.t() if strided else G, M, V, skip=skip, **kw)

    check_skip(make, run, backend)
    impl = lookup("adamw_step", backend)
    W, M, V = make()
    with pytest.raises(TypeError, match=rf"adamw_step \(backend '{backend}'\): skip must"):
        impl(W, G, M, V, skip=torch.zeros((), device=backend), **kw)
