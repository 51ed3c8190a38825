"""AdaPM and AdaPM-mini (docs/methods/adapm.md): a literal transcription of the update rule (both
variants) compared step by step, the invariants of docs/conventions.md (1, 6, 8), the full-rank
limits, block classification (HF LLaMA and GPT-2 names, plain Linear stacks, overrides), the
fused-QKV split, checkpoint round trips, a tiny model, every flag, and argument errors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lowrank_fused.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank_fused.optim.adapm import (AdaPM, AdaPMMini, adapm_block_names, adapm_param_groups,
                                       sketch_matrix, sketch_seed)
from lowrank_fused.testing import assert_parity, tolerance


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster on the 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# An independent transcription of docs/methods/adapm.md (low-rank, full- and no-momentum
# blocks, and AdaPM-mini's block means), in float64. Only the Gaussian sketch that seeds L at t = 1
# is taken from the module (it is a documented random draw, not math).

def _orth(Y):
    Q, Rq = torch.linalg.qr(Y)
    s = torch.where(torch.diagonal(Rq) < 0, -1.0, 1.0).to(Y.dtype)
    return Q * s, Rq * s[:, None]


class LiteralAdaPM:
    def __init__(self, specs, *, lr, betas, eps, lam, T, K, mini, correction="unbiased",
                 bias_correction=True, clip="elementwise", nomomentum="ema"):
        self.specs = specs  # (W as fp64 rows x cols, block, rank, head_dim, seeds, is_matrix)
        self.lr, self.b1, self.b2, self.eps, self.lam = lr, betas[0], betas[1], eps, lam
        self.T, self.K, self.mini = T, K, mini
        self.correction, self.bc = correction, bias_correction
        self.clip, self.nomom = clip, nomomentum
        self.st = [dict() for _ in specs]
        self.t = 0

    def _vmean(self, block, x, head_dim):
        m, n = x.shape
        if not self.mini or block == "bias":
            return x
        if block in ("norm",) or m == 1:
            return x.mean().reshape(1, 1).expand(m, n)
        if block in ("q", "k"):
            return x.reshape(m // head_dim, head_dim * n).mean(1, keepdim=True).expand(
                -1, head_dim * n).reshape(m, n)
        return x.mean(1, keepdim=True).expand(m, n)

    def _apply(self, W, g, mc, st, block, head_dim, adagrad, decay):
        bc2 = 1 - self.b2 ** self.t if self.bc else 1.0
        x = self._vmean(block, g * g, head_dim)
        if adagrad:
            st["v"] = st.get("v", torch.zeros_like(g)) + x
            denom = st["v"].sqrt() + self.eps
        else:
            st["v"] = self.b2 * st.get("v", torch.zeros_like(g)) + (1 - self.b2) * x
            denom = (st["v"] / bc2).sqrt() + self.eps
        u = mc / denom
        if self.clip == "elementwise":
            u = u.clamp(-1.0, 1.0)
        elif self.clip == "rms":
            u = u / max(1.0, u.pow(2).mean().sqrt().item())
        return W * (1 - self.lr * decay) - self.lr * u

    def step(self, grads):
        self.t += 1
        b1 = self.b1
        bc1 = 1 - b1 ** self.t if self.bc else 1.0
        for (W, block, rank, head_dim, seeds, is_matrix), st, G in zip(self.specs, self.st, grads):
            decay = self.lam if is_matrix else 0.0   # weight decay on 2-D parameters only
            if block == "qkv":
                d = W.shape[0] // 3
                rows = [(0, d, "q"), (d, 2 * d, "k"), (2 * d, 3 * d, "v")]
            else:
                rows = [(0, W.shape[0], block)]
            for i, (a, b, blk) in enumerate(rows):
                sub = st.setdefault(i, {})
                g = G[a:b]
                if blk in ("q", "k", "mlp"):
                    W[a:b] = self._lowrank(W[a:b], g, sub, blk, rank, head_dim, seeds[i], bc1,
                                           decay)
                elif blk in ("v", "lm_head", "norm", "bias"):
                    sub["m"] = b1 * sub.get("m", torch.zeros_like(g)) + (1 - b1) * g
                    W[a:b] = self._apply(W[a:b], g, sub["m"] / bc1, sub, blk, head_dim, False,
                                         decay)
                else:   # embedding, attention output projection: no momentum
                    W[a:b] = self._apply(W[a:b], g, g, sub, blk, head_dim,
                                         self.nomom == "adagrad", decay)

    def _lowrank(self, W, g, st, block, r, head_dim, seed, bc1, decay):
        b1 = self.b1
        m, n = g.shape
        if self.t == 1:                                   # line 2
            Omega = sketch_matrix(n, r, seed, "cpu").double()
            L = _orth(g @ Omega)[0]
            st["L"] = _orth(g @ _orth(g.T @ L)[0])[0]
            st["R"] = torch.zeros(r, n, dtype=g.dtype)
        L, R = st["L"], st["R"]
        Rg = L.T @ g                                      # line 3
        if (self.t - 1) % self.T == 0:                    # line 4, refit
            L0, R0 = L, R
            R = b1 * R0 + (1 - b1) * Rg
            for _ in range(self.K):
                grad_L = L @ (R @ R.T) - b1 * L0 @ (R0 @ R.T) - (1 - b1) * (g @ R.T)
                lmax = torch.linalg.eigvalsh(R @ R.T)[-1]
                if lmax > 0:
                    L = L - grad_L / lmax
                grad_R = (L.T @ L) @ R - b1 * (L.T @ L0) @ R0 - (1 - b1) * (L.T @ g)
                lmax = torch.linalg.eigvalsh(L.T @ L)[-1]
                if lmax > 0:
                    R = R - grad_R / lmax
            L, Rq = _orth(L)
            R = Rq @ R
            mom = b1 * L0 @ R0 + (1 - b1) * g             # m_t of Alg. 1
            e = mom - L @ R
        else:
            mom = b1 * L @ R + (1 - b1) * g
            R = b1 * R + (1 - b1) * Rg
            e = (1 - b1) * (g - L @ Rg)
        st["L"], st["R"] = L, R
        k = 1 / (1 - b1)
        mc = {"unbiased": L @ R / bc1 + e * k,             # line 5 (9.2 estimators)
              "eq3": mom / bc1 + e * k,
              "alg1": mom / bc1 - e * k,
              "none": L @ R / bc1}[self.correction]
        return self._apply(W, g, mc, st, block, head_dim, False, decay)


# ---------------------------------------------------------------------------------------------
# helpers

# (name, shape, block, rank, head_dim)
_SPECS = [("q", (24, 40), "q", 3, 8), ("mlp", (50, 30), "mlp", 4, None),
          ("mlp_small", (20, 64), "mlp", None, None), ("v", (24, 40), "v", None, None),
          ("emb", (32, 16), "embedding", None, None), ("out", (24, 24), "attn_out", None, None),
          ("qkv", (48, 16), "qkv", 2, 4), ("norm", (16,), "norm", None, None),
          ("bias", (24,), "bias", None, None)]


def _params(specs=_SPECS, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s[1], generator=g).to(dtype)) for s in specs]


def _groups(params, specs=_SPECS):
    groups = []
    for p, (_, _, block, rank, hd) in zip(params, specs):
        grp = dict(params=[p], block=block)
        if rank is not None:
            grp["rank"] = rank
        if hd is not None:
            grp["head_dim"] = hd
        groups.append(grp)
    return groups


def _trend(shape, salt):
    g = torch.Generator().manual_seed(99 + salt)
    m, n = shape
    k = min(m, n, 6)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return (U * (5.0 * 0.7 ** torch.arange(k, dtype=torch.float32))) @ V.t()


def _grad(p, t, salt):
    """A W-dependent pull, a planted low-rank trend and fresh noise (never zero)."""
    g = torch.Generator().manual_seed(1000 * t + salt)
    noise = torch.randn(p.shape, generator=g)
    trend = _trend(p.shape, salt) if p.dim() == 2 else 0.0
    return (0.5 * p.detach().float() + trend + noise).to(p.dtype)


_LITERAL_CONFIGS = {
    "defaults": dict(),
    "alg1-rms": dict(adapm_correction="alg1", clip_mode="rms"),
    "eq3-noclip-adagrad": dict(adapm_correction="eq3", clip_mode="none",
                               nomomentum_mode="adagrad"),
    "none-nobc": dict(adapm_correction="none", bias_correction=False),
}


@pytest.mark.parametrize("cls", [AdaPM, AdaPMMini], ids=["AdaPM", "AdaPM-mini"])
@pytest.mark.parametrize("config", list(_LITERAL_CONFIGS), ids=list(_LITERAL_CONFIGS))
def test_matches_literal_transcription(cls, config):
    """13 steps, refits at t = 1, 5, 9, 13 (T = 4, K = 3): every block kind, a fused QKV and
    both shape regimes (m < n, m > n) against the float64 transcription of 9.6/9.7."""
    flags = _LITERAL_CONFIGS[config]
    params = _params()
    hp = dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = cls(_groups(params), refit_T=4, refit_K=3, backend="reference", **hp, **flags)
    specs = []
    for i, (p, (_, _, block, rank, hd)) in enumerate(zip(params, _SPECS)):
        rows = p.shape[0] // 3 if block == "qkv" else p.shape[0] if p.dim() == 2 else 1
        cols = p.shape[1] if p.dim() == 2 else p.shape[0]
        r = rank if rank is not None else math.ceil(0.05 * min(rows, cols))
        W = p.detach().double().clone().reshape(-1, cols)
        specs.append((W, block, r, hd, [sketch_seed(0, i, j) for j in range(3)], p.dim() == 2))
    lit = LiteralAdaPM(specs, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                       lam=hp["weight_decay"], T=4, K=3, mini=cls is AdaPMMini,
                       correction=flags.get("adapm_correction", "unbiased"),
                       bias_correction=flags.get("bias_correction", True),
                       clip=flags.get("clip_mode", "elementwise"),
                       nomomentum=flags.get("nomomentum_mode", "ema"))
    start = [p.detach().clone() for p in params]
    for t in range(13):
        grads = [_grad(p, t, i) for i, p in enumerate(params)]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        lit.step([g.double().reshape(-1, s[0].shape[1]) for g, s in zip(grads, specs)])
        for p, s, (name, *_) in zip(params, specs, _SPECS):
            assert_parity(p.detach().reshape(s[0].shape), s[0], rtol=1e-5,
                          name=f"{name} at step {t + 1}")
    for p, p0 in zip(params, start):
        assert not torch.equal(p, p0)


# ---------------------------------------------------------------------------------------------
# invariants (docs/conventions.md) and full-rank limits

def test_invariant6_full_rank_square_L_is_adam_plus_clip():
    """r = m <= n (low-rank path kept with size_guard=False): L is square orthogonal
    (invariant 1), L@R is the full momentum, so e == 0 and mc = m/bc1: the trajectory equals
    the full-momentum ("v") block, clip included. Refits every 3 steps do not break it."""
    m, n = 12, 20
    p, q = (nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(1)))
            for _ in range(2))
    kw = dict(lr=5e-2, betas=(0.9, 0.95), weight_decay=0.1, refit_T=3, refit_K=4,
              backend="reference")
    low = AdaPM([dict(params=[p], block="mlp", rank=m)], size_guard=False, **kw)
    full = AdaPM([dict(params=[q], block="v")], **kw)
    F_mom = torch.zeros(m, n, dtype=torch.float64)
    for t in range(10):
        p.grad = _grad(p, t, 3)
        q.grad = _grad(q, t, 3)
        F_mom = 0.9 * F_mom + 0.1 * p.grad.double()
        low.step()
        full.step()
        L, R = low.state[p]["L"], low.state[p]["R"]
        assert L.shape == (m, m)
        assert torch.linalg.norm(L.t() @ L - torch.eye(m)) < 1e-5
        assert_parity(L.double() @ R.double(), F_mom, rtol=1e-5, name=f"L@R at step {t + 1}")
        assert_parity(p, q, rtol=1e-5, name=f"W at step {t + 1}")


def test_invariant6_does_not_hold_for_tall_matrices():
    """m > n with r = n: L (m x n) cannot hold the momentum of an m x n matrix row space in
    general, so L@R differs from the full momentum (the contrast that makes the test above
    meaningful)."""
    m, n = 20, 12
    p = nn.Parameter(torch.randn(m, n))
    opt = AdaPM([dict(params=[p], block="mlp", rank=n)], size_guard=False,
                refit_T=100, refit_K=2, backend="reference")
    F_mom = torch.zeros(m, n, dtype=torch.float64)
    for t in range(4):
        p.grad = _grad(p, t, 4) + torch.randn(m, n)
        F_mom = 0.9 * F_mom + 0.1 * p.grad.double()
        opt.step()
    LR = opt.state[p]["L"].double() @ opt.state[p]["R"].double()
    assert (LR - F_mom).norm() / F_mom.norm() > 1e-2


@pytest.mark.parametrize("rank", [12, 40])
def test_full_rank_guard_reduces_to_torch_adamw(rank):
    """rank >= min(m, n) (default guard): the full-momentum step; with clip_mode='none' it is
    torch.optim.AdamW (E-torch epsilon, WD-pre)."""
    p = nn.Parameter(torch.randn(12, 30))
    q = nn.Parameter(p.detach().clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    a = AdaPM([dict(params=[p], block="mlp", rank=rank)], clip_mode="none",
              backend="reference", **kw)
    b = torch.optim.AdamW([q], foreach=False, **kw)
    for t in range(10):
        p.grad = _grad(p, t, 5)
        q.grad = p.grad.clone()
        a.step()
        b.step()
        assert_parity(p, q, rtol=1e-6, name=f"W at step {t + 1}")
    assert "L" not in a.state[p] and a.state[p]["exp_avg"].shape == (12, 30)


@pytest.mark.parametrize("correction,low,high", [("unbiased", 0.0, 0.08), ("eq3", 0.05, 0.2),
                                                 ("alg1", 1.7, 2.1), ("none", 0.85, 1.15)])
def test_invariant8_estimator_bias(correction, low, high):
    """Fixed L, stationary gradients ``mu + noise``: the mean over independent columns of
    ``mc - F/bc1`` (F the full momentum), normalised by the part of mu outside span(L), is
    about 0 for the unbiased estimator, (1-beta1) for eq. 3, 1+beta1 for Alg. 1 literal and 1
    without correction (the estimators of docs/methods/adapm.md). mc is read back from
    the update with lr = 1, eps = 0 and no clip. Step 1 sees pure noise, so that L (fitted at
    t = 1 and never refit) is a random subspace."""
    m, n, r, b1, b2, T = 40, 1500, 4, 0.9, 0.95, 60
    mu = torch.randn(m, 1, generator=torch.Generator().manual_seed(3))
    W = nn.Parameter(torch.randn(m, n))
    opt = AdaPM([dict(params=[W], block="mlp", rank=r)], lr=1.0, betas=(b1, b2), eps=0.0,
                weight_decay=0.0, refit_T=10 ** 6, refit_K=5, clip_mode="none",
                adapm_correction=correction, backend="reference")
    gen = torch.Generator().manual_seed(5)
    F_mom = torch.zeros(m, n, dtype=torch.float64)
    for t in range(1, T + 1):
        g = torch.randn(m, n, generator=gen) + (mu if t > 1 else 0.0)
        F_mom = b1 * F_mom + (1 - b1) * g.double()
        W.data.zero_()
        W.grad = g
        opt.step()
    v = opt.state[W]["exp_avg_sq"].double()
    mc = -W.detach().double() * torch.sqrt(v / (1 - b2 ** T))
    L = opt.state[W]["L"].double()
    perp = mu.double() - L @ (L.t() @ mu.double())
    bias = (mc - F_mom / (1 - b1 ** T)).mean(dim=1, keepdim=True)
    ratio = (bias.norm() / perp.norm()).item()
    assert low <= ratio <= high, f"{correction}: normalised bias {ratio:.3f}"


# ---------------------------------------------------------------------------------------------
# classification, groups, QKV split

def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def test_classification_hf_llama_names():
    model = _tiny_llama()
    blocks = adapm_block_names(model)
    expect = {"model.embed_tokens.weight": "embedding", "lm_head.weight": "lm_head",
              "model.norm.weight": "norm"}
    for i in range(2):
        pre = f"model.layers.{i}."
        expect.update({pre + "input_layernorm.weight": "norm",
                       pre + "post_attention_layernorm.weight": "norm",
                       pre + "self_attn.q_proj.weight": "q", pre + "self_attn.k_proj.weight": "k",
                       pre + "self_attn.v_proj.weight": "v",
                       pre + "self_attn.o_proj.weight": "attn_out",
                       pre + "mlp.gate_proj.weight": "mlp", pre + "mlp.up_proj.weight": "mlp",
                       pre + "mlp.down_proj.weight": "mlp"})
    assert blocks == expect
    groups = adapm_param_groups(model, rank=3, lr=1e-3)
    by_block = {g["block"]: g for g in groups}
    assert sorted(by_block) == sorted(set(expect.values()))
    assert by_block["q"]["head_dim"] == 8 and by_block["k"]["head_dim"] == 8
    assert by_block["mlp"]["rank"] == 3 and "rank" not in by_block["v"]
    assert all(g["lr"] == 1e-3 for g in groups)
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.02 * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.02 * torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class _GPT2Attention(nn.Module):
    def __init__(self, d, n_head, conv=True):
        super().__init__()
        self.n_head, self.d = n_head, d
        self.c_attn = Conv1D(3 * d, d) if conv else nn.Linear(d, 3 * d)
        self.c_proj = Conv1D(d, d) if conv else nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class _GPT2MLP(nn.Module):
    def __init__(self, d, conv=True):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d) if conv else nn.Linear(d, 4 * d)
        self.c_proj = Conv1D(d, 4 * d) if conv else nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class _GPT2Block(nn.Module):
    def __init__(self, d, n_head, conv=True):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = _GPT2Attention(d, n_head, conv), _GPT2MLP(d, conv)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT2(nn.Module):
    """GPT-2 / nanoGPT module names (``conv=False``: nanoGPT's nn.Linear layout), tied head."""

    def __init__(self, vocab=48, d=32, n_head=4, layers=2, block=32, conv=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block, d),
            h=nn.ModuleList(_GPT2Block(d, n_head, conv) for _ in range(layers)),
            ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        for mod in self.modules():
            if isinstance(mod, nn.LayerNorm):
                nn.init.normal_(mod.weight, 1.0, 0.02)
                nn.init.normal_(mod.bias, 0.0, 0.02)

    def forward(self, idx, targets):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
        for blk in tr.h:
            x = blk(x)
        logits = self.lm_head(tr.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("conv", [True, False], ids=["hf-conv1d", "nanogpt-linear"])
def test_classification_gpt2_names(conv):
    model = TinyGPT2(conv=conv)
    blocks = adapm_block_names(model)
    expect = {"transformer.wte.weight": "embedding", "transformer.wpe.weight": "embedding",
              "transformer.ln_f.weight": "norm", "transformer.ln_f.bias": "bias"}
    for i in range(2):
        pre = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            expect.update({pre + ln + ".weight": "norm", pre + ln + ".bias": "bias"})
        expect.update({pre + "attn.c_attn.weight": "qkv", pre + "attn.c_attn.bias": "bias",
                       pre + "attn.c_proj.weight": "attn_out", pre + "attn.c_proj.bias": "bias",
                       pre + "mlp.c_fc.weight": "mlp", pre + "mlp.c_fc.bias": "bias",
                       pre + "mlp.c_proj.weight": "mlp", pre + "mlp.c_proj.bias": "bias"})
    assert blocks == expect      # the tied lm_head is wte: the embedding rule, listed once
    groups = adapm_param_groups(model)
    qkv = [g for g in groups if g["block"] == "qkv"]
    assert len(qkv) == 1 and qkv[0]["head_dim"] == 8 and qkv[0]["transposed"] is conv
    for g in groups:
        if g["block"] in ("attn_out", "mlp"):
            assert g["transposed"] is conv


def test_classification_plain_linear_stack_and_overrides():
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 3))
    mlp[2].weight.requires_grad_(False)
    assert adapm_block_names(mlp) == {"0.weight": "mlp", "0.bias": "bias", "2.bias": "bias",
                                      "4.weight": "mlp", "4.bias": "bias"}
    groups = adapm_param_groups(mlp, rank=2, overrides={r"^4\.weight$": "lm_head",
                                                        r"^0\.weight$": dict(rank=5)})
    by = {(g["block"], g.get("rank")): g["params"] for g in groups}
    assert by[("lm_head", None)] == [mlp[4].weight] and by[("mlp", 5)] == [mlp[0].weight]
    assert all(p.requires_grad for ps in by.values() for p in ps)
    meta = nn.ModuleDict(dict(tok_embeddings=nn.Embedding(8, 4), output=nn.Linear(4, 8),
                              feed_forward=nn.ModuleDict(dict(w1=nn.Linear(4, 6)))))
    assert adapm_block_names(meta) == {"tok_embeddings.weight": "embedding",
                                       "output.weight": "lm_head", "output.bias": "bias",
                                       "feed_forward.w1.weight": "mlp",
                                       "feed_forward.w1.bias": "bias"}
    hook = adapm_block_names(mlp, overrides=lambda name, p, mod: "other" if "bias" in name
                             else None)
    assert hook["0.bias"] == "other" and hook["0.weight"] == "mlp"
    with pytest.raises(ValueError, match="block"):
        adapm_param_groups(mlp, overrides={"0": "momentum"})
    with pytest.raises(ValueError, match="rank"):
        adapm_param_groups(mlp, rank=0)


def _qkv_run(cls, conv, steps=6):
    W0 = torch.randn(96, 32, generator=torch.Generator().manual_seed(3))
    w = nn.Parameter(W0.t().contiguous() if conv else W0.clone())
    opt = cls([dict(params=[w], block="qkv", rank=2, head_dim=8, transposed=conv)],
              refit_T=3, refit_K=2, backend="reference")
    for t in range(steps):
        g = _grad(w.t() if conv else w, t, 11)
        w.grad = g.t().contiguous() if conv else g
        opt.step()
    return (w.detach().t() if conv else w.detach()), opt.state[w]


@pytest.mark.parametrize("cls", [AdaPM, AdaPMMini], ids=["AdaPM", "AdaPM-mini"])
def test_fused_qkv_split_layout_and_conv1d_equivalence(cls):
    """A fused QKV (3d x d) keeps one state per logical block: q and k low rank, v full; the
    Conv1D (d x 3d) layout runs on the transposed view and gives the same trajectory."""
    w_lin, st = _qkv_run(cls, conv=False)
    w_conv, st_conv = _qkv_run(cls, conv=True)
    d = 32
    v_shape = (d, d) if cls is AdaPM else None
    expect = {"q.L": (d, 2), "q.R": (2, d), "k.L": (d, 2), "k.R": (2, d), "v.exp_avg": (d, d)}
    for key, shape in expect.items():
        assert tuple(st[key].shape) == shape, key
    head_v = (d, d) if cls is AdaPM else (4,)
    row_v = (d, d) if cls is AdaPM else (d,)
    assert tuple(st["q.exp_avg_sq"].shape) == head_v and tuple(st["k.exp_avg_sq"].shape) == head_v
    assert tuple(st["v.exp_avg_sq"].shape) == (v_shape or row_v)
    assert set(st) == set(expect) | {"q.exp_avg_sq", "k.exp_avg_sq", "v.exp_avg_sq", "step"}
    assert_parity(w_conv, w_lin, rtol=1e-6, name="Conv1D vs Linear layout")
    for key in expect:
        assert_parity(st_conv[key], st[key], rtol=1e-5, name=key)


# ---------------------------------------------------------------------------------------------
# checkpoints

def _ckpt_run(cls, steps, params=None, state_dict=None, start=0):
    params = params if params is not None else _params()
    opt = cls(_groups(params), lr=1e-2, refit_T=4, refit_K=3, backend="reference")
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    for t in range(start, steps):
        for i, p in enumerate(params):
            p.grad = _grad(p, t, i)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls", [AdaPM, AdaPMMini], ids=["AdaPM", "AdaPM-mini"])
def test_state_dict_round_trip_continues_bit_identically(cls, tmp_path):
    full, _ = _ckpt_run(cls, 14)
    part, opt = _ckpt_run(cls, 6)
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in part]}, path)
    ckpt = torch.load(path, weights_only=True)
    params = _params()
    for p, saved in zip(params, ckpt["params"]):
        p.data.copy_(saved)
    resumed, opt2 = _ckpt_run(cls, 14, params, ckpt["opt"], start=6)   # refits at 9 and 13
    assert opt2.state[params[0]]["step"] == 14
    for p, q, (name, *_) in zip(resumed, full, _SPECS):
        assert torch.equal(p, q), f"resumed run diverged for {name}"


def test_load_state_dict_rejects_another_layout():
    _, opt = _ckpt_run(AdaPM, 2)
    sd = opt.state_dict()
    sd["param_groups"][0]["rank"] = 5                      # q block saved with rank 3
    params = _params()
    opt2 = AdaPM(_groups(params), backend="reference")
    with pytest.raises(ValueError, match="layout"):
        opt2.load_state_dict(sd)
    assert len(opt2.state) == 0 and opt2.param_groups[0]["rank"] == 3


# ---------------------------------------------------------------------------------------------
# a tiny model

def _expected_state_bytes(model, mini):
    """The state (docs/methods/adapm.md) for the tiny LLaMA (all fp32): low rank L, R (+ v),
    full m, v, no-momentum v; AdaPM-mini's v are block means."""
    total = 0
    for name, block in adapm_block_names(model).items():
        p = dict(model.named_parameters())[name]
        m, n = (p.shape[0], p.shape[1]) if p.dim() == 2 else (1, p.shape[0])
        if mini:
            v = {"q": m // 8, "k": m // 8, "norm": 1}.get(block, m)
        else:
            v = m * n
        if block in ("q", "k", "mlp"):
            r = math.ceil(0.05 * min(m, n))
            total += r * (m + n) + v
        elif block in ("v", "lm_head", "norm"):
            total += m * n + v
        else:
            total += v
    return 4 * total


@pytest.mark.parametrize("cls", [AdaPM, AdaPMMini], ids=["AdaPM", "AdaPM-mini"])
def test_tiny_llama_trains(cls):
    """100 steps on a fixed next-token task (x_{i+1} = 5 x_i + 3 mod 48 from random starts)."""
    model = _tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 48, (16, 1), generator=g)
    seq = [start]
    for _ in range(16):
        seq.append((5 * seq[-1] + 3) % 48)
    seq = torch.cat(seq, dim=1)
    opt = cls(adapm_param_groups(model), lr=1e-2, refit_T=25, backend="reference")
    losses = []
    for _ in range(100):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    adamw = sum(8 * p.numel() for p in model.parameters())
    assert opt.state_bytes() == _expected_state_bytes(model, cls is AdaPMMini)
    assert opt.state_bytes() < (0.65 if cls is AdaPM else 0.15) * adamw


def test_tiny_gpt2_conv1d_trains_with_mini():
    model = TinyGPT2(conv=True, seed=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 48, (8, 17), generator=g)
    opt = AdaPMMini(adapm_param_groups(model), lr=1e-2, refit_T=10, backend="reference")
    first = None
    for _ in range(30):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert math.isfinite(loss.item()) and loss.item() < 0.5 * first
    c_attn = model.transformer.h[0].attn.c_attn.weight
    assert opt.state[c_attn]["q.exp_avg_sq"].shape == (4,)


# ---------------------------------------------------------------------------------------------
# every flag, backends, errors

_FLAGS = [dict(adapm_correction="eq3"), dict(adapm_correction="alg1"),
          dict(adapm_correction="none"), dict(bias_correction=False),
          dict(clip_mode="rms"), dict(clip_mode="none"), dict(clip_threshold=0.5),
          dict(nomomentum_mode="adagrad"), dict(refit_T=1), dict(refit_K=0),
          dict(rank=2), dict(rank_ratio=0.3), dict(sign_canon=False),
          dict(size_guard=False, rank=64), dict(seed=5)]


@pytest.mark.parametrize("cls", [AdaPM, AdaPMMini], ids=["AdaPM", "AdaPM-mini"])
@pytest.mark.parametrize("flag", _FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_every_flag_runs_and_matters(cls, flag):
    runs = []
    for kw in ({}, flag):
        params = _params()
        opt = cls(_groups(params), lr=1e-2, refit_T=kw.get("refit_T", 3), backend="reference",
                  **{k: v for k, v in kw.items() if k != "refit_T"})
        if "rank" in kw or "rank_ratio" in kw:        # the groups' own ranks would win
            for grp in opt.param_groups:
                grp["rank"] = kw.get("rank")
        for t in range(6):
            for i, p in enumerate(params):
                p.grad = _grad(p, t, i)
            opt.step()
        assert all(torch.isfinite(p).all() for p in params)
        runs.append((params, opt))
    (base, base_opt), (flagged, flagged_opt) = runs
    if "sign_canon" in flag:      # column signs of L (and rows of R) differ; L@R does not
        a, b = base_opt.state[base[0]]["L"], flagged_opt.state[flagged[0]]["L"]
        assert not torch.equal(a, b) and torch.allclose(a.abs(), b.abs(), atol=1e-6)
        return
    assert any(not torch.equal(a, b) for a, b in zip(base, flagged)), f"{flag} changed nothing"


def test_faithful_dtypes_keeps_states_in_bf16():
    params = _params(dtype=torch.bfloat16)
    opt = AdaPM(_groups(params), faithful_dtypes=True, refit_T=2, backend="reference")
    for t in range(4):
        for i, p in enumerate(params):
            p.grad = _grad(p, t, i)
        opt.step()
    for p in params:
        assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()
        for key, v in opt.state[p].items():
            if torch.is_tensor(v):
                assert v.dtype == torch.bfloat16, key
    opt32 = AdaPM(_groups(_params(dtype=torch.bfloat16)), backend="reference")
    q = opt32.param_groups[0]["params"][0]
    q.grad = _grad(q, 0, 0)
    opt32.step()
    assert opt32.state[q]["L"].dtype == torch.float32


def test_auto_backend_matches_reference():
    """backend='auto' (the projection may run on a fused kernel, the AdaPM ops on their
    references) follows the reference trajectory."""
    specs = [("q", (24, 40), "q", 3, 8), ("norm", (16,), "norm", None, None)]
    runs = []
    for backend in ("reference", "auto"):
        params = _params(specs)
        opt = AdaPM(_groups(params, specs), refit_T=2, refit_K=2, backend=backend)
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = _grad(p, t, i)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert_parity(b, a, rtol=1e-5, name="auto vs reference")


@pytest.mark.parametrize("cls", [AdaPM, AdaPMMini], ids=["AdaPM", "AdaPM-mini"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_matches_reference(cls, dtype):
    """``backend="triton"`` constructs (every op has a Triton implementation: the refit is
    kernels/adapm_refit.py) and follows the reference over 5 steps with refits at t = 1, 3, 5
    (K = 2 iterations each), every block kind included. fp32: 1e-5; bf16 parameters: the
    trajectory entry of the table (each step may flip W's last bit)."""
    runs = []
    for backend in ("reference", "triton"):
        params = _params(dtype=dtype)
        opt = cls(_groups(params), refit_T=2, refit_K=2, backend=backend)
        for t in range(5):
            for i, p in enumerate(params):
                p.grad = _grad(p, t, i)
            opt.step()
        runs.append((params, opt))
    (ref, opt_ref), (fused, opt_fused) = runs
    rtol = tolerance(dtype, "trajectory")
    for (name, *_), a, b in zip(_SPECS, fused, ref):
        assert_parity(a, b, rtol=rtol, name=f"W {name}")
        for key, v in opt_ref.state[b].items():     # L, R (sign-canonical QR), v, ...
            if torch.is_tensor(v):
                assert_parity(opt_fused.state[a][key], v, rtol=rtol, name=f"{name}.{key}")


def test_lr_scheduler_zero_lr_leaves_weights():
    params = _params()
    opt = AdaPMMini(_groups(params), backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    before = [p.detach().clone() for p in params]
    for i, p in enumerate(params):
        p.grad = _grad(p, 0, i)
    opt.step()
    sched.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_bad_hyperparameters_raise_naming_them():
    p = nn.Parameter(torch.randn(8, 16))
    for kw, match in [(dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
                      (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
                      (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
                      (dict(betas=0.9), "betas"), (dict(eps=-1e-8), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay"), (dict(rank=0), "rank"),
                      (dict(rank=2.5), "rank"), (dict(rank_ratio=0.0), "rank_ratio"),
                      (dict(rank_ratio=1.5), "rank_ratio"), (dict(refit_T=0), "refit_T"),
                      (dict(refit_T=2.0), "refit_T"), (dict(refit_K=-1), "refit_K"),
                      (dict(adapm_correction="eq4"), "adapm_correction"),
                      (dict(bias_correction=1), "bias_correction"),
                      (dict(clip_mode="norm"), "clip_mode"),
                      (dict(clip_threshold=0.0), "clip_threshold"),
                      (dict(nomomentum_mode="sgd"), "nomomentum_mode"),
                      (dict(size_guard="yes"), "size_guard"),
                      (dict(seed=-1), "seed"), (dict(backend="gpu"), "backend"),
                      (dict(matmul_precision="fp16"), "matmul_precision")]:
        with pytest.raises(ValueError, match=match):
            AdaPM([p], **kw)
    for group, match in [(dict(block="attention"), "block"),
                         (dict(block="qkv"), "three equal"),       # 8 rows
                         (dict(block="qkv", qkv_sizes=(2, 2, 2)), "qkv_sizes"),
                         (dict(block="q", head_dim=0), "head_dim"),
                         (dict(transposed=1), "transposed")]:
        with pytest.raises(ValueError, match=match):
            AdaPM([dict(params=[p], **group)])
    with pytest.raises(ValueError, match="head_dim"):
        AdaPMMini([dict(params=[p], block="q")])
    with pytest.raises(ValueError, match="head_dim"):
        AdaPMMini([dict(params=[p], block="k", head_dim=3)])
    with pytest.raises(ValueError, match="transposed"):
        AdaPM([dict(params=[nn.Parameter(torch.randn(8))], transposed=True)])


def test_bad_input_never_touches_weights_or_state():
    params = _params()
    opt = AdaPM(_groups(params), refit_T=2, backend="reference")
    for i, p in enumerate(params):
        p.grad = _grad(p, 0, i)
    opt.step()

    def snapshot():
        return ([p.detach().clone() for p in params],
                [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                 for p in params])

    def unchanged(snap):
        ws, sts = snap
        assert all(torch.equal(p, w) for p, w in zip(params, ws))
        for p, st in zip(params, sts):
            assert set(opt.state[p]) == set(st)
            for k, v in st.items():
                now = opt.state[p][k]
                assert torch.equal(now, v) if torch.is_tensor(v) else now == v

    snap = snapshot()
    opt.param_groups[-1]["lr"] = -1.0          # the last group is bad: no group may step
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    unchanged(snap)
    opt.param_groups[-1]["lr"] = 1e-3
    opt.param_groups[-2]["clip_mode"] = "hard"
    with pytest.raises(ValueError, match="clip_mode"):
        opt.step()
    unchanged(snap)
    opt.param_groups[-2]["clip_mode"] = "elementwise"
    opt.step()                                  # t = 2
    snap = snapshot()
    for i, p in enumerate(params):
        p.grad = _grad(p, 5, i)
    params[6].grad[5, 3] = float("nan")         # t = 3 refits the fused QKV
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    unchanged(snap)
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match="refit_K"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.randn(4, 4))], refit_K=-2))
    assert len(opt.param_groups) == n_groups
