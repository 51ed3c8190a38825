"""Every method under FSDP2 with bf16 weights (2 gloo processes): with the same gradients in
both runs (``fixed_grad``: the backward passes' own bf16 rounding would otherwise differ by
more than the optimizer does), the sharded run equals the one-process run within two bf16
roundings of the largest weight, both ranks hold the same weights, and a halfway checkpoint
resumes to the same weights. The fp32 cases of each method are in its own test_fsdp2_* file."""
import pytest
import torch

from lowrank_fused.testing.distributed import (FSDP2_TARGETS, check_fsdp2_case, fsdp2_run,
                                               fsdp2_single)

T = dict(target_modules=FSDP2_TARGETS)
BF16 = dict(dtype="bfloat16", fixed_grads=True)
EXACT = dict(exact_gram_ratio=1e9)           # the one-process run's exact SVD on every matrix
CASES = [(name, method, dict(kw, **BF16)) for name, method, kw in [
    ("adamw", "adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adafactor", "adafactor", dict(lr=3e-2, relative_step=False, beta1=0.9)),
    ("galore", "galore", dict(T, rank=4, update_proj_gap=2, lr=1e-2, **EXACT)),
    ("adaptive_adamw", "adaptive_adamw", dict(T, rank=3, update_proj_gap=2, lr=1e-2, **EXACT)),
    ("rsadamw", "rsadamw", dict(T, rank=3, update_proj_gap=2, lr=1e-2, sigma=0.6, seed=3)),
    ("gha", "gha", dict(T, rank=3, lr=1e-2, eta=0.7, **EXACT)),
    ("galore_kfac", "galore_kfac", dict(T, rank=3, update_proj_gap=3, kfac_update_freq=2,
                                        lr=1e-2, **EXACT)),
    ("adarankgrad", "adarankgrad", dict(T, rank=4, lr=1e-2, t_min=1, t_max=2, eta_th=0.9)),
    ("ldadam", "ldadam", dict(T, rank=4, lr=1e-3, **EXACT)),
    ("adamem", "adamem", dict(T, rank=4, update_proj_gap=2, lr=1e-2, all_layers=True,
                              **EXACT)),
    ("adapm", "adapm", dict(rank=2, lr=1e-2, refit_T=2, refit_K=3)),
    ("adapm_mini", "adapm_mini", dict(rank=2, lr=1e-2, refit_T=3, refit_K=2)),
]]
# two roundings of the largest weight (bf16 keeps 8 bits): the sums over ranks may move a
# weight across a rounding boundary
RTOL = 2 * 2.0 ** -8


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2_bf16"))


@pytest.mark.parametrize("name,method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_bf16_equals_one_process(name, method, kwargs, results):
    torch.set_num_threads(1)
    single = fsdp2_single(method, kwargs)
    assert all(w.dtype == torch.bfloat16 for w in single.values())
    check_fsdp2_case(results, name, single, rtol=RTOL, update_rtol=None)
