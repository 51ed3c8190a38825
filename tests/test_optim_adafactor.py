"""Adafactor (docs/methods/adafactor.md, the HF version vendored in GaLore): an independent fp64
transcription of the pseudocode compared step by step under every flag, exact identities
(step-1 statistics, rank-1 gradients, the RMS clip), >2-D factoring, checkpoints, a tiny
model, state bytes, errors."""
import math

import pytest
import torch

from lowrank_fused import BackendUnavailable
from lowrank_fused.dispatch import implementations
from lowrank_fused.optim.adafactor import Adafactor, beta2_at, relative_step_size
from lowrank_fused.testing import assert_parity, tolerance
from _cases import tiny_lm_task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HF_DEFAULTS = dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                   weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)


# ---------------------------------------------------------------------------------------------
# Literal transcription of docs/methods/adafactor.md, in fp64, one matrix at a time.

def literal_adafactor_step(p, st, hp):
    g = p.grad.double()                                             # 1
    w = p.detach().double()
    st["t"] = st.get("t", 0) + 1                                    # 2
    t = st["t"]
    rms_w = w.norm() / math.sqrt(w.numel())
    if hp["relative_step"]:                                         # 3
        rho = min(1e-6 * t if hp["warmup_init"] else 1e-2, 1 / math.sqrt(t))
    else:
        rho = hp["lr"]
    eps1, eps2 = hp["eps"]
    a = rho * (max(eps2, rms_w.item()) if hp["scale_parameter"] else 1.0)
    b2t = 1 - t ** hp["decay_rate"]                                 # 4
    q = g ** 2 + eps1                                               # 5
    if g.dim() >= 2:                                                # 6
        m, n = g.shape[-2], g.shape[-1]
        G3, Q3 = g.reshape(-1, m, n), q.reshape(-1, m, n)
        st.setdefault("row", [torch.zeros(m, dtype=torch.float64) for _ in G3])
        st.setdefault("col", [torch.zeros(n, dtype=torch.float64) for _ in G3])
        U = torch.empty_like(G3)
        for b in range(G3.shape[0]):
            st["row"][b] = b2t * st["row"][b] + (1 - b2t) * Q3[b].mean(dim=1)
            st["col"][b] = b2t * st["col"][b] + (1 - b2t) * Q3[b].mean(dim=0)
            vhat = torch.outer(st["row"][b], st["col"][b]) / st["row"][b].mean()
            U[b] = G3[b] / torch.sqrt(vhat)
        U = U.reshape(g.shape)
    else:
        st["v"] = b2t * st.get("v", torch.zeros_like(g)) + (1 - b2t) * q
        U = g / torch.sqrt(st["v"])
    U = U / max(1.0, (U.norm() / math.sqrt(U.numel())).item() / hp["clip_threshold"])   # 7
    U = a * U                                                       # 8
    if hp["beta1"] is not None:                                     # 9
        st["exp_avg"] = hp["beta1"] * st.get("exp_avg", torch.zeros_like(g)) + (1 - hp["beta1"]) * U
        U = st["exp_avg"]
    if hp["weight_decay"] != 0:                                     # 10
        w = w - hp["weight_decay"] * a * w
    w = w - U                                                       # 11
    p.data.copy_(w)


SHAPES = ((37, 53), (3, 5, 7), (2, 3, 4, 6), (64,), ())


def _params(dtype=torch.float32, seed=5, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grad(p, t, i):
    g = torch.Generator().manual_seed(1000 * i + t)
    x = 0.5 * p.detach().float() + torch.randn(p.shape, generator=g)
    if p.dim() >= 2:
        x[..., 1, :] = 0.0                                          # a dead row: eps1 matters
        x[..., :, 2] *= 1e-3                                        # a quiet column
    return x.to(p.dtype)


FLAGS = {
    "hf-defaults": {},
    "warmup_init": dict(warmup_init=True),
    "galore-c4": dict(lr=1e-2, relative_step=False, scale_parameter=False),
    "external-lr-scaled": dict(lr=5e-2, relative_step=False),
    "momentum-wd-clip": dict(beta1=0.9, weight_decay=0.1, clip_threshold=0.3, decay_rate=-0.5,
                             eps=(1e-4, 1e-3)),
    "momentum-c4": dict(lr=3e-2, relative_step=False, scale_parameter=False, beta1=0.8),
}


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
def test_matches_literal_transcription(flags):
    hp = dict(HF_DEFAULTS, **flags)
    ours, lit = _params(), _params()
    bf, bf_lit = _params(torch.bfloat16, shapes=((24, 40),)), _params(torch.bfloat16, shapes=((24, 40),))
    opt = Adafactor(ours + bf, backend="reference", **flags)
    states = [{} for _ in lit + bf_lit]
    for t in range(12):
        for i, (p, q) in enumerate(zip(ours + bf, lit + bf_lit)):
            p.grad = _grad(p, t, i)
            q.grad = p.grad.clone()
        opt.step()
        for q, st in zip(lit + bf_lit, states):
            literal_adafactor_step(q, st, hp)
        for p, q in zip(ours + bf, lit + bf_lit):
            assert_parity(p, q, rtol=tolerance(p.dtype, "trajectory"), name=f"W {tuple(p.shape)} t={t}")
    assert all(opt.state[p]["step"] == 12 for p in ours)
    for p, st in zip(ours, states):
        if p.dim() >= 2:
            m, n = p.shape[-2:]
            assert_parity(opt.state[p]["exp_avg_sq_row"].reshape(-1, m), torch.stack(st["row"]),
                          rtol=1e-5, name="row")
            assert_parity(opt.state[p]["exp_avg_sq_col"].reshape(-1, n), torch.stack(st["col"]),
                          rtol=1e-5, name="col")
        else:
            assert_parity(opt.state[p]["exp_avg_sq"], st["v"], rtol=1e-5, name="v")
        if hp["beta1"] is not None:
            assert_parity(opt.state[p]["exp_avg"], st["exp_avg"], rtol=1e-5, name="exp_avg")


def test_state_layout_follows_hf():
    ps = _params()
    opt = Adafactor(ps, beta1=0.9, backend="reference")
    for i, p in enumerate(ps):
        p.grad = _grad(p, 0, i)
    opt.step()
    for p in ps:
        st = opt.state[p]
        if p.dim() >= 2:
            assert st["exp_avg_sq_row"].shape == p.shape[:-1]
            assert st["exp_avg_sq_col"].shape == p.shape[:-2] + p.shape[-1:]
            assert "exp_avg_sq" not in st
        else:
            assert st["exp_avg_sq"].shape == p.shape
        assert st["exp_avg"].shape == p.shape
        assert all(v.dtype == torch.float32 for v in st.values() if torch.is_tensor(v))


def test_schedules():
    assert beta2_at(1, -0.8) == 0.0                                 # step 1 needs no correction
    assert beta2_at(10, -0.8) == pytest.approx(1 - 10 ** -0.8)
    assert relative_step_size(1, None, True, False) == 1e-2
    assert relative_step_size(40_000, None, True, False) == pytest.approx(1 / 200)
    assert relative_step_size(3, None, True, True) == pytest.approx(3e-6)
    assert relative_step_size(7, 0.25, False, False) == 0.25


def test_step_one_statistics_are_exact_means():
    """b2t = 0 at t = 1: the statistics are the step's own means (no bias correction)."""
    p = torch.nn.Parameter(torch.randn(3, 9, 11))
    opt = Adafactor([p], backend="reference")
    p.grad = torch.randn_like(p)
    q = p.grad.double() ** 2 + 1e-30
    opt.step()
    assert_parity(opt.state[p]["exp_avg_sq_row"], q.mean(-1), rtol=1e-6, name="row")
    assert_parity(opt.state[p]["exp_avg_sq_col"], q.mean(-2), rtol=1e-6, name="col")


@pytest.mark.parametrize("d", [1.0, 0.25])
def test_rank_one_gradient_is_factored_exactly_and_clipped(d):
    """g = outer(x, y): g^2 is rank one, so the factored estimate is exact at step 1 and
    U = g/|g| = sign(g), with RMS 1; the clip scales it to d when d < 1."""
    x, y = torch.randn(20), torch.randn(30)
    w0 = torch.randn(20, 30)
    p = torch.nn.Parameter(w0.clone())
    opt = Adafactor([p], lr=0.1, relative_step=False, scale_parameter=False, clip_threshold=d,
                    backend="reference")
    p.grad = torch.outer(x, y)
    opt.step()
    expected = w0 - 0.1 * min(1.0, d) * torch.sign(p.grad)
    assert_parity(p, expected, rtol=2e-6, name="W")


def test_scale_parameter_uses_rms_of_w_floored_by_eps2():
    x, y = torch.randn(6), torch.randn(8)
    for scale in (3.0, 1e-6):                                       # RMS above / below eps2
        w0 = scale * torch.randn(6, 8)
        p = torch.nn.Parameter(w0.clone())
        opt = Adafactor([p], backend="reference")                   # relative step, rho = 1e-2
        p.grad = torch.outer(x, y)
        opt.step()
        a = 1e-2 * max(1e-3, (w0.norm() / math.sqrt(48)).item())
        assert_parity(p, w0 - a * torch.sign(p.grad), rtol=2e-6, name=f"W scale={scale}")


def test_momentum_is_ema_of_clipped_scaled_update():
    x, y = torch.randn(6), torch.randn(8)
    p = torch.nn.Parameter(torch.randn(6, 8))
    opt = Adafactor([p], lr=0.1, relative_step=False, scale_parameter=False, beta1=0.9,
                    clip_threshold=0.5, backend="reference")
    p.grad = torch.outer(x, y)
    opt.step()
    assert_parity(opt.state[p]["exp_avg"], 0.1 * 0.1 * 0.5 * torch.sign(p.grad), rtol=2e-6,
                  name="exp_avg")


def test_noncontiguous_parameters_match_contiguous():
    base = torch.randn(3, 2, 5, 6)
    cont = torch.nn.Parameter(base.transpose(0, 1).contiguous())
    strided = torch.nn.Parameter(base.clone().transpose(0, 1))     # (2, 3, 5, 6), not viewable
    assert not strided.is_contiguous()
    a = Adafactor([cont], beta1=0.5, backend="reference")
    b = Adafactor([strided], beta1=0.5, backend="reference")
    for t in range(3):
        cont.grad = _grad(cont, t, 0)
        strided.grad = cont.grad.clone()
        a.step()
        b.step()
    assert torch.equal(cont, strided)
    assert torch.equal(a.state[cont]["exp_avg_sq_row"], b.state[strided]["exp_avg_sq_row"])


def test_zero_gradient_gives_no_nan():
    ps = _params()
    opt = Adafactor(ps, backend="reference")
    for p in ps:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in ps]
    opt.step()
    for p, b in zip(ps, before):
        assert torch.isfinite(p).all() and torch.equal(p, b)


def _run(steps, ps, **kw):
    opt = Adafactor(ps, backend="reference", **kw)
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        opt.step()
    return opt


def test_state_dict_round_trip_continues_bit_identically(tmp_path):
    kw = dict(beta1=0.9, weight_decay=0.01)
    full = _params(torch.bfloat16)
    _run(10, full, **kw)
    part = _params(torch.bfloat16)
    opt = _run(4, part, **kw)
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in part]}, path)
    ckpt = torch.load(path, weights_only=True)
    ps = _params(torch.bfloat16)
    for p, saved in zip(ps, ckpt["params"]):
        p.data.copy_(saved)
    opt2 = Adafactor(ps, backend="reference", **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[ps[0]]["exp_avg_sq_row"].dtype == torch.float32
    for t in range(4, 10):
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        opt2.step()
    for p, q in zip(ps, full):
        assert torch.equal(p, q)


@pytest.mark.parametrize("flags", [dict(lr=1e-2, relative_step=False, scale_parameter=False),
                                   dict(beta1=0.9)], ids=["galore-c4", "hf-defaults+momentum"])
def test_tiny_model_trains_with_factored_state(flags):
    model, batch = tiny_lm_task()
    opt = Adafactor(model.parameters(), backend="reference", **flags)
    losses = []
    for _ in range(100):
        x, y = batch()
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < (0.5 if "lr" in flags else 0.7) * first
    ps = list(model.parameters())
    factored = sum(4 * (p.shape[0] + p.shape[1]) for p in ps if p.dim() == 2)
    unfactored = sum(4 * p.numel() for p in ps if p.dim() < 2)
    momentum = 4 * sum(p.numel() for p in ps) if flags.get("beta1") else 0
    assert opt.state_bytes() == factored + unfactored + momentum
    adamw = 8 * sum(p.numel() for p in ps)
    if not momentum:
        # 32x32 .. 64x32 matrices: 4(m+n) against 8mn bytes, at least 10x less in all
        assert opt.state_bytes() * 10 < adamw
    else:
        assert opt.state_bytes() < 0.6 * adamw


def test_zero_lr_and_scheduler():
    ps = _params()
    before = [p.detach().clone() for p in ps]
    opt = Adafactor(ps, lr=1e-2, relative_step=False, weight_decay=0.1, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    for i, p in enumerate(ps):
        p.grad = _grad(p, 0, i)
    opt.step()
    sched.step()
    for p, b in zip(ps, before):
        assert torch.equal(p, b)


def test_bad_arguments_are_rejected_without_side_effects():
    p = torch.nn.Parameter(torch.randn(8, 16))
    cases = [(dict(lr=1e-3), "lr"),                                   # lr with relative_step
             (dict(relative_step=False), "lr"),                       # no lr without it
             (dict(relative_step=False, lr=-1.0), "lr"),
             (dict(relative_step=False, lr=1e-2, warmup_init=True), "warmup_init"),
             (dict(eps=1e-30), "eps"), (dict(eps=(-1.0, 1e-3)), r"eps\[0\]"),
             (dict(eps=(1e-30, float("nan"))), r"eps\[1\]"),
             (dict(clip_threshold=0.0), "clip_threshold"), (dict(clip_threshold=-1), "clip_threshold"),
             (dict(decay_rate=0.5), "decay_rate"), (dict(beta1=1.0), "beta1"),
             (dict(beta1="0.9x"), "beta1"), (dict(weight_decay=-0.1), "weight_decay"),
             (dict(scale_parameter=1), "scale_parameter"), (dict(relative_step="no"), "relative_step"),
             (dict(warmup_init=None), "warmup_init"), (dict(backend="gpu"), "backend")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            Adafactor([p], **kw)
    with pytest.raises(ValueError, match="clip_threshold"):
        Adafactor([dict(params=[p], clip_threshold=-2.0)])
    q = torch.nn.Parameter(torch.randn(4))
    opt = Adafactor([dict(params=[p]), dict(params=[q])], backend="reference")
    before = p.detach().clone()
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.param_groups[1]["beta1"] = 2.0
    with pytest.raises(ValueError, match="beta1"):
        opt.step()
    assert torch.equal(p, before) and opt.state[p] == {}


def test_backends():
    p = torch.nn.Parameter(torch.randn(8, 16))
    if "triton" not in implementations("adafactor_step"):
        with pytest.raises(BackendUnavailable, match="adafactor_step"):
            Adafactor([p], backend="triton")
    opt = Adafactor([p])                      # auto: runs the reference where no kernel exists
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["step"] == 1
