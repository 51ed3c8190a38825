"""AdaPM / AdaPM-mini full-momentum and no-momentum blocks (docs/methods/adapm.md): the fused
Triton op vs the eager reference (lowrank_fused/reference/adapm_dense_update.py). Every
mutated tensor (W, M, V) is compared; inputs are fresh random values, never zeros."""
import importlib

import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, tolerance
from lowrank_fused.testing.trace import AllocationTrace
from _cases import SHAPES

CLIPS = ("elementwise", "rms", "none")
VMODES = ("elementwise", "rows", "heads", "one")    # V m x n; nb = m; nb = a divisor; nb = 1
BETA1, BETA2 = 0.9, 0.95
HYPER = dict(beta1=BETA1, c1=1 - BETA1 ** 3, v_keep=BETA2, v_add=1 - BETA2, eps=1e-8,
             c2=1 - BETA2 ** 3, lr=0.1, pre_scale=0.99, clip_threshold=0.8)
ADAGRAD = dict(v_keep=1.0, v_add=1.0, c2=1.0)        # nomomentum_mode="adagrad"


def heads(m):
    return next((d for d in range(2, m) if m % d == 0), m)


def make_inputs(shape, *, momentum=True, dtype=torch.float32, state=torch.float32,
                vmode="elementwise", device="cpu", seed=0):
    """(W, G, M, V); W small so that the update dominates its comparison."""
    m, n = shape
    gen = torch.Generator(device=device).manual_seed(seed)
    G = torch.randn(m, n, generator=gen, device=device).to(dtype)
    M = (0.3 * torch.randn(m, n, generator=gen, device=device)).to(state) if momentum else None
    nb = {"elementwise": None, "rows": m, "heads": heads(m), "one": 1}[vmode]
    V = (torch.rand((m, n) if nb is None else (nb,), generator=gen, device=device)
         + 0.05).to(state)
    W = (0.05 * torch.randn(m, n, generator=gen, device=device)).to(dtype)
    return W, G, M, V


def keep(t):
    """A copy with the same strides (so views stay non-contiguous)."""
    return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                      device=t.device).copy_(t)


def run(backend, inputs, **kw):
    W, G, M, V = [keep(t) for t in inputs]
    lookup("adapm_dense_update", backend)(W, G, M, V, **{**HYPER, **kw})
    return {"W": W, "M": M, "V": V}


def check(inputs, **kw):
    ref, out = run("reference", inputs, **kw), run("triton", inputs, **kw)
    for name, t in out.items():
        if t is None:
            assert ref[name] is None
            continue
        assert t.dtype == ref[name].dtype and t.shape == ref[name].shape
        assert_parity(t, ref[name], rtol=tolerance(t.dtype), name=name)
    assert (ref["W"].float() - inputs[0].float()).abs().max() > 1e-2     # the update is real
    return out


# every shape x dtype x block kind; clip mode and second moment rotate (their full product is
# tested on one shape below)
CASES = [(s, d, mom, CLIPS[(j + i + 2 * k) % 3], VMODES[(j + 2 * i + k) % 4])
         for j, s in enumerate(SHAPES) for i, d in enumerate((torch.float32, torch.bfloat16))
         for k, mom in enumerate((True, False))]


@pytest.mark.parametrize("shape,dtype,momentum,clip,vmode", CASES,
                         ids=[f"{s[0]}x{s[1]}-{str(d)[6:]}-{'full' if mom else 'nomom'}-{c}-V{v}"
                              for s, d, mom, c, v in CASES])
def test_matches_reference(shape, dtype, momentum, clip, vmode, device):
    inputs = make_inputs(shape, momentum=momentum, dtype=dtype, vmode=vmode, device=device,
                         seed=shape[0])
    check(inputs, clip_mode=clip)


@pytest.mark.parametrize("momentum", [True, False], ids=["full", "nomom"])
@pytest.mark.parametrize("vmode", VMODES)
@pytest.mark.parametrize("clip", CLIPS)
def test_clip_modes_and_second_moments(clip, vmode, momentum, device):
    """Every clip mode x V layout x block kind on one shape (203 rows: heads = 7 blocks)."""
    inputs = make_inputs((203, 97), momentum=momentum, vmode=vmode, device=device, seed=3)
    thr = 0.2     # binds for both clips
    out = check(inputs, clip_mode=clip, clip_threshold=thr)
    u = (inputs[0] * HYPER["pre_scale"] - out["W"]) / HYPER["lr"]
    u_none = (inputs[0] * HYPER["pre_scale"]
              - run("reference", inputs, clip_mode="none")["W"]) / HYPER["lr"]
    if clip == "rms":
        assert u_none.square().mean().sqrt() > 1.2 * thr
        assert abs(u.square().mean().sqrt().item() - thr) < 1e-4 * thr
    elif clip == "elementwise":
        assert u_none.abs().max() > 1.5 * thr and u.abs().max() <= thr * (1 + 1e-5)


@pytest.mark.parametrize("vmode", ["elementwise", "rows"])
def test_adagrad_second_moment(vmode, device):
    """nomomentum_mode='adagrad': V += g^2, no bias correction."""
    inputs = make_inputs((97, 203), momentum=False, vmode=vmode, device=device, seed=5)
    check(inputs, clip_mode="elementwise", **ADAGRAD)


@pytest.mark.parametrize("momentum", [True, False], ids=["full", "nomom"])
def test_narrow_states(momentum, device):
    """faithful_dtypes: M and V in bf16 next to bf16 W and G."""
    for vmode in ("elementwise", "heads"):
        inputs = make_inputs((97, 203), momentum=momentum, dtype=torch.bfloat16,
                             state=torch.bfloat16, vmode=vmode, device=device, seed=7)
        check(inputs, clip_mode="rms")


def test_non_contiguous_inputs(device):
    """Transposed views of W, M, V and a column slice of a wider G: everything by strides."""
    m, n = 97, 130
    t = lambda x: None if x is None else x.t().contiguous().t()     # noqa: E731
    for momentum in (True, False):
        W, G, M, V = make_inputs((m, n), momentum=momentum, device=device, seed=9)
        wide = torch.randn(m, n + 7, device=device)[:, 3:3 + n]
        wide.copy_(G)
        inputs = (t(W), wide, t(M), t(V))
        assert not any(x.is_contiguous() for x in inputs if x is not None)
        check(inputs, clip_mode="rms")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)], ids=str)
@pytest.mark.parametrize("momentum", [True, False], ids=["full", "nomom"])
def test_empty(shape, momentum, device):
    m, n = shape
    for nb in (None, 1) if m else (None,):
        inputs = (torch.randn(m, n, device=device), torch.randn(m, n, device=device),
                  torch.randn(m, n, device=device) if momentum else None,
                  torch.rand((m, n) if nb is None else (nb,), device=device))
        ref, out = run("reference", inputs), run("triton", inputs)
        for name in ("W", "M", "V"):
            if out[name] is not None:
                assert torch.equal(torch.nan_to_num(out[name], 7.0),
                                   torch.nan_to_num(ref[name], 7.0))


@pytest.mark.parametrize("momentum,clip,vmode", [(True, "rms", "elementwise"),
                                                 (False, "rms", "heads"),
                                                 (True, "elementwise", "rows")])
def test_no_full_size_temporary(momentum, clip, vmode, device):
    """The fused op allocates nothing with m*n elements or more (the eager reference does)."""
    m, n = 40, 70
    inputs = make_inputs((m, n), momentum=momentum, vmode=vmode, device=device, seed=11)
    fn = lookup("adapm_dense_update", "triton")
    fn(*[keep(t) for t in inputs], **HYPER, clip_mode=clip)     # warm
    args = [keep(t) for t in inputs]
    with AllocationTrace() as trace:
        fn(*args, **HYPER, clip_mode=clip)
    assert trace.at_least(m * n) == [], sorted(set(trace.at_least(m * n)))
    with AllocationTrace() as trace:
        lookup("adapm_dense_update", "reference")(*[keep(t) for t in inputs], **HYPER,
                                                  clip_mode=clip)
    assert trace.at_least(m * n), "the reference should allocate full-size temporaries"


def test_gpu_tiles(device, monkeypatch):
    """The tile shape the GPU launches use (the interpreter otherwise takes a larger one)."""
    for name in ("adapm_update", "adapm_dense_update"):
        mod = importlib.import_module(f"lowrank_fused.kernels.{name}")
        monkeypatch.setattr(mod, "elementwise_tiles", lambda bm, bn: (bm, bn))
    for momentum, vmode in ((True, "elementwise"), (False, "heads")):
        inputs = make_inputs((130, 257), momentum=momentum, vmode=vmode, device=device, seed=13)
        check(inputs, clip_mode="rms")


def test_bad_clip_mode(device):
    with pytest.raises(ValueError, match="clip_mode"):
        run("triton", make_inputs((8, 16), device=device), clip_mode="global")
