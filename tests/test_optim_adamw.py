"""AdamW baseline (docs/methods/adamw.md): torch semantics against torch.optim.AdamW and a
literal transcription, the HF variant (E-hf, WD-post) against its own transcription and
GaLore's dense path, every backend of ``adamw_step`` against the reference, checkpoints,
a tiny model, errors."""
import math

import pytest
import torch

from lowrank_fused import BackendUnavailable, GaLoreAdamW
from lowrank_fused.dispatch import available
from lowrank_fused.optim.adamw import AdamW, HFAdamW
from lowrank_fused.testing import assert_parity, tolerance
from _cases import tiny_lm_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Literal transcriptions of docs/methods/adamw.md, torch AdamW and HF AdamW (GaLore's step
# without the projection), one parameter at a time, fp32.

def literal_torch_adamw_step(p, st, lr, betas, eps, wd):
    b1, b2 = betas
    g = p.grad.float()
    if not st:
        st.update(t=0, m=torch.zeros_like(g), v=torch.zeros_like(g))
    st["t"] += 1
    t = st["t"]
    w = p.detach().float() * (1 - lr * wd)                        # 2: WD-pre
    st["m"] = b1 * st["m"] + (1 - b1) * g                         # 3
    st["v"] = b2 * st["v"] + (1 - b2) * g ** 2                    # 4
    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
    w = w - lr * (st["m"] / bc1) / (torch.sqrt(st["v"] / bc2) + eps)   # 5: E-torch
    p.data.copy_(w)


def literal_hf_adamw_step(p, st, lr, betas, eps, wd, bias_correction=True):
    b1, b2 = betas
    g = p.grad.float()
    if not st:
        st.update(t=0, m=torch.zeros_like(g), v=torch.zeros_like(g))
    st["t"] += 1
    t = st["t"]
    st["m"] = b1 * st["m"] + (1 - b1) * g
    st["v"] = b2 * st["v"] + (1 - b2) * g ** 2
    denom = torch.sqrt(st["v"]) + eps                             # E-hf
    ss = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if bias_correction else lr
    w = p.detach().float() - ss * (st["m"] / denom)
    if wd > 0:
        w = w - lr * wd * w                                       # WD-post with lr
    p.data.copy_(w)


def _params(dtype=torch.float32, seed=3, shapes=((37, 53), (64,), (5, 4, 6))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grad(p, t, i):
    g = torch.Generator().manual_seed(10_000 * i + t)
    # W-dependent pull plus noise with a spread of scales (tiny v somewhere)
    scale = torch.logspace(-4, 1, p.shape[-1]).expand(p.shape)
    return (0.3 * p.detach().float() + scale * torch.randn(p.shape, generator=g)).to(p.dtype)


def _clones(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


# ---------------------------------------------------------------------------------------------

def test_defaults_are_torch_and_hf():
    p = _params()
    d = AdamW(p).defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2)
    d = AdamW(p, hf=True).defaults
    assert (d["eps"], d["weight_decay"], d["bias_correction"]) == (1e-6, 0.0, True)
    assert HFAdamW(p).defaults == d


def test_matches_torch_optim_adamw_and_literal():
    """Two groups (different lr and weight decay), 20 steps, every step compared."""
    ours, theirs, lit = _params(), _params(), _params()
    kw = dict(betas=(0.9, 0.99), eps=1e-8)
    g1, g2 = dict(lr=3e-2, weight_decay=0.1), dict(lr=1e-2, weight_decay=0.0)
    opt = AdamW([dict(params=ours[:2], **g1), dict(params=ours[2:], **g2)], backend="reference", **kw)
    ref = torch.optim.AdamW([dict(params=theirs[:2], **g1), dict(params=theirs[2:], **g2)], **kw)
    lit_state = [{} for _ in lit]
    for t in range(20):
        for i, (p, q, r) in enumerate(zip(ours, theirs, lit)):
            p.grad = _grad(p, t, i)
            q.grad = p.grad.clone()
            r.grad = p.grad.clone()
        opt.step()
        ref.step()
        for i, r in enumerate(lit):
            g = g1 if i < 2 else g2
            literal_torch_adamw_step(r, lit_state[i], g["lr"], kw["betas"], kw["eps"], g["weight_decay"])
        for p, q, r in zip(ours, theirs, lit):
            assert_parity(p, q, rtol=tolerance(torch.float32, "trajectory"), name="W vs torch")
            assert_parity(p, r, rtol=tolerance(torch.float32, "trajectory"), name="W vs literal")
    for p, q in zip(ours, theirs):
        assert opt.state[p]["step"] == 20
        assert_parity(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-5, name="exp_avg")
        assert_parity(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5,
                      name="exp_avg_sq")


def test_faithful_dtypes_bf16_tracks_torch_bf16():
    """faithful_dtypes keeps bf16 moments, as torch.optim.AdamW does for bf16 parameters."""
    ours, theirs = _params(torch.bfloat16), _params(torch.bfloat16)
    opt = AdamW(ours, lr=1e-2, backend="reference", faithful_dtypes=True)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for t in range(10):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            p.grad = _grad(p, t, i)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert_parity(p, q, rtol=tolerance(torch.bfloat16, "trajectory"), name="W bf16")
    fp32 = AdamW(_params(torch.bfloat16), backend="reference")
    q = fp32.param_groups[0]["params"][0]
    q.grad = torch.randn_like(q)
    fp32.step()
    assert fp32.state[q]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("bias_correction", [True, False])
def test_hf_variant_matches_literal_and_galore_dense_path(bias_correction):
    ours, lit, gal = _params(), _params(), _params()
    kw = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05, bias_correction=bias_correction)
    opt = AdamW(ours, hf=True, backend="reference", **kw)
    galore = GaLoreAdamW(gal, backend="reference", **kw)        # no rank key: HF AdamW
    lit_state = [{} for _ in lit]
    for t in range(12):
        for i, (p, q, r) in enumerate(zip(ours, gal, lit)):
            p.grad = _grad(p, t, i)
            q.grad = p.grad.clone()
            r.grad = p.grad.clone()
        opt.step()
        galore.step()
        for r, st in zip(lit, lit_state):
            literal_hf_adamw_step(r, st, kw["lr"], kw["betas"], kw["eps"], kw["weight_decay"],
                                  bias_correction)
        for p, q, r in zip(ours, gal, lit):
            assert torch.equal(p, q), "HF AdamW must be GaLore's dense step bit for bit"
            assert_parity(p, r, rtol=tolerance(torch.float32, "trajectory"), name="W vs literal")


def test_hf_and_torch_variants_differ():
    """E-hf/WD-post vs E-torch/WD-pre with the same eps and decay: the flag must matter."""
    a, b = _params(), _params()
    oa = AdamW(a, lr=1e-2, eps=1e-3, weight_decay=0.5, backend="reference")
    ob = AdamW(b, lr=1e-2, eps=1e-3, weight_decay=0.5, hf=True, backend="reference")
    for i, (p, q) in enumerate(zip(a, b)):
        p.grad = _grad(p, 0, i)
        q.grad = p.grad.clone()
    oa.step()
    ob.step()
    assert not torch.allclose(a[0], b[0], rtol=1e-6, atol=0)


def _trajectory(backend, dtype, steps=8, faithful=False, hf=False):
    ps = _params(dtype, shapes=((33, 70), (70,)))
    opt = AdamW(ps, lr=1e-2, hf=hf, backend=backend, faithful_dtypes=faithful)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("hf", [False, True], ids=["torch", "hf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fused_backends_match_reference(backend, dtype, hf):
    if not available(backend, "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    ref, _ = _trajectory("reference", dtype, hf=hf)
    fused, opt = _trajectory(backend, dtype, hf=hf)
    assert opt.resolved_backend("cpu") == backend
    for p, q in zip(fused, ref):
        assert_parity(p, q, rtol=tolerance(dtype, "trajectory"), name=f"W {backend}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_state_dict_round_trip_continues_bit_identically(backend, tmp_path):
    if not available(backend, "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    full, _ = _trajectory(backend, torch.bfloat16, steps=9)
    part, opt = _trajectory(backend, torch.bfloat16, steps=4)
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in part]}, path)
    ckpt = torch.load(path, weights_only=True)
    ps = _params(torch.bfloat16, shapes=((33, 70), (70,)))
    for p, saved in zip(ps, ckpt["params"]):
        p.data.copy_(saved)
    opt2 = AdamW(ps, lr=1e-2, backend=backend)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[ps[0]]["exp_avg"].dtype == torch.float32
    assert opt2.state[ps[0]]["step"] == 4
    for t in range(4, 9):
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        opt2.step()
    for p, q in zip(ps, full):
        assert torch.equal(p, q)


def test_tiny_model_trains():
    model, batch = tiny_lm_task()
    opt = AdamW(model.parameters(), lr=3e-3, backend="reference")
    losses = []
    for _ in range(100):
        x, y = batch()
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    # the baseline's state is exactly two fp32 tensors per parameter
    assert opt.state_bytes() == 8 * sum(p.numel() for p in model.parameters())


def test_zero_lr_and_scheduler():
    ps = _params()
    before = [p.detach().clone() for p in ps]
    opt = AdamW(ps, lr=1e-2, weight_decay=0.1, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)


def test_bad_arguments_are_rejected_without_side_effects():
    p = torch.nn.Parameter(torch.randn(8, 16))
    for kw, match in [(dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr="x"), "lr"),
                      (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
                      (dict(betas=0.9), "betas"), (dict(eps=-1e-8), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="gpu"), "backend"),
                      (dict(hf="yes"), "hf"), (dict(bias_correction=False), "bias_correction")]:
        with pytest.raises(ValueError, match=match):
            AdamW([p], **kw)
    with pytest.raises(ValueError, match="lr"):
        AdamW([dict(params=[p], lr=-2.0)])
    # a bad value set later on the second group must not update the first group either
    q = torch.nn.Parameter(torch.randn(4))
    opt = AdamW([dict(params=[p]), dict(params=[q])], lr=1e-2, backend="reference")
    before = p.detach().clone()
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.param_groups[1]["eps"] = float("inf")
    with pytest.raises(ValueError, match="eps"):
        opt.step()
    assert torch.equal(p, before) and opt.state[p] == {}
    opt.param_groups[1]["eps"] = 1e-8
    q.grad = torch.randn(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(p, before) and opt.state[p] == {}


def test_unavailable_backend_is_an_error():
    p = torch.nn.Parameter(torch.randn(8, 16))
    with pytest.raises(BackendUnavailable, match="cuda"):
        AdamW([p], backend="cuda")
