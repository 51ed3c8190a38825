"""Batched subspace primitives (lowrank_fused.subspace): CholeskyQR2 with Householder
fallback, power iteration, randomized range finder and SVD, shape-grouped refresh."""
import pytest
import torch

from lowrank_fused import subspace as ss
from lowrank_fused.linalg import canonical_svd_basis, orth


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def decaying(B, m, n, *, decay=0.85, seed=0, noise=1e-3):
    """Gradient-like matrices: singular values s_i = decay^i plus a small noise floor."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(B, m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(B, n, k, generator=g))
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (U * s) @ V.transpose(-1, -2) + noise * torch.randn(B, m, n, generator=g) / n ** 0.5


def _ortho_err(Q):
    k = Q.shape[-1]
    return (Q.transpose(-1, -2) @ Q - torch.eye(k)).norm(dim=(-2, -1))


def test_cholqr2_orthonormal_reconstructs_and_matches_householder():
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(6, 200, 12, generator=g)
    Q, R, fb = ss.cholesky_qr2(Y, return_r=True, return_fallback=True)
    assert not fb.any()
    assert _ortho_err(Q).max() < 1e-5
    assert torch.allclose(Q @ R, Y, atol=1e-4, rtol=1e-4)
    assert (torch.diagonal(R, dim1=-2, dim2=-1) >= 0).all()
    assert torch.allclose(torch.triu(R), R)
    Qh, Rh = torch.linalg.qr(Y)
    sign = torch.where(torch.diagonal(Rh, dim1=-2, dim2=-1) < 0, -1.0, 1.0)
    assert torch.allclose(Q, Qh * sign.unsqueeze(-2), atol=1e-4)
    for b in range(6):
        assert torch.allclose(Q[b], orth(Y[b]), atol=1e-4)


def test_cholqr2_bf16_input_single_matrix():
    Y = torch.randn(64, 5, generator=torch.Generator().manual_seed(2)).bfloat16()
    Q = ss.cholesky_qr2(Y)
    assert Q.dtype == torch.float32 and Q.shape == (64, 5)
    assert _ortho_err(Q) < 1e-5


def test_cholqr2_rank_deficient_zero_and_mixed_batch():
    g = torch.Generator().manual_seed(3)
    m, k = 80, 8
    good = torch.randn(m, k, generator=g)
    low = torch.randn(m, 3, generator=g) @ torch.randn(3, k, generator=g)   # rank 3
    zero = torch.zeros(m, k)
    ill = torch.randn(m, k, generator=g) * torch.logspace(0, -6, k)        # cond 1e6
    dup = good.clone()
    dup[:, 5] = dup[:, 2]                                                    # repeated column
    Y = torch.stack([good, low, zero, ill, dup])
    Q, R, fb = ss.cholesky_qr2(Y, return_r=True, return_fallback=True, fill_seed=7)
    assert fb.tolist() == [False, True, True, True, True]
    assert _ortho_err(Q).max() < 1e-5
    assert torch.isfinite(Q).all()
    assert (torch.diagonal(R, dim1=-2, dim2=-1) >= -1e-4).all()   # ~0 on completed columns
    # kept columns span Y: Q Q^T Y = Y
    assert torch.allclose(Q @ (Q.transpose(-1, -2) @ Y), Y, atol=1e-4)
    # deterministic: same seed, same completion
    assert torch.equal(Q, ss.cholesky_qr2(Y, fill_seed=7))
    # the well-conditioned matrix is unaffected by its neighbours
    assert torch.allclose(Q[0], ss.cholesky_qr2(good), atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cholqr2_nonfinite_falls_back_without_poisoning_batch(bad):
    Y = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(4))
    Y[0, 3, 1] = bad
    Q, fell_back = ss.cholesky_qr2(Y, return_fallback=True)
    assert fell_back.tolist() == [True, False]
    assert _ortho_err(Q[1]) < 1e-5
    assert torch.allclose(Q[1], ss.cholesky_qr2(Y[1]), atol=1e-6)


def _energy_exact(G, r):
    s = torch.linalg.svdvals(G.float())
    return (s[..., :r] ** 2).sum(-1) / (s ** 2).sum(-1)


@pytest.mark.parametrize("shape", [(4, 256, 128), (3, 96, 300)])
def test_randomized_energy_within_1pct_on_decaying_spectra(shape):
    G = decaying(*shape, seed=5)
    r = 16
    for side in ("left", "right"):
        P = ss.randomized_basis(G, r, side)
        e = ss.captured_energy(G, P, side)
        assert (e >= 0.99 * _energy_exact(G, r)).all(), (side, e)
        ortho = P if side == "left" else P.transpose(-1, -2)
        assert _ortho_err(ortho).max() < 1e-5


def test_randomized_svd_matches_exact_top_vectors():
    G = decaying(2, 120, 90, decay=0.7, seed=6)
    U, S, V = ss.randomized_svd(G, 6, oversample=6, power_iters=2)
    s = torch.linalg.svdvals(G)[:, :6]
    assert torch.allclose(S, s, rtol=1e-4)
    for b in range(2):
        Pe = canonical_svd_basis(G[b], 6, "left")
        assert torch.allclose(U[b], Pe, atol=1e-3)        # same signs: canonical on both
        Pr = canonical_svd_basis(G[b], 6, "right")
        assert torch.allclose(ss.randomized_basis(G[b:b + 1], 6, "right")[0], Pr, atol=1e-3)
    assert torch.allclose(U @ torch.diag_embed(S) @ V.transpose(-1, -2),
                          (U @ U.transpose(-1, -2)) @ G, atol=1e-4)


def test_flat_spectrum_energy_matches_svd_but_basis_is_arbitrary():
    """Documented behaviour on a flat spectrum: every r-subspace of the dominant space is
    optimal, so the captured energy equals the SVD's (r / min(m, n)) while the basis itself
    need not agree with the SVD's."""
    g = torch.Generator().manual_seed(8)
    U, _ = torch.linalg.qr(torch.randn(1, 64, 32, generator=g))
    V, _ = torch.linalg.qr(torch.randn(1, 48, 32, generator=g))
    G = U @ V.transpose(-1, -2)                   # all 32 singular values equal to 1
    P = ss.randomized_basis(G, 8, "left")
    e = ss.captured_energy(G, P, "left")
    assert torch.allclose(e, torch.tensor([8 / 32]), atol=1e-4)


def test_power_iteration_warm_start_converges():
    G = decaying(3, 150, 100, decay=0.6, seed=9)
    Q0 = ss.cholesky_qr2(torch.randn(3, 150, 5, generator=torch.Generator().manual_seed(0)))
    Q = ss.power_iteration(G, Q0, iters=6)
    e = ss.captured_energy(G, Q)
    assert (e >= 0.999 * _energy_exact(G, 5)).all()
    # warm start at the answer is a fixed point (up to sign canon: diag(R) >= 0)
    Pe = ss.exact_basis(G, 5, "left")
    Q1 = ss.power_iteration(G, Pe, iters=1)
    assert (ss.captured_energy(G, Q1) >= 0.9999 * _energy_exact(G, 5)).all()
    Qw = ss.range_finder(G, 5, power_iters=0, warm_start=Pe)
    assert (ss.captured_energy(G, Qw) >= 0.9999 * _energy_exact(G, 5)).all()


def test_refresh_bases_groups_by_shape_and_matches_svd():
    g = torch.Generator().manual_seed(10)
    Gs = [decaying(1, 64, 48, seed=s)[0] for s in range(3)] + [decaying(1, 40, 72, seed=7)[0]]
    items = [(G, 4, "left") for G in Gs[:3]] + [(Gs[3], 4, "right")]
    exact = ss.refresh_bases(items, projector="svd")
    for (G, r, side), P in zip(items, exact):
        assert torch.allclose(P, canonical_svd_basis(G, r, side), atol=1e-5)
    rnd = ss.refresh_bases(items, projector="randomized")
    for (G, r, side), P, Pe in zip(items, rnd, exact):
        assert P.shape == Pe.shape
        assert ss.captured_energy(G, P, side) >= 0.99 * ss.captured_energy(G, Pe, side)
    with pytest.raises(ValueError):
        ss.refresh_bases(items, projector="nope")
    with pytest.raises(FloatingPointError):
        ss.refresh_bases([(torch.full((8, 8), float("nan")), 2, "left")])
