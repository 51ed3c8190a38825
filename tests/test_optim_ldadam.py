"""LDAdamW: faithfulness to a literal transcription of docs/methods/ldadam.md, the invariants of
docs/conventions.md (4: fused == explicit, 5: error-feedback conservation, 6: full-rank limit, 1:
an orthonormal basis, 9: V >= 0), the dense limits, error-buffer safety under zero_grad and
clipping, checkpoint round trips, a tiny model, every flag, and argument errors."""
import math

import pytest
import torch

from lowrank_fused import BackendUnavailable
from lowrank_fused.linalg import canonical_svd_basis
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.optim.ldadam import LDAdamW, ldadam_side
from lowrank_fused.reference.ldadam_error_feedback import ldadam_error_feedback_ref
from lowrank_fused.reference.ldadam_moment_transport import ldadam_moment_transport_ref
from lowrank_fused.reference.ldadam_power_iteration import ldadam_power_iteration_ref
from lowrank_fused.routing import galore_target_names
from lowrank_fused.testing import assert_parity

DEV = "cpu"   # the reference optimizer; the fused kernels are a later issue
SHAPES = ((40, 70), (70, 40), (48, 48))   # left, right, square (left under LDAdam's rule)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# An independent literal transcription of docs/methods/ldadam.md (left and right forms written out
# separately, as docs/methods/ldadam.md states them), in float64, one global counter, sign-canonical
# QR/SVD (the optimizer's default), the dense path as torch AdamW with the global counter.

def _orth64(Y):
    Q, R = torch.linalg.qr(Y)
    return Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)


def _svd_top64(X, r, side):
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    B = U[:, :r] if side == "left" else Vh[:r, :].t()
    B = B * torch.sign(B.gather(0, B.abs().argmax(0, keepdim=True)))
    return B if side == "left" else B.t()


class LiteralLDAdamW:
    def __init__(self, weights, lowrank, *, lr, betas, eps, weight_decay, rank, rho,
                 error_feedback=True, proj_method="power_iteration"):
        self.W = [w.detach().double().clone() for w in weights]
        self.lowrank = lowrank
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.r, self.rho, self.ef, self.method = rank, rho, error_feedback, proj_method
        self.completed_steps = 0
        self.st = [dict() for _ in weights]

    def step(self, grads):
        for i, g in enumerate(grads):
            if self.lowrank[i]:
                self._ldadam(i, g.double())
            else:
                self._adamw(i, g.double())
        self.completed_steps += 1

    def _adamw(self, i, g):
        st, t, b1, b2 = self.st[i], self.completed_steps, self.b1, self.b2
        st.setdefault("m", torch.zeros_like(g))
        st.setdefault("v", torch.zeros_like(g))
        st["m"] = b1 * st["m"] + (1 - b1) * g
        st["v"] = b2 * st["v"] + (1 - b2) * g ** 2
        W = self.W[i] * (1 - self.lr * self.wd)
        self.W[i] = W - self.lr * (st["m"] / (1 - b1 ** (t + 1))) / (
            torch.sqrt(st["v"] / (1 - b2 ** (t + 1))) + self.eps)

    def _ldadam(self, i, G):
        st, t, b1, b2, r, rho = self.st[i], self.completed_steps, self.b1, self.b2, self.r, self.rho
        m_, n_ = G.shape
        left = m_ <= n_                                   # 'std' under LDAdam
        c = b1 / (1 - b1)
        if t == 0:
            st["m"] = torch.zeros((r, n_) if left else (m_, r), dtype=G.dtype)
            st["v"] = torch.zeros_like(st["m"])
            st["E"] = torch.zeros_like(G)
        A = st["E"] + G if self.ef else G
        m, v = st["m"], st["v"]
        if left:
            if t == 0:
                P = _svd_top64(A, r, "left")
                P_old = torch.zeros(m_, r, dtype=G.dtype)
            else:
                P_old = st["P"]
                b = (rho / (1 - b1 ** t)) * (P_old @ m) + (1 - rho) * A
                if self.method == "svd":
                    P = _svd_top64(b, r, "left")
                else:
                    P = _orth64(b @ (b.t() @ P_old))
            Rg = P.t() @ A
            E = A - P @ Rg
            C = P.t() @ P_old
            m_tr = C @ m
            E = E + c * (P_old @ m) - c * (P @ m_tr)
        else:
            if t == 0:
                P = _svd_top64(A, r, "right")                          # Q, r x n
                P_old = torch.zeros(r, n_, dtype=G.dtype)
            else:
                P_old = st["P"]
                b = (rho / (1 - b1 ** t)) * (m @ P_old) + (1 - rho) * A
                if self.method == "svd":
                    P = _svd_top64(b, r, "right")
                else:
                    Uq = b @ P_old.t()
                    P = _orth64(b.t() @ Uq).t()
            Rg = A @ P.t()
            E = A - Rg @ P
            C = P_old @ P.t()
            m_tr = m @ C
            E = E + c * (m @ P_old) - c * (m_tr @ P)
        if t > 0:
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            v = v / bc2 - m ** 2 / bc1 ** 2
            v = (C * C) @ v if left else v @ (C * C)
            v = v + m_tr ** 2 / bc1 ** 2
            v = v * bc2
            v = torch.abs(v)
            m = m_tr
        m = b1 * m + (1 - b1) * Rg
        v = b2 * v + (1 - b2) * Rg ** 2
        N = (m / (1 - b1 ** (t + 1))) / (torch.sqrt(v / (1 - b2 ** (t + 1))) + self.eps)
        W = self.W[i] * (1 - self.lr * self.wd)
        self.W[i] = W - self.lr * (P @ N if left else N @ P)
        st.update(P=P, m=m, v=v, E=E if self.ef else torch.zeros_like(G))


# ---------------------------------------------------------------------------------------------
# helpers

def _trend(shape, salt):
    """A fixed low-rank gradient component with separated singular values."""
    g = torch.Generator().manual_seed(99 + salt)
    m, n = shape[0], math.prod(shape[1:])
    k = min(m, n, 10)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return ((U * (20.0 * 0.7 ** torch.arange(k))) @ V.t()).reshape(shape)


def _grad(p, t, salt, scale=1.0):
    """A W-dependent pull, a planted low-rank trend and fresh noise (never zeros)."""
    g = torch.Generator().manual_seed(1000 * t + salt)
    noise = torch.randn(p.shape, generator=g)
    trend = _trend(p.shape, salt) if p.dim() >= 2 else 0.0
    return (scale * (0.5 * p.detach().float() + trend + noise)).to(p.dtype)


def _params(dtype=torch.float32, shapes=SHAPES, seed=7):
    g = torch.Generator().manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    dense = [torch.nn.Parameter(torch.randn(13, generator=g).to(dtype))]
    return mats, dense


def _groups(mats, dense, **lowrank):
    return [dict(params=mats, enable_lowrank=True, **lowrank), dict(params=dense)]


def _back(basis, m, side):
    return basis.float() @ m.float() if side == "left" else m.float() @ basis.float()


def _side(p):
    return ldadam_side(tuple(p.shape), "std")


KW = dict(lr=2e-2, betas=(0.908, 0.99), eps=1e-8, weight_decay=0.05, rho=0.908)


# ---------------------------------------------------------------------------------------------
# the literal transcription, step by step

@pytest.mark.parametrize("proj_method,error_feedback", [("power_iteration", True),
                                                        ("power_iteration", False),
                                                        ("svd", True)])
def test_matches_literal_transcription_step_by_step(proj_method, error_feedback):
    mats, dense = _params()
    ps = mats + dense
    W0 = [p.detach().clone() for p in ps]
    lit = LiteralLDAdamW(ps, [True] * len(mats) + [False], rank=6, error_feedback=error_feedback,
                         proj_method=proj_method, **KW)
    opt = LDAdamW(_groups(mats, dense, rank=6, proj_method=proj_method,
                          error_feedback=error_feedback, ef_dtype="fp32"),
                  backend="reference", **KW)
    for t in range(12):
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        lit.step([p.grad for p in ps])
        opt.step()
        assert opt.completed_steps == lit.completed_steps == t + 1
        for i, p in enumerate(ps):
            assert_parity(p, lit.W[i], rtol=1e-5, name=f"step {t} W{i} {tuple(p.shape)}")
            assert_parity(p - W0[i], lit.W[i] - W0[i].double(), rtol=1e-4,
                          name=f"step {t} W{i} - W0")
        for i, p in enumerate(mats):
            st, ls = opt.state[p], lit.st[i]
            assert_parity(st["basis"], ls["P"], rtol=1e-4, name=f"step {t} basis {i}")
            assert_parity(st["exp_avg"], ls["m"], rtol=1e-4, name=f"step {t} m {i}")
            assert_parity(st["exp_avg_sq"], ls["v"], rtol=1e-4, name=f"step {t} v {i}")
            if error_feedback:
                assert_parity(st["error"], ls["E"], rtol=1e-4, name=f"step {t} E {i}")
            else:
                assert "error" not in st
    assert all(not torch.equal(p, w) for p, w in zip(ps, W0))


# ---------------------------------------------------------------------------------------------
# invariant 4: the fused forms equal the explicit code path

def _orthonormal(m, r, seed):
    return torch.linalg.qr(torch.randn(m, r, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))[0].float()


def test_fused_power_iteration_and_single_gemm_ef_equal_explicit_ops():
    """Invariant 4 of docs/conventions.md, on the reference ops."""
    g = torch.Generator().manual_seed(3)
    m, n, r = 64, 128, 8
    rho, bc1, c = 0.908, 1 - 0.908 ** 5, 0.908 / (1 - 0.908)
    P_old = _orthonormal(m, r, 1)
    M = torch.randn(r, n, generator=g)
    A = torch.randn(m, n, generator=g)
    Y_f, Y_e = torch.empty(m, r), torch.empty(m, r)
    kw = dict(coef_m=rho / bc1, coef_a=1 - rho)
    ldadam_power_iteration_ref(A, P_old, M, Y_f, **kw)
    ldadam_power_iteration_ref(A, P_old, M, Y_e, explicit=True, **kw)
    b = (rho / bc1) * (P_old.double() @ M.double()) + (1 - rho) * A.double()
    Y_64 = b @ (b.t() @ P_old.double())
    assert_parity(Y_f, Y_64, rtol=1e-5, name="fused Y vs fp64 explicit")
    assert_parity(Y_f, Y_e, rtol=1e-5, name="fused Y vs explicit Y")
    # the fused form relies on P_old^T P_old = I: with a non-orthonormal P_old it differs
    ldadam_power_iteration_ref(A, 2.0 * P_old, M, Y_f, **kw)
    ldadam_power_iteration_ref(A, 2.0 * P_old, M, Y_e, explicit=True, **kw)
    with pytest.raises(AssertionError):
        assert_parity(Y_f, Y_e, rtol=1e-3)

    P_new = torch.linalg.qr(Y_64)[0].float()
    Rg = P_new.t() @ A
    M_tr = torch.empty(r, n)
    ldadam_moment_transport_ref(P_new, P_old, M, torch.rand(r, n, generator=g), M_tr,
                                bc1=bc1, bc2=1 - 0.99 ** 5)
    E_f, E_e = torch.empty(m, n), torch.empty(m, n)
    ldadam_error_feedback_ref(A, P_new, P_old, Rg, M, M_tr, E_f, c=c)
    ldadam_error_feedback_ref(A, P_new, P_old, Rg, M, M_tr, E_e, c=c, explicit=True)
    d = lambda x: x.double()  # noqa: E731
    E_64 = (d(A) - d(P_new) @ d(Rg) + c * (d(P_old) @ d(M))
            - c * (d(P_new) @ (d(P_new).t() @ d(P_old) @ d(M))))
    assert_parity(E_f, E_64, rtol=1e-5, name="single-GEMM EF vs fp64")
    assert_parity(E_f, E_e, rtol=1e-5, name="single-GEMM EF vs explicit EF")
    assert E_f.abs().max() > 0.1 * A.abs().max()


def test_variance_aware_transport_uses_abs_and_matches_formula():
    g = torch.Generator().manual_seed(5)
    m, n, r = 30, 50, 5
    P_old, P_new = _orthonormal(m, r, 2), _orthonormal(m, r, 3)
    M = torch.randn(r, n, generator=g)
    V = 1e-3 * torch.rand(r, n, generator=g)          # small V: the variance part goes negative
    bc1, bc2 = 1 - 0.9 ** 4, 1 - 0.99 ** 4
    C = P_new.double().t() @ P_old.double()
    m_tr = C @ M.double()
    w = (C * C) @ (V.double() / bc2 - M.double() ** 2 / bc1 ** 2) + m_tr ** 2 / bc1 ** 2
    assert (w < 0).any(), "the test needs a negative variance estimate before abs"
    V_out, M_tr = V.clone(), torch.empty(r, n)
    ldadam_moment_transport_ref(P_new, P_old, M, V_out, M_tr, bc1=bc1, bc2=bc2)
    assert_parity(M_tr, m_tr, rtol=1e-5, name="M_tr")
    assert_parity(V_out, (w * bc2).abs(), rtol=1e-5, name="V")
    assert (V_out >= 0).all()


@pytest.mark.parametrize("proj_method", ["power_iteration", "svd"])
def test_fused_and_explicit_forms_give_the_same_trajectory(proj_method):
    runs = []
    for form in ("fused", "explicit"):
        mats, dense = _params()
        opt = LDAdamW(_groups(mats, dense, rank=6, proj_method=proj_method, ef_dtype="fp32"),
                      backend="reference", form=form, **KW)
        for t in range(10):
            for i, p in enumerate(mats + dense):
                p.grad = _grad(p, t, i)
            opt.step()
        runs.append((mats + dense, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a, b):
        assert_parity(p, q, rtol=1e-5, name=f"W {tuple(p.shape)}")
    for p, q in zip(a[:3], b[:3]):
        assert_parity(oa.state[p]["error"], ob.state[q]["error"], rtol=1e-4, name="E")


# ---------------------------------------------------------------------------------------------
# invariant 5 (EF conservation), invariant 1 (orthonormal basis), invariant 9 (V >= 0)

@pytest.mark.parametrize("form", ["fused", "explicit"])
def test_error_feedback_conservation_orthonormality_and_nonnegative_v(form):
    """E_t + P_t m_t/(1-b1) == E_{t-1} + P_{t-1} m_{t-1}/(1-b1) + G_t - P_{t-1} m_{t-1}."""
    mats, dense = _params()
    b1 = 0.9
    opt = LDAdamW(_groups(mats, dense, rank=5, ef_dtype="fp32"), backend="reference", form=form,
                  **{**KW, "betas": (b1, 0.99)})
    prev = {id(p): (torch.zeros(p.shape), torch.zeros(p.shape)) for p in mats}  # (E, P m)
    for t in range(10):
        for i, p in enumerate(mats + dense):
            p.grad = _grad(p, t, i, scale=1.0 + 0.3 * t)
        opt.step()
        for p in mats:
            st, side = opt.state[p], _side(p)
            E_prev, Pm_prev = prev[id(p)]
            Pm = _back(st["basis"], st["exp_avg"], side)
            lhs = st["error"] + Pm / (1 - b1)
            rhs = E_prev + Pm_prev / (1 - b1) + p.grad.float() - Pm_prev
            assert_parity(lhs, rhs, rtol=1e-5, name=f"conservation t={t} {tuple(p.shape)}")
            B = st["basis"] if side == "left" else st["basis"].t()
            assert torch.linalg.norm(B.t() @ B - torch.eye(B.shape[1])) < 1e-5
            assert (st["exp_avg_sq"] >= 0).all()
            assert st["error"].abs().max() > 0
            prev[id(p)] = (st["error"].clone(), Pm)


# ---------------------------------------------------------------------------------------------
# invariant 6 and the dense limits

@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
def test_full_rank_has_zero_error_buffer(shape):
    """r = min(m, n) with the size guard off: the new basis spans everything, so the
    compression error and the lost momentum are both zero (up to fp32 rounding)."""
    g = torch.Generator().manual_seed(11)
    p = torch.nn.Parameter(torch.randn(shape, generator=g))
    r = min(shape)
    opt = LDAdamW([dict(params=[p], enable_lowrank=True, rank=r, ef_dtype="fp32")],
                  backend="reference", size_guard=False, **KW)
    for t in range(4):
        p.grad = _grad(p, t, 0)
        A = p.grad.float() + (opt.state[p]["error"] if t else 0.0)
        opt.step()
        want = (shape[0], r) if _side(p) == "left" else (r, shape[1])
        assert opt.state[p]["basis"].shape == want
        E = opt.state[p]["error"]
        assert E.abs().max() < 1e-5 * A.abs().max(), f"step {t + 1}: E is not ~0"
    # at a lower rank the buffer is not zero (the check can fail)
    q = torch.nn.Parameter(torch.randn(shape, generator=g))
    opt = LDAdamW([dict(params=[q], enable_lowrank=True, rank=r - 2)], backend="reference", **KW)
    for t in range(3):
        q.grad = _grad(q, t, 0)
        opt.step()
    assert opt.state[q]["error"].abs().max() > 1e-2 * q.grad.abs().max()


def test_dense_path_is_torch_adamw_and_size_guard_gives_it():
    """Groups without enable_lowrank, 1-D parameters, and rank >= min(m, n) under the size
    guard get torch AdamW (E-torch, WD-pre); with every parameter stepping every step the
    global counter equals torch's per-parameter step."""
    g = torch.Generator().manual_seed(4)
    shapes = [(6, 30), (30, 6), (9,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = LDAdamW([dict(params=ours, enable_lowrank=True, rank=6)], backend="reference", **kw)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **kw)
    for t in range(6):
        for i, (p, q) in enumerate(zip(ours, ref)):
            p.grad = _grad(p, t, i)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ours, ref):
        assert "basis" not in opt.state[p]
        assert_parity(p, q, rtol=1e-6, name=f"W {tuple(p.shape)}")
        assert not torch.equal(p, torch.randn(p.shape))


def test_global_counter_drives_bias_correction_of_late_parameters():
    """A parameter whose first gradient arrives at global step 3 is bias-corrected with the
    global count (ldadamw.py#L132, L152), and a low-rank one starts from the SVD of its A."""
    late_dense = torch.nn.Parameter(torch.randn(7))
    late_mat = torch.nn.Parameter(torch.randn(20, 30))
    early = torch.nn.Parameter(torch.randn(20, 30))
    opt = LDAdamW([dict(params=[early, late_mat], enable_lowrank=True, rank=4),
                   dict(params=[late_dense])], backend="reference", lr=1e-2)
    for t in range(4):
        early.grad = _grad(early, t, 0)
        if t == 3:
            late_mat.grad = _grad(late_mat, t, 1)
            late_dense.grad = torch.randn(7)
            w0, g0, basis0 = late_dense.detach().clone(), late_dense.grad.clone(), \
                canonical_svd_basis(late_mat.grad, 4, "left")
        opt.step()
    assert opt.completed_steps == 4
    b1, b2 = 0.908, 0.99
    m, v = (1 - b1) * g0, (1 - b2) * g0 ** 2
    expected = w0 - 1e-2 * (m / (1 - b1 ** 4)) / (torch.sqrt(v / (1 - b2 ** 4)) + 1e-8)
    assert_parity(late_dense, expected, rtol=1e-6, name="late dense W")
    assert_parity(opt.state[late_mat]["basis"], basis0, rtol=1e-5, name="late basis")
    assert torch.isfinite(late_mat).all()


# ---------------------------------------------------------------------------------------------
# the error buffer is optimizer state: zero_grad and clipping cannot touch it

def test_error_buffer_survives_zero_grad_and_clipping_sees_only_the_gradient():
    runs = []
    for clip_first in (True, False):
        mats, dense = _params(shapes=((40, 70), (70, 40)))
        ps = mats + dense
        opt = LDAdamW(_groups(mats, dense, rank=4), backend="reference", **KW)
        for i, p in enumerate(ps):
            p.grad = _grad(p, 0, i)
        opt.step()
        E_before = [opt.state[p]["error"].clone() for p in mats]
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ps)
        for p, E in zip(mats, E_before):
            assert torch.equal(opt.state[p]["error"], E) and E.abs().max() > 0
        for i, p in enumerate(ps):
            p.grad = _grad(p, 1, i)
        if clip_first:
            raw = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in ps))
            total = torch.nn.utils.clip_grad_norm_(ps, max_norm=1.0)
            assert torch.allclose(total, raw), "clipping must see the gradient only, not E + G"
            clipped = [p.grad.clone() for p in ps]
        else:   # the same clipped gradients, handed over directly
            clipped = runs[0][1]
            for p, c in zip(ps, clipped):
                p.grad = c.clone()
        opt.step()
        runs.append((ps, clipped, opt))
    (a, _, oa), (b, _, ob) = runs
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    for p, q in zip(a[:2], b[:2]):
        assert torch.equal(oa.state[p]["error"], ob.state[q]["error"])


# ---------------------------------------------------------------------------------------------
# checkpoints

def _run(steps, dtype=torch.float32, state=None, start=0, **opt_kw):
    mats, dense = _params(dtype)
    if state is not None:
        for p, w in zip(mats + dense, state["params"]):
            p.data.copy_(w)
    opt = LDAdamW(_groups(mats, dense, rank=6), backend="reference", **{**KW, **opt_kw})
    if state is not None:
        opt.load_state_dict(state["opt"])
    for t in range(start, steps):
        for i, p in enumerate(mats + dense):
            p.grad = _grad(p, t, i)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return mats + dense, opt


@pytest.mark.parametrize("dtype,opt_kw", [(torch.float32, {}),
                                          (torch.bfloat16, {}),
                                          (torch.bfloat16, dict(faithful_dtypes=True))],
                         ids=["fp32", "bf16", "bf16-faithful"])
@pytest.mark.parametrize("cut", [1, 5])
def test_state_dict_round_trip_continues_bit_identically(dtype, opt_kw, cut, tmp_path):
    full, _ = _run(12, dtype, **opt_kw)
    part, opt = _run(cut, dtype, **opt_kw)
    sd = opt.state_dict()
    assert sd["state"][0]["completed_steps"] == cut
    assert all("error" in sd["state"][i] for i in range(3))
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": sd, "params": [p.detach() for p in part]}, path)
    ckpt = torch.load(path, weights_only=True)
    resumed, opt2 = _run(12, dtype, state=ckpt, start=cut, **opt_kw)
    assert opt2.completed_steps == 12
    st = opt2.state[resumed[0]]
    assert st["error"].dtype == dtype                    # ef_dtype 'param'
    assert st["exp_avg"].dtype == (dtype if opt_kw else torch.float32)
    for p, q in zip(resumed, full):
        assert torch.equal(p, q), f"resumed run diverged for {tuple(p.shape)}"
    # without the saved error buffer and counter the run would differ
    lost, _ = _run(12, dtype, state={"opt": {"state": {}, "param_groups": sd["param_groups"]},
                                     "params": ckpt["params"]}, start=cut, **opt_kw)
    assert not all(torch.equal(p, q) for p, q in zip(lost, full))


def test_state_bytes_and_dtypes():
    mats, dense = _params(torch.bfloat16, shapes=((64, 128), (128, 64)))
    opt = LDAdamW(_groups(mats, dense, rank=8), backend="reference")
    for i, p in enumerate(mats + dense):
        p.grad = _grad(p, 0, i)
    opt.step()
    st = opt.state[mats[1]]
    assert st["basis"].shape == (8, 64) and st["exp_avg"].shape == (128, 8)   # right form
    # per matrix: basis 64*8 + m, v 2*8*128 in fp32; E 64*128 in bf16; dense 2*13 fp32
    expected = 2 * (4 * (64 * 8 + 2 * 8 * 128) + 2 * 64 * 128) + 2 * 4 * 13
    assert opt.state_bytes() == expected
    opt32 = LDAdamW(_groups(mats, dense, rank=8, ef_dtype="fp32"), backend="reference")
    for i, p in enumerate(mats + dense):
        p.grad = _grad(p, 0, i)
    opt32.step()
    assert opt32.state_bytes() == expected + 2 * 2 * 64 * 128
    assert opt32.state[mats[0]]["error"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# a tiny model

def _pattern_batch(gen, batch, seq, vocab):
    """Arithmetic sequences x_i = (x_0 + i*k) mod vocab with a random start and k in 1..4."""
    x0 = torch.randint(0, vocab, (batch, 1), generator=gen)
    k = torch.randint(1, 5, (batch, 1), generator=gen)
    toks = (x0 + k * torch.arange(seq + 1)) % vocab
    return toks[:, :-1], toks[:, 1:]


def test_tiny_llama_trains():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    names = set(galore_target_names(model, ("attn", "mlp")))
    low = [m.weight for n, m in model.named_modules() if n in names]
    low_ids = {id(p) for p in low}
    other = [p for p in model.parameters() if id(p) not in low_ids]
    opt = LDAdamW([dict(params=low, enable_lowrank=True, rank=8), dict(params=other)],
                  lr=3e-3, weight_decay=0.01, backend="reference")
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        x, y = _pattern_batch(gen, 8, 24, cfg.vocab_size)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 3.5                                    # ~ln(64) at init
    assert last < first - 1.0, (first, last)
    # state: low-rank matrices hold E (m x n, fp32 here) + P + m, v; everything else AdamW
    r = 8
    expected = sum(8 * p.numel() for p in other)
    for p in low:
        m, n = p.shape
        left = m <= n
        expected += 4 * (m * n + (m * r if left else n * r) + 2 * r * (n if left else m))
    adamw = sum(8 * p.numel() for p in model.parameters())
    assert opt.state_bytes() == expected
    assert opt.state_bytes() < adamw
    low_bytes = sum(4 * p.numel() for p in low)
    assert opt.state_bytes() <= adamw - low_bytes + 0.5 * low_bytes


# ---------------------------------------------------------------------------------------------
# every flag alternative runs

FLAG_CASES = {
    "svd": dict(group=dict(proj_method="svd")),
    "svd_lowrank": dict(group=dict(proj_method="svd_lowrank")),
    "left": dict(group=dict(proj_type="left")),
    "right": dict(group=dict(proj_type="right")),
    "reverse_std": dict(group=dict(proj_type="reverse_std")),
    "no_error_feedback": dict(group=dict(error_feedback=False)),
    "ef_fp32": dict(group=dict(ef_dtype="fp32")),
    "faithful_bf16": dict(opt=dict(faithful_dtypes=True), dtype=torch.bfloat16),
    "bf16": dict(dtype=torch.bfloat16),
    "no_sign_canon": dict(opt=dict(sign_canon=False)),
    "explicit": dict(opt=dict(form="explicit")),
    "no_size_guard": dict(group=dict(rank=40), opt=dict(size_guard=False)),
    "not_lowrank": dict(group=dict(enable_lowrank=False)),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_every_flag_runs(case):
    spec = FLAG_CASES[case]
    dtype = spec.get("dtype", torch.float32)
    g = torch.Generator().manual_seed(2)
    shapes = ((40, 70), (70, 40), (8, 3, 3, 3))           # and a 4-D weight, flattened to 8 x 27
    ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
    group = {**dict(params=ps, enable_lowrank=True, rank=4), **spec.get("group", {})}
    opt = LDAdamW([group], backend="reference", **spec.get("opt", {}))
    before = [p.detach().clone() for p in ps]
    for t in range(4):
        for i, p in enumerate(ps):
            p.grad = _grad(p, t, i)
        opt.step()
    for p, b in zip(ps, before):
        assert torch.isfinite(p).all() and not torch.equal(p, b)
    st = [opt.state[p] for p in ps]
    low = group["enable_lowrank"]
    if not low:
        assert all("basis" not in s for s in st)
        return
    proj_type = group.get("proj_type", "std")
    for s, sh in zip(st, ((40, 70), (70, 40), (8, 27))):
        r = min(group["rank"], min(sh))
        side = ldadam_side(sh, proj_type)
        assert s["basis"].shape == ((sh[0], r) if side == "left" else (r, sh[1]))
        assert s["exp_avg"].shape == ((r, sh[1]) if side == "left" else (sh[0], r))
    sdt = dtype if spec.get("opt", {}).get("faithful_dtypes") else torch.float32
    assert st[0]["exp_avg"].dtype == st[0]["basis"].dtype == sdt
    if group.get("error_feedback", True):
        edt = torch.float32 if group.get("ef_dtype") == "fp32" else dtype
        assert st[0]["error"].dtype == edt and st[2]["error"].shape == (8, 27)
    else:
        assert "error" not in st[0]
    if case == "svd_lowrank":   # seeded: a second run is identical
        qs = [torch.nn.Parameter(b.clone()) for b in before]
        opt2 = LDAdamW([dict(group, params=qs)], backend="reference")
        for t in range(4):
            for i, q in enumerate(qs):
                q.grad = _grad(q, t, i)
            opt2.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs))


# ---------------------------------------------------------------------------------------------
# errors

def test_bad_hyperparameters_raise_naming_the_parameter():
    p = torch.nn.Parameter(torch.randn(8, 16))
    for kw, match in [(dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
                      (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
                      (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
                      (dict(betas=0.9), "betas"), (dict(eps=0.0), "eps"), (dict(eps=-1e-8), "eps"),
                      (dict(weight_decay=-0.1), "weight_decay"), (dict(rank=0), "rank"),
                      (dict(rank=2.5), "rank"), (dict(rank=True), "rank"), (dict(rho=1.0), "rho"),
                      (dict(rho=-0.1), "rho"), (dict(proj_type="diag"), "proj_type"),
                      (dict(proj_method="qr"), "proj_method"),
                      (dict(error_feedback=1), "error_feedback"),
                      (dict(ef_dtype="bf16"), "ef_dtype"),
                      (dict(enable_lowrank="yes"), "enable_lowrank"),
                      (dict(form="fast"), "form"), (dict(size_guard=None), "size_guard"),
                      (dict(backend="gpu"), "backend"),
                      (dict(matmul_precision="fp16"), "matmul_precision")]:
        with pytest.raises(ValueError, match=match):
            LDAdamW([p], **kw)
    for group, match in [(dict(rank=-3), "rank"), (dict(rho=2.0), "rho"),
                         (dict(ef_dtype=torch.int8), "ef_dtype")]:
        with pytest.raises(ValueError, match=match):
            LDAdamW([dict(params=[p], enable_lowrank=True, **group)])


def test_bad_group_value_at_step_changes_nothing():
    mats, dense = _params(shapes=((40, 70),))
    opt = LDAdamW(_groups(mats, dense, rank=4), backend="reference")
    for i, p in enumerate(mats + dense):
        p.grad = _grad(p, 0, i)
    opt.step()
    snap = [p.detach().clone() for p in mats + dense]
    state = {k: v.clone() for k, v in opt.state[mats[0]].items() if torch.is_tensor(v)}
    opt.param_groups[1]["betas"] = (0.9, 1.5)           # the second group goes bad
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step()
    assert opt.completed_steps == 1
    assert all(torch.equal(p, s) for p, s in zip(mats + dense, snap))
    assert all(torch.equal(opt.state[mats[0]][k], v) for k, v in state.items())


@pytest.mark.parametrize("at_step", [0, 2])
def test_nonfinite_gradient_is_reported_and_leaves_weights_and_state(at_step):
    p = torch.nn.Parameter(torch.randn(20, 30))
    opt = LDAdamW([dict(params=[p], enable_lowrank=True, rank=3)], backend="reference")
    for t in range(at_step):
        p.grad = _grad(p, t, 0)
        opt.step()
    before = p.detach().clone()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
    p.grad = _grad(p, at_step, 0)
    p.grad[3, 4] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert torch.equal(p, before)
    assert opt.state[p].keys() == state.keys() and opt.completed_steps == at_step
    for k, v in state.items():
        assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v


def test_triton_backend_covers_the_power_iteration_path_only():
    """Every op of the default (power-iteration) path has a Triton implementation; the SVD
    refresh variants mix b in memory with ``ldadam_momentum_mix``, which has none, so an
    explicit triton backend refuses them at construction."""
    from lowrank_fused.dispatch import available

    p = torch.nn.Parameter(torch.randn(8, 16))
    if available("triton", p.device):
        LDAdamW([dict(params=[p], enable_lowrank=True, rank=2)], backend="triton")
    for method in ("svd", "svd_lowrank"):
        with pytest.raises(BackendUnavailable, match=r"ldadam_\w+|triton|TRITON"):
            LDAdamW([dict(params=[p], enable_lowrank=True, rank=2)], backend="triton",
                    proj_method=method)


def test_lr_scheduler_drives_the_step():
    mats, dense = _params(shapes=((40, 70),))
    opt = LDAdamW(_groups(mats, dense, rank=4), lr=1e-2, backend="reference")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    before = [p.detach().clone() for p in mats + dense]
    for i, p in enumerate(mats + dense):
        p.grad = _grad(p, 0, i)
    opt.step()
    sched.step()
    assert all(torch.equal(p, b) for p, b in zip(mats + dense, before))
    assert opt.completed_steps == 1
