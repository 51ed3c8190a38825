"""lowrank_fused/sharded.py: the collectives of row-sharded matrices (FSDP2's dim-0 shards)
equal the one-process functions on the whole matrix. Two gloo processes hold unequal row
shards of fixed matrices; each result is compared with ``subspace.randomized_svd``,
``linalg.canonical_svd_basis`` and ``ops.project`` on the whole matrix, and the bytes each
collective moved with what the math needs."""
import pytest
import torch

from lowrank_fused import ops, sharded, subspace
from lowrank_fused.linalg import canonical_svd_basis
from lowrank_fused.testing import assert_parity
from lowrank_fused.testing.distributed import (SHARDED_OPS_SHAPES, free_port, sharded_ops_matrix,
                                               spawn_with_deadline,
                                               sharded_ops_worker)

WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    spawn_with_deadline(sharded_ops_worker, (WORLD, free_port(), str(out)), WORLD)
    return [torch.load(out / f"sharded-{r}.pt", weights_only=True) for r in range(WORLD)]


def _whole(results, key, side):
    """The whole basis from the ranks' parts (left: rows concatenated; right: replicated, the
    same on every rank)."""
    parts = [r[key][0] if isinstance(r[key], tuple) else r[key] for r in results]
    if side == "left":
        return torch.cat(parts)
    assert torch.equal(parts[0], parts[1])
    return parts[0]


@pytest.mark.parametrize("shape", SHARDED_OPS_SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("iters", [0, 2])
def test_randomized_svd_over_shards_equals_whole(results, shape, side, iters):
    m, n = shape
    G = sharded_ops_matrix(m, n)
    A = G if side == "left" else G.t()
    U, S, _ = subspace.randomized_svd(A, 3, oversample=2, power_iters=iters, seed=5,
                                      compute_v=False, check_finite=True)
    want = U if side == "left" else U.t()
    got = _whole(results, (m, n, side, "rsvd", iters), side)
    assert_parity(got, want, rtol=1e-5, name=f"basis {side}")
    for r in results:
        assert_parity(r[(m, n, side, "rsvd", iters)][1], S, rtol=1e-5, name="S")


@pytest.mark.parametrize("shape", SHARDED_OPS_SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_exact_svd_over_shards_equals_svd(results, shape, side):
    m, n = shape
    G = sharded_ops_matrix(m, n)
    want = canonical_svd_basis(G, 3, side, True)
    assert_parity(_whole(results, (m, n, side, "exact"), side), want, rtol=1e-5, name=side)
    S = torch.linalg.svdvals(G)[:3]
    assert_parity(results[0][(m, n, side, "exact")][1], S, rtol=1e-5, name="S")


@pytest.mark.parametrize("shape", SHARDED_OPS_SHAPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_project_over_shards(results, shape, side):
    """Left: P^T G all-reduced (every rank holds the whole r x n, r*n*4 bytes sent); right:
    this rank's rows of G Q^T, no communication."""
    m, n = shape
    G = sharded_ops_matrix(m, n)
    B = torch.randn(*((m, 3) if side == "left" else (3, n)),
                    generator=torch.Generator().manual_seed(3))
    want = ops.project(G, B, side=side, backend="reference")
    key = (m, n, side, "project")
    if side == "left":
        for r in results:
            assert_parity(r[key], want, rtol=1e-5, name="R")
            assert r[(m, n, side, "project-bytes")] == 3 * n * 4
    else:
        assert_parity(torch.cat([r[key] for r in results]), want, rtol=1e-5, name="R")
        assert all(r[(m, n, side, "project-bytes")] == 0 for r in results)


@pytest.mark.parametrize("shape", SHARDED_OPS_SHAPES)
def test_rows_sum_sq_and_gather(results, shape):
    m, n = shape
    G = sharded_ops_matrix(m, n)
    for r in results:
        assert_parity(r[(m, n, "sum_sq")], G.double().square().sum().float(), rtol=1e-6,
                      name="sum_sq")
        # the workers build G with one thread: equal to this process's G up to rounding
        assert_parity(r[(m, n, "gather")], G[:, :2], rtol=1e-6, name="gather")


def test_randomized_refresh_moves_thin_matrices_only(results):
    """A randomized refresh of a 13 x 7 matrix sends O((m + n) k) numbers, not m x n."""
    for side in ("left", "right"):
        for iters in (0, 2):
            sent = results[0][(13, 7, side, "rsvd-bytes", iters)]
            assert 0 < sent < 13 * 7 * 4 * (2 + 2 * iters), (side, iters, sent)


def test_one_process_rows_reproduce_subspace_bit_for_bit():
    """With the Rows of one process every collective is a no-op and the sharded refresh is
    the one-process function itself."""
    G = sharded_ops_matrix(13, 7)
    rows = sharded.single_rows(13)
    for side in ("left", "right"):
        A = G if side == "left" else G.t()
        U, S, _ = subspace.randomized_svd(A, 3, oversample=2, power_iters=2, seed=1,
                                          compute_v=False)
        B, S2 = sharded.randomized_svd(G, 3, side, rows, oversample=2, power_iters=2, seed=1)
        assert torch.equal(B, U if side == "left" else U.t().contiguous())
        assert torch.equal(S, S2)


def test_chunk_counts_follow_torch_chunk():
    for m in (0, 1, 2, 5, 9, 41):
        for world in (1, 2, 3, 4):
            want = [len(c) for c in torch.arange(m).chunk(world)] if m else []
            want += [0] * (world - len(want))
            assert sharded._chunk_counts(m, world) == want, (m, world)


def test_basis_rejects_an_unknown_projector():
    rows = sharded.single_rows(4)
    with pytest.raises(ValueError, match="projector"):
        sharded.basis(torch.randn(4, 3), 2, "left", rows, projector="qr")


def test_gram_is_small_weighs_the_gradient_and_the_randomized_refresh():
    """The exact SVD's fp64 n x n Gram is used where it is no larger than the gradient, or
    than the randomized refresh it replaces at that rank (LLaMA-1B's 2048 x 2048 at rank 512
    vs the rank 1024 an adaptive allocation may reach)."""
    assert sharded.gram_is_small((5461, 2048))              # n <= m / 2
    assert not sharded.gram_is_small((2048, 5461))
    assert not sharded.gram_is_small((2048, 2048), 512)     # 33.5 MB vs 21.3 MB
    assert sharded.gram_is_small((2048, 2048), 1024)        # 33.5 MB vs 42.4 MB
    assert sharded.randomized_bytes((2048, 2048), 512) == 4 * 520 * 4096 * 3
    old = sharded.EXACT_GRAM_RATIO
    try:
        sharded.EXACT_GRAM_RATIO = 2.0
        assert sharded.gram_is_small((2048, 2048))
    finally:
        sharded.EXACT_GRAM_RATIO = old
