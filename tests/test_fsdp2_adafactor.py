"""Adafactor under FSDP2 (2 gloo processes on CPU, the odd MLP of
``lowrank_fused.testing.distributed``: weights 41x17, 23x41, 9x23 with rows split 21/20, 12/11,
5/4, and their biases split too): every case equals the one-process run on the same global
batches within all-reduce rounding, both ranks hold the same weights, a run checkpointed
halfway resumes to the same weights, and each step all-reduces exactly the statistics the
math needs (docs/methods/adafactor.md, "Under FSDP2")."""
import pytest
import torch

from lowrank_fused.testing import assert_parity
from lowrank_fused.testing.distributed import (check_fsdp2_case, fsdp2_run, fsdp2_single)

# the sharded step is eager torch on any backend; the one-process run it is compared with is
# the fused kernel (Triton, the CPU interpreter here) in the first case, the eager reference
# op in the others
REF = dict(backend="reference")
CASES = [
    # HF defaults: relative step, parameter scale (RMS(W) over the whole tensor), clipping at 1
    ("default", "adafactor", dict(backend="triton")),
    # clipping active on every matrix, momentum on the clipped update, weight decay
    ("clip_momentum", "adafactor", dict(clip_threshold=0.05, beta1=0.9, weight_decay=0.1,
                                                    **REF)),
    # external lr, no parameter scale (no sum(W^2) all-reduced), another beta2 schedule
    ("external_lr", "adafactor", dict(lr=3e-2, relative_step=False, scale_parameter=False,
                                      decay_rate=-0.5, **REF)),
]

# (m, n) of the MLP's weights and the lengths of its biases
MATRICES = [(41, 17), (23, 41), (9, 23)]
BIASES = [41, 23, 9]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return fsdp2_run(CASES, tmp_path_factory.mktemp("fsdp2_adafactor"))


@pytest.mark.parametrize("name,method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_adafactor_equals_one_process(name, method, kwargs, results):
    torch.set_num_threads(1)
    single = fsdp2_single(method, kwargs)
    check_fsdp2_case(results, name, single)     # the weights and the updates


@pytest.mark.parametrize("name,method,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_adafactor_traffic(name, method, kwargs, results):
    """Per step and rank: a matrix all-reduces its column sums, the sum of its row statistics
    and (scale_parameter) sum(W^2) in one call, then sum(U^2); a vector sum(U^2) and sum(W^2)."""
    scaled = kwargs.get("scale_parameter", True)
    w = 1 if scaled else 0
    per_step = sum(4 * (n + 1 + w) + 4 for _, n in MATRICES) + len(BIASES) * 4 * (1 + w)
    for r in results:
        assert r[name + ":traffic"] == [per_step] * len(r[name + ":traffic"])


# -- a parameter with more than two dimensions: a batch of matrices split along the batch ------
class _Batched(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, 6, 7))   # 5 matrices of 6x7: 3/2
        self.bias = torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        return torch.einsum("bij,bj->bi", self.weight, x).tanh().sum(dim=1) + self.bias


def _batched_model():
    torch.manual_seed(3)
    return _Batched()


def _batched_loss(model, t):
    g = torch.Generator().manual_seed(40 + t)
    return (model(torch.randn(5, 7, generator=g)) - 1.0).square().mean()


BATCHED_KW = dict(beta1=0.9, weight_decay=0.1, clip_threshold=0.5)
BATCHED_STEPS = 4


def _batched_worker(rank, world, port, out_dir):
    import os

    from torch.distributed.fsdp import fully_shard

    import lowrank_fused as lf
    from lowrank_fused import sharded
    from lowrank_fused.testing.distributed import gloo_group

    with gloo_group(rank, world, port):
        model = _batched_model()
        fully_shard(model)
        opt = lf.Adafactor(model.parameters(), **BATCHED_KW)
        traffic = []
        for t in range(BATCHED_STEPS):
            # every rank computes the whole loss: FSDP2 averages the two equal gradients
            _batched_loss(model, t).backward()
            before = sharded.traffic()["bytes"]
            opt.step()
            traffic.append(sharded.traffic()["bytes"] - before)
            opt.zero_grad(set_to_none=True)
        out = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
        torch.save({"weights": out, "traffic": traffic,
                    "local_row": list(opt.state[model.weight]["exp_avg_sq_row"].shape)},
                   os.path.join(out_dir, f"batched-{rank}.pt"))


def test_fsdp2_adafactor_batch_of_matrices(tmp_path):
    """A (5, 6, 7) weight is five matrices; FSDP2 gives each rank whole matrices (3 and 2), so
    their statistics stay local and only sum(U^2) and sum(W^2) are all-reduced (per tensor)."""
    from lowrank_fused.testing.distributed import free_port, spawn_with_deadline
    import lowrank_fused as lf

    torch.set_num_threads(1)
    spawn_with_deadline(_batched_worker, (2, free_port(), str(tmp_path)), 2)
    res = [torch.load(tmp_path / f"batched-{r}.pt", weights_only=True) for r in range(2)]
    model = _batched_model()
    opt = lf.Adafactor(model.parameters(), **BATCHED_KW)
    for t in range(BATCHED_STEPS):
        _batched_loss(model, t).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    start = _batched_model().state_dict()
    assert [r["local_row"] for r in res] == [[3, 6], [2, 6]]
    for key, w in model.state_dict().items():
        for r in res:
            assert_parity(r["weights"][key], w, rtol=1e-4, name=key)
            assert_parity(r["weights"][key] - start[key], w - start[key], rtol=1e-3,
                          name=f"update of {key}")
        assert torch.equal(res[0]["weights"][key], res[1]["weights"][key])
    assert res[0]["traffic"] == [16] * BATCHED_STEPS       # 2 tensors x (sum U^2, sum W^2)
