"""The AdaptiveAdamW family under FSDP2 (2 gloo processes on CPU, the odd MLP of
``lowrank_fused.testing.distributed``: weights 41x17 projected on the right under "std",
23x41 and 9x23 on the left, rows split 21/20, 12/11, 5/4): AdaptiveAdamW (joint refreshes
with rank changes inside the run, exact and randomized spectra), RSAdamW (random subspaces
drawn whole, each rank keeping its rows), GaLore-KFAC (the Kronecker factor's statistic
summed over the rows) and GHA (the Hebbian update's products over the rows summed) each
equal the one-process run on the same global batches within all-reduce rounding; both ranks
hold the same weights; a run checkpointed halfway resumes to the same weights; a steady step
communicates what docs/methods/adaptive_adamw.md ("Under FSDP2") says."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.testing.distributed import (FSDP2_STEPS, FSDP2_TARGETS, check_fsdp2_case,
                                               fsdp2_run, fsdp2_single, odd_batch, odd_mlp)

BASE = dict(target_modules=FSDP2_TARGETS, rank=3, lr=1e-2)
# the exact SVD of every shard (its n x n Gram all-reduced even where it is larger than the
# gradient): the one-process "svd" refresh, up to rounding
EXACT = dict(exact_gram_ratio=8.0)

CASES = [
    # joint refreshes at steps 0, 2, 4: spectra from the exact SVD, ranks reallocated
    ("adaptive_svd", "adaptive_adamw",
     dict(BASE, update_proj_gap=2, rank_metric="singular_value", **EXACT)),
    # the randomized refresh over the shards (seeded by pool_step), another metric, no limiter
    ("adaptive_randomized", "adaptive_adamw",
     dict(BASE, rank=4, update_proj_gap=2, projector="randomized", proj_oversample=4,
          proj_power_iters=1, rank_metric="combined", nl_gamma=None)),
    # projector "svd" on shards whose Gram is larger than the gradient: the randomized range
    # finder, which equals the exact SVD when rank + oversample reaches min(m, n); the states
    # in capacity buffers (rank changes write into the same memory), ranks capped by max_rank
    ("adaptive_svd_fallback", "adaptive_adamw",
     dict(BASE, update_proj_gap=3, proj_oversample=30, rank_metric="gap",
          capacity_buffers=True, max_rank=5)),
    # random subspaces drifting at every other step (moment transport), both sides
    ("rsadamw", "rsadamw", dict(BASE, update_proj_gap=2, sigma=0.6, seed=3)),
    # K-FAC: refreshes at 0 and 3 (F and M transported), the root recomputed every 2 steps
    ("galore_kfac", "galore_kfac", dict(BASE, update_proj_gap=3, kfac_update_freq=2, **EXACT)),
    # GHA: the first basis an exact SVD, then the Hebbian update every step
    ("gha", "gha", dict(BASE, eta=0.7, **EXACT)),
]

# (m, n, side) of the MLP's weights under "std"
MATRICES = [(41, 17, "right"), (23, 41, "left"), (9, 23, "left")]
WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2_adaptive_adamw"))


@pytest.mark.parametrize("name,method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_adaptive_family_equals_one_process(name, method, kwargs, results):
    torch.set_num_threads(1)
    single = fsdp2_single(method, kwargs)
    check_fsdp2_case(results, name, single)     # the weights and the updates


def test_fsdp2_adaptive_cases_change_ranks():
    """The AdaptiveAdamW cases reallocate ranks inside the run (one-process run, the same
    batches): the sharded runs above follow rank changes."""
    torch.set_num_threads(1)
    for name in ("adaptive_svd", "adaptive_randomized", "adaptive_svd_fallback"):
        kwargs = dict(next(c[2] for c in CASES if c[0] == name))
        kwargs.pop("exact_gram_ratio", None)
        model = odd_mlp()
        opt = lf.make_optimizer(model, "adaptive_adamw", **kwargs)
        seen = []
        for t in range(FSDP2_STEPS):
            x, y = odd_batch(t, WORLD)
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen.append(tuple(opt.ranks()[0]))
        assert len(set(seen)) > 1, (name, seen)
        assert all(sum(r) == kwargs["rank"] * len(MATRICES) for r in seen), seen


def _steady_bytes(method, r=3):
    """fp32 bytes one rank sends into the collectives on a step with no refresh (r x n
    projections of the left matrices; the right ones' ||N||^2 for the limiter; K-FAC's
    R R^T; GHA's update: see docs/methods/adaptive_adamw.md)."""
    total = 0
    for m, n, side in MATRICES:
        if side == "left":
            total += 4 * r * n                          # P^T G
            if method == "gha":           # Y^T and ||G||^2; Z^T Z and Z^T P in fp64
                total += 4 * (r * n + 1) + 8 * 2 * r * r
        else:
            total += 4                                  # ||N||^2 (limiter)
            if method == "galore_kfac":
                total += 4 * r * r                      # R R^T
            if method == "gha":                         # G^T Y, Y^T Y and ||G||^2
                total += 4 * (n * r + r * r + 1)
    return total


@pytest.mark.parametrize("name,method,steady", [
    ("rsadamw", "rsadamw", [1, 3, 5]), ("galore_kfac", "galore_kfac", [1, 2, 4, 5]),
    ("gha", "gha", [1, 2, 3, 4, 5])])
def test_fsdp2_adaptive_family_steady_traffic(name, method, steady, results):
    for r in results:
        traffic = r[name + ":traffic"]
        assert [traffic[t] for t in steady] == [_steady_bytes(method)] * len(steady), traffic
