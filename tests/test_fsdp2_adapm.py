"""AdaPM and AdaPM-mini under FSDP2 (2 gloo processes on CPU, the odd MLP of
``lowrank_fused.testing.distributed``, unequal row shards): the seeded initialisation of L and
the refits run over the shards (their QRs on the whole thin L, the Gram products all-reduced),
``Rg = L^T G`` is all-reduced, Adam-mini block means spanning ranks and the RMS clip reduce
over all ranks; so every run equals the one-process run within all-reduce rounding and a run
checkpointed halfway resumes to the same weights. A ``transposed=True`` weight (stored
(in, out)) is split over its logical columns: L is whole and R, Rg are each rank's columns."""
import pytest
import torch

from lowrank_fused.testing.distributed import check_fsdp2_case, fsdp2_run, fsdp2_single

# refit_T=2: a refit at steps 1, 3 and 5 (3: steps 1 and 4); rank 2 on 41x17 and 9x23
CASES = [
    # low rank (41x17, 9x23), no momentum (23x41 as an attention out-projection), full
    # momentum (the biases)
    ("adapm", "adapm", dict(rank=2, lr=1e-2, refit_T=2, refit_K=3,
                            overrides={r"^2\.weight$": "attn_out"})),
    # per-row block means (row-local), elementwise biases
    ("mini", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=3, refit_K=2)),
    # block means across the shard boundary: 3-row heads of 9x23 (rows split 5/4), one
    # scalar for a 2-D "norm" block and a sharded 1-D one; the RMS clip over all ranks
    ("mini_blocks", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=2, refit_K=2, clip_mode="rms",
                                       clip_threshold=0.5,
                                       overrides={r"^4\.weight$": {"block": "q", "head_dim": 3},
                                                  r"^2\.weight$": "norm",
                                                  r"^0\.bias$": "norm"})),
    # a fused QKV whose q, k, v row blocks (14, 14, 13 rows) straddle the 21/20 split
    ("qkv", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=2, refit_K=2,
                               overrides={r"^0\.weight$": {"block": "qkv", "head_dim": 7,
                                                            "qkv_sizes": (14, 14, 13)}})),
    # 23x41 stored (in, out): the logical 41x23 matrix, its 23 columns split 12/11
    ("transposed", "adapm", dict(rank=2, lr=1e-2, refit_T=2, refit_K=3,
                                 overrides={r"^2\.weight$": {"transposed": True}})),
    # per-row block means over split columns (one m-vector), the RMS clip
    ("mini_transposed", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=2, refit_K=2,
                                           clip_mode="rms",
                                           overrides={r"^0\.weight$": {"transposed": True}})),
]
KWARGS = {name: (method, kw) for name, method, kw in CASES}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2_adapm"))


@pytest.mark.parametrize("name", list(KWARGS))
def test_fsdp2_equals_one_process(name, results):
    torch.set_num_threads(1)
    method, kwargs = KWARGS[name]
    check_fsdp2_case(results, name, fsdp2_single(method, kwargs))


def test_steady_steps_communicate_only_the_projection(results):
    """Between refits AdaPM all-reduces ``Rg = L^T G`` (r x n) of each low-rank block and
    nothing else (its update is row-local); with block means spanning ranks and the RMS clip,
    AdaPM-mini adds one nb-vector per such block and one number per clipped tensor."""
    for r in results:
        assert r["adapm:traffic"][1] == 4 * 2 * (17 + 23), r["adapm:traffic"]
        assert r["mini:traffic"][1] == 4 * 2 * (17 + 41 + 23), r["mini:traffic"]
        # Rg of 41x17 and 9x23; fp64 block sums: 3 heads, 1 + 1 scalars; 6 RMS sums
        assert r["mini_blocks:traffic"][1] == 4 * 2 * (17 + 23) + 8 * (3 + 1 + 1) + 8 * 6, \
            r["mini_blocks:traffic"]
        # a transposed weight's Rg stays local: only 41x17's and 9x23's
        assert r["transposed:traffic"][1] == 4 * 2 * (17 + 23), r["transposed:traffic"]
        # Rg of 23x41 and 9x23; the row means of the transposed 17x41 (17 fp64 sums) and 6
        # RMS sums
        assert r["mini_transposed:traffic"][1] == 4 * 2 * (41 + 23) + 8 * 17 + 8 * 6, \
            r["mini_transposed:traffic"]
