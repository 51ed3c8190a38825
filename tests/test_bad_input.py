"""Bad input for every method: invalid hyperparameters, names, dtypes, layouts and devices
raise ValueError / TypeError naming the parameter and the value, at construction or at the
first step, with weights and state as they were; odd but valid tensors (1-D, 3-D, empty,
frozen, without gradient) are handled."""
import pytest
import torch
import torch.nn as nn

import lowrank_fused as lf
from lowrank_fused.routing import DENSE_METHODS, METHODS, optimizer_class

from _methods import assert_same, backward, model, optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

LOW_RANK = [m for m in METHODS if m not in DENSE_METHODS]


def _lr_kw(method, lr):
    return dict(lr=lr, relative_step=False) if method == "adafactor" else dict(lr=lr)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf"), "0.1"])
def test_bad_lr_at_construction(method, lr):
    with pytest.raises(ValueError, match=r"lr .*" + repr(lr)[:3]):
        optimizer(model(), method, **_lr_kw(method, lr))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "adafactor"])
@pytest.mark.parametrize("betas,bad", [((0.9, 1.0), r"betas\[1\]"), ((-0.1, 0.9), r"betas\[0\]"),
                                       ((0.9,), "betas"), ((0.9, float("nan")), r"betas\[1\]")])
def test_bad_betas(method, betas, bad):
    with pytest.raises(ValueError, match=bad):
        optimizer(model(), method, betas=betas)


@pytest.mark.parametrize("method", LOW_RANK)
@pytest.mark.parametrize("rank", [0, -3, 2.5, True, "4"])
def test_bad_rank(method, rank):
    with pytest.raises(ValueError, match=r"rank .*" + repr(rank)[:3]):
        optimizer(model(), method, rank=rank)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_backend(method):
    with pytest.raises(ValueError, match="backend must be one of .*'gpu'"):
        optimizer(model(), method, backend="gpu")


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of .*'galore2'"):
        lf.make_optimizer(model(), "galore2")


@pytest.mark.parametrize("method,key,value", [
    ("galore", "proj_type", "diagonal"), ("galore", "projector", "qr"),
    ("adaptive_adamw", "rank_metric", "entropy"), ("ldadam", "proj_method", "qr"),
    ("ldadam", "proj_type", "both"), ("adarankgrad", "iass_mode", "greedy"),
    ("adarankgrad", "exit_rule", "never"), ("adamem", "v_source", "grad"),
    ("adamem", "residual_form", "implicit"), ("adapm", "clip_mode", "global"),
    ("adapm", "adapm_correction", "biased")])
def test_unknown_names(method, key, value):
    with pytest.raises(ValueError, match=rf"{key} must be one of .*'{value}'"):
        optimizer(model(), method, **{key: value})


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_unsupported_parameter_dtype(method, dtype):
    if method == "adafactor" and dtype == torch.float64:
        pytest.skip("Adafactor runs float64, as HF's does")
    with pytest.raises(TypeError, match=rf"'[a-z_.0-9]+' \(shape .*\) has dtype {dtype}"):
        optimizer(model(dtype=dtype if dtype != torch.complex64 else torch.float32)
                  .to(dtype), method)


@pytest.mark.parametrize("method", METHODS)
def test_mixed_devices(method):
    a = nn.Parameter(torch.randn(8, 6))
    b = nn.Parameter(torch.randn(8, 6, device="meta"))
    with pytest.raises(ValueError, match="one device: parameter 0 .* cpu, parameter 1 .* meta"):
        optimizer_class(method)([a, b])


@pytest.mark.parametrize("method", METHODS)
def test_sparse_gradient_changes_nothing(method):
    net = model()
    opt = optimizer(net, method)
    backward(net, 0)
    opt.step()
    backward(net, 1)
    before = snapshot(net, opt)
    emb = net.model.embed_tokens.weight
    emb.grad = emb.grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients \('model.embed_tokens.weight'"):
        opt.step()
    assert_same(before, snapshot(net, opt), method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("lr", -1.0), ("weight_decay", -1.0)])
def test_bad_value_written_mid_run_changes_nothing(method, key, value):
    """A scheduler (or a user) writing a bad value into a group: refused at the step."""
    net = model()
    opt = optimizer(net, method, **_lr_kw(method, 1e-3))
    backward(net, 0)
    opt.step()
    opt.zero_grad()
    backward(net, 1)
    before = snapshot(net, opt)
    for g in opt.param_groups:
        g[key] = value
    with pytest.raises(ValueError, match=rf"{key}.*{value}"):
        opt.step()
    assert_same(before, snapshot(net, opt), method)


@pytest.mark.parametrize("method", METHODS)
def test_lr_as_a_device_tensor_is_refused_and_a_cpu_tensor_taken(method):
    """``lr`` as a tensor on a device (here ``meta``, which stands for any device: the check
    looks only at the device type) is refused at construction and when written mid-run, naming
    ``lr`` and the device, with nothing written: it would be read on the host at every step, a
    wait for the device each time. A one-element CPU tensor is taken and read at every step:
    changed in place (as torch's schedulers do) it gives the weights a float lr of the same
    value gives."""
    with pytest.raises(ValueError, match=r"lr must be a number or a CPU tensor.*meta"):
        optimizer(model(), method, **_lr_kw(method, torch.tensor(1e-3, device="meta")))
    runs = []
    for kind in ("float", "tensor"):
        net = model()
        lr = torch.tensor(1e-2)
        opt = optimizer(net, method, **_lr_kw(method, lr if kind == "tensor" else float(lr)))
        for step in range(3):
            backward(net, step)
            opt.step()
            opt.zero_grad()
            if kind == "tensor":
                lr.mul_(0.5)              # every group holds this one tensor: halved once
            else:
                for g in opt.param_groups:
                    g["lr"] = float(torch.tensor(g["lr"]) * 0.5)
        runs.append((net, opt))
    for (a, _), (b, _) in zip(runs, runs[1:]):
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    net, opt = runs[1]
    backward(net, 5)
    before = snapshot(net, opt)
    for g in opt.param_groups:
        g["lr"] = torch.tensor(1e-3, device="meta")
    with pytest.raises(ValueError, match=r"lr must be a number or a CPU tensor.*meta"):
        opt.step()
    assert_same(before, snapshot(net, opt), method)


def _odd_params():
    torch.manual_seed(0)
    return {"vector": nn.Parameter(torch.randn(7)), "conv": nn.Parameter(torch.randn(6, 3, 5)),
            "empty": nn.Parameter(torch.randn(0, 9)), "matrix": nn.Parameter(torch.randn(12, 10)),
            "frozen": nn.Parameter(torch.randn(12, 10), requires_grad=False),
            "no_grad": nn.Parameter(torch.randn(5, 4))}


def _groups(method, params):
    ps = list(params.values())
    if method == "adaptive_adamw":      # a global refresh needs every projected gradient
        rest = [params["frozen"], params["no_grad"]]
        return [{"params": [p for p in ps if all(p is not q for q in rest)], "rank": 2},
                {"params": rest}]
    if method in DENSE_METHODS:
        return [{"params": ps}]
    if method in ("adapm", "adapm_mini"):
        return [{"params": ps, "rank": 2, "block": "mlp"}]
    group = {"params": ps, "rank": 2}
    if method == "ldadam":
        group["enable_lowrank"] = True
    return [group]


@pytest.mark.parametrize("method", METHODS)
def test_1d_3d_empty_frozen_and_gradless_parameters(method):
    params = _odd_params()
    kw = _lr_kw(method, 1e-2)
    opt = optimizer_class(method)(_groups(method, params), **kw)
    fixed = {k: params[k].detach().clone() for k in ("frozen", "no_grad", "empty")}
    start = {k: p.detach().clone() for k, p in params.items()}
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for k in ("vector", "conv", "empty", "matrix"):
            params[k].grad = torch.randn(params[k].shape, generator=g)
        opt.step()
    for k, v in fixed.items():
        assert torch.equal(params[k], v), f"{method}: {k} changed"
    for k in ("vector", "conv", "matrix"):
        assert torch.isfinite(params[k]).all(), f"{method}: {k} not finite"
        assert not torch.equal(params[k], start[k]), f"{method}: {k} was not updated"
    assert params["conv"].shape == (6, 3, 5)


def test_adaptive_names_a_projected_parameter_without_gradient():
    params = _odd_params()
    opt = optimizer_class("adaptive_adamw")([{"params": [params["matrix"], params["no_grad"]],
                                              "rank": 2}])
    params["matrix"].grad = torch.randn(12, 10)
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(5, 4\)\) has no gradient"):
        opt.step()


@pytest.mark.parametrize("method", ["galore", "adamw"])
def test_refused_param_group_leaves_the_optimizer_as_it_was(method):
    net = model()
    opt = optimizer_class(method)(net.parameters())
    n = len(opt.param_groups)
    with pytest.raises(TypeError, match="dtype torch.float64"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3, dtype=torch.float64))]})
    assert len(opt.param_groups) == n


@pytest.mark.parametrize("method", ["adamw", "galore"])
def test_sparse_gradient_after_zero_stride_gradients_changes_nothing(method):
    """A sparse COO tensor reports all-zero strides, as an expanded dense gradient does: after
    steps with such a dense gradient, the step's layout check must still see the sparse one
    (the layouts are compared whenever a recorded gradient has only zero strides)."""
    net = model()
    opt = optimizer(net, method)
    norm = net.model.norm.weight
    for t in range(2):
        opt.zero_grad(set_to_none=True)
        backward(net, t)
        norm.grad = torch.full((1,), 1e-3).expand(norm.shape)    # strides (0,)
        opt.step()
    opt.zero_grad(set_to_none=True)
    backward(net, 2)
    norm.grad = torch.full(norm.shape, 1e-3).to_sparse()
    assert norm.grad.stride() == (0,)
    before = snapshot(net, opt)
    with pytest.raises(RuntimeError, match=r"sparse gradients \('model.norm.weight'"):
        opt.step()
    assert_same(before, snapshot(net, opt), method)
