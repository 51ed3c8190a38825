"""AdaMeM (docs/methods/adamem.md): a literal transcription of its update rule, the invariants of
docs/conventions.md (orthonormal basis, Claim 3.1 orthogonality and its converse, the residual
identity), the full-rank limits, every flag, checkpoint resume, routing, a tiny model, and argument
errors."""
import io
import math

import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.optim.adamem import AdaMeM, adamem_param_groups
from lowrank_fused.reference.residual_col_stats import residual_col_sumsq
from lowrank_fused.testing import assert_parity


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ref(op):
    return lookup(op, "reference")


# ---------------------------------------------------------------------------------------------
# An independent transcription of docs/methods/adamem.md, in float64, one tensor at a time.

def _literal_basis(G, r):
    """Top-r left singular vectors, largest-|.| entry of each made positive
    (docs/conventions.md)."""
    U = torch.linalg.svd(G, full_matrices=False)[0][:, :r]
    top = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
    return U * torch.sign(top)


class LiteralAdaMeM:
    """The update rule of docs/methods/adamem.md for one matrix; m > n runs everything on the
    transpose."""

    def __init__(self, rank, T, lr, beta1, beta2, eps, eps1, lam, delta, v_source="momentum",
                 transport_on_refresh=False, bias_correction=True):
        self.__dict__.update(locals())
        self.t, self.P = 0, None

    def step(self, W, grad):
        transposed = W.shape[0] > W.shape[1]
        W, G = (W.T, grad.T) if transposed else (W, grad)
        b1, b2 = self.beta1, self.beta2
        if self.P is None:
            self.M = torch.zeros(self.rank, G.shape[1], dtype=G.dtype)
            self.a_row = torch.zeros(self.rank, dtype=G.dtype)
            self.a_col = torch.zeros(G.shape[1], dtype=G.dtype)
            self.c_os = torch.zeros(G.shape[1], dtype=G.dtype)
        self.t += 1                                                        # 1
        t = self.t
        if (t - 1) % self.T == 0:                                          # 2
            P_new = _literal_basis(G, self.rank)
            if self.transport_on_refresh and self.P is not None:
                C = P_new.T @ self.P
                self.M = C @ self.M
                self.a_row = (C * C) @ self.a_row
            self.P = P_new
        P = self.P
        R = P.T @ G                                                        # 3
        S = G - P @ R                                                      # 4
        self.M = b1 * self.M + (1 - b1) * R                                # 5
        bc1, bc2 = (1 - b1 ** t, 1 - b2 ** t) if self.bias_correction else (1.0, 1.0)
        Mhat = self.M / bc1                                                # 6
        X = Mhat if self.v_source == "momentum" else R
        self.a_row = b2 * self.a_row + (1 - b2) * (X ** 2 + self.eps1).mean(dim=1)
        self.a_col = b2 * self.a_col + (1 - b2) * (X ** 2 + self.eps1).mean(dim=0)
        Vhat1 = torch.outer(self.a_row, self.a_col) / self.a_row.mean() / bc2
        N1 = Mhat / (torch.sqrt(Vhat1) + self.eps)
        self.c_os = b2 * self.c_os + (1 - b2) * (S ** 2 + self.eps1).mean(dim=0)   # 7
        N2 = S / (torch.sqrt(self.c_os / bc2)[None, :] + self.eps)
        W = W * (1 - self.lr * self.lam)                                   # 8
        W = W - self.lr * (P @ N1 + self.delta * N2)                       # 9
        return W.T if transposed else W


class LiteralAdafactor:
    """Routing (docs/methods/adamem.md): Adafactor with fixed beta2 and bias correction, no
    momentum, no clipping, no relative step; factored for matrices, unfactored for vectors."""

    def __init__(self, lr, beta2, eps, eps1, lam, bias_correction=True):
        self.__dict__.update(locals())
        self.t = 0

    def step(self, W, G):
        b2 = self.beta2
        self.t += 1
        bc2 = 1 - b2 ** self.t if self.bias_correction else 1.0
        q = G ** 2 + self.eps1
        if G.dim() == 2:
            if self.t == 1:
                self.row, self.col = torch.zeros_like(q[:, 0]), torch.zeros_like(q[0])
            self.row = b2 * self.row + (1 - b2) * q.mean(dim=1)
            self.col = b2 * self.col + (1 - b2) * q.mean(dim=0)
            Vhat = torch.outer(self.row, self.col) / self.row.mean() / bc2
        else:
            if self.t == 1:
                self.v = torch.zeros_like(q)
            self.v = b2 * self.v + (1 - b2) * q
            Vhat = self.v / bc2
        return W * (1 - self.lr * self.lam) - self.lr * G / (torch.sqrt(Vhat) + self.eps)


# ---------------------------------------------------------------------------------------------

LOW_RANK_SHAPES = ((40, 70), (70, 40), (48, 48))


def _params(dtype=torch.float32, shapes=LOW_RANK_SHAPES, seed=7):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(30, 20, generator=g).to(dtype)),
             torch.nn.Parameter(torch.randn(13, generator=g).to(dtype))]
    return mats, dense


def _trend(shape, salt):
    """A planted low-rank component with well-separated singular values, so the top-r
    subspace is well conditioned and two implementations pick the same basis."""
    g = torch.Generator().manual_seed(99 + salt)
    m, n = shape[0], math.prod(shape[1:])
    k = min(m, n, 12)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    sigma = 200.0 * 0.8 ** torch.arange(k, dtype=torch.float32)
    return ((U * sigma) @ V.t()).reshape(shape)


def _grad_like(p, t, salt):
    """A W-dependent pull, a planted low-rank trend (matrices) and fresh noise."""
    g = torch.Generator().manual_seed(1000 * t + salt)
    noise = torch.randn(p.shape, generator=g)
    trend = _trend(p.shape, salt) if p.dim() >= 2 else 0.0
    return (0.5 * p.detach().float() + trend + noise).to(p.dtype)


HYPER = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, eps1=1e-30, weight_decay=0.1, delta=0.5)
LITERAL_CASES = {
    "defaults": {},
    "v_source=gradient": dict(v_source="gradient"),
    "transport_on_refresh": dict(transport_on_refresh=True),
    "no_bias_correction": dict(bias_correction=False),
    "residual_form=explicit": dict(residual_form="explicit"),
    "large_eps": dict(eps=0.3, eps1=0.5),
    "all_alternatives": dict(v_source="gradient", transport_on_refresh=True,
                             bias_correction=False, residual_form="explicit", betas=(0.8, 0.9)),
}


def _literal_run(flags, steps, rank=5, T=4):
    h = {**HYPER, **flags}
    mats, dense = _params(torch.float64)
    lit_kw = dict(lr=h["lr"], beta2=h["betas"][1], eps=h["eps"], eps1=h["eps1"],
                  lam=h["weight_decay"], bias_correction=h.get("bias_correction", True))
    lits = [LiteralAdaMeM(rank, T, beta1=h["betas"][0], delta=h["delta"],
                          v_source=h.get("v_source", "momentum"),
                          transport_on_refresh=h.get("transport_on_refresh", False), **lit_kw)
            for _ in mats] + [LiteralAdafactor(**lit_kw) for _ in dense]
    Ws = [p.detach().clone() for p in mats + dense]
    for t in range(steps):
        for i, lit in enumerate(lits):
            Ws[i] = lit.step(Ws[i], _grad_like(Ws[i].float(), t, i).double())
    return Ws, lits


@pytest.mark.parametrize("case", list(LITERAL_CASES))
def test_matches_literal_transcription(case):
    """12 steps crossing the refreshes at t = 5 and 9, both orientations and a square matrix,
    plus the Adafactor-routed matrix and vector, against the float64 transcription."""
    flags = LITERAL_CASES[case]
    steps = 12
    mats, dense = _params()
    start = [p.detach().clone() for p in mats + dense]
    opt = AdaMeM([dict(params=mats, rank=5), dict(params=dense)], update_proj_gap=4,
                 backend="reference", **{**HYPER, **flags})
    for t in range(steps):
        for i, p in enumerate(mats + dense):
            p.grad = _grad_like(p, t, i)
        opt.step()
    lit_W, lits = _literal_run(flags, steps)
    for p, w0, q in zip(mats + dense, start, lit_W):
        assert_parity(p - w0, (q - w0).float(), rtol=1e-5, name=f"update {tuple(p.shape)}")
    for p, lit in zip(mats, lits):
        st = opt.state[p]
        assert st["step"] == steps
        assert_parity(st["M"], lit.M.float(), rtol=1e-5, name="M")
        assert_parity(st["c_os"], lit.c_os.float(), rtol=1e-5, name="c_os")
        assert_parity(st["a_row"], lit.a_row.float(), rtol=1e-5, name="a_row")
        assert st["basis"].shape == (min(p.shape), 5) and st["c_os"].shape == (max(p.shape),)
        assert st["M"].shape == (5, max(p.shape))          # canonical (transposed) layout
    if case not in ("defaults", "residual_form=explicit"):
        # the flag must matter: the transcription with the flag differs from the default one
        default_W, _ = _literal_run({}, steps)
        assert max((a - b).abs().max().item() for a, b in zip(lit_W[:3], default_W[:3])) > 1e-3


# ---------------------------------------------------------------------------------------------
# invariants of docs/conventions.md

def _orthonormal(m, r, g):
    return torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))[0].float()


def _hetero_grad(m, n, g):
    """Rows and columns with very different scales, as real gradients have."""
    return (torch.randn(m, 1, generator=g).exp() * torch.randn(m, n, generator=g)
            * torch.randn(1, n, generator=g).exp())


def _preconditioned_parts(G, P, M, a_row, a_col, c_os, t=3, v_source="momentum"):
    """``P @ N1`` and ``N2`` through the optimizer's reference ops (fp32)."""
    R = P.t() @ G
    N1 = torch.empty_like(M)
    c1, c2 = 1 - 0.9 ** t, 1 - 0.95 ** t
    _ref("adamem_moments")(R, M, a_row, a_col, N1, beta1=0.9, beta2=0.95, eps=1e-8,
                           eps1=1e-30, c1=c1, c2=c2, stats_from_momentum=v_source == "momentum")
    col_scale = torch.empty_like(c_os)
    _ref("residual_col_stats")(G, P, R, c_os, col_scale, beta2=0.95, eps1=1e-30, eps=1e-8, c2=c2)
    S = G - P @ R
    return P @ N1, S * col_scale[None, :], S


def _cos(A, B):
    A, B = A.double(), B.double()
    return ((A * B).sum() / (A.norm() * B.norm())).abs().item()


@pytest.mark.parametrize("shape,rank", [((64, 128), 8), ((33, 97), 5), ((50, 50), 20)])
@pytest.mark.parametrize("v_source", ["momentum", "gradient"])
def test_claim_3_1_orthogonality_and_its_converse(shape, rank, v_source):
    """Invariant 2: <P N1, N2>_F ~ 0 (< 1e-6 relative in fp32). Converse (the
    design choice of docs/methods/adamem.md): per-row one-sided statistics would break it."""
    m, n = shape
    g = torch.Generator().manual_seed(m * n + rank)
    G = _hetero_grad(m, n, g)
    P = _orthonormal(m, rank, g)
    M = torch.randn(rank, n, generator=g)
    a_row, a_col = torch.rand(rank, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    c_os = torch.rand(n, generator=g) + 0.1
    A, B, S = _preconditioned_parts(G, P, M, a_row, a_col, c_os, v_source=v_source)
    assert A.norm() > 0 and B.norm() > 0
    assert _cos(A, B) < 1e-6
    B_row = S / torch.sqrt((S * S).mean(dim=1, keepdim=True) + 1e-30)
    assert _cos(A, B_row) > 1e-2, "per-row statistics should break the orthogonality"


@pytest.mark.parametrize("shape,rank", [((48, 96), 6), ((64, 200), 4), ((96, 48), 6)])
def test_claim_3_1_with_the_optimizers_own_basis_and_states(shape, rank):
    """Invariant 2 on states taken from runs: the optimizer's SVD basis P, momentum and
    statistics, with gradients dominated by their low-rank part (|R| >> |S|, where any
    non-orthonormality of P shows most: a raw fp32 SVD basis reaches ~1.4e-6 here)."""
    worst = 0.0
    for seed in range(8):
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
        opt = AdaMeM([dict(params=[w], rank=rank)], update_proj_gap=3, backend="reference")
        for t in range(7):
            w.grad = _grad_like(w, t, seed)
            opt.step()
        st = {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)}
        G = _grad_like(w, 7, seed).float()
        G = G.t() if shape[0] > shape[1] else G                 # canonical form
        A, B, _ = _preconditioned_parts(G, st["basis"], st["M"], st["a_row"], st["a_col"],
                                        st["c_os"], t=8)
        worst = max(worst, _cos(A, B))
    assert worst < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_identity(dtype):
    """Invariant 3: colsum((G - P P^T G)^2) == colsum(G^2) - colsum((P^T G)^2); the op's
    identity form (no residual formed) matches its explicit form and the float64 truth."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 57, 131, 7
    G = _hetero_grad(m, n, g).to(dtype)
    P64 = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))[0]
    G64 = G.double()
    truth = ((G64 - P64 @ (P64.t() @ G64)) ** 2).sum(dim=0)
    assert_parity(((G64 ** 2).sum(0) - ((P64.t() @ G64) ** 2).sum(0)), truth, rtol=1e-12,
                  name="identity (float64)")
    P = P64.float()
    R = P.t() @ G.float()
    identity = residual_col_sumsq(G, P, R, explicit=False)
    explicit = residual_col_sumsq(G, P, R, explicit=True)
    assert_parity(identity, truth, rtol=1e-5, name="identity form")
    assert_parity(explicit, truth, rtol=1e-5, name="explicit form")
    # and through the op: same c_os and column scales from both forms
    outs = []
    for form in (False, True):
        c_os, scale = torch.rand(n, generator=torch.Generator().manual_seed(1)), torch.empty(n)
        _ref("residual_col_stats")(G, P, R, c_os, scale, beta2=0.95, eps1=1e-30, eps=1e-8,
                                   c2=0.0975, explicit=form)
        outs.append((c_os, scale))
    assert_parity(outs[0][0], outs[1][0], rtol=1e-5, name="c_os")
    assert_parity(outs[0][1], outs[1][1], rtol=1e-5, name="col_scale")


def test_residual_identity_clamps_cancellation():
    """A gradient inside span(P): the identity's cancellation must not go negative (no NaN)."""
    g = torch.Generator().manual_seed(4)
    P = _orthonormal(40, 6, g)
    G = P @ torch.randn(6, 90, generator=g) * 100.0
    R = P.t() @ G
    sumsq = residual_col_sumsq(G, P, R)
    assert (sumsq >= 0).all() and sumsq.max() < 1e-3 * (G * G).sum(0).max()
    c_os, scale = torch.zeros(90), torch.empty(90)
    _ref("residual_col_stats")(G, P, R, c_os, scale, beta2=0.95, eps1=1e-30, eps=1e-8, c2=0.05)
    assert torch.isfinite(c_os).all() and torch.isfinite(scale).all() and (c_os > 0).all()


@pytest.mark.parametrize("shape", [(40, 70), (70, 40)])
def test_basis_is_orthonormal_after_every_refresh(shape):
    """Invariant 1, and the refresh schedule t = 1, T+1, 2T+1 (P changes only there)."""
    w = torch.nn.Parameter(torch.randn(shape))
    opt = AdaMeM([dict(params=[w], rank=5)], update_proj_gap=3, backend="reference")
    bases = []
    for t in range(7):
        w.grad = torch.randn(shape) + _trend(shape, t)     # a new dominant subspace each step
        opt.step()
        P = opt.state[w]["basis"]
        assert P.shape == (min(shape), 5)
        assert torch.linalg.norm(P.t() @ P - torch.eye(5)) < 1e-5
        bases.append(P.clone())
    changed = [not torch.equal(a, b) for a, b in zip(bases, bases[1:])]
    assert changed == [False, False, True, False, False, True]   # refreshes at t = 4 and 7


def test_tall_matrix_runs_on_its_transpose():
    """m > n: P holds top right singular vectors (n x r), R = G P (m x r) and the one-sided
    statistics are per row of G (an m-vector averaged over n), written in the right form."""
    m, n, r = 70, 40, 5
    w = torch.nn.Parameter(torch.randn(m, n))
    w0 = w.detach().clone()
    G = _grad_like(w, 0, 1)
    w.grad = G
    opt = AdaMeM([dict(params=[w], rank=r)], lr=0.1, weight_decay=0.0, backend="reference")
    opt.step()
    st = opt.state[w]
    Q = st["basis"]
    Vr = torch.linalg.svd(G.double())[2][:r].t()
    assert_parity(Q.double() @ Q.double().t(), Vr @ Vr.t(), rtol=1e-5, name="right basis")
    R = G @ Q                                               # m x r
    S = G - R @ Q.t()
    assert_parity(st["M"].t(), 0.1 * R, rtol=1e-5, name="M (stored as r x m)")
    c_os = 0.05 * ((S * S).mean(dim=1) + 1e-30)             # per row of G
    assert_parity(st["c_os"], c_os, rtol=1e-5, name="c_os")
    assert_parity(st["a_col"], 0.05 * (R * R + 1e-30).mean(dim=1), rtol=1e-5, name="m-vector")
    N2 = S / (torch.sqrt(st["c_os"] / 0.05)[:, None] + 1e-8)
    a_row, a_col = st["a_row"], st["a_col"]
    N1 = R / (torch.sqrt(torch.outer(a_col, a_row) / a_row.mean() / 0.05) + 1e-8)
    assert_parity(w - w0, -0.1 * (N1 @ Q.t() + N2), rtol=1e-5, name="update")


# ---------------------------------------------------------------------------------------------
# full-rank limits

def test_full_rank_guard_gives_adafactor():
    """rank >= min(m, n): the matrix gets AdaMeM's Adafactor, exactly (the size guard)."""
    p = torch.nn.Parameter(torch.randn(6, 30))
    q = torch.nn.Parameter(p.detach().clone())
    a = AdaMeM([dict(params=[p], rank=6)], lr=1e-2, weight_decay=0.1, backend="reference")
    b = AdaMeM([q], lr=1e-2, weight_decay=0.1, backend="reference")
    for _ in range(4):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        a.step()
        b.step()
    assert torch.equal(p, q)
    assert set(a.state[p]) == {"step", "row", "col"}


class _NoSizeGuard(AdaMeM):
    """Runs the low-rank path even at rank = min(m, n), to test the limit itself."""

    def _plan(self, p, group):
        if "rank" not in group or p.dim() < 2:
            return None
        return min(group["rank"], *p.shape), tuple(p.shape), p.shape[0] > p.shape[1]


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_limit_is_adafactor_in_the_rotated_basis(shape):
    """rank = min(m, n), beta1 = 0, delta = 0 and no refresh after the first: P is square
    orthogonal, so AdaMeM is exactly the (bias-corrected, factored) Adafactor run on the
    rotated weights P^T W with gradients P^T G (weight decay commutes with the rotation)."""
    kw = dict(lr=1e-2, betas=(0.0, 0.95), weight_decay=0.1, delta=0.0, update_proj_gap=1000,
              backend="reference")
    w = torch.nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    opt = _NoSizeGuard([dict(params=[w], rank=min(shape))], **kw)
    grads = [torch.randn(shape) for _ in range(8)]
    for G in grads:
        w.grad = G.clone()
        opt.step()
    P = opt.state[w]["basis"]
    canon = (lambda X: X.t()) if shape[0] > shape[1] else (lambda X: X)
    d = torch.nn.Parameter(P.t() @ canon(w0))                # rotated canonical weights
    d0 = d.detach().clone()
    dense = AdaMeM([d], **kw)
    for G in grads:
        d.grad = P.t() @ canon(G)
        dense.step()
    assert torch.linalg.norm(P.t() @ P - torch.eye(min(shape))) < 1e-5
    assert_parity(canon(w - w0), P @ (d - d0), rtol=1e-5, name="update")


# ---------------------------------------------------------------------------------------------
# flags not covered by the literal transcription

def _short_run(steps=3, shape=(40, 70), **kw):
    w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    opt = AdaMeM([dict(params=[w], rank=5)], update_proj_gap=4, backend="reference", **kw)
    for t in range(steps):
        w.grad = _grad_like(w, t, 0)
        opt.step()
    return w, opt


def test_sign_canon_off_runs_and_is_invisible_within_one_subspace():
    """Library signs instead of canonical ones: within one refresh period the step does not
    depend on the signs of P's columns (M, N1 flip with them; row statistics are squares)."""
    a, opt_a = _short_run(4, sign_canon=True)
    b, opt_b = _short_run(4, sign_canon=False)
    assert_parity(b, a, rtol=1e-5, name="W")
    Pa, Pb = opt_a.state[a]["basis"], opt_b.state[b]["basis"]
    assert_parity(Pb.abs(), Pa.abs(), rtol=1e-5, name="|P|")


def test_auto_backend_runs_and_matches_reference():
    """``auto`` resolves each op to its fastest implementation on the device: under the
    Triton interpreter every low-rank op runs fused (projection, low-rank moments, residual
    statistics, update); the result matches the reference backend."""
    a, _ = _short_run(3, shape=(24, 40))
    w = torch.nn.Parameter(torch.randn((24, 40), generator=torch.Generator().manual_seed(5)))
    opt = AdaMeM([dict(params=[w], rank=5)], update_proj_gap=4, backend="auto")
    for t in range(3):
        w.grad = _grad_like(w, t, 0)
        opt.step()
    assert_parity(w, a, rtol=1e-5, name="W")


@pytest.mark.parametrize("residual_form", ["identity", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_backend_constructs_and_matches_reference(residual_form, dtype):
    """``backend="triton"``: every op a matrix and a 1-D parameter need has a Triton
    implementation (the residual statistics: kernels/residual_col_stats.py); over steps that
    cross a refresh, both orientations, the weights match the reference backend (bf16
    weights: the trajectory budget, each step can flip W's last bit)."""
    from lowrank_fused.dispatch import available

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not available("triton", device):
        pytest.skip("Triton cannot run here (no GPU and TRITON_INTERPRET unset)")
    runs = []
    for backend in ("reference", "triton"):
        mats, dense = _params(dtype, shapes=((24, 40), (40, 24)))
        params = [p.to(device).detach().requires_grad_() for p in mats + dense]
        opt = AdaMeM([dict(params=params[:2], rank=5), dict(params=params[2:])],
                     update_proj_gap=3, residual_form=residual_form, backend=backend, **HYPER)
        for t in range(5):
            for i, p in enumerate(params):
                p.grad = _grad_like(p.detach().cpu(), t, i).to(device)
            opt.step()
        runs.append(params)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (f, r) in enumerate(zip(runs[1], runs[0])):
        assert_parity(f, r, rtol=tol, name=f"param {i}")


# ---------------------------------------------------------------------------------------------
# checkpointing

def _ckpt_run(opt_kw, steps, start=0, opt=None, params=None):
    mats, dense = params or _params(torch.bfloat16, shapes=((40, 70), (70, 40)))
    if opt is None:
        opt = AdaMeM([dict(params=mats, rank=5), dict(params=dense)], update_proj_gap=4,
                     backend="reference", **opt_kw)
    for t in range(start, steps):
        for i, p in enumerate(mats + dense):
            p.grad = _grad_like(p, t, i)
        opt.step()
    return mats + dense, opt


@pytest.mark.parametrize("flags", [{}, dict(transport_on_refresh=True, v_source="gradient")],
                         ids=["defaults", "transport+gradient"])
def test_state_dict_round_trip_continues_bit_identically(flags):
    """bf16 weights, fp32 states; save at step 6, resume across the refreshes at t = 9, 13."""
    full, _ = _ckpt_run(flags, 14)
    part, opt = _ckpt_run(flags, 6)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in part]}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    mats, dense = _params(torch.bfloat16, shapes=((40, 70), (70, 40)))
    for p, saved in zip(mats + dense, ckpt["params"]):
        p.data.copy_(saved)
    opt2 = AdaMeM([dict(params=mats, rank=5), dict(params=dense)], update_proj_gap=4,
                  backend="reference", **flags)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.state[mats[0]]["M"].dtype == torch.float32, "fp32 state must stay fp32"
    assert opt2.state[mats[0]]["step"] == 6
    _ckpt_run(flags, 14, start=6, opt=opt2, params=(mats, dense))
    for p, q in zip(mats + dense, full):
        assert torch.equal(p, q), f"resumed run diverged for {tuple(p.shape)}"


# ---------------------------------------------------------------------------------------------
# routing and a tiny model

def _tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=32))


def test_routing_keeps_first_and_last_layers_on_adafactor():
    model = _tiny_llama()
    low, rest = adamem_param_groups(model, rank=4, update_proj_gap=50)
    names = {id(p): n for n, p in model.named_parameters()}
    low_names = {names[id(p)] for p in low["params"]}
    rest_names = {names[id(p)] for p in rest["params"]}
    assert low["rank"] == 4 and low["update_proj_gap"] == 50
    assert "model.embed_tokens.weight" in rest_names and "lm_head.weight" in rest_names
    assert len(low_names) == 2 * 7 and all(".self_attn." in n or ".mlp." in n for n in low_names)
    assert all(p.dim() == 1 for p in rest["params"] if names[id(p)].endswith("norm.weight"))
    (everything,) = [g for g in adamem_param_groups(model, rank=4, all_layers=True)
                     if "rank" in g]
    all_names = {names[id(p)] for p in everything["params"]}
    assert all_names == low_names | {"model.embed_tokens.weight", "lm_head.weight"}
    with pytest.raises(ValueError, match="rank"):
        adamem_param_groups(model, rank=0)


@pytest.mark.parametrize("all_layers", [False, True], ids=["paper-routing", "all-layers"])
def test_tiny_llama_learns_with_far_less_state_than_adamw(all_layers):
    """~100 steps on a fixed synthetic task (next token = 5*token + 3 mod V): the loss falls,
    nothing goes NaN, and the state is the (m + n) r + r + 2n count of docs/methods/adamem.md."""
    model = _tiny_llama()
    V, rank = model.config.vocab_size, 4
    opt = AdaMeM(adamem_param_groups(model, rank=rank, update_proj_gap=25, all_layers=all_layers),
                 lr=1e-2, backend="reference")
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        start = torch.randint(0, V, (16, 1), generator=g)
        seq = [start]
        for _ in range(24):
            seq.append((5 * seq[-1] + 3) % V)
        ids = torch.cat(seq, dim=1)
        _, loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-10:]) / 10 < 0.1 * losses[0], losses[::10]
    expected = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if "rank" in group and p.dim() == 2 and rank < min(p.shape):
                k, l = min(p.shape), max(p.shape)
                expected += 4 * (k * rank + rank * l + rank + 2 * l)
            elif p.dim() == 2:
                expected += 4 * sum(p.shape)
            else:
                expected += 4 * p.numel()
    assert opt.state_bytes() == expected
    adamw = sum(8 * p.numel() for p in model.parameters())
    # 7.9x (paper routing) and 5.8x (all layers) for this model; rank/hidden = 1/8
    assert opt.state_bytes() < adamw / (5.5 if all_layers else 7.5)


# ---------------------------------------------------------------------------------------------
# errors and edge cases

BAD_KWARGS = [(dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
              (dict(betas=(1.0, 0.9)), r"betas\[0\]"), (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
              (dict(betas=0.9), "betas"), (dict(eps=-1e-8), "eps"), (dict(eps1=-1.0), "eps1"),
              (dict(weight_decay=-0.1), "weight_decay"), (dict(delta=float("inf")), "delta"),
              (dict(delta=-0.5), "delta"), (dict(update_proj_gap=0), "update_proj_gap"),
              (dict(update_proj_gap=2.0), "update_proj_gap"), (dict(v_source="grad"), "v_source"),
              (dict(transport_on_refresh="yes"), "transport_on_refresh"),
              (dict(bias_correction=1), "bias_correction"),
              (dict(residual_form="implicit"), "residual_form"), (dict(backend="gpu"), "backend"),
              (dict(matmul_precision="fp16"), "matmul_precision")]


@pytest.mark.parametrize("kw,match", BAD_KWARGS, ids=[m for _, m in BAD_KWARGS])
def test_bad_hyperparameters_are_rejected(kw, match):
    p = torch.nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ValueError, match=match):
        AdaMeM([dict(params=[p], rank=2)], **kw)
    key = next(iter(kw))
    if key not in ("backend", "matmul_precision"):     # per-group keys too
        with pytest.raises(ValueError, match=match):
            AdaMeM([dict(params=[p], rank=2, **kw)])


@pytest.mark.parametrize("rank", [0, 2.5, True, "4"])
def test_bad_rank_is_rejected(rank):
    p = torch.nn.Parameter(torch.randn(8, 16))
    with pytest.raises(ValueError, match="rank"):
        AdaMeM([dict(params=[p], rank=rank)])


def test_bad_value_edited_in_later_group_leaves_everything_untouched():
    mats, dense = _params()
    opt = AdaMeM([dict(params=mats, rank=5), dict(params=dense)], backend="reference")
    for i, p in enumerate(mats + dense):
        p.grad = _grad_like(p, 0, i)
    opt.step()
    before = [p.detach().clone() for p in mats + dense]
    state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
             for p in mats + dense}
    opt.param_groups[1]["delta"] = float("nan")
    with pytest.raises(ValueError, match="delta"):
        opt.step()
    opt.param_groups[1]["delta"] = 1.0
    opt.param_groups[0]["v_source"] = "both"
    with pytest.raises(ValueError, match="v_source"):
        opt.step()
    for p, b in zip(mats + dense, before):
        assert torch.equal(p, b)
        for k, v in state[p].items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


def test_changed_rank_mid_run_is_an_error_not_a_silent_reshape():
    w = torch.nn.Parameter(torch.randn(20, 30))
    opt = AdaMeM([dict(params=[w], rank=4)], backend="reference")
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0]["rank"] = 6
    before = w.detach().clone()
    with pytest.raises(ValueError, match="rank changed"):
        opt.step()
    opt.param_groups[0]["rank"] = 25
    with pytest.raises(ValueError, match="Adafactor path"):
        opt.step()
    assert torch.equal(w, before)


def test_nonfinite_gradient_at_refresh_is_reported_and_leaves_weights():
    w = torch.nn.Parameter(torch.randn(8, 16))
    before = w.detach().clone()
    opt = AdaMeM([dict(params=[w], rank=2)], backend="reference")
    w.grad = torch.randn_like(w)
    w.grad[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(w, before)
    assert "M" not in opt.state[w] and "step" not in opt.state[w]


def test_zero_rows_and_columns_stay_finite():
    """docs/methods/adamem.md: eps1 prevents 0/0 in mean(a_row), eps the division by zero in N1,
    N2."""
    mats, dense = _params(shapes=((40, 70), (70, 40)))
    opt = AdaMeM([dict(params=mats, rank=5), dict(params=dense)], update_proj_gap=2,
                 backend="reference")
    for t in range(4):
        for i, p in enumerate(mats + dense):
            G = _grad_like(p, t, i)
            if G.dim() == 2:
                G[:3] = 0.0
                G[:, -4:] = 0.0
            else:
                G[:2] = 0.0
            p.grad = G
        opt.step()
    for p in mats + dense:
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))


def test_zero_learning_rate_leaves_weights():
    mats, dense = _params()
    opt = AdaMeM([dict(params=mats, rank=5), dict(params=dense)], lr=0.0, backend="reference")
    before = [p.detach().clone() for p in mats + dense]
    for i, p in enumerate(mats + dense):
        p.grad = _grad_like(p, 0, i)
    opt.step()
    for p, b in zip(mats + dense, before):
        assert torch.equal(p, b)


def test_fused_step_makes_no_full_size_temporary(device):
    """Between refreshes, with the projection (and its colsum(G^2) side output) and the
    residual update fused, an AdaMeM step allocates nothing of the weight's size: the
    residual G - P R never exists (docs/bytes.md: two reads of G, one of W)."""
    from lowrank_fused.dispatch import available
    from lowrank_fused.testing.trace import AllocationTrace

    if not available("triton", device):
        pytest.skip("needs the Triton backend (a GPU, or TRITON_INTERPRET=1)")
    sizes = {}
    for backend in ("reference", "auto"):
        w = torch.nn.Parameter(torch.randn(97, 203, device=device, dtype=torch.bfloat16))
        opt = AdaMeM([dict(params=[w], rank=8, update_proj_gap=100)], backend=backend)
        w.grad = torch.randn_like(w)
        opt.step()                       # step 1 refreshes (an SVD, by design)
        w.grad = torch.randn_like(w)
        with AllocationTrace() as trace:
            opt.step()
        sizes[backend] = trace.at_least(w.numel())
    assert sizes["reference"], "the trace must see the reference's full-size temporaries"
    assert sizes["auto"] == [], f"fused step allocated full-size tensors: {sizes['auto']}"


# ---------------------------------------------------------------------------------------------
# the step engine (docs/engine.md): classes of matrices equal the per-matrix step

ENGINE_CASES = [("triton", torch.float32, {}), ("triton", torch.bfloat16, {}),
                ("triton", torch.float32, dict(v_source="gradient", bias_correction=False,
                                               betas=(0.8, 0.9))),
                ("reference", torch.float32, {}), ("reference", torch.bfloat16, {}),
                ("reference", torch.float32, dict(transport_on_refresh=True,
                                                  v_source="gradient", bias_correction=False)),
                ("reference", torch.bfloat16, dict(projector="randomized"))]


def _engine_run(engine, backend, dtype, steps, flags):
    g = torch.Generator().manual_seed(3)
    # two wide and two tall (transposed, side "right") matrices of one shape each, a 3-D
    # weight (a 2-D view), a second rank group with its own lr, Adafactor parameters
    shapes = [(12, 20), (12, 20), (20, 12), (20, 12), (4, 3, 5), (16, 24)]
    mats = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(9, 7, generator=g).to(dtype)),
             torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))]
    opt = AdaMeM([dict(params=mats[:5], rank=3), dict(params=mats[5:], rank=4, lr=3e-3),
                  dict(params=dense)], update_proj_gap=2, backend=backend,
                 **{**HYPER, **flags})
    opt.engine = engine
    params = mats + dense
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = _grad_like(p, t, i)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend,dtype,flags", ENGINE_CASES, ids=str)
def test_engine_equals_per_matrix_step(backend, dtype, flags, monkeypatch):
    """The engine's classes (one grouped K1 with every colsum(G^2), the factored moments and
    residual statistics per member, one grouped combined update) equal the per-matrix step
    (``opt.engine = False``) bit for bit: weights and every state tensor, over steps crossing
    the refreshes at t = 1, 3, both orientations, fp32 and bf16 weights; each class takes one
    grouped K1 and one grouped update per step and no single one; on Triton the middle is
    one grouped call per class (kernels/grouped_adamem_middle.py)."""
    from lowrank_fused.dispatch import available
    from _cases import count_calls

    if not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    steps = 3 if backend == "triton" else 4
    a, opt_a = _engine_run(False, backend, dtype, steps, flags)
    calls = count_calls(monkeypatch, ("project", "grouped_project",
                                      "residual_backproject_update",
                                      "grouped_residual_backproject_update"), backend=backend)
    b, opt_b = _engine_run(True, backend, dtype, steps, flags)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for p, q in zip(a, b):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key, v in sa.items():
            assert torch.equal(v, sb[key]) if torch.is_tensor(v) else v == sb[key], key
    plan = opt_b._engine_plan
    assert {cls.route.side for cls in plan.classes.values()} == {"left", "right"}
    assert len(plan.classes) == 4                           # (12, 20), (20, 12), 3-D, rank 4
    if backend == "triton":             # the class's middle as one grouped call
        assert all(cls.extra["middle"] is not None for cls in plan.classes.values())
    # the Adafactor parameters on the engine too: the vector set and the factored matrix
    assert not plan.legacy
    assert [vs.params for vs in plan.vector_sets] == [b[-1:]]
    assert [f.p for f in plan.factored] == b[-2:-1]
    assert calls.get("project", 0) == calls.get("residual_backproject_update", 0) == 0
    assert calls["grouped_project"] == calls["grouped_residual_backproject_update"] \
        == steps * len(plan.classes)


def test_engine_keeps_the_explicit_form_per_parameter():
    """``residual_form="explicit"`` takes the per-parameter step; a rank changed mid-run is
    refused on the engine as on the per-matrix step."""
    a, opt_a = _engine_run(False, "reference", torch.float32, 2,
                           dict(residual_form="explicit"))
    b, opt_b = _engine_run(True, "reference", torch.float32, 2,
                           dict(residual_form="explicit"))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not opt_b._engine_plan.classes and not opt_b._engine_plan.routed
    _, opt = _engine_run(True, "reference", torch.float32, 1, {})
    opt.param_groups[0]["rank"] = 2
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="rank changed"):
        opt.step()


def test_engine_grouped_middle_spans_several_tiles():
    """The grouped middle over members of several 32 x 128 tiles (partial sums across tiles,
    several row and column blocks): bit for bit the per-matrix Triton step."""
    from lowrank_fused.dispatch import available

    if not available("triton", "cpu"):
        pytest.skip("triton unavailable here")
    runs = []
    for engine in (False, True):
        g = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(s, generator=g))
                  for s in ((40, 300), (40, 300), (300, 40))]
        opt = AdaMeM([dict(params=params, rank=34)], update_proj_gap=2, backend="triton",
                     **HYPER)
        opt.engine = engine
        for t in range(2):
            for i, p in enumerate(params):
                p.grad = _grad_like(p, t, i)
            opt.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    assert all(cls.extra["middle"] is not None for cls in opt_b._engine_plan.classes.values())
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][key]) if torch.is_tensor(v) else \
                v == opt_b.state[q][key], key


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_engine_class_of_several_groups_and_counters(backend):
    """A class whose members come from two groups (other lr, weight decay, beta2) and whose
    counters differ (a matrix and a vector with no gradient on the first steps): per-member
    scalars in the grouped middle, the combined update and the vector set, bit for bit the
    per-matrix step."""
    from lowrank_fused.dispatch import available

    if not available(backend, "cpu"):
        pytest.skip(f"{backend} unavailable here")
    runs = []
    for engine in (False, True):
        g = torch.Generator().manual_seed(5)
        mats = [torch.nn.Parameter(torch.randn(12, 20, generator=g)) for _ in range(3)]
        vecs = [torch.nn.Parameter(torch.randn(7, generator=g)) for _ in range(3)]
        opt = AdaMeM([dict(params=mats[:2], rank=3), dict(params=vecs[:2]),
                      dict(params=mats[2:], rank=3, lr=3e-3, weight_decay=0.0,
                           betas=(0.9, 0.9)),
                      dict(params=vecs[2:], lr=2e-3, betas=(0.9, 0.8))],
                     update_proj_gap=4, backend=backend, **{k: v for k, v in HYPER.items()
                                                            if k not in ("betas",)})
        opt.engine = engine
        for t in range(3):
            for i, p in enumerate(mats + vecs):
                late = i in (1, 4)                   # no gradient at the first step
                p.grad = None if late and t == 0 else _grad_like(p, t, i)
            opt.step()
        runs.append((mats + vecs, opt))
    (a, opt_a), (b, opt_b) = runs
    plan = opt_b._engine_plan
    assert len(plan.classes) == 1 and len(plan.vector_sets) == 1 and not plan.legacy
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key, v in sa.items():
            assert torch.equal(v, sb[key]) if torch.is_tensor(v) else v == sb[key], key
    counters = {opt_b.state[q]["step"] for q in b}
    assert len(counters) == 2, counters
