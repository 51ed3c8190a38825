"""AdaMeM under FSDP2 (2 gloo processes on CPU, the odd MLP of
``lowrank_fused.testing.distributed``: weights 41x17 (m > n: run on its transpose, the basis
over the columns, replicated), 23x41 and 9x23 (m <= n: the basis over the split rows), rows
split 21/20, 12/11, 5/4; biases split too): every case equals the one-process run on the
same global batches within all-reduce rounding, with refreshes inside the run, both ranks
hold the same weights, a run checkpointed halfway resumes to the same weights, and a steady
step all-reduces exactly what the math needs (docs/methods/adamem.md, "Under FSDP2")."""
import pytest
import torch

from lowrank_fused.testing.distributed import (FSDP2_TARGETS, check_fsdp2_case, fsdp2_run,
                                               fsdp2_single)

LOW = dict(target_modules=FSDP2_TARGETS, all_layers=True)   # all three weights low rank
# the first case runs the Triton kernels (its ops on each rank's shard; the CPU interpreter
# here), the others the eager reference ops (the interpreter's time is spent once)
REF = dict(backend="reference")
CASES = [
    # projector "svd": the 41x17 refreshes by the exact SVD of its all-reduced 17 x 17 Gram;
    # the two others (their Gram larger than the gradient) by the randomized range finder,
    # here with an oversample that spans the whole row space, so exact as well
    ("svd", "adamem", dict(rank=4, update_proj_gap=2, proj_oversample=32, lr=1e-2,
                           backend="triton", **LOW)),
    # the randomized projector (default oversample: a true sketch on every matrix), the
    # moments transported at each refresh, statistics from R, weight decay, delta
    ("randomized_transport", "adamem", dict(
        rank=3, update_proj_gap=2, projector="randomized", transport_on_refresh=True,
        v_source="gradient", weight_decay=0.1, delta=0.5, lr=1e-2, **LOW, **REF)),
    # the explicit residual (colsum(S^2) all-reduced), no bias correction
    ("explicit", "adamem", dict(rank=4, update_proj_gap=3, residual_form="explicit",
                                bias_correction=False, proj_oversample=32, lr=1e-2, **LOW,
                                **REF)),
    # the paper's routing: first and last layers (41x17, 9x23) on AdaMeM's factored Adafactor
    ("adafactor_ends", "adamem", dict(rank=4, update_proj_gap=2, proj_oversample=32,
                                      lr=1e-2, **REF)),
]

# (m, n) of the MLP's weights
MATRICES = [(41, 17), (23, 41), (9, 23)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2_adamem"))


@pytest.mark.parametrize("name,method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_adamem_equals_one_process(name, method, kwargs, results):
    torch.set_num_threads(1)
    single = fsdp2_single(method, kwargs)
    check_fsdp2_case(results, name, single)     # the weights and the updates


def _steady_bytes(kwargs):
    """Bytes one rank all-reduces in a step without a refresh: per low-rank matrix with
    m <= n, R (r x n) and colsum(G^2) or colsum(S^2) (n); with m > n the row sums of the
    factored statistics (r); per Adafactor matrix its column sums and the sum of its row
    statistics (n + 1); vectors nothing."""
    r = kwargs["rank"]
    low = ["0", "2", "4"] if kwargs.get("all_layers") else ["2"]
    total = 0
    for name, (m, n) in zip(["0", "2", "4"], MATRICES):
        if name not in low:
            total += 4 * (n + 1)
        elif m > n:
            total += 4 * r
        else:
            total += 4 * (r + 1) * n
    return total


@pytest.mark.parametrize("name,method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_adamem_traffic(name, method, kwargs, results):
    gap = kwargs["update_proj_gap"]
    want = _steady_bytes(kwargs)
    for r in results:
        traffic = r[name + ":traffic"]
        for t, got in enumerate(traffic):
            if t % gap == 0:          # a refresh: more than a steady step
                assert got > want, (name, t, got, want)
            else:
                assert got == want, (name, t, got, want)
