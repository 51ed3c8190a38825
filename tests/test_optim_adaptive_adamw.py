"""AdaptiveAdamW and the variants RSAdamW, GHAAdamW, GaLoreKFACAdamW
(docs/methods/adaptive_adamw.md): rank allocation (vectorised vs step-by-step greedy), the
invariants of docs/conventions.md, full-rank limits, GaLore equivalence, literal transcriptions,
checkpoint round trips, a tiny model, flags and errors."""
import copy
import io
import math

import pytest
import torch

from lowrank_fused import GaLoreAdamW
from lowrank_fused.dispatch import lookup
from lowrank_fused.optim.adaptive_adamw import (MONOTONE_METRICS, RANK_METRICS, AdaptiveAdamW,
                                                GaLoreKFACAdamW, GHAAdamW, RSAdamW,
                                                allocate_ranks, rank_scores)
from lowrank_fused.testing import assert_parity

CLASSES = [AdaptiveAdamW, RSAdamW, GHAAdamW, GaLoreKFACAdamW]
IDS = [c.__name__ for c in CLASSES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# helpers

def _orthonormal(rows, k, gen):
    return torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))[0].float()


def _planted(shape, spectrum, seed, device="cpu"):
    """``U diag(spectrum) V^T`` with seeded random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    k = len(spectrum)
    U, V = _orthonormal(m, k, g), _orthonormal(n, k, g)
    return ((U * torch.tensor(spectrum, dtype=torch.float32)) @ V.t()).to(device)


def _flat(shape):
    return [3.0] * (min(shape) // 2)


def _steep(shape):
    return [8.0 * 0.35 ** j for j in range(min(shape) // 2)]


def _phase_grad(p, t, i, T, noise=0.05):
    """Layer i's gradient at step t: a planted spectrum that is flat or steep depending on the
    refresh phase t // T (so the allocation moves between layers), fresh noise and a pull
    towards 0 (so gradients depend on W)."""
    phase = t // T
    shape = (p.shape[0], math.prod(p.shape[1:]))
    spec = _flat(shape) if (i + phase) % 2 == 0 else _steep(shape)
    trend = _planted(shape, spec, 1000 * i + phase, p.device).reshape(p.shape)
    g = torch.Generator().manual_seed(7919 * t + i)
    rnd = torch.randn(p.shape, generator=g).to(p.device)
    return (trend + noise * rnd + 0.1 * p.detach().float()).to(p.dtype)


def _params(shapes, dtype=torch.float32, seed=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dtype))
            for s in shapes]


def _canonical_basis(P, shape):
    """The stored basis as m_c x r columns (Q^T for right-projected matrices)."""
    return P if shape[0] < shape[1] else P.t()


def _orthonormality_error(P):
    B = P.float() if P.shape[0] >= P.shape[1] else P.float().t()
    return (B.t() @ B - torch.eye(B.shape[1])).norm().item()


def _stepwise_greedy(spectra, budget, metric, w=0.5):
    """Phase A2 of docs/methods/adaptive_adamw.md as written: r_l = 1, then one increment at a time
    to the first matrix (smallest l) with the largest score among those below r_max = len(s)."""
    lists = [rank_scores(s, metric, combined_weight=w).tolist() for s in spectra]
    ranks = [1] * len(spectra)
    for _ in range(budget - len(spectra)):
        best, best_l = None, None
        for l, sc in enumerate(lists):
            if ranks[l] < len(spectra[l]) and (best is None or sc[ranks[l] - 1] > best):
                best, best_l = sc[ranks[l] - 1], l
        ranks[best_l] += 1
    return ranks


def _random_spectra(gen):
    L = int(torch.randint(1, 7, (1,), generator=gen))
    spectra = []
    for l in range(L):
        n = int(torch.randint(1, 13, (1,), generator=gen))
        kind = int(torch.randint(0, 5, (1,), generator=gen))
        s = torch.rand(n, generator=gen) * 10 ** float(torch.randn(1, generator=gen))
        if kind == 1:
            s = torch.zeros(n)                                  # zero gradient
        elif kind == 2:
            s[n // 2:] = 0.0                                    # rank deficient
        elif kind == 3 and spectra:
            s = spectra[-1].clone()                             # exact ties across layers
        elif kind == 4:
            s = torch.full((n,), 0.5)                           # ties within a layer
        spectra.append(torch.sort(s, descending=True).values)
    return spectra


# ---------------------------------------------------------------------------------------------
# allocation

@pytest.mark.parametrize("metric", RANK_METRICS)
def test_allocation_equals_stepwise_greedy_on_random_spectra(metric):
    gen = torch.Generator().manual_seed(11)
    for trial in range(60):
        spectra = _random_spectra(gen)
        cap = sum(len(s) for s in spectra)
        budget = int(torch.randint(len(spectra), cap + 1, (1,), generator=gen))
        want = _stepwise_greedy(spectra, budget, metric, w=0.3)
        got = allocate_ranks(spectra, budget, metric, combined_weight=0.3)
        heap = allocate_ranks(spectra, budget, metric, combined_weight=0.3, algorithm="heap")
        assert heap == want, (trial, metric)
        assert got == want, (trial, metric)
        assert sum(got) == budget and all(1 <= r <= len(s) for r, s in zip(got, spectra))
        if metric in MONOTONE_METRICS:
            assert allocate_ranks(spectra, budget, metric, combined_weight=0.3,
                                  algorithm="topk") == want


def test_topk_is_wrong_for_the_non_monotone_gap_metric():
    """The vectorised path is only valid for monotone scores; for "gap" the greedy can see a
    high score behind a low one (a plateau after a drop) that top-k would take too early."""
    spectra = [torch.tensor([1.0, 0.1, 0.1, 0.1]), torch.tensor([1.0, 0.5, 0.2, 0.1])]
    greedy = _stepwise_greedy(spectra, 4, "gap")
    assert allocate_ranks(spectra, 4, "gap") == greedy
    assert allocate_ranks(spectra, 4, "gap", algorithm="topk") != greedy


def test_rank_scores_follow_the_spec_formulas():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    E = float((s * s).sum())
    sl = s.tolist()
    want = {
        "explained_variance": [sl[r] ** 2 / E for r in range(1, 5)],
        "singular_value": [sl[r] ** 2 for r in range(1, 5)],
        "conditioning": [sl[r] / sl[0] for r in range(1, 5)],
        "gap": [sl[r] / sl[r - 1] for r in range(1, 5)],
        "combined": [0.5 * sl[r] ** 2 / E + 0.5 * sl[r] / sl[0] for r in range(1, 5)],
        "uniform_variance": [-sum(x * x for x in sl[:r]) / E for r in range(1, 5)],
    }
    for metric, w in want.items():
        assert rank_scores(s, metric).tolist() == pytest.approx(w, rel=1e-6), metric
        assert rank_scores(torch.zeros(5), metric).eq(-math.inf).all()   # 5.5 zero-gradient guard
    assert rank_scores(torch.tensor([1.0, 0.0, 0.0]), "gap").tolist() == [0.0, 0.0]
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        s = torch.sort(torch.rand(9, generator=gen), descending=True).values
        for metric in MONOTONE_METRICS:
            sc = rank_scores(s, metric)
            assert (sc[1:] <= sc[:-1]).all(), metric


def test_allocation_rejects_impossible_budgets():
    spectra = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(spectra, 1)
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(spectra, 6)
    with pytest.raises(ValueError, match="rank_metric"):
        allocate_ranks(spectra, 3, "variance")


# ---------------------------------------------------------------------------------------------
# AdaptiveAdamW: invariants

@pytest.mark.parametrize("metric", RANK_METRICS)
def test_flat_spectrum_layer_gets_more_rank_than_steep_one(metric):
    shape = (24, 40)
    flat = [1.0] * 12
    steep = [0.5 ** j for j in range(12)]
    norm = math.sqrt(sum(x * x for x in steep) / sum(x * x for x in flat))
    mats = _params([shape, shape])
    opt = AdaptiveAdamW([dict(params=mats, rank=4)], rank_metric=metric, backend="reference")
    mats[0].grad = _planted(shape, steep, 1)
    mats[1].grad = _planted(shape, [x * norm for x in flat], 2)   # same ||G||
    opt.step()
    r_steep, r_flat = opt.ranks()[0]
    assert r_flat > r_steep and r_steep + r_flat == 8, (metric, r_steep, r_flat)


SHAPES = [(20, 36), (36, 20), (24, 24), (16, 40)]   # left, right, square (right), left


def _adaptive_run(steps, metric="explained_variance", T=4, dtype=torch.float32, opt_kw=None,
                  shapes=SHAPES, start=0, params=None, opt=None, record=None):
    mats = params if params is not None else _params(shapes, dtype)
    if opt is None:
        kw = dict(lr=1e-2, weight_decay=0.01, rank_metric=metric, update_proj_gap=T)
        kw.update(opt_kw or {})
        opt = AdaptiveAdamW([dict(params=mats, rank=4)], backend="reference", **kw)
    for t in range(start, start + steps):
        for i, p in enumerate(mats):
            p.grad = _phase_grad(p, t, i, T)
        opt.step()
        if record is not None:
            record.append([opt.state[p]["rank"] for p in mats])
    return mats, opt


@pytest.mark.parametrize("metric", RANK_METRICS)
def test_every_metric_spends_the_budget_and_keeps_invariants(metric):
    """Each refresh spends B = rank * L exactly, 1 <= r_l <= min(m, n), bases orthonormal,
    state shapes follow r_l, no NaN; the planted spectra move rank between layers."""
    ranks = []
    mats, opt = _adaptive_run(13, metric, record=ranks)
    for rs in ranks:
        assert sum(rs) == 4 * len(SHAPES)
        assert all(1 <= r <= min(s) for r, s in zip(rs, SHAPES))
    assert len({tuple(r) for r in ranks}) > 1, "the allocation never changed"
    for p, shape in zip(mats, SHAPES):
        st = opt.state[p]
        r = st["rank"]
        right = shape[0] >= shape[1]
        assert st["basis"].shape == ((r, shape[1]) if right else (shape[0], r))
        assert st["exp_avg"].shape == st["exp_avg_sq"].shape == ((shape[0], r) if right
                                                                 else (r, shape[1]))
        assert _orthonormality_error(st["basis"]) < 1e-5
        assert (st["exp_avg_sq"] >= 0).all()
        assert torch.isfinite(p).all() and torch.isfinite(st["exp_avg"]).all()


def test_transport_at_a_rank_change_is_C_and_C_squared():
    """Invariant 9 (docs/conventions.md): across a refresh with r_new != r_old the moments are C m
    and (C*C) v (then updated with the new projected gradient), V stays >= 0 with the new shape."""
    T = 4
    mats, opt = _adaptive_run(T, T=T, opt_kw=dict(nl_gamma=None))
    before = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
              for p in mats}
    for i, p in enumerate(mats):
        p.grad = _phase_grad(p, T, i, T)
    grads = [p.grad.clone() for p in mats]
    opt.step()
    changed = 0
    b1, b2 = opt.param_groups[0]["betas"]
    for p, G, shape in zip(mats, grads, SHAPES):
        old, st = before[p], opt.state[p]
        changed += old["rank"] != st["rank"]
        if shape[0] >= shape[1]:      # right: C = Q_old Q_new^T, m <- m C
            C = old["basis"] @ st["basis"].t()
            M, V = old["exp_avg"] @ C, old["exp_avg_sq"] @ (C * C)
            R = G @ st["basis"].t()
        else:                         # left: C = P_new^T P_old, m <- C m
            C = st["basis"].t() @ old["basis"]
            M, V = C @ old["exp_avg"], (C * C) @ old["exp_avg_sq"]
            R = st["basis"].t() @ G
        assert (C * C).min() >= 0 and ((C * C) @ old["exp_avg_sq"] if shape[0] < shape[1]
                                       else old["exp_avg_sq"] @ (C * C)).min() >= 0
        assert_parity(st["exp_avg"], b1 * M + (1 - b1) * R, rtol=1e-5, name="exp_avg")
        assert_parity(st["exp_avg_sq"], b2 * V + (1 - b2) * R * R, rtol=1e-5, name="exp_avg_sq")
        assert (st["exp_avg_sq"] >= 0).all()
    assert changed >= 2


def test_moment_transport_op_keeps_v_nonnegative_across_rank_changes():
    gen = torch.Generator().manual_seed(2)
    impl = lookup("moment_transport", "reference")
    for r_old, r_new in [(3, 7), (7, 3), (5, 5)]:
        P_old, P_new = _orthonormal(30, r_old, gen), _orthonormal(30, r_new, gen)
        M = torch.randn(r_old, 11, generator=gen)
        V = torch.rand(r_old, 11, generator=gen)
        M2, V2 = impl(P_new, P_old, M, V)
        C = P_new.t() @ P_old
        assert M2.shape == V2.shape == (r_new, 11)
        assert (V2 >= 0).all()
        assert_parity(M2, C @ M, rtol=1e-6)
        assert_parity(V2, (C * C) @ V, rtol=1e-6)


def test_zero_gradient_layer_keeps_rank_one_and_stays_finite():
    shapes = [(20, 36), (36, 20), (24, 24)]
    mats = _params(shapes)
    opt = AdaptiveAdamW([dict(params=mats, rank=4)], update_proj_gap=2, backend="reference")
    w0 = [p.detach().clone() for p in mats]
    for t in range(5):
        for i, p in enumerate(mats):
            p.grad = torch.zeros_like(p) if (i == 1 and t < 2) else _phase_grad(p, t, i, 2)
        opt.step()
        if t == 0:
            ranks = opt.ranks()[0]
            assert ranks[1] == 1 and sum(ranks) == 12
            assert torch.equal(mats[1], w0[1])     # a zero gradient moves nothing
            assert _orthonormality_error(opt.state[mats[1]]["basis"]) < 1e-6
    for p in mats:
        assert torch.isfinite(p).all()
        for v in opt.state[p].values():
            assert not torch.is_tensor(v) or torch.isfinite(v).all()
    # the limiter must not throttle a layer whose previous step was zero (memory 0 = none)
    assert (mats[1] - w0[1]).norm() > 1e-2


@pytest.mark.parametrize("cls", [RSAdamW, GHAAdamW, GaLoreKFACAdamW],
                         ids=["RSAdamW", "GHAAdamW", "GaLoreKFACAdamW"])
def test_zero_gradient_is_safe_in_every_variant(cls):
    """A zero gradient moves nothing and poisons nothing: GHA keeps its basis, KFAC's zero
    factor gives no inverse root until a gradient arrives (then it is computed at once)."""
    mats = _params([(20, 36), (36, 20)])
    opt = cls([dict(params=mats, rank=4, update_proj_gap=3)], backend="reference")
    w0 = [p.detach().clone() for p in mats]
    for p in mats:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(mats, w0))
    for t in range(1, 3):
        for i, p in enumerate(mats):
            p.grad = _phase_grad(p, t, i, 3)
        opt.step()
        if t == 1:
            assert all((p - w).norm() > 1e-3 for p, w in zip(mats, w0))
    bases = [opt.state[p]["basis"].clone() for p in mats]
    for p in mats:
        p.grad = torch.zeros_like(p)
    opt.step()                                        # k = 3: a refresh for RS and KFAC
    for p, B in zip(mats, bases):
        st = opt.state[p]
        assert torch.isfinite(p).all() and _orthonormality_error(st["basis"]) < 1e-5
        assert all(torch.isfinite(v).all() for v in st.values() if torch.is_tensor(v))
        if cls is GHAAdamW:
            assert torch.equal(st["basis"], B)


def test_limiter_caps_norm_growth_at_gamma():
    """The limiter: after the first call, ||N_t|| <= gamma * ||N_{t-1}||; E-hf's N grows fast in the
    first steps (bias correction sits in the step size), so the cap is active."""
    p = _params([(20, 36)])[0]
    opt = AdaptiveAdamW([dict(params=[p], rank=4)], update_proj_gap=100, backend="reference")
    mem, ratio = [], []
    for t in range(8):
        p.grad = _phase_grad(p, 0, 0, 100) * (1.5 ** t)
        opt.step()
        mem.append(opt.state[p]["nl_prev"].item())
    for a, b in zip(mem, mem[1:]):
        ratio.append(b / a)
        assert b <= 1.01 * (a + 1e-8) * (1 + 1e-6)
    assert max(ratio) == pytest.approx(1.01, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# AdaptiveAdamW vs GaLore, full-rank limits

@pytest.mark.parametrize("shape", [(30, 44), (44, 30)], ids=["left", "right"])
def test_single_layer_equals_galore_except_transport_at_refresh(shape):
    """B = rank with one layer: no rank change is possible and, with the limiter off, every
    step before the second refresh is GaLore's bit for bit; at the refresh the bases agree and
    the moments differ by exactly the transport (b1*(C m - m), b2*((C*C) v - v))."""
    T = 4
    a, g = _params([shape]), _params([shape])
    kw = dict(lr=1e-2, weight_decay=0.01)
    opt_a = AdaptiveAdamW([dict(params=a, rank=5, update_proj_gap=T, scale=0.25)],
                          nl_gamma=None, backend="reference", **kw)
    opt_g = GaLoreAdamW([dict(params=g, rank=5, update_proj_gap=T, scale=0.25)],
                        backend="reference", **kw)
    for t in range(T):
        a[0].grad = _phase_grad(a[0], t, 0, T)
        g[0].grad = _phase_grad(g[0], t, 0, T)
        opt_a.step(); opt_g.step()
        assert torch.equal(a[0], g[0])
    sa, sg = opt_a.state[a[0]], opt_g.state[g[0]]
    for key in ("exp_avg", "exp_avg_sq", "basis"):
        assert torch.equal(sa[key], sg[key])
    M, V, P_old = sg["exp_avg"].clone(), sg["exp_avg_sq"].clone(), sg["basis"].clone()
    a[0].grad = _phase_grad(a[0], T, 0, T)
    g[0].grad = _phase_grad(g[0], T, 0, T)
    opt_a.step(); opt_g.step()
    assert torch.equal(sa["basis"], sg["basis"]) and sa["rank"] == 5
    right = shape[0] >= shape[1]
    C = P_old @ sa["basis"].t() if right else sa["basis"].t() @ P_old
    assert (C - torch.eye(5)).abs().max() > 1e-2, "the refresh must change the basis"
    b1, b2 = opt_a.param_groups[0]["betas"]
    tM = M @ C if right else C @ M
    tV = V @ (C * C) if right else (C * C) @ V
    assert_parity(sa["exp_avg"], sg["exp_avg"] + b1 * (tM - M), rtol=1e-5, name="exp_avg")
    assert_parity(sa["exp_avg_sq"], sg["exp_avg_sq"] + b2 * (tV - V), rtol=1e-5,
                  name="exp_avg_sq")


def test_full_rank_guard_is_hf_adamw():
    """rank >= min(m, n): the 1.6 size guard gives the dense HF AdamW step, outside the budget."""
    p, q = _params([(6, 20)]), _params([(6, 20)])
    a = AdaptiveAdamW([dict(params=p, rank=6)], lr=1e-2, weight_decay=0.1, backend="reference")
    b = GaLoreAdamW(q, lr=1e-2, weight_decay=0.1, backend="reference")
    for t in range(3):
        p[0].grad = torch.randn(6, 20)
        q[0].grad = p[0].grad.clone()
        a.step(); b.step()
    assert torch.equal(p[0], q[0]) and "basis" not in a.state[p[0]]


def test_full_rank_allocation_with_identity_basis_is_hf_adamw():
    """A layer allocated r = min(m, n) whose basis is the identity (planted first gradient
    D X with orthonormal rows X), scale 1, limiter off, no refresh: invariant 6, HF AdamW."""
    small, big = (6, 20), (30, 40)
    p = _params([small, big])
    q = [torch.nn.Parameter(p[0].detach().clone())]
    gen = torch.Generator().manual_seed(4)
    X = _orthonormal(20, 6, gen).t()
    g0 = torch.tensor([1.0, 0.95, 0.9, 0.85, 0.8, 0.75]).unsqueeze(1) * X
    a = AdaptiveAdamW([dict(params=p, rank=4, scale=1.0, update_proj_gap=1000)], nl_gamma=None,
                      lr=1e-2, weight_decay=0.05, backend="reference")
    b = GaLoreAdamW(q, lr=1e-2, weight_decay=0.05, backend="reference")
    for t in range(8):
        p[0].grad = g0.clone() if t == 0 else torch.randn(small, generator=gen)
        p[1].grad = _planted(big, [1.0], 9)          # rank one: nothing left to explain
        q[0].grad = p[0].grad.clone()
        a.step(); b.step()
        if t == 0:
            assert a.ranks() == [[6, 2]]
            assert (a.state[p[0]]["basis"] - torch.eye(6)).abs().max() < 1e-5
    assert_parity(p[0], q[0], rtol=1e-5, name="W")
    assert not torch.equal(p[0], _params([small, big])[0])


# ---------------------------------------------------------------------------------------------
# literal transcription of docs/methods/adaptive_adamw.md (fp32; "std" side rule; E-hf; WD-post)

def _literal_sign_canon(B):
    """4.6: flip each column (singular vector) so that its largest-magnitude entry is positive."""
    B = B.clone()
    for j in range(B.shape[1]):
        i = int(B[:, j].abs().argmax())
        if B[i, j] < 0:
            B[:, j] = -B[:, j]
    return B


def _literal_orth(Y):
    Q, R = torch.linalg.qr(Y)
    d = torch.diagonal(R)
    return Q * torch.where(d < 0, -1.0, 1.0)


def _literal_score(s, E, r, metric, w):
    if r + 1 > len(s) or E == 0:
        return -math.inf
    nxt = s[r]                     # s[r+1] in the docs' 1-based indexing
    if metric == "explained_variance":
        return nxt ** 2 / E
    if metric == "singular_value":
        return nxt ** 2
    if metric == "conditioning":
        return nxt / s[0]
    if metric == "gap":
        return nxt / s[r - 1] if s[r - 1] > 0 else 0.0
    if metric == "combined":
        return w * nxt ** 2 / E + (1 - w) * nxt / s[0]
    return -sum(x * x for x in s[:r]) / E


class LiteralAdaptive:
    def __init__(self, params, *, rank, T, alpha, metric, gamma, lr, betas, eps, wd, w=0.5):
        self.params, self.rank, self.T, self.alpha = params, rank, T, alpha
        self.metric, self.gamma, self.lr, self.betas, self.eps, self.wd, self.w = (
            metric, gamma, lr, betas, eps, wd, w)
        self.k = 0
        self.st = [{} for _ in params]

    def _phase_a(self):
        L = len(self.params)
        spectra = [torch.linalg.svdvals(p.grad.float()).tolist() for p in self.params]
        energy = [sum(x * x for x in s) for s in spectra]
        r = [1] * L
        rem = self.rank * L - L
        while rem > 0:
            best = None
            for l in range(L):
                if r[l] < len(spectra[l]):
                    sc = _literal_score(spectra[l], energy[l], r[l], self.metric, self.w)
                    if best is None or sc > best[0]:
                        best = (sc, l)
            r[best[1]] += 1
            rem -= 1
        for l, p in enumerate(self.params):
            st, G = self.st[l], p.grad.float()
            right = G.shape[0] >= G.shape[1]
            U, s, Vh = torch.linalg.svd(G, full_matrices=False)
            if right:
                P_new = _literal_sign_canon(Vh[:r[l], :].t()).t()
            else:
                P_new = _literal_sign_canon(U[:, :r[l]])
            if "P" in st:
                if right:
                    C = st["P"] @ P_new.t()
                    st["m"], st["v"] = st["m"] @ C, st["v"] @ (C * C)
                else:
                    C = P_new.t() @ st["P"]
                    st["m"], st["v"] = C @ st["m"], (C * C) @ st["v"]
                if "nl" in st:
                    st["nl"] = st["nl"] * math.sqrt(r[l] / st["r"])
            else:
                shape = (G.shape[0], r[l]) if right else (r[l], G.shape[1])
                st["m"], st["v"], st["step"] = torch.zeros(shape), torch.zeros(shape), 0
            st["P"], st["r"] = P_new, r[l]

    def step(self):
        if self.k % self.T == 0:
            self._phase_a()
        b1, b2 = self.betas
        for p, st in zip(self.params, self.st):
            G = p.grad.float()
            right = G.shape[0] >= G.shape[1]
            R = G @ st["P"].t() if right else st["P"].t() @ G
            st["step"] += 1
            t = st["step"]
            st["m"] = b1 * st["m"] + (1 - b1) * R
            st["v"] = b2 * st["v"] + (1 - b2) * R * R
            N = st["m"] / (st["v"].sqrt() + self.eps)
            if self.gamma is not None:
                z = N.norm()
                if "nl" in st and st["nl"] > 0:
                    f = max(z / (st["nl"] + 1e-8), self.gamma) / self.gamma
                    N = N / f
                    st["nl"] = z / f
                else:
                    st["nl"] = z
            U = self.alpha * (N @ st["P"] if right else st["P"] @ N)
            ss = self.lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            p.data.add_(U, alpha=-ss)
            if self.wd > 0:
                p.data.add_(p.data, alpha=-self.lr * self.wd)
        self.k += 1


@pytest.mark.parametrize("metric", RANK_METRICS)
def test_reference_matches_literal_transcription(metric):
    """13 steps, refreshes at k = 0, 4, 8, 12 with ranks moving between four layers of both
    sides (square included), limiter on, weight decay on."""
    T = 4
    kw = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6)
    mats = _params(SHAPES)
    lit = [torch.nn.Parameter(p.detach().clone()) for p in mats]
    opt = AdaptiveAdamW([dict(params=mats, rank=4, update_proj_gap=T, scale=0.25)],
                        rank_metric=metric, weight_decay=0.05, backend="reference", **kw)
    ref = LiteralAdaptive(lit, rank=4, T=T, alpha=0.25, metric=metric, gamma=1.01, wd=0.05,
                          **kw)
    seen = set()
    for t in range(13):
        for i, (p, q) in enumerate(zip(mats, lit)):
            p.grad = _phase_grad(p, t, i, T)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        assert opt.ranks()[0] == [st["r"] for st in ref.st], t
        seen.add(tuple(opt.ranks()[0]))
        for p, q in zip(mats, lit):
            assert_parity(p, q, rtol=1e-5, name=f"W {tuple(p.shape)} step {t}")
    assert len(seen) > 1
    for p, st in zip(mats, ref.st):
        assert_parity(opt.state[p]["exp_avg"], st["m"], rtol=1e-5, name="exp_avg")
        assert_parity(opt.state[p]["nl_prev"], st["nl"], rtol=1e-5, name="nl_prev")


# literal GHA and KFAC (docs/methods/adaptive_adamw.md), written in the canonical left form

def _canon_grad(G):
    return (G.t(), True) if G.shape[0] >= G.shape[1] else (G, False)


def _literal_svd_basis(G, r):
    """GaLore's refresh as columns of the canonical form (right: Vh[:r]^T), sign-canonical."""
    U, s, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    return _literal_sign_canon(Vh[:r].t() if G.shape[0] >= G.shape[1] else U[:, :r])


def _literal_limit(st, N, gamma):
    z = N.norm()
    if "nl" in st and st["nl"] > 0:
        f = max(z / (st["nl"] + 1e-8), gamma) / gamma
        st["nl"] = z / f
        return N / f
    st["nl"] = z
    return N


def _literal_apply(p, P, N, coef, lr, wd, transposed):
    U = P @ N
    p.data.add_(U.t() if transposed else U, alpha=-coef)
    p.data.add_(p.data, alpha=-lr * wd)


def literal_gha_step(params, states, *, rank, eta, alpha, gamma, lr, betas, eps, wd):
    b1, b2 = betas
    for p, st in zip(params, states):
        G, tr = _canon_grad(p.grad.float())
        if "P" not in st:
            st["P"] = _literal_svd_basis(p.grad, rank)
            st["m"], st["v"], st["t"] = (torch.zeros(rank, G.shape[1]),
                                         torch.zeros(rank, G.shape[1]), 0)
        else:
            P = st["P"]
            g2 = (G * G).sum()
            Y = G.t() @ P
            H = (Y.t() @ Y) / g2
            P_new = _literal_orth(P + eta * ((G @ Y) / g2 - P @ torch.triu(H)))
            C = P_new.t() @ P
            st["m"], st["v"], st["P"] = C @ st["m"], (C * C) @ st["v"], P_new
        R = st["P"].t() @ G
        st["t"] += 1
        t = st["t"]
        st["m"] = b1 * st["m"] + (1 - b1) * R
        st["v"] = b2 * st["v"] + (1 - b2) * R * R
        N = _literal_limit(st, st["m"] / (st["v"].sqrt() + eps), gamma)
        ss = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        _literal_apply(p, st["P"], N, ss * alpha, lr, wd, tr)


def literal_kfac_step(params, states, *, rank, T, freq, eps_k, transport, alpha, gamma, lr,
                      betas, wd):
    b1, b2 = betas
    for p, st in zip(params, states):
        G, tr = _canon_grad(p.grad.float())
        k = st.get("t", 0)
        if "P" not in st or k % T == 0:
            P_new = _literal_svd_basis(p.grad, rank)
            if "P" not in st:
                st["m"], st["F"], st["t"], st["root"] = (torch.zeros(rank, G.shape[1]),
                                                         torch.zeros(rank, rank), 0, None)
            elif transport:
                C = P_new.t() @ st["P"]
                st["m"], st["F"], st["root"] = C @ st["m"], C @ st["F"] @ C.t(), None
            st["P"] = P_new
        R = st["P"].t() @ G
        st["t"] += 1
        t = st["t"]
        st["m"] = b1 * st["m"] + (1 - b1) * R
        st["F"] = b2 * st["F"] + (1 - b2) * (R @ R.t()) / G.shape[1]
        if (t - 1) % freq == 0 or st["root"] is None:
            Fh = st["F"] / (1 - b2 ** t)
            A = Fh + eps_k * torch.trace(Fh) / rank * torch.eye(rank)
            ev, Q = torch.linalg.eigh(A)
            st["root"] = Q @ torch.diag(ev ** -0.5) @ Q.t()
        N = _literal_limit(st, st["root"] @ (st["m"] / (1 - b1 ** t)), gamma)
        _literal_apply(p, st["P"], N, lr * alpha, lr, wd, tr)


@pytest.mark.parametrize("variant", ["gha", "kfac", "kfac-no-transport"])
def test_variants_match_literal_transcriptions(variant):
    T, kw = 5, dict(lr=2e-2, betas=(0.9, 0.99))
    shapes = [(20, 36), (36, 20)]
    mats = _params(shapes)
    lit = [torch.nn.Parameter(p.detach().clone()) for p in mats]
    states = [{}, {}]
    if variant == "gha":
        opt = GHAAdamW([dict(params=mats, rank=4)], eta=0.5, weight_decay=0.05,
                       backend="reference", **kw)
        lit_step = lambda: literal_gha_step(lit, states, rank=4, eta=0.5, alpha=0.25,  # noqa: E731
                                            gamma=1.01, eps=1e-6, wd=0.05, **kw)
    else:
        transport = variant == "kfac"
        opt = GaLoreKFACAdamW([dict(params=mats, rank=4, update_proj_gap=T)], kfac_update_freq=3,
                              transport_on_refresh=transport, weight_decay=0.05,
                              backend="reference", **kw)
        lit_step = lambda: literal_kfac_step(lit, states, rank=4, T=T, freq=3,  # noqa: E731
                                             eps_k=1e-6, transport=transport, alpha=0.25,
                                             gamma=1.01, wd=0.05, **kw)
    for t in range(12):
        for i, (p, q) in enumerate(zip(mats, lit)):
            p.grad = _phase_grad(p, t, i, T)
            q.grad = p.grad.clone()
        opt.step()
        lit_step()
        for p, q in zip(mats, lit):
            assert_parity(p, q, rtol=1e-5, name=f"W {tuple(p.shape)} step {t}")
    for p, st, shape in zip(mats, states, shapes):
        assert_parity(_canonical_basis(opt.state[p]["basis"], shape), st["P"], rtol=1e-4,
                      name="basis")


# ---------------------------------------------------------------------------------------------
# RSAdamW

def test_rsadamw_draws_are_seeded_and_sigma_controls_drift():
    def run(seed, sigma, steps=5):
        mats = _params([(20, 36), (36, 20)])
        opt = RSAdamW([dict(params=mats, rank=4, update_proj_gap=2)], sigma=sigma, seed=seed,
                      backend="reference")
        bases = []
        for t in range(steps):
            for i, p in enumerate(mats):
                p.grad = _phase_grad(p, t, i, 2)
            opt.step()
            bases.append([opt.state[p]["basis"].clone() for p in mats])
            assert all(_orthonormality_error(b) < 1e-5 for b in bases[-1])
            assert opt.ranks() == [[4, 4]]
        return mats, bases

    a, ba = run(0, 1.0)
    b, bb = run(0, 1.0)
    c, bc = run(1, 1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ba[0][0], bc[0][0])
    # sigma = 0: a refresh keeps the subspace (orth(P) = P up to rounding)
    _, b0 = run(0, 0.0)
    assert_parity(b0[-1][0], b0[0][0], rtol=1e-5, name="basis, sigma=0")
    # sigma = 0.3 moves it a little, sigma = 1 replaces it
    def overlap(P, Q):
        P, Q = _canonical_basis(P, (20, 36)), _canonical_basis(Q, (20, 36))
        return (P.t() @ Q).norm().item() ** 2 / P.shape[1]
    _, b3 = run(0, 0.3)
    assert 0.6 < overlap(b3[2][0], b3[0][0]) < 0.999
    assert overlap(ba[2][0], ba[0][0]) < 0.6


def test_subspace_drift_op_is_the_spec_formula():
    gen = torch.Generator().manual_seed(8)
    impl = lookup("subspace_drift", "reference")
    P = _orthonormal(25, 4, gen)
    Z = torch.randn(25, 4, generator=gen) / 5.0
    out = impl(P, Z, sigma=0.6)
    assert_parity(out, _literal_orth(0.8 * P + 0.6 * Z), rtol=1e-5)
    assert_parity(impl(None, Z, sigma=0.6), _literal_orth(Z), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# checkpoints, training, flags, errors

def _make(cls, mats, dense, T, **kw):
    return cls([dict(params=mats, rank=4, update_proj_gap=T), dict(params=dense)], lr=1e-2,
               weight_decay=0.01, backend="reference", **kw)


def _train(cls, mats, dense, opt, start, stop, T):
    for t in range(start, stop):
        for i, p in enumerate(mats + dense):
            p.grad = _phase_grad(p, t, i, T) if p.dim() > 1 else torch.randn(
                p.shape, generator=torch.Generator().manual_seed(t)).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_state_dict_round_trip_continues_bit_identically(cls, tmp_path):
    """bf16 weights, fp32 states; the resumed run crosses refreshes (and, for AdaptiveAdamW,
    rank changes) and must equal the uninterrupted one bit for bit."""
    T = 4
    def fresh():
        ps = _params(SHAPES + [(9,)], torch.bfloat16)
        return ps[:-1], ps[-1:]
    mats, dense = fresh()
    full = _make(cls, mats, dense, T)
    _train(cls, mats, dense, full, 0, 14, T)
    pm, pd = fresh()
    part = _make(cls, pm, pd, T)
    _train(cls, pm, pd, part, 0, 5, T)
    saved_ranks = part.ranks()
    buf = io.BytesIO()
    torch.save({"opt": part.state_dict(), "params": [p.detach() for p in pm + pd]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rm, rd = fresh()
    for p, saved in zip(rm + rd, ckpt["params"]):
        p.data.copy_(saved)
    resumed = _make(cls, rm, rd, T)
    resumed.load_state_dict(ckpt["opt"])
    assert resumed.state[rm[0]]["basis"].dtype == torch.float32
    _train(cls, rm, rd, resumed, 5, 14, T)
    for p, q in zip(rm + rd, mats + dense):
        assert torch.equal(p, q), f"resumed run diverged for {tuple(p.shape)}"
    for p, q in zip(rm, mats):
        for key, v in full.state[q].items():
            w = resumed.state[p][key]
            assert (torch.equal(v, w) if torch.is_tensor(v) else v == w), key
    if cls is AdaptiveAdamW:
        assert resumed.param_groups[0]["pool_step"] == 14
        assert resumed.ranks() != saved_ranks


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mlp_in = torch.nn.Linear(24, 64)
        self.mlp_out = torch.nn.Linear(64, 48)
        self.head = torch.nn.Linear(48, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.mlp_out(torch.tanh(self.mlp_in(x)))))


def _state_bytes_formula(cls, opt, model):
    total = 0
    for p in model.parameters():
        st = opt.state[p]
        if "basis" not in st:
            total += 8 * p.numel()
            continue
        m, n = p.shape
        r = st["rank"]
        rows, cols = (n, m) if m >= n else (m, n)       # canonical (left) form
        if cls is GaLoreKFACAdamW:
            total += 4 * (rows * r + r * cols + 2 * r * r) + 4
        else:
            total += 4 * (rows * r + 2 * r * cols) + 4
    return total


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_tiny_model_trains_with_far_less_state(cls):
    """100 full-batch steps of a 3-layer MLP on a fixed teacher task: the loss falls, the
    projected layers help (against freezing them), bases stay orthonormal, no NaN, and the
    state is the low-rank layout (below a quarter of AdamW's)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 24, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        Y = teacher(X)

    def train(lr_lowrank):
        model = _MLP()
        mats = [model.mlp_in.weight, model.mlp_out.weight]
        rest = [p for n, p in model.named_parameters() if n not in ("mlp_in.weight",
                                                                    "mlp_out.weight")]
        opt = cls([dict(params=mats, rank=4, update_proj_gap=20, lr=lr_lowrank),
                   dict(params=rest)], lr=1e-2, backend="reference")
        losses = []
        for t in range(100):
            loss = torch.nn.functional.mse_loss(model(X), Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if lr_lowrank and t % 10 == 0:
                assert all(_orthonormality_error(opt.state[p]["basis"]) < 1e-5 for p in mats)
        return model, opt, losses

    model, opt, losses = train(1e-2)
    _, _, frozen = train(0.0)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.05 * losses[0]
    assert losses[-1] < 0.7 * frozen[-1]
    assert sum(opt.ranks()[0]) == 8
    adamw = sum(8 * p.numel() for p in model.parameters())
    assert opt.state_bytes() == _state_bytes_formula(cls, opt, model)
    assert opt.state_bytes() < adamw / 4


FLAG_CASES = [
    (AdaptiveAdamW, dict(nl_gamma=None)),
    (AdaptiveAdamW, dict(sign_canon=False)),
    (AdaptiveAdamW, dict(faithful_dtypes=True)),
    (AdaptiveAdamW, dict(combined_weight=0.2, rank_metric="combined")),
    (AdaptiveAdamW, dict(bias_correction=False, matmul_precision="ieee")),
    (AdaptiveAdamW, dict(group=dict(proj_type="reverse_std"))),
    (AdaptiveAdamW, dict(group=dict(proj_type="left", rank_metric="gap"))),
    (RSAdamW, dict(sigma=0.3, seed=7)),
    (RSAdamW, dict(sign_canon=False, faithful_dtypes=True, nl_gamma=None)),
    (GHAAdamW, dict(eta=0.1, sign_canon=False)),
    (GHAAdamW, dict(faithful_dtypes=True, group=dict(proj_type="right"))),
    (GaLoreKFACAdamW, dict(transport_on_refresh=False, kfac_update_freq=1)),
    (GaLoreKFACAdamW, dict(kfac_eps=1e-3, faithful_dtypes=True, bias_correction=False)),
]


@pytest.mark.parametrize("cls,kw", FLAG_CASES,
                         ids=[f"{c.__name__}-{'-'.join(k)}" for c, k in FLAG_CASES])
def test_every_flag_alternative_runs(cls, kw):
    kw = dict(kw)
    group = kw.pop("group", {})
    dtype = torch.bfloat16 if kw.get("faithful_dtypes") else torch.float32
    mats = _params(SHAPES, dtype)
    w0 = [p.detach().clone() for p in mats]
    opt = cls([dict(params=mats, rank=4, update_proj_gap=2, **group)], backend="reference", **kw)
    for t in range(5):
        for i, p in enumerate(mats):
            p.grad = _phase_grad(p, t, i, 2)
        opt.step()
    for p, w in zip(mats, w0):
        st = opt.state[p]
        assert torch.isfinite(p).all() and not torch.equal(p, w)
        assert st["exp_avg"].dtype == dtype and st["basis"].dtype == dtype
        assert _orthonormality_error(st["basis"]) < (3e-2 if dtype == torch.bfloat16 else 1e-5)
        assert ("nl_prev" in st) == (kw.get("nl_gamma", 1.01) is not None)


BAD = [
    (AdaptiveAdamW, dict(rank_metric="entropy"), "rank_metric"),
    (AdaptiveAdamW, dict(nl_gamma=0.5), "nl_gamma"),
    (AdaptiveAdamW, dict(nl_gamma=float("nan")), "nl_gamma"),
    (AdaptiveAdamW, dict(combined_weight=1.5), "combined_weight"),
    (AdaptiveAdamW, dict(update_proj_gap=0), "update_proj_gap"),
    (AdaptiveAdamW, dict(scale=float("inf")), "scale"),
    (AdaptiveAdamW, dict(lr=-1.0), "lr"),
    (AdaptiveAdamW, dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (AdaptiveAdamW, dict(eps=-1.0), "eps"),
    (AdaptiveAdamW, dict(weight_decay=-0.1), "weight_decay"),
    (AdaptiveAdamW, dict(backend="gpu"), "backend"),
    (AdaptiveAdamW, dict(group=dict(rank=0)), "rank"),
    (AdaptiveAdamW, dict(group=dict(rank_metric="variance")), "rank_metric"),
    (AdaptiveAdamW, dict(group=dict(pool_step=-1)), "pool_step"),
    (AdaptiveAdamW, dict(group=dict(proj_type="diag")), "proj_type"),
    (RSAdamW, dict(sigma=1.5), "sigma"),
    (RSAdamW, dict(sigma=-0.1), "sigma"),
    (RSAdamW, dict(seed=-1), "seed"),
    (RSAdamW, dict(seed=1.5), "seed"),
    (GHAAdamW, dict(eta=-1.0), "eta"),
    (GHAAdamW, dict(eta=float("nan")), "eta"),
    (GHAAdamW, dict(nl_gamma=0.9), "nl_gamma"),
    (GaLoreKFACAdamW, dict(kfac_eps=0.0), "kfac_eps"),
    (GaLoreKFACAdamW, dict(kfac_update_freq=0), "kfac_update_freq"),
    (GaLoreKFACAdamW, dict(transport_on_refresh="yes"), "transport_on_refresh"),
    (GaLoreKFACAdamW, dict(group=dict(update_proj_gap=2.5)), "update_proj_gap"),
]


@pytest.mark.parametrize("cls,kw,match", BAD, ids=[f"{c.__name__}-{m}-{i}"
                                                    for i, (c, _, m) in enumerate(BAD)])
def test_bad_hyperparameters_raise_naming_them(cls, kw, match):
    kw = dict(kw)
    group = {"rank": 2, **kw.pop("group", {})}
    p = torch.nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ValueError, match=match):
        cls([dict(params=[p], **group)], **kw)


def _snapshot(opt, params):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def _assert_unchanged(opt, params, snap):
    sd, ws = snap
    for p, w in zip(params, ws):
        assert torch.equal(p, w)
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert (torch.equal(v, now["state"][i][k]) if torch.is_tensor(v)
                    else v == now["state"][i][k]), k


def test_bad_group_value_at_step_time_changes_nothing():
    mats = _params(SHAPES)
    opt = AdaptiveAdamW([dict(params=mats[:2], rank=4, update_proj_gap=2),
                         dict(params=mats[2:], rank=3)], backend="reference")
    _adaptive_run(3, params=mats, opt=opt, T=2)
    snap = _snapshot(opt, mats)
    opt.param_groups[1]["rank_metric"] = "bogus"
    for i, p in enumerate(mats):
        p.grad = _phase_grad(p, 3, i, 2)
    with pytest.raises(ValueError, match="rank_metric"):
        opt.step()
    opt.param_groups[1]["rank_metric"] = "explained_variance"
    _assert_unchanged(opt, mats, snap)


@pytest.mark.parametrize("cls", [AdaptiveAdamW, GHAAdamW, GaLoreKFACAdamW],
                         ids=["AdaptiveAdamW", "GHAAdamW", "GaLoreKFACAdamW"])
def test_nonfinite_gradient_at_a_basis_update_changes_nothing(cls):
    mats = _params(SHAPES)
    opt = cls([dict(params=mats, rank=4, update_proj_gap=2)], backend="reference")
    for t in (0, 2):        # the first refresh, and a later one with state in place
        snap = _snapshot(opt, mats)
        for i, p in enumerate(mats):
            p.grad = _phase_grad(p, t, i, 2)
        mats[2].grad[3, 4] = float("nan")
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
        _assert_unchanged(opt, mats, snap)
        _adaptive_run(2, params=mats, opt=opt, T=2, start=t)


def test_missing_gradient_at_a_refresh_is_an_error_elsewhere_skipped():
    mats = _params(SHAPES)
    opt = AdaptiveAdamW([dict(params=mats, rank=4, update_proj_gap=3)], backend="reference")
    snap = _snapshot(opt, mats)
    for i, p in enumerate(mats):
        p.grad = None if i == 1 else _phase_grad(p, 0, i, 3)
    with pytest.raises(ValueError, match="no gradient"):
        opt.step()
    _assert_unchanged(opt, mats, snap)
    mats[1].grad = _phase_grad(mats[1], 0, 1, 3)
    opt.step()
    w1 = mats[1].detach().clone()
    mats[1].grad = None            # between refreshes a missing gradient skips the matrix
    opt.step()
    assert torch.equal(mats[1], w1) and opt.state[mats[1]]["step"] == 1
    assert opt.param_groups[0]["pool_step"] == 2


def _four_steps(cls, backend, device):
    """A (16, 24) and a (24, 16) matrix at rank 3, 4 steps with a refresh every 2: (mats,
    optimizer)."""
    mats = _params([(16, 24), (24, 16)], device=device)
    opt = cls([dict(params=mats, rank=3, update_proj_gap=2)], backend=backend)
    for t in range(4):
        for i, p in enumerate(mats):
            p.grad = _phase_grad(p, t, i, 2)
        opt.step()
    return mats, opt


# every op of the family has a Triton implementation: the limiter (kernels/norm_growth_limit.py),
# RSAdamW's drift (kernels/subspace_drift.py), GaLoreKFACAdamW's whitening
# (kernels/kfac_precondition.py)
@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_explicit_triton_backend_matches_reference(cls, device):
    """``backend="triton"`` constructs and runs every op fused, the limiter on K2's ``sumsq``
    side output; 4 steps across a refresh (a rank reallocation, a drift, a KFAC root
    recompute) match the reference backend."""
    ref, opt_ref = _four_steps(cls, "reference", device)
    fused, opt_fused = _four_steps(cls, "triton", device)
    for p, q in zip(fused, ref):
        assert_parity(p, q, rtol=1e-5, name="W")
        assert_parity(opt_fused.state[p]["nl_prev"], opt_ref.state[q]["nl_prev"], rtol=1e-5,
                      name="nl_prev")


def test_auto_backend_mixes_fused_and_reference_ops(device):
    """``auto`` runs the fused K1-K3 where they exist (Triton; on CPU its interpreter) and the
    reference for the method's own ops; the trajectory matches the all-reference one."""
    ref, _ = _four_steps(AdaptiveAdamW, "reference", device)
    mixed, _ = _four_steps(AdaptiveAdamW, "auto", device)
    for p, q in zip(mixed, ref):
        assert_parity(p, q, rtol=1e-5, name="W")
