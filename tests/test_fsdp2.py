"""FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0; 2 gloo processes on CPU):
AdamW and HFAdamW update each rank's shard; GaLoreAdamW and LDAdamW project on the side the
one-process run uses (a left basis is row-sharded like the weight: its projection is one
all-reduce of r x n) with refreshes over the shards (lowrank_fused/sharded.py); every run
equals the single-process run on the same global batches within rounding and resumes from a
halfway checkpoint; a NaN in one rank's shard makes every rank skip (the flag is
all-reduced); a method without a sharded path refuses sharded parameters clearly."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.testing import assert_parity
from lowrank_fused.testing.distributed import (FSDP2_TARGETS, check_fsdp2_case, free_port,
                                               spawn_with_deadline,
                                               fsdp2_run, fsdp2_single, fsdp2_worker, odd_single)

STEPS = 4
WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    spawn_with_deadline(fsdp2_worker, (WORLD, free_port(), STEPS, str(out)), WORLD)
    return [torch.load(out / f"fsdp-rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name,factory", [
    ("adamw", lambda m: lf.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)),
    ("hf_adamw", lambda m: lf.HFAdamW(m.parameters(), lr=1e-2))])
def test_fsdp2_equals_single_process(name, factory, results):
    torch.set_num_threads(1)
    single = odd_single(factory, STEPS, WORLD)
    for r in results:
        for key, w in single.items():
            # the reduce-scatter averages per-rank gradients in another order than one
            # backward over the global batch: fp32 rounding grown through Adam's normalisation
            assert_parity(r[name][key], w, rtol=1e-4, name=f"{name} {key}")
    for key in single:
        assert torch.equal(results[0][name][key], results[1][name][key])


def test_fsdp2_nonfinite_skip_is_global(results):
    """A NaN in rank 1's shard only: both ranks skip the step, and the run equals the
    single-process run that skipped the same step."""
    torch.set_num_threads(1)
    assert [r["adamw_skip:skipped"] for r in results] == [1, 1]
    single = odd_single(lambda m: lf.AdamW(m.parameters(), lr=1e-2, nonfinite="skip"), STEPS,
                        WORLD, poison_step=1)
    for key, w in single.items():
        assert_parity(results[0]["adamw_skip"][key], w, rtol=1e-4, name=key)


def test_fsdp2_a_method_without_a_sharded_path_refuses_sharded_parameters(results):
    for r in results:
        assert r["refusal"] is not None
        assert "WholeMatricesOnly does not support FSDP2" in r["refusal"]
        assert "use DDP" in r["refusal"] and "Shard(dim=0)" in r["refusal"]


def test_per_layer_mode_refuses_a_process_group(results):
    for r in results:
        msg = r["per_layer_refusal"]
        assert msg is not None and "single-process" in msg


# the odd MLP (lowrank_fused.testing.distributed.odd_mlp): a right-projected 41x17 and
# left-projected 23x41 and 9x23 weights under "std", rows split unequally; refreshes at steps
# 0, 2 and 4. exact_gram_ratio: the exact SVD over shards for every matrix (the one-process
# run's projector; by default only matrices whose n x n Gram is no larger than the gradient)
LOWRANK = dict(rank=4, target_modules=FSDP2_TARGETS)
CASES = [
    ("galore_svd", "galore", dict(LOWRANK, update_proj_gap=2, lr=1e-2, weight_decay=0.1,
                                  exact_gram_ratio=1e9)),
    ("galore_randomized", "galore", dict(LOWRANK, update_proj_gap=2, lr=1e-2,
                                         projector="randomized", proj_oversample=1)),
    ("galore_reverse", "galore", dict(LOWRANK, update_proj_gap=3, lr=1e-2,
                                      proj_type="reverse_std", exact_gram_ratio=1e9)),
    ("ldadam", "ldadam", dict(LOWRANK, lr=1e-3, weight_decay=0.1, exact_gram_ratio=1e9)),
    ("ldadam_explicit", "ldadam", dict(LOWRANK, lr=1e-3, form="explicit",
                                       exact_gram_ratio=1e9)),
    ("ldadam_svd", "ldadam", dict(LOWRANK, lr=1e-3, proj_method="svd", exact_gram_ratio=1e9)),
    ("ldadam_svd_lowrank", "ldadam", dict(LOWRANK, lr=1e-3, proj_method="svd_lowrank")),
    ("galore_default", "galore", dict(LOWRANK, update_proj_gap=2, lr=1e-2)),
    ("adamw", "adamw", dict(lr=1e-2, weight_decay=0.1)),
]
# a NaN in one rank's shard only, with nonfinite="skip": every rank skips that step (on a
# refresh step for the even ones), like the one-process run with the NaN at that step
SKIP = dict(nonfinite="skip")
NAN_CASES = [(f"nan_{name}", method, dict(kw, **SKIP, poison_step=step))
             for name, method, kw, step in [
    ("galore", "galore", dict(LOWRANK, update_proj_gap=2, lr=1e-2, exact_gram_ratio=1e9), 2),
    ("ldadam", "ldadam", dict(LOWRANK, lr=1e-3, exact_gram_ratio=1e9), 3),
    ("adaptive_adamw", "adaptive_adamw", dict(LOWRANK, update_proj_gap=2, lr=1e-2,
                                              exact_gram_ratio=1e9), 2),
    ("gha", "gha", dict(LOWRANK, lr=1e-2, exact_gram_ratio=1e9), 3),
    ("adarankgrad", "adarankgrad", dict(LOWRANK, lr=1e-2, t_min=1, t_max=2, eta_th=0.9), 3),
    ("adamem", "adamem", dict(LOWRANK, update_proj_gap=2, lr=1e-2, all_layers=True,
                              exact_gram_ratio=1e9), 2),
    ("adafactor", "adafactor", dict(), 1),
    ("adapm_mini", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=2, refit_K=2), 2),
]]
# nonfinite="ignore" and a NaN in one rank's shard on a step whose refresh needs a finite
# gradient: every rank raises, none waits in a collective for a peer that left the step
IGNORE = dict(nonfinite="ignore", poison_step=2)
IGNORE_CASES = [(f"ignore_{name}", method, dict(kw, **IGNORE)) for name, method, kw in [
    ("galore", "galore", dict(LOWRANK, update_proj_gap=2, lr=1e-2)),
    ("adaptive_adamw", "adaptive_adamw", dict(LOWRANK, update_proj_gap=2, lr=1e-2)),
    ("adamem", "adamem", dict(LOWRANK, update_proj_gap=2, lr=1e-2)),
    ("adarankgrad", "adarankgrad", dict(LOWRANK, lr=1e-2, t_min=1, t_max=2)),
    ("adapm", "adapm", dict(rank=2, lr=1e-2, refit_T=2, refit_K=2)),
]]
CASES += NAN_CASES + IGNORE_CASES
EQUAL = [c for c in CASES if c[0] != "galore_default" and c not in IGNORE_CASES]


@pytest.fixture(scope="module")
def lowrank_results(tmp_path_factory):
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2-lowrank"))


@pytest.mark.parametrize("name,method,kwargs", EQUAL, ids=[c[0] for c in EQUAL])
def test_fsdp2_lowrank_equals_single_process(lowrank_results, name, method, kwargs):
    torch.set_num_threads(1)
    check_fsdp2_case(lowrank_results, name, fsdp2_single(method, kwargs))


def test_fsdp2_left_projection_communicates_r_by_n(lowrank_results):
    """GaLore's steady steps (no refresh: steps 1, 3, 5) all-reduce only the left projections
    (r x n fp32 for the 23x41 and 9x23 weights), not a gradient; a refresh step adds its
    thin products."""
    traffic = lowrank_results[0]["galore_svd:traffic"]
    want = 4 * (41 + 23) * 4
    assert [traffic[t] for t in (1, 3, 5)] == [want] * 3
    assert all(traffic[t] > want for t in (0, 2, 4))


def test_fsdp2_exact_refresh_only_where_the_gram_is_small(lowrank_results):
    """projector="svd" with the default limit: the 41x17 weight (a 17x17 Gram, smaller than
    its gradient) refreshes exactly, the 23x41 and 9x23 ones (41x41 and 23x23 Grams) by the
    randomized range finder, with one warning naming the first of them; the run completes."""
    for r in lowrank_results:
        assert "galore_default:error" not in r, r.get("galore_default:error")
        warned = r["galore_default:warnings"]
        assert len(warned) == 1 and "(23, 41)" in warned[0] and "randomized" in warned[0]
        assert r["galore_svd:warnings"] == []


@pytest.mark.parametrize("name", [c[0] for c in NAN_CASES])
def test_fsdp2_nonfinite_shard_skips_the_step_on_every_rank(lowrank_results, name):
    """The run itself equals the one-process run that skipped the same step
    (test_fsdp2_lowrank_equals_single_process); here: both ranks counted one skipped step."""
    assert [r[name + ":skipped"] for r in lowrank_results] == [1, 1]


@pytest.mark.parametrize("name", [c[0] for c in IGNORE_CASES])
def test_fsdp2_ignore_refuses_a_nonfinite_refresh_on_every_rank(lowrank_results, name):
    errors = [r.get(name + ":error", "") for r in lowrank_results]
    assert all(e.startswith("FloatingPointError") for e in errors), errors


# four ranks: the 9x23 weight's rows split 3/3/3/0, so one rank holds no row of it (and the
# biases of 9 split the same way); every collective must still be entered by every rank
FOUR = [
    ("galore", "galore", dict(LOWRANK, update_proj_gap=2, lr=1e-2, exact_gram_ratio=1e9)),
    ("adamem", "adamem", dict(LOWRANK, update_proj_gap=2, lr=1e-2, all_layers=True,
                              exact_gram_ratio=1e9)),
    ("adarankgrad", "adarankgrad", dict(LOWRANK, lr=1e-2, t_min=1, t_max=2)),
    ("adapm_mini", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=2, refit_K=2)),
]


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory):
    return fsdp2_run(FOUR, tmp_path_factory.mktemp("fsdp2-four"), steps=4, world=4)


@pytest.mark.parametrize("name,method,kwargs", FOUR, ids=[c[0] for c in FOUR])
def test_fsdp2_four_ranks_with_an_empty_shard(four_rank_results, name, method, kwargs):
    torch.set_num_threads(1)
    check_fsdp2_case(four_rank_results, name, fsdp2_single(method, kwargs, steps=4, world=4))
