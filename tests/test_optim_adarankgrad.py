"""AdaRankGrad (docs/methods/adarankgrad.md): a literal transcription of its update rule,
the invariants of docs/conventions.md (orthonormality, prefix nesting, transport shape and
V >= 0), rank selection on planted spectra, the exit rules, zero and rank-deficient gradients, the
full-rank limits, checkpoint resume, a tiny model, every flag, and argument errors."""
import math

import pytest
import torch

from lowrank_fused import BackendUnavailable
from lowrank_fused.dispatch import lookup
from lowrank_fused.optim.adarankgrad import AdaRankGrad, sketch_matrix
from lowrank_fused.reference.iass_select import smallest_sufficient_rank
from lowrank_fused.testing import assert_parity


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# gradients with a planted spectrum

def _orthonormal(rows, cols, gen):
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def planted(m, n, sigmas, *, noise=0.0, salt=0):
    """``U diag(sigmas) V^T + noise * randn`` with random orthonormal U, V (seeded by salt)."""
    g = torch.Generator().manual_seed(12345 + salt)
    k = len(sigmas)
    U, V = _orthonormal(m, k, g), _orthonormal(n, k, g)
    G = (U * torch.tensor(sigmas, dtype=torch.float32)) @ V.t()
    if noise:
        G = G + noise * torch.randn(m, n, generator=g)
    return G


def _switching_grad(p, t, salt, pull=0.1):
    """A rank-3 trend until step 7, a rank-6 trend in another subspace until step 13, then a
    rank-2 one; plus noise that changes every step and a pull towards W."""
    if p.dim() < 2:
        g = torch.Generator().manual_seed(7 * t + salt)
        return torch.randn(p.shape, generator=g).to(p.dtype)
    m, n = p.shape[0], math.prod(p.shape[1:])
    if t < 7:
        trend = planted(m, n, [50.0, 42.0, 35.0], salt=100 + salt)
    elif t < 13:
        trend = planted(m, n, [40.0, 38.0, 36.0, 34.0, 32.0, 30.0], salt=200 + salt)
    else:
        trend = planted(m, n, [45.0, 40.0], salt=300 + salt)
    g = torch.Generator().manual_seed(1000 * t + salt)
    noise = 0.3 * torch.randn(m, n, generator=g)
    G = trend + noise
    if pull:
        G = G + pull * p.detach().float().reshape(m, n)
    return G.reshape(p.shape).to(p.dtype)


def _params(shapes=((40, 70), (70, 40)), dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(7)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(13, generator=g).to(dtype))] if bias else []
    return mats, dense


def _gram_error(basis):
    """||P^T P - I|| for a stored basis (P, m x r, or Q, r x n)."""
    P = basis if basis.shape[0] >= basis.shape[1] else basis.t()
    return (P.t() @ P - torch.eye(P.shape[1])).norm().item()


def _canon(basis, shape):
    """The stored basis of a matrix of ``shape`` in left form: P (m x r), or Q^T for m >= n."""
    return basis.t() if shape[0] >= shape[1] else basis


# ---------------------------------------------------------------------------------------------
# literal transcription of docs/methods/adarankgrad.md (left form; m >= n runs on the transpose)

def _lit_orth(Y):
    Q, R = torch.linalg.qr(Y)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)


class LiteralAdaRankGrad:
    def __init__(self, layer_id, r_max, *, lr, betas, eps, lam, alpha, eta_th, q, p, eps_rel,
                 beta_c, T_min, T_max, seed):
        self.layer_id, self.r_max = layer_id, r_max
        self.lr, (self.b1, self.b2), self.eps, self.lam, self.alpha = lr, betas, eps, lam, alpha
        self.eta_th, self.q, self.p = eta_th, q, p
        self.eps_rel, self.beta_c, self.T_min, self.T_max, self.seed = (eps_rel, beta_c, T_min,
                                                                       T_max, seed)
        self.t, self.j, self.refresh = 0, 0, False

    def ssrf(self, G, k):
        Omega = sketch_matrix(self.seed, self.layer_id, self.j + 1, G.shape[1], k)
        Qb = _lit_orth(G @ Omega)
        for _ in range(self.q):
            Z = _lit_orth(G.t() @ Qb)
            Qb = _lit_orth(G @ Z)
        return Qb

    def iass(self, G):
        k = min(self.r_max + self.p, G.shape[0], G.shape[1])
        Qb = self.ssrf(G, k)
        B = Qb.t() @ G
        E = (G * G).sum()
        c = torch.cumsum((B * B).sum(dim=1), 0)
        r = next((r for r in range(1, min(self.r_max, k) + 1) if c[r - 1] >= self.eta_th * E),
                 min(self.r_max, k))                                # linear scan
        return Qb[:, :r], r

    def step(self, W, G):
        right = W.shape[0] >= W.shape[1]
        W = W.t() if right else W
        G = (G.t() if right else G).float()
        self.t += 1
        t = self.t
        if t == 1 or self.refresh:
            P_new, r_new = self.iass(G)
            if self.j == 0:
                self.M = torch.zeros(r_new, G.shape[1])
                self.V = torch.zeros(r_new, G.shape[1])
            else:
                C = P_new.t() @ self.P
                self.M = C @ self.M
                self.V = (C * C) @ self.V
            self.P, self.r, self.j, self.t_j, self.refresh = P_new, r_new, self.j + 1, t, False
        Ghat = self.P.t() @ G
        z = Ghat.norm().item()
        self.M = self.b1 * self.M + (1 - self.b1) * Ghat
        self.V = self.b2 * self.V + (1 - self.b2) * Ghat ** 2
        N = (self.M / (1 - self.b1 ** t)) / (torch.sqrt(self.V / (1 - self.b2 ** t)) + self.eps)
        W.mul_(1 - self.lr * self.lam)
        W.sub_(self.lr * self.alpha * (self.P @ N))
        s = t - self.t_j + 1
        self.z_ema = z if s == 1 else self.beta_c * self.z_ema + (1 - self.beta_c) * z
        if s == self.T_min:
            self.z_ref = self.z_ema
        if (s > self.T_min and self.z_ema <= self.eps_rel * self.z_ref) or s >= self.T_max:
            self.refresh = True


def test_reference_matches_literal_pseudocode():
    """20 steps, both projection sides and a dense bias, crossing refreshes by the exit rule
    and by T_max, with rank changes 3 -> 6 -> 2 (an independent transcription of
    docs/methods/adarankgrad.md)."""
    mats, dense = _params()
    lit_W = [p.detach().clone() for p in mats]
    hp = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, scale=0.5, eta_th=0.9,
              proj_power_iters=1, proj_oversample=2, eps_rel=0.5, beta_c=0.5, t_min=2, t_max=6, seed=3)
    opt = AdaRankGrad([dict(params=mats, rank=8), dict(params=dense)], backend="reference", **hp)
    lits = [LiteralAdaRankGrad(i, 8, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                               lam=hp["weight_decay"], alpha=hp["scale"], eta_th=hp["eta_th"],
                               q=1, p=2, eps_rel=0.5, beta_c=0.5, T_min=2, T_max=6, seed=3)
            for i in range(2)]
    ranks, blocks = set(), []
    for t in range(20):
        for i, p in enumerate(mats + dense):
            p.grad = _switching_grad(p, t, i)
        grads = [p.grad.clone() for p in mats]
        opt.step()
        for i, (p, lit) in enumerate(zip(mats, lits)):
            lit.step(lit_W[i], grads[i])
            st = opt.state[p]
            assert (st["rank"], st["j"], st["t_j"]) == (lit.r, lit.j, lit.t_j), f"step {t + 1}"
            assert_parity(p, lit_W[i], rtol=1e-5, name=f"W {tuple(p.shape)} step {t + 1}")
            assert_parity(_canon(st["basis"], p.shape), lit.P, rtol=1e-5, name="P")
            ranks.add(st["rank"])
        blocks.append(opt.state[mats[0]]["j"])
    assert {2, 3, 6} <= ranks, ranks
    assert blocks[-1] >= 4


# ---------------------------------------------------------------------------------------------
# invariants of docs/conventions.md

def test_sketch_prefix_is_the_smaller_sketch():
    big = sketch_matrix(5, 2, 3, 50, 12)
    assert torch.equal(big[:, :4], sketch_matrix(5, 2, 3, 50, 4))
    assert not torch.equal(big, sketch_matrix(5, 2, 4, 50, 12))      # depends on the block
    assert not torch.equal(big, sketch_matrix(5, 3, 3, 50, 12))      # and on the layer


@pytest.mark.parametrize("q", [0, 1, 2])
def test_prefix_nesting_of_range_finder(q):
    """Invariant 7: span(SSRF(Omega)[:, :r]) == span(SSRF(Omega[:, :r]))."""
    G = planted(60, 90, [30.0 * 0.8 ** i for i in range(20)], noise=0.1, salt=q)
    rf = lookup("range_finder", "reference")
    omega = sketch_matrix(0, 0, 1, 90, 16)
    full = torch.empty(60, 16)
    rf(G, omega, full, power_iters=q)
    assert _gram_error(full) < 1e-5
    for r in (3, 7, 12):
        part = torch.empty(60, r)
        rf(G, omega[:, :r], part, power_iters=q)
        err = (full[:, :r] @ full[:, :r].t() - part @ part.t()).norm().item()
        assert err < 1e-4, (r, err)


def test_iass_prefix_basis_is_the_rank_r_ssrf():
    """The optimizer's selected P (r < k) is SSRF with k = r on Omega[:, :r], Omega being the
    sketch of (seed, parameter index, block): same columns (sign-canonical), every block."""
    shapes = [(48, 96), (96, 48)]
    Ws = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = AdaRankGrad([dict(params=Ws, rank=10)], eta_th=0.95, proj_power_iters=1, seed=9,
                      t_min=1, t_max=1, proj_oversample=3)
    for block in (1, 2, 3):
        for i, (W, (m, n)) in enumerate(zip(Ws, shapes)):
            W.grad = planted(m, n, [20.0, 19.0, 18.0, 17.0] + [0.2] * 20, salt=block + 5 * i)
        opt.step()
        for i, (W, shape) in enumerate(zip(Ws, shapes)):
            st = opt.state[W]
            P, r = _canon(st["basis"], shape), st["rank"]
            assert (r, st["j"], st["layer_id"]) == (4, block, i)
            Gc = W.grad if shape[0] < shape[1] else W.grad.t()
            direct = torch.empty(Gc.shape[0], r)
            lookup("range_finder", "reference")(Gc, sketch_matrix(9, i, block, Gc.shape[1], r),
                                                direct, power_iters=1)
            assert_parity(P, direct, rtol=1e-4, name=f"P block {block}")


def test_oversample_changes_ritz_but_not_prefix():
    """A consequence of invariant 7: prefix IASS selects ``Qb[:, :r]``, which does not depend on
    the sketch width, so oversampling changes nothing there; Ritz vectors use the whole sketch."""
    G = planted(60, 90, [10.0 * 0.85 ** i for i in range(40)], salt=8)
    bases = {}
    for mode in ("prefix", "ritz"):
        for p in (0, 6):
            W = torch.nn.Parameter(torch.randn(60, 90))
            W.grad = G.clone()
            opt = AdaRankGrad([dict(params=[W], rank=8)], eta_th=0.8, iass_mode=mode,
                              proj_oversample=p)
            opt.step()
            bases[mode, p] = opt.state[W]["basis"]
    assert bases["prefix", 0].shape == bases["prefix", 6].shape
    assert_parity(bases["prefix", 6], bases["prefix", 0], rtol=1e-4, name="prefix basis")
    a, b = bases["ritz", 0], bases["ritz", 6]
    assert a.shape != b.shape or (a - b).abs().max() > 1e-2
    # more sketch columns capture more energy per Ritz vector: rank never grows
    assert b.shape[1] <= a.shape[1]


@pytest.mark.parametrize("iass_mode", ["prefix", "ritz"])
def test_sign_canon_only_flips_columns(iass_mode):
    """sign_canon=True: diag(R) >= 0 in every QR (prefix) or the largest-magnitude entry of each
    Ritz vector positive; False keeps the library's signs. The bases differ by column signs."""
    G = planted(40, 70, [10.0 * 0.8 ** i for i in range(30)], salt=2)
    bases = []
    for canon in (True, False):
        W = torch.nn.Parameter(torch.randn(40, 70))
        W.grad = G.clone()
        opt = AdaRankGrad([dict(params=[W], rank=8)], eta_th=0.99, sign_canon=canon,
                          iass_mode=iass_mode)
        opt.step()
        bases.append(opt.state[W]["basis"])
    a, b = bases
    assert a.shape == b.shape and a.shape[1] >= 6
    signs = torch.sign((a * b).sum(0))
    assert_parity(b, a * signs, rtol=1e-4, name="basis up to signs")
    assert (signs < 0).any(), "library signs should differ from the canonical ones somewhere"
    if iass_mode == "ritz":
        idx = a.abs().argmax(dim=0)
        assert (a[idx, torch.arange(a.shape[1])] > 0).all()


def _run_with_checks(opt, params, grad_fn, steps):
    """Step ``steps`` times; after every refresh check orthonormality and the moment shapes."""
    seen = 0
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = grad_fn(p, t, i)
        before = {p: opt.state[p].get("j", 0) for p in params}
        opt.step()
        for p in params:
            st = opt.state[p]
            if "basis" in st and st["j"] != before[p]:
                seen += 1
                assert _gram_error(st["basis"]) < 1e-5, f"step {t + 1}"
                r = st["rank"]
                P = st["basis"]
                expect = (r, p.shape[1]) if P.shape[0] == p.shape[0] else (p.shape[0], r)
                assert tuple(st["exp_avg"].shape) == expect == tuple(st["exp_avg_sq"].shape)
                assert (st["exp_avg_sq"] >= 0).all()
                assert torch.isfinite(st["exp_avg"]).all()
    return seen


@pytest.mark.parametrize("iass_mode", ["prefix", "ritz"])
def test_orthonormal_after_every_refresh(iass_mode):
    mats, _ = _params(((40, 70), (70, 40), (32, 32)), bias=False)
    opt = AdaRankGrad([dict(params=mats, rank=8)], iass_mode=iass_mode, eta_th=0.9,
                      t_min=2, t_max=3, proj_oversample=3)
    kinds = [lambda p, t, i: _switching_grad(p, t, i),
             lambda p, t, i: torch.randn(p.shape),                            # full rank
             lambda p, t, i: planted(*p.shape, [5.0, 1.0], salt=t)]            # rank 2 < k
    n = sum(_run_with_checks(opt, mats, kinds[t % 3], 1) for t in range(21))
    assert n >= 15


def test_transport_formulas_and_V_nonnegative():
    """Invariant 9 and Block 2: across a refresh with r_new != r_old, the stored moments equal
    ``b1*C@M + (1-b1)*Ghat`` and ``b2*(C*C)@V + (1-b2)*Ghat^2`` with C = P_new^T P_old."""
    for v_transport in ("cc", "linear"):
        mats, _ = _params(bias=False)
        opt = AdaRankGrad([dict(params=mats, rank=8)], betas=(0.8, 0.9), eta_th=0.9, t_min=2,
                          t_max=6, v_transport=v_transport)
        changes = 0
        for t in range(16):
            for i, p in enumerate(mats):   # no pull: linear transport may make W NaN
                p.grad = _switching_grad(p, t, i, pull=0.0)
            old = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                   for p in mats}
            old_j = {p: opt.state[p].get("j", 0) for p in mats}
            opt.step()
            for p in mats:
                st = opt.state[p]
                if old_j[p] == 0 or st["j"] == old_j[p]:
                    continue
                Pn, Po = _canon(st["basis"], p.shape), _canon(old[p]["basis"], p.shape)
                right = p.shape[0] >= p.shape[1]
                tr = (lambda x: x.t()) if right else (lambda x: x)
                G = tr(p.grad)
                C = Pn.t() @ Po
                Ghat = Pn.t() @ G
                M = 0.8 * C @ tr(old[p]["exp_avg"]) + 0.2 * Ghat
                CV = (C * C) if v_transport == "cc" else C
                V = 0.9 * CV @ tr(old[p]["exp_avg_sq"]) + 0.1 * Ghat ** 2
                assert_parity(tr(st["exp_avg"]), M, rtol=1e-5, name="M")
                assert_parity(tr(st["exp_avg_sq"]), V, rtol=1e-5, name="V")
                if v_transport == "cc":
                    assert (st["exp_avg_sq"] >= 0).all()
                changes += Pn.shape[1] != Po.shape[1]
        assert changes >= 2


# ---------------------------------------------------------------------------------------------
# rank selection

@pytest.mark.parametrize("iass_mode", ["prefix", "ritz"])
@pytest.mark.parametrize("gap", [1, 2, 5, 7])
@pytest.mark.parametrize("shape", [(50, 80), (80, 50)])
def test_rank_at_the_planted_gap(gap, shape, iass_mode):
    sig = [10.0 * (1 - 0.03 * i) for i in range(gap)] + [0.05] * 30
    W = torch.nn.Parameter(torch.randn(shape))
    W.grad = planted(*shape, sig, salt=gap)
    opt = AdaRankGrad([dict(params=[W], rank=10)], eta_th=0.95, iass_mode=iass_mode)
    opt.step()
    assert opt.state[W]["rank"] == gap


def test_selected_rank_is_the_smallest_sufficient_one():
    """No gap (geometric spectrum): c_r >= eta*E > c_{r-1} for the returned prefix, and Ritz
    never needs more than prefix (it is the best rank-r choice within the same sketch)."""
    shape = (60, 90)
    G = planted(*shape, [10.0 * 0.85 ** i for i in range(40)], salt=4)
    got = {}
    for mode in ("prefix", "ritz"):
        for eta in (0.5, 0.8, 0.9, 0.97):
            W = torch.nn.Parameter(torch.randn(shape))
            W.grad = G.clone()
            opt = AdaRankGrad([dict(params=[W], rank=20)], eta_th=eta, iass_mode=mode)
            opt.step()
            P, r = opt.state[W]["basis"], opt.state[W]["rank"]
            E = G.square().sum()
            assert (P.t() @ G).square().sum() >= eta * E * (1 - 1e-5)
            assert (P[:, :r - 1].t() @ G).square().sum() < eta * E
            got[mode, eta] = r
    assert all(got["ritz", e] <= got["prefix", e] for e in (0.5, 0.8, 0.9, 0.97))
    assert got["prefix", 0.5] < got["prefix", 0.97]


def test_binary_search_matches_linear_scan():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        k = int(torch.randint(1, 12, (1,), generator=g))
        c = torch.cumsum(torch.rand(k, generator=g), 0).tolist()
        target = float(torch.rand(1, generator=g)) * c[-1] * 1.2
        r_hi = int(torch.randint(1, k + 1, (1,), generator=g))
        want = next((r for r in range(1, r_hi + 1) if c[r - 1] >= target), r_hi)
        assert smallest_sufficient_rank(c, target, r_hi) == want


# ---------------------------------------------------------------------------------------------
# exit rules

def _trace_blocks(opt, W, grads):
    starts = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        starts.append(opt.state[W]["t_j"])
    return starts


def test_stationary_gradient_refreshes_only_at_t_max():
    W = torch.nn.Parameter(torch.randn(30, 50))
    G = planted(30, 50, [9.0, 7.0, 5.0], salt=1)
    opt = AdaRankGrad([dict(params=[W], rank=6)], lr=0.0, t_min=2, t_max=5)
    starts = _trace_blocks(opt, W, [G] * 17)
    assert sorted(set(starts)) == [1, 6, 11, 16]


def test_subspace_switch_triggers_refresh_after_t_min():
    """The gradient moves to another subspace at step 8: with beta_c = 0 the exit test fires
    at once (refresh at step 9); with the default EMA it fires later, but before T_max."""
    W = torch.nn.Parameter(torch.randn(60, 90))
    A = planted(60, 90, [9.0, 7.0, 5.0], salt=1)
    B = planted(60, 90, [9.0, 7.0, 5.0], salt=2)
    grads = [A] * 7 + [B] * 30
    opt = AdaRankGrad([dict(params=[W], rank=6)], lr=0.0, beta_c=0.0, t_min=3, t_max=100)
    starts = _trace_blocks(opt, W, grads)
    assert starts[7] == 1 and starts[8] == 9 and starts[-1] == 9
    opt = AdaRankGrad([dict(params=[W], rank=6)], lr=0.0, t_min=3, t_max=100)
    starts = _trace_blocks(opt, W, grads)
    first = next(i + 1 for i, s in enumerate(starts) if s > 1)
    # replay the rule: z = ||A|| for 7 steps, then ||U_A^T B|| (A's subspace, B's gradient)
    U_A = torch.linalg.svd(A)[0][:, :3]
    z_a, z_b = A.norm().item(), (U_A.t() @ B).norm().item()
    ema, s = z_a, 1
    while not (s > 3 and ema <= 0.5 * z_a):
        s += 1
        ema = 0.9 * ema + 0.1 * (z_a if s <= 7 else z_b)
    assert first == s + 1 and 10 < first < 30 and starts[-1] == first
    assert _canon(opt.state[W]["basis"], W.shape).shape[1] == 3


def test_absolute_exit_rule():
    """eps_j = eps_0/j with no T_min/T_max: with ||Ghat|| = z constant and eps_0 = 2.5 z,
    blocks 1 and 2 end at once (z <= 2.5z, z <= 1.25z) and block 3 never (z > 0.83z)."""
    W = torch.nn.Parameter(torch.randn(30, 50))
    G = planted(30, 50, [9.0, 7.0, 5.0], salt=1)
    z = G.norm().item()
    opt = AdaRankGrad([dict(params=[W], rank=6)], lr=0.0, exit_rule="absolute", eps_0=2.5 * z,
                      t_max=1)   # t_max has no effect on the absolute rule
    starts = _trace_blocks(opt, W, [G] * 12)
    assert starts[:4] == [1, 2, 3, 3] and starts[-1] == 3
    assert opt.state[W]["j"] == 3


# ---------------------------------------------------------------------------------------------
# zero and rank-deficient gradients

def test_zero_gradient_first_step_only_decays():
    W = torch.nn.Parameter(torch.randn(30, 50))
    W0 = W.detach().clone()
    opt = AdaRankGrad([dict(params=[W], rank=6)], lr=0.1, weight_decay=0.5)
    W.grad = torch.zeros_like(W)
    opt.step()
    assert torch.equal(W.detach(), W0 * (1 - 0.1 * 0.5))
    st = opt.state[W]
    assert "basis" not in st and st["refresh"] and st["j"] == 0 and st["step"] == 1
    W.grad = planted(30, 50, [9.0, 7.0], salt=3)
    opt.step()
    assert st["j"] == 1 and st["t_j"] == 2 and st["rank"] == 2
    assert torch.isfinite(W).all() and _gram_error(st["basis"]) < 1e-5


def test_zero_gradient_at_a_refresh_keeps_the_subspace():
    W = torch.nn.Parameter(torch.randn(50, 30))        # right-projected
    opt = AdaRankGrad([dict(params=[W], rank=6)], lr=1e-2, t_min=1, t_max=3)
    for t in range(3):
        W.grad = _switching_grad(W, t, 0)
        opt.step()
    st = opt.state[W]
    assert st["refresh"]
    P, M, j = st["basis"].clone(), st["exp_avg"].clone(), st["j"]
    z_ema = st["z_ema"]
    W.grad = torch.zeros_like(W)
    opt.step()
    assert torch.equal(st["basis"], P) and st["j"] == j and st["refresh"]
    assert st["z_ema"] == z_ema                            # exit test skipped
    assert_parity(st["exp_avg"], 0.9 * M, rtol=1e-6, name="M decays")
    assert torch.isfinite(W).all()
    W.grad = _switching_grad(W, 4, 0)
    opt.step()
    assert st["j"] == j + 1 and not st["refresh"] and st["t_j"] == 5


def test_rank_deficient_sketch():
    """rank(G) = 2 < k = 10: the sketch basis is completed to k orthonormal columns, IASS
    picks r <= 2, and nothing is NaN."""
    for shape in ((40, 70), (70, 40)):
        W = torch.nn.Parameter(torch.randn(shape))
        opt = AdaRankGrad([dict(params=[W], rank=8)], proj_oversample=2, eta_th=0.999, t_max=2)
        for t in range(5):
            W.grad = planted(*shape, [3.0, 1.0], salt=t % 2)
            opt.step()
            st = opt.state[W]
            assert st["rank"] <= 2 and _gram_error(st["basis"]) < 1e-5
            assert torch.isfinite(W).all() and torch.isfinite(st["exp_avg_sq"]).all()


def test_range_finder_on_zero_and_deficient_inputs_is_orthonormal_and_seeded():
    rf = lookup("range_finder", "reference")
    omega = sketch_matrix(0, 0, 1, 70, 8)
    for G in (torch.zeros(40, 70), planted(40, 70, [2.0, 1.0, 0.5])):
        a, b, c = torch.empty(40, 8), torch.empty(40, 8), torch.empty(40, 8)
        rf(G, omega, a, power_iters=1, fill_seed=5)
        rf(G, omega, b, power_iters=1, fill_seed=5)
        rf(G, omega, c, power_iters=1, fill_seed=6)
        assert _gram_error(a) < 1e-5 and torch.equal(a, b) and not torch.equal(a, c)


def test_nonfinite_gradient_at_refresh_raises_before_mutating():
    W = torch.nn.Parameter(torch.randn(30, 50))
    opt = AdaRankGrad([dict(params=[W], rank=6)])
    W.grad = torch.full_like(W, float("nan"))
    W0 = W.detach().clone()
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(W, W0) and "basis" not in opt.state[W]


# ---------------------------------------------------------------------------------------------
# full-rank limits

def test_size_guard_gives_torch_adamw():
    """rank >= min(m, n) (the size guard) and groups without rank: torch AdamW (E-torch,
    WD-pre)."""
    ps = [torch.nn.Parameter(torch.randn(6, 30)), torch.nn.Parameter(torch.randn(9))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = AdaRankGrad([dict(params=ps[:1], rank=6), dict(params=ps[1:])], lr=1e-2,
                    betas=(0.8, 0.95), weight_decay=0.1)
    b = torch.optim.AdamW(qs, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, eps=1e-8,
                          foreach=False)
    for _ in range(6):
        for p, q in zip(ps, qs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        assert_parity(p, q, rtol=1e-6, name="W")
    assert "basis" not in a.state[ps[0]]


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (24, 24)])
def test_full_rank_moments_are_rotated_adam_moments(shape):
    """size_guard=False, rank = min(m, n), eta_th = 1: P is square orthogonal, so across every
    refresh (C orthogonal) P @ M equals dense Adam's m, and the column sums of V (over the r
    index, C*C being doubly stochastic) equal those of dense Adam's v."""
    m, n = shape
    W = torch.nn.Parameter(torch.randn(shape))
    opt = AdaRankGrad([dict(params=[W], rank=min(shape))], size_guard=False, eta_th=1.0,
                      t_min=1, t_max=2, betas=(0.8, 0.9))
    right = m >= n
    tr = (lambda x: x.t()) if right else (lambda x: x)
    dm = torch.zeros(tr(W).shape)
    dv = torch.zeros(tr(W).shape)
    g = torch.Generator().manual_seed(2)
    for t in range(9):
        W.grad = torch.randn(shape, generator=g)
        opt.step()
        G = tr(W.grad)
        dm = 0.8 * dm + 0.2 * G
        dv = 0.9 * dv + 0.1 * G * G
        st = opt.state[W]
        assert st["rank"] == min(shape)
        P = _canon(st["basis"], shape)
        assert_parity(P @ tr(st["exp_avg"]), dm, rtol=1e-5, name="P @ M")
        assert_parity(tr(st["exp_avg_sq"]).sum(0), dv.sum(0), rtol=1e-5, name="colsum V")
    assert st["j"] == 5


# ---------------------------------------------------------------------------------------------
# checkpoints, determinism, backends

def _ckpt_run(steps, start=0, opt_state=None, params=None):
    mats, dense = params if params is not None else _params(dtype=torch.bfloat16)
    opt = AdaRankGrad([dict(params=mats, rank=8), dict(params=dense)], lr=1e-2,
                      weight_decay=0.01, eta_th=0.9, t_min=2, t_max=5, proj_oversample=1)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    hist = []
    for t in range(start, steps):
        for i, p in enumerate(mats + dense):
            p.grad = _switching_grad(p, t, i)
        opt.step()
        hist.append(opt.state[mats[0]]["rank"])
    return mats + dense, opt, hist


def test_state_dict_round_trip_continues_bit_identically(tmp_path):
    full, _, hist = _ckpt_run(17)
    part, opt, _ = _ckpt_run(5)
    assert opt.state[part[0]]["refresh"], "the checkpoint is taken with a refresh pending"
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in part]}, path)
    ckpt = torch.load(path, weights_only=True)
    mats, dense = _params(dtype=torch.bfloat16)
    for p, saved in zip(mats + dense, ckpt["params"]):
        p.data.copy_(saved)
    resumed, opt2, _ = _ckpt_run(17, start=5, opt_state=ckpt["opt"], params=(mats, dense))
    assert opt2.state[mats[0]]["exp_avg"].dtype == torch.float32
    assert len(set(hist[5:])) >= 2, "the resumed stretch must change rank"
    for p, q in zip(resumed, full):
        assert torch.equal(p, q), f"resumed run diverged for {tuple(p.shape)}"


def test_seed_makes_runs_reproducible_and_distinct():
    Ws = []
    for seed in (0, 0, 1):
        W = torch.nn.Parameter(torch.ones(30, 50))
        opt = AdaRankGrad([dict(params=[W], rank=6)], seed=seed, lr=1e-2, eta_th=0.99)
        for t in range(3):
            W.grad = _switching_grad(W, t, 0)
            opt.step()
        Ws.append(opt.state[W]["basis"])
    assert torch.equal(Ws[0], Ws[1]) and not torch.equal(Ws[0], Ws[2])


def test_backends():
    """Every op AdaRankGrad needs has a Triton implementation (IASS: kernels/iass_select.py),
    so ``backend="triton"`` constructs; ``auto`` picks Triton wherever it runs; the
    extension's backends lack the low-rank ops and are refused at construction."""
    from lowrank_fused.dispatch import available, lookup

    W = torch.nn.Parameter(torch.randn(30, 50))
    with pytest.raises(BackendUnavailable):
        AdaRankGrad([dict(params=[W], rank=6)], backend="cpu")
    opt = AdaRankGrad([dict(params=[W], rank=6)])
    chosen = opt._backend_for(opt.param_groups[0], W)
    fused = available("triton", W.device)
    for op in ("iass_select", "range_finder", "project"):
        assert (lookup(op, chosen) is lookup(op, "triton")) == fused, op
    if fused:
        AdaRankGrad([dict(params=[W], rank=6)], backend="triton")


@pytest.mark.parametrize("iass_mode", ["prefix", "ritz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_matches_reference(iass_mode, dtype):
    """``backend="triton"`` over steps that change the subspace and its rank (both
    orientations and a dense parameter): the same ranks, and weights matching the reference
    backend (fp32: 1e-5; bf16 weights: the trajectory budget 2e-2)."""
    from lowrank_fused.dispatch import available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not available("triton", device):
        pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)")
    runs, ranks = [], []
    for backend in ("reference", "triton"):
        mats, dense = _params(dtype=dtype)
        params = [p.to(device).detach().requires_grad_() for p in mats + dense]
        opt = AdaRankGrad([dict(params=params[:2], rank=8), dict(params=params[2:])],
                          lr=1e-2, eta_th=0.9, t_min=2, t_max=4, iass_mode=iass_mode,
                          backend=backend)
        hist = []
        for t in range(10):
            for i, p in enumerate(params):
                p.grad = _switching_grad(p.detach().cpu(), t, i).to(device)
            opt.step()
            hist.append(tuple(opt.state[p]["rank"] for p in params[:2]))
        runs.append(params)
        ranks.append(hist)
    assert ranks[0] == ranks[1]
    assert len(set(ranks[0])) > 1, "the run must change rank"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (f, r) in enumerate(zip(runs[1], runs[0])):
        assert_parity(f, r, rtol=tol, name=f"param {i}")


def test_conv_weight_is_flattened():
    w = torch.nn.Parameter(torch.randn(24, 5, 3, 3))
    opt = AdaRankGrad([dict(params=[w], rank=4)], eta_th=1.0)
    for t in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state[w]["exp_avg"].shape == (4, 45)


# ---------------------------------------------------------------------------------------------
# a tiny model

def test_tiny_mlp_trains_and_saves_state():
    torch.manual_seed(0)
    d_in, d_h, d_out = 64, 256, 64
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.Tanh(),
                                  torch.nn.Linear(16, d_out))
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_h), torch.nn.ReLU(),
                                torch.nn.Linear(d_h, d_out))
    weights = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    opt = AdaRankGrad([dict(params=weights, rank=8), dict(params=others)], lr=3e-3,
                      t_min=5, t_max=25)
    X = torch.randn(512, d_in)
    with torch.no_grad():
        Y = teacher(X)
    losses = []
    for t in range(100):
        idx = torch.arange(64) + 64 * (t % 8)
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8]), (losses[:8], losses[-8:])
    assert max(opt.state[w]["j"] for w in weights) >= 4          # the subspaces moved
    lowrank = 0
    for w in weights:
        st = opt.state[w]
        r = st["rank"]
        m, n = w.shape
        lowrank += 4 * (r * n + 2 * r * m) if m >= n else 4 * (m * r + 2 * r * n)
    dense = sum(2 * 4 * p.numel() for p in others)
    assert opt.state_bytes() == lowrank + dense
    adamw = sum(2 * 4 * p.numel() for p in model.parameters())
    assert opt.state_bytes() < adamw / 6


# ---------------------------------------------------------------------------------------------
# flags and errors

@pytest.mark.parametrize("flags", [
    dict(iass_mode="ritz"), dict(exit_rule="absolute", eps_0=50.0), dict(v_transport="linear"),
    dict(sign_canon=False), dict(proj_power_iters=0), dict(proj_power_iters=2), dict(proj_oversample=4),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_every_flag_alternative_runs(flags):
    mats, dense = _params()
    opt = AdaRankGrad([dict(params=mats, rank=8), dict(params=dense)], lr=1e-2, eta_th=0.9,
                      t_min=2, t_max=4, **flags)
    if flags.get("v_transport") == "linear":
        # V <- C @ V can turn V negative and the step NaN (documented): it must run, on
        # gradients that do not depend on W
        for t in range(12):
            for i, p in enumerate(mats + dense):
                p.grad = _switching_grad(p, t, i, pull=0.0)
            opt.step()
        assert sum(opt.state[p]["j"] for p in mats) >= 4
        return
    assert _run_with_checks(opt, mats + dense, _switching_grad, 12) >= 4
    assert all(torch.isfinite(p).all() for p in mats + dense)


BAD = [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"), (dict(betas=0.9), "betas"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(scale=float("nan")), "scale"), (dict(eta_th=0.0), "eta_th"),
    (dict(eta_th=1.5), "eta_th"), (dict(proj_power_iters=-1), "proj_power_iters"),
    (dict(proj_power_iters=1.5), "proj_power_iters"), (dict(proj_oversample=-2), "proj_oversample"),
    (dict(iass_mode="svd"), "iass_mode"), (dict(exit_rule="fixed"), "exit_rule"),
    (dict(eps_rel=-0.5), "eps_rel"), (dict(beta_c=1.0), "beta_c"), (dict(t_min=0), "t_min"),
    (dict(t_max=0), "t_max"), (dict(t_max=2.5), "t_max"),
    (dict(exit_rule="absolute"), "eps_0"), (dict(eps_0=-1.0), "eps_0"),
    (dict(v_transport="C@V"), "v_transport"), (dict(seed="x"), "seed"),
    (dict(size_guard="yes"), "size_guard"), (dict(sign_canon=None), "sign_canon"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[n.replace("\\", "") for _, n in BAD])
def test_bad_hyperparameters_raise_naming_them(kw, name):
    W = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(ValueError, match=name):
        AdaRankGrad([dict(params=[W], rank=2)], **kw)


@pytest.mark.parametrize("rank", [0, 2.5, True])
def test_bad_rank_raises(rank):
    W = torch.nn.Parameter(torch.randn(8, 12))
    with pytest.raises(ValueError, match="rank"):
        AdaRankGrad([dict(params=[W], rank=rank)])


def test_bad_group_value_leaves_everything_untouched():
    """A hyperparameter broken after construction (e.g. by a scheduler) in the *last* group
    raises before any parameter or state of any group changes."""
    mats, dense = _params()
    opt = AdaRankGrad([dict(params=mats, rank=8), dict(params=dense)], t_max=2)
    for t in range(2):
        for i, p in enumerate(mats + dense):
            p.grad = _switching_grad(p, t, i)
        opt.step()
    before = [p.detach().clone() for p in mats + dense]
    states = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
              for p in mats + dense}
    opt.param_groups[1]["eta_th"] = 2.0
    with pytest.raises(ValueError, match="eta_th"):
        opt.step()
    for p, b in zip(mats + dense, before):
        assert torch.equal(p, b)
        for k, v in states[p].items():
            now = opt.state[p][k]
            assert torch.equal(now, v) if torch.is_tensor(v) else now == v, k
