"""AdaRankGrad under FSDP2 (2 gloo processes on CPU, the odd MLP of
``lowrank_fused.testing.distributed``: 41x17 projected on the right, 23x41 and 9x23 on the left,
unequal row shards): IASS runs over the shards (the one-process sketch, power iterations and
QRs on the whole thin matrices, the threshold from the all-reduced ``||G||^2``), so the run
equals the one-process run within all-reduce rounding, through refreshes and rank changes, and
a run checkpointed halfway resumes to the same weights."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.testing.distributed import (FSDP2_STEPS, FSDP2_TARGETS, _odd_loss,
                                               check_fsdp2_case, fsdp2_run, fsdp2_single,
                                               odd_batch, odd_mlp)

# t_min=1, t_max=2: a new block (IASS, moment transport) at steps 1, 3 and 5
CASES = [
    ("std", "adarankgrad", dict(rank=4, target_modules=FSDP2_TARGETS, lr=1e-2, t_min=1,
                                t_max=2, eta_th=0.9)),
    ("ritz", "adarankgrad", dict(rank=5, target_modules=FSDP2_TARGETS, lr=1e-2, t_min=1,
                                 t_max=2, eta_th=0.7, iass_mode="ritz", proj_oversample=2,
                                 proj_power_iters=2, capacity_buffers=True)),
]
KWARGS = {name: kw for name, _, kw in CASES}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    torch.set_num_threads(1)
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2_adarankgrad"))


@pytest.mark.parametrize("name", [name for name, _, _ in CASES])
def test_fsdp2_equals_one_process(name, results):
    torch.set_num_threads(1)
    check_fsdp2_case(results, name, fsdp2_single("adarankgrad", KWARGS[name]))


def _ranks(kwargs):
    """The selected rank of each projected matrix after every step of the one-process run."""
    model = odd_mlp()
    opt = lf.make_optimizer(model, "adarankgrad", **kwargs)
    history = []
    for t in range(FSDP2_STEPS):
        x, y = odd_batch(t, 2)
        _odd_loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(tuple(opt.state[model[i].weight]["rank"] for i in (0, 2, 4)))
    return history


def test_the_std_case_changes_ranks_inside_the_run():
    """The parity above covers a rank change on both sides: the one-process run of "std"
    re-selects a different rank for the right-projected 41x17 and the left 23x41 matrix."""
    torch.set_num_threads(1)
    history = _ranks(KWARGS["std"])
    assert history[0][:2] != history[-1][:2], history


def test_steady_steps_communicate_only_the_projection(results):
    """A steady step all-reduces the r x n projection of each left-projected matrix (every
    rank then holds it whole, and its norm) and one fp64 number (||G Q^T||^2) for the
    right-projected one; a refresh step stays below the gradient's own size."""
    ranks = _ranks(KWARGS["std"])
    grad_bytes = 4 * (41 * 17 + 23 * 41 + 9 * 23)
    for r in results:
        traffic = r["std:traffic"]
        for t in (1, 3):        # steps 2 and 4: no refresh, the ranks chosen at steps 1 and 3
            _, r2, r4 = ranks[t]
            assert traffic[t] == 8 + 4 * r2 * 41 + 4 * r4 * 23, traffic
        assert max(traffic) < grad_bytes, traffic
