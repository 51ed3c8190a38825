"""AdaPM / AdaPM-mini low-rank step (docs/methods/adapm.md lines 3-7): the fused Triton op vs
the eager reference (lowrank_fused/reference/adapm_update.py). Every mutated tensor (W, V, R)
is compared; inputs are fresh random values, never zeros."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, tolerance
from lowrank_fused.testing.trace import AllocationTrace
from _cases import SHAPES, orthonormal, ranks_for

CLIPS = ("elementwise", "rms", "none")
VMODES = ("elementwise", "rows", "heads", "one")    # V m x n; nb = m; nb = a divisor; nb = 1
# estimator A with bias correction at t = 3 (beta1 = 0.9, beta2 = 0.95)
BETA1, BETA2 = 0.9, 0.95
C1, C2 = 1 - BETA1 ** 3, 1 - BETA2 ** 3
HYPER = dict(beta1=BETA1, s_coef=1.0 / C1, e_coef=1.0 / (1 - BETA1), v_keep=BETA2,
             v_add=1 - BETA2, eps=1e-8, c2=C2, lr=0.1, pre_scale=0.99, clip_threshold=0.8)


def heads(m):
    """A divisor of m strictly between 1 and m (a head count), else m."""
    return next((d for d in range(2, m) if m % d == 0), m)


def n_blocks(vmode, m):
    return {"elementwise": None, "rows": m, "heads": heads(m), "one": 1}[vmode]


def make_inputs(shape, rank, *, dtype=torch.float32, state=torch.float32, refit=False,
                vmode="elementwise", device="cpu", seed=0):
    """(W, G, L, R, Rg, V, L0, R0): W small so that the update dominates its comparison."""
    m, n = shape
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*size, scale=1.0):
        return scale * torch.randn(*size, generator=gen, device=device)

    L = orthonormal(m, rank, device, generator=torch.Generator(device=device).manual_seed(seed))
    G = rnd(m, n).to(dtype)
    Rg = L.t() @ G.float()
    R = rnd(rank, n)
    L0 = R0 = None
    if refit:
        L0 = orthonormal(m, rank, device, generator=torch.Generator(device=device)
                         .manual_seed(seed + 1)).to(state)
        R0 = rnd(rank, n).to(state)
    nb = n_blocks(vmode, m)
    V = (torch.rand((m, n) if nb is None else (nb,), generator=gen, device=device) + 0.05)
    W = rnd(m, n, scale=0.05).to(dtype)
    return W, G, L.to(state), R.to(state), Rg, V.to(state), L0, R0


def keep(t):
    """A copy with the same strides (so views stay non-contiguous)."""
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                      device=t.device).copy_(t)


def run(backend, inputs, **kw):
    W, G, L, R, Rg, V, L0, R0 = [keep(t) for t in inputs]
    lookup("adapm_update", backend)(W, G, L, R, Rg, V, L0, R0, **{**HYPER, **kw})
    return {"W": W, "V": V, "R": R}


def check(inputs, precision="ieee", **kw):
    ref = run("reference", inputs, **kw)
    out = run("triton", inputs, precision=precision, **kw)
    for name, t in out.items():
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape
        assert_parity(t, ref[name], rtol=tolerance(t.dtype, precision=precision), name=name)
    W0 = inputs[0]
    assert (ref["W"].float() - W0.float()).abs().max() > 1e-2     # the update is real
    return out


# every shape x rank x dtype; the step kind, clip mode and second moment rotate so that every
# shape meets both steps and each dtype meets every clip mode and V layout (their full product
# is tested on one shape below)
PAIRS = [(s, r) for s in SHAPES for r in ranks_for(s)]
CASES = [(s, r, d, (j + i) % 2 == 1, CLIPS[(j + i) % 3], VMODES[(j + 2 * i) % 4])
         for j, (s, r) in enumerate(PAIRS) for i, d in enumerate((torch.float32, torch.bfloat16))]


@pytest.mark.parametrize(
    "shape,rank,dtype,refit,clip,vmode", CASES,
    ids=[f"{s[0]}x{s[1]}-r{r}-{str(d)[6:]}-{'refit' if f else 'between'}-{c}-V{v}"
         for s, r, d, f, c, v in CASES])
def test_matches_reference(shape, rank, dtype, refit, clip, vmode, device):
    inputs = make_inputs(shape, rank, dtype=dtype, refit=refit, vmode=vmode, device=device,
                         seed=rank)
    check(inputs, clip_mode=clip)


@pytest.mark.parametrize("refit", [False, True], ids=["between", "refit"])
@pytest.mark.parametrize("vmode", VMODES)
@pytest.mark.parametrize("clip", CLIPS)
def test_clip_modes_and_second_moments(clip, vmode, refit, device):
    """Every clip mode x V layout x step kind on one shape (203 rows: heads = 7 blocks)."""
    inputs = make_inputs((203, 97), 9, refit=refit, vmode=vmode, device=device, seed=3)
    thr = 0.2     # binds for both clips: some |u| and rms(u) exceed it
    out = check(inputs, clip_mode=clip, clip_threshold=thr)
    u = (inputs[0].float() * HYPER["pre_scale"] - out["W"].float()) / HYPER["lr"]
    u_none = (inputs[0].float() * HYPER["pre_scale"]
              - run("reference", inputs, clip_mode="none")["W"]) / HYPER["lr"]
    if clip == "rms":
        assert u_none.square().mean().sqrt() > 1.2 * thr
        assert abs(u.square().mean().sqrt().item() - thr) < 1e-4 * thr
    elif clip == "elementwise":
        assert u_none.abs().max() > 1.5 * thr and u.abs().max() <= thr * (1 + 1e-5)


@pytest.mark.parametrize("refit", [False, True], ids=["between", "refit"])
@pytest.mark.parametrize("vmode", ["elementwise", "heads"])
def test_narrow_states(refit, vmode, device):
    """faithful_dtypes: L, R, V, L0, R0 in bf16 next to bf16 W and G."""
    inputs = make_inputs((97, 203), 13, dtype=torch.bfloat16, state=torch.bfloat16,
                         refit=refit, vmode=vmode, device=device, seed=5)
    check(inputs, clip_mode="elementwise")


@pytest.mark.parametrize("correction", ["eq3", "alg1", "none"])
def test_other_estimators(correction, device):
    """The coefficients of the other estimators (docs/methods/adapm.md): e_coef = 1/c1 +-
    1/(1-beta1), or 0."""
    k = 1.0 / (1 - BETA1)
    e_coef = {"eq3": 1.0 / C1 + k, "alg1": 1.0 / C1 - k, "none": 0.0}[correction]
    for refit in (False, True):
        inputs = make_inputs((64, 64), 5, refit=refit, device=device, seed=7)
        check(inputs, e_coef=e_coef, clip_mode="none")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision(precision, device):
    inputs = make_inputs((130, 257), 17, refit=True, device=device, seed=11)
    check(inputs, precision=precision, clip_mode="rms")


def test_non_contiguous_inputs(device):
    """Transposed views of W, V, L, R, Rg, L0, R0 and a column slice of a wider G: everything
    goes by strides (and the results land in the views)."""
    m, n, r = 97, 130, 11
    t = lambda x: None if x is None else x.t().contiguous().t()     # noqa: E731
    for refit in (False, True):
        W, G, L, R, Rg, V, L0, R0 = make_inputs((m, n), r, refit=refit, device=device, seed=13)
        wide = torch.randn(m, n + 7, device=device)[:, 3:3 + n]
        wide.copy_(G)
        inputs = (t(W), wide, t(L), t(R), t(Rg), t(V), t(L0), t(R0))
        assert not any(x.is_contiguous() for x in inputs if x is not None)
        check(inputs, clip_mode="rms")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)], ids=str)
@pytest.mark.parametrize("refit", [False, True], ids=["between", "refit"])
def test_empty(shape, refit, device):
    """Empty blocks do what the reference does (nothing, or Adam-mini's mean of nothing)."""
    m, n = shape
    for nb in (None, 1) if m else (None,):
        inputs = (torch.randn(m, n, device=device), torch.randn(m, n, device=device),
                  torch.empty(m, 0, device=device), torch.empty(0, n, device=device),
                  torch.empty(0, n, device=device),
                  torch.rand((m, n) if nb is None else (nb,), device=device),
                  torch.empty(m, 0, device=device) if refit else None,
                  torch.empty(0, n, device=device) if refit else None)
        ref, out = run("reference", inputs), run("triton", inputs)
        for name in out:
            assert torch.equal(torch.nan_to_num(out[name], 7.0), torch.nan_to_num(ref[name], 7.0))


@pytest.mark.parametrize("refit,clip,vmode", [(False, "rms", "elementwise"),
                                              (True, "rms", "heads"),
                                              (False, "elementwise", "rows")])
def test_no_full_size_temporary(refit, clip, vmode, device):
    """The fused op allocates nothing with m*n elements or more (the eager reference does)."""
    m, n = 40, 70
    inputs = make_inputs((m, n), 5, refit=refit, vmode=vmode, device=device, seed=17)
    W, G, L, R, Rg, V, L0, R0 = [keep(t) for t in inputs]
    fn = lookup("adapm_update", "triton")
    fn(W.clone(), G, L, R.clone(), Rg, V.clone(), L0, R0, **HYPER, clip_mode=clip)   # warm
    with AllocationTrace() as trace:
        fn(W, G, L, R, Rg, V, L0, R0, **HYPER, clip_mode=clip)
    assert trace.at_least(m * n) == [], sorted(set(trace.at_least(m * n)))
    assert trace.sizes, "the trace saw no allocation at all: is it recording?"
    with AllocationTrace() as trace:
        lookup("adapm_update", "reference")(*[keep(t) for t in inputs], **HYPER, clip_mode=clip)
    assert trace.at_least(m * n), "the reference should allocate full-size temporaries"


def test_bad_clip_mode(device):
    inputs = make_inputs((8, 16), 2, device=device)
    with pytest.raises(ValueError, match="clip_mode"):
        run("triton", inputs, clip_mode="global")


def test_gpu_tiles(device, monkeypatch):
    """The tile shapes the GPU launches use (the interpreter otherwise takes larger ones)."""
    import importlib

    mod = importlib.import_module("lowrank_fused.kernels.adapm_update")
    monkeypatch.setattr(mod, "CONFIG_INTERPRET", mod.CONFIGS_FMA[0])
    monkeypatch.setattr(mod, "elementwise_tiles", lambda bm, bn: (bm, bn))
    for refit, vmode in ((False, "elementwise"), (True, "heads")):
        inputs = make_inputs((130, 257), 43, refit=refit, vmode=vmode, device=device, seed=19)
        check(inputs, clip_mode="rms")
