"""FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0; 2 gloo processes on CPU):
AdamW and HFAdamW update each rank's shard; GaLoreAdamW projects each rank's rows on the right
with a basis from the all-reduced Gram (no gathered gradient); LDAdamW sums its power
iteration's n x r parts over the ranks; all equal the single-process run
on the same global batches within rounding; a NaN in one rank's shard makes every rank skip
(the flag is all-reduced); the other low-rank methods refuse sharded parameters clearly."""
import pytest
import torch
import torch.multiprocessing as mp

import lowrank_fused as lf
from lowrank_fused.testing import assert_parity
from lowrank_fused.testing.distributed import (free_port, fsdp2_worker, galore_groups,
                                               ldadam_groups, mlp_single)

STEPS = 4
WORLD = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(fsdp2_worker, args=(WORLD, free_port(), STEPS, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"fsdp-rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name,factory", [
    ("adamw", lambda m: lf.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)),
    ("hf_adamw", lambda m: lf.HFAdamW(m.parameters(), lr=1e-2)),
    ("galore", lambda m: lf.GaLoreAdamW(galore_groups(m), lr=1e-2)),
    ("ldadam", lambda m: lf.LDAdamW(ldadam_groups(m), lr=1e-3))])
def test_fsdp2_equals_single_process(name, factory, results):
    torch.set_num_threads(1)
    single = mlp_single(factory, STEPS, WORLD)
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
    single = mlp_single(lambda m: lf.AdamW(m.parameters(), lr=1e-2, nonfinite="skip"), STEPS,
                        WORLD, poison_step=1)
    for key, w in single.items():
        assert_parity(results[0]["adamw_skip"][key], w, rtol=1e-4, name=key)


def test_fsdp2_methods_needing_whole_matrices_refuse_sharded_parameters(results):
    for r in results:
        assert r["refusal"] is not None
        assert "AdaptiveAdamW does not support FSDP2" in r["refusal"] and "use DDP" in r["refusal"]


def test_per_layer_mode_refuses_a_process_group(tmp_path):
    from lowrank_fused.testing.distributed import per_layer_refusal_worker

    mp.spawn(per_layer_refusal_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD,
             join=True)
    for r in range(WORLD):
        msg = torch.load(tmp_path / f"pl-{r}.pt", weights_only=True)
        assert msg is not None and "single-process" in msg
