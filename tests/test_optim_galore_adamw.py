"""GaLore-AdamW: faithfulness of the reference to galore_torch (docs/methods/galore.md),
fused (Triton) vs reference trajectories, checkpoint round trips, schedulers, errors."""
import math

import pytest
import torch

from lowrank_fused import BackendUnavailable, GaLoreAdamW
from lowrank_fused.testing import assert_parity, tolerance
from lowrank_fused.testing.trace import AllocationTrace


# ---------------------------------------------------------------------------------------------
# An independent transcription of galore_torch's GaLoreAdamW + GaLoreProjector, written from
# docs/methods/galore.md (official dtype policy aside: everything fp32 here).

def _literal_is_right(shape, proj_type):
    if proj_type == "std":
        return shape[0] >= shape[1]
    if proj_type == "reverse_std":
        return shape[0] < shape[1]
    return proj_type == "right"


class _LiteralProjector:
    def __init__(self, rank, gap, scale, proj_type):
        self.rank, self.gap, self.scale, self.proj_type = rank, gap, scale, proj_type
        self.ortho = None

    def _right(self, g):
        return _literal_is_right(g.shape, self.proj_type)

    def project(self, g, it):
        if self.ortho is None or it % self.gap == 0:
            U, s, Vh = torch.linalg.svd(g.float(), full_matrices=False)
            self.ortho = Vh[:self.rank, :] if self._right(g) else U[:, :self.rank]
        return g @ self.ortho.t() if self._right(g) else self.ortho.t() @ g

    def project_back(self, low, g_shape):
        right = _literal_is_right(g_shape, self.proj_type)
        full = low @ self.ortho if right else self.ortho @ low
        return full * self.scale


def literal_galore_step(params, groups_state, groups, lr, betas, eps, weight_decay, bias_correction=True):
    wd = weight_decay
    for group, ps in zip(groups, params):
        for p in ps:
            st = groups_state.setdefault(id(p), {"step": 0})
            grad = p.grad
            if "rank" in group:
                st.setdefault("proj", _LiteralProjector(group["rank"], group["update_proj_gap"],
                                                        group["scale"], group["proj_type"]))
                grad = st["proj"].project(grad, st["step"])
            if "m" not in st:
                st["m"], st["v"] = torch.zeros_like(grad), torch.zeros_like(grad)
            st["step"] += 1
            b1, b2 = betas
            st["m"].mul_(b1).add_(grad, alpha=1 - b1)
            st["v"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = st["v"].sqrt().add_(eps)
            step_size = lr
            if bias_correction:
                step_size = lr * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])
            norm = st["m"] / denom
            if "rank" in group:
                norm = st["proj"].project_back(norm, p.grad.shape)
            p.data.add_(norm, alpha=-step_size)
            if wd > 0:
                p.data.add_(p.data, alpha=-lr * wd)


def _model_params(device, dtype=torch.float32, shapes=((40, 70), (70, 40), (48, 48))):
    g = torch.Generator(device).manual_seed(7)
    mats = [torch.nn.Parameter(torch.randn(s, device=device, generator=g).to(dtype)) for s in shapes]
    bias = torch.nn.Parameter(torch.randn(13, device=device, generator=g).to(dtype))
    return mats, [bias]


def _trend(shape, salt, device):
    """A fixed low-rank gradient component with well-separated singular values, so that the
    top-r subspace (and each singular vector) is well conditioned and trajectories of two
    implementations can be compared after a refresh."""
    g = torch.Generator(device).manual_seed(99 + salt)
    m, n = shape[0], math.prod(shape[1:])
    k = min(m, n, 12)
    U = torch.linalg.qr(torch.randn(m, k, device=device, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, device=device, generator=g))[0]
    sigma = 200.0 * 0.8 ** torch.arange(k, device=device, dtype=torch.float32)
    return ((U * sigma) @ V.t()).reshape(shape)


def _grad_like(p, t, salt):
    g = torch.Generator(p.device).manual_seed(1000 * t + salt)
    # a W-dependent pull, a planted low-rank trend and fresh noise
    noise = torch.randn(p.shape, device=p.device, generator=g)
    trend = _trend(p.shape, salt, p.device) if p.dim() >= 2 else 0.0
    return (0.5 * p.detach().float() + trend + noise).to(p.dtype)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_reference_is_faithful_to_galore_torch(proj_type, device):
    mats, dense = _model_params(device)
    lit_mats = [torch.nn.Parameter(p.detach().clone()) for p in mats]
    lit_dense = [torch.nn.Parameter(p.detach().clone()) for p in dense]
    kw = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    rank_group = dict(rank=6, update_proj_gap=4, scale=0.25, proj_type=proj_type)
    opt = GaLoreAdamW([dict(params=mats, **rank_group), dict(params=dense)], backend="reference",
                      sign_canon=False, **kw)
    lit_state = {}
    for t in range(11):
        for i, (p, q) in enumerate(zip(mats + dense, lit_mats + lit_dense)):
            p.grad = _grad_like(p, t, i)
            q.grad = p.grad.clone()
        opt.step()
        literal_galore_step([lit_mats, lit_dense], lit_state, [rank_group, {}], **kw)
    for p, q in zip(mats + dense, lit_mats + lit_dense):
        assert_parity(p, q, rtol=1e-5, name=f"W {tuple(p.shape)}")
        assert not torch.equal(p, _model_params(device)[0][0]) or p.dim() == 1


def _run(backend, dtype, device, steps, *, faithful=False, shapes=((97, 203), (203, 97)),
         opt_kw=None, grads_from=0):
    mats, dense = _model_params(device, dtype, shapes)
    opt = GaLoreAdamW([dict(params=mats, rank=8, update_proj_gap=9, scale=0.25),
                       dict(params=dense)], lr=1e-2, weight_decay=0.01, backend=backend,
                      faithful_dtypes=faithful, **(opt_kw or {}))
    for t in range(steps):
        for i, p in enumerate(mats + dense):
            p.grad = _grad_like(p, t + grads_from, i)
        opt.step()
    return mats + dense, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("faithful", [False, True], ids=["fp32-states", "faithful-dtypes"])
def test_fused_trajectory_matches_reference(dtype, faithful, device):
    """24 steps crossing two refreshes, both projection sides, plus a dense parameter."""
    if faithful and dtype == torch.float32:
        pytest.skip("faithful_dtypes with fp32 params is the default path")
    ref, ref_opt = _run("reference", dtype, device, 24, faithful=faithful)
    fused, fused_opt = _run("triton", dtype, device, 24, faithful=faithful)
    assert fused_opt.resolved_backend(device) == "triton"
    for p, q in zip(fused, ref):
        assert_parity(p, q, rtol=tolerance(dtype, "trajectory"), name=f"W {tuple(p.shape)}")
    for p, q in zip(fused[:2], ref[:2]):
        for key in ("exp_avg", "exp_avg_sq", "basis"):
            a, e = fused_opt.state[p][key], ref_opt.state[q][key]
            assert a.dtype == (dtype if faithful else torch.float32)
            # the states see gradients computed from W, so they carry W's rounding
            assert_parity(a, e, rtol=tolerance(dtype, "trajectory"), name=key)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_state_dict_round_trip_continues_bit_identically(backend, device, tmp_path):
    full, _ = _run(backend, torch.bfloat16, device, 14)
    part, opt = _run(backend, torch.bfloat16, device, 5)
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in part]}, path)
    ckpt = torch.load(path, weights_only=True)
    mats, dense = _model_params(device, torch.bfloat16, ((97, 203), (203, 97)))
    for p, saved in zip(mats + dense, ckpt["params"]):
        p.data.copy_(saved)
    opt2 = GaLoreAdamW([dict(params=mats, rank=8, update_proj_gap=9, scale=0.25),
                        dict(params=dense)], lr=1e-2, weight_decay=0.01, backend=backend)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[mats[0]]["exp_avg"].dtype == torch.float32, "fp32 state must stay fp32"
    for t in range(5, 14):   # crosses the refresh at step 9
        for i, p in enumerate(mats + dense):
            p.grad = _grad_like(p, t, i)
        opt2.step()
    for p, q in zip(mats + dense, full):
        assert torch.equal(p, q), f"resumed run diverged for {tuple(p.shape)}"


def test_lr_scheduler_drives_the_step(device):
    """LambdaLR edits group['lr']; a zero learning rate must leave W unchanged."""
    mats, dense = _model_params(device)
    opt = GaLoreAdamW([dict(params=mats, rank=4), dict(params=dense)], lr=1e-2, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    before = [p.detach().clone() for p in mats + dense]
    for p in mats + dense:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    for p, b in zip(mats + dense, before):
        assert torch.equal(p, b)


def test_full_rank_guard_gives_hf_adamw(device):
    """rank >= min(m, n): the matrix gets the group's dense HF AdamW (the size guard)."""
    p = torch.nn.Parameter(torch.randn(6, 30, device=device))
    q = torch.nn.Parameter(p.detach().clone())
    a = GaLoreAdamW([dict(params=[p], rank=6)], lr=1e-2, weight_decay=0.1, backend="reference")
    b = GaLoreAdamW([q], lr=1e-2, weight_decay=0.1, backend="reference")
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        a.step(); b.step()
    assert torch.equal(p, q)
    assert "basis" not in a.state[p]


def test_conv_weight_is_flattened(device):
    """A 4-D weight is projected as (out, in*kh*kw), and fused matches reference."""
    ws = []
    for backend in ("reference", "triton"):
        w = torch.nn.Parameter(torch.randn(24, 5, 3, 3, device=device, generator=torch.Generator(device).manual_seed(0)))
        opt = GaLoreAdamW([dict(params=[w], rank=4, update_proj_gap=3)], lr=1e-2, backend=backend)
        for t in range(4):
            w.grad = _grad_like(w, t, 0)
            opt.step()
        assert opt.state[w]["exp_avg"].shape == (4, 45)
        ws.append(w)
    assert_parity(ws[1], ws[0], rtol=1e-5, name="W")


def test_state_bytes_far_below_adamw(device):
    mats, dense = _model_params(device, shapes=((256, 512), (512, 256)))
    opt = GaLoreAdamW([dict(params=mats, rank=16), dict(params=dense)], backend="reference")
    for p in mats + dense:
        p.grad = torch.randn_like(p)
    opt.step()
    adamw = sum(2 * 4 * p.numel() for p in mats + dense)
    galore = sum(4 * (16 * 512 * 2 + 16 * 256) for _ in mats) + 2 * 4 * 13
    assert opt.state_bytes() == galore
    assert opt.state_bytes() < adamw / 8


def test_fused_step_makes_no_full_size_temporary(device):
    """Between refreshes, a fused step allocates nothing of the weight's size (K1/K2/K3 keep
    every m x n quantity in registers); the reference step, for contrast, does."""
    sizes = {}
    for backend in ("reference", "triton"):
        w = torch.nn.Parameter(torch.randn(97, 203, device=device, dtype=torch.bfloat16))
        opt = GaLoreAdamW([dict(params=[w], rank=8, update_proj_gap=100)], backend=backend)
        w.grad = torch.randn_like(w)
        opt.step()                       # step 1 refreshes (SVD of an fp32 copy, by design)
        w.grad = torch.randn_like(w)
        with AllocationTrace() as trace:
            opt.step()
        sizes[backend] = [s for s in trace.sizes if s[1] >= w.numel()]
    assert sizes["reference"], "the trace must see the reference's full-size temporaries"
    assert sizes["triton"] == [], f"fused step allocated full-size tensors: {sizes['triton']}"


def test_bad_arguments_are_rejected(device):
    p = torch.nn.Parameter(torch.randn(8, 16, device=device))
    for kw, match in [(dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
                      (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(eps=-1e-8), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay"), (dict(backend="gpu"), "backend"),
                      (dict(matmul_precision="fp16"), "matmul_precision")]:
        with pytest.raises(ValueError, match=match):
            GaLoreAdamW([p], **kw)
    for group, match in [(dict(rank=0), "rank"), (dict(rank=2.5), "rank"),
                         (dict(rank=2, update_proj_gap=0), "update_proj_gap"),
                         (dict(rank=2, proj_type="diag"), "proj_type"),
                         (dict(rank=2, scale=float("inf")), "scale")]:
        with pytest.raises(ValueError, match=match):
            GaLoreAdamW([dict(params=[p], **group)])
    with pytest.raises(NotImplementedError, match="full"):
        GaLoreAdamW([dict(params=[p], rank=2, proj_type="full")])


def test_unavailable_backend_is_an_error_not_a_fallback(device):
    p = torch.nn.Parameter(torch.randn(8, 16, device=device))
    other = "cuda" if device == "cpu" else "cpu"
    with pytest.raises(BackendUnavailable, match=other):
        GaLoreAdamW([dict(params=[p], rank=2)], backend=other)


def test_nonfinite_gradient_at_refresh_is_reported_and_leaves_weights(device):
    p = torch.nn.Parameter(torch.randn(8, 16, device=device))
    before = p.detach().clone()
    opt = GaLoreAdamW([dict(params=[p], rank=2)], backend="reference")
    p.grad = torch.randn_like(p)
    p.grad[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(p, before)
    assert opt.state[p] == {} or "exp_avg" not in opt.state[p]


def test_nonfinite_gradient_at_refresh_leaves_every_parameter(device):
    """The check runs before the first update: a NaN in the second matrix's gradient leaves
    the first matrix (stepped earlier in the loop) untouched too."""
    a = torch.nn.Parameter(torch.randn(8, 16, device=device))
    b = torch.nn.Parameter(torch.randn(12, 20, device=device))
    before = [a.detach().clone(), b.detach().clone()]
    opt = GaLoreAdamW([dict(params=[a, b], rank=2)], backend="reference")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    b.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="12, 20"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert all(len(opt.state[p]) == 0 for p in (a, b))
