"""Parameter routing for every method (docs/conventions.md) and make_optimizer, on the tiny
LLaMA model and on a plain stack of Linears."""
import math

import pytest
import torch
import torch.nn as nn

from lowrank_fused import routing
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.routing import (DENSE_METHODS, GALORE_LIKE, METHODS, make_optimizer,
                                   optimizer_class, param_groups)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=16))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return sorted(by_id[id(p)] for p in params)


def assert_partition(model, groups):
    """Every trainable parameter in exactly one group."""
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter appears twice"
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad}


ATTN_MLP = sorted(f"model.layers.{i}.{blk}.{lin}_proj.weight"
                  for i in range(2)
                  for blk, lins in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                  for lin in lins)


@pytest.mark.parametrize("method", GALORE_LIKE + ("ldadam",))
def test_galore_family_routes_attn_and_mlp_linears(method):
    model = llama()
    groups = param_groups(model, method=method, rank=8, update_proj_gap=20)
    assert_partition(model, groups)
    low, rest = groups
    assert names(model, low["params"]) == ATTN_MLP
    assert low["rank"] == 8 and low["update_proj_gap"] == 20
    assert "rank" not in rest and "update_proj_gap" not in rest
    assert set(names(model, rest["params"])) >= {"model.embed_tokens.weight", "lm_head.weight",
                                                  "model.norm.weight"}
    if method == "ldadam":
        assert low["enable_lowrank"] is True and rest["enable_lowrank"] is False
    else:
        assert "enable_lowrank" not in low and "enable_lowrank" not in rest


def test_target_modules_narrow_and_all_linear():
    model = llama()
    low = param_groups(model, method="galore", target_modules=["q_proj"], rank=4)[0]
    assert names(model, low["params"]) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    low = param_groups(model, method="adarankgrad", target_modules="all-linear")[0]
    assert names(model, low["params"]) == ATTN_MLP                  # lm_head is not targeted
    seq = mlp()
    with pytest.raises(ValueError, match="target_modules"):
        param_groups(seq, method="galore")                          # default targets: no match
    groups = param_groups(seq, method="galore", target_modules="all-linear", rank=4)
    assert_partition(seq, groups)
    assert names(seq, groups[0]["params"]) == ["0.weight", "2.weight", "4.weight", "6.weight"]
    assert names(seq, groups[1]["params"]) == ["0.bias", "2.bias", "4.bias", "6.bias"]


def test_adamem_excludes_first_and_last_layers():
    model = llama()
    groups = param_groups(model, method="adamem", rank=4, delta=0.5)
    assert_partition(model, groups)
    low, rest = groups
    assert names(model, low["params"]) == ATTN_MLP                  # embedding is not a Linear
    assert low["rank"] == 4 and low["delta"] == 0.5 and "rank" not in rest
    assert "lm_head.weight" in names(model, rest["params"])
    low = param_groups(model, method="adamem", target_modules=("mlp",))[0]
    assert all(".mlp." in n for n in names(model, low["params"]))
    seq = mlp()
    groups = param_groups(seq, method="adamem", rank=2)
    assert_partition(seq, groups)
    assert names(seq, groups[0]["params"]) == ["2.weight", "4.weight"]   # first, last left out
    with pytest.raises(ValueError, match="first and last"):
        param_groups(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), method="adamem")


@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_methods_get_one_group(method):
    model = llama()
    groups = param_groups(model, method=method, lr=3e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 3e-3 and "rank" not in groups[0]
    assert_partition(model, groups)
    with pytest.raises(ValueError, match="target_modules"):
        param_groups(model, method=method, target_modules=("attn",))


def test_frozen_and_tied_parameters():
    model = llama()
    model.lm_head.weight = model.model.embed_tokens.weight          # tied
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    for method in GALORE_LIKE + ("ldadam", "adamem") + DENSE_METHODS:
        groups = param_groups(model, method=method)
        assert_partition(model, groups)
        all_names = [n for g in groups for n in names(model, g["params"])]
        assert "model.layers.0.self_attn.q_proj.weight" not in all_names


def test_errors():
    model = llama()
    with pytest.raises(ValueError, match="method") as e:
        param_groups(model, method="sgd")
    assert all(m in str(e.value) for m in METHODS)
    for bad in (0, 2.5, True, "8", None):
        with pytest.raises(ValueError, match="rank"):
            param_groups(model, method="galore", rank=bad)
    with pytest.raises(ValueError, match="method"):
        make_optimizer(model, "lion")


def test_adapm_delegates():
    adapm = pytest.importorskip("lowrank_fused.optim.adapm")
    if not hasattr(adapm, "adapm_param_groups"):
        pytest.skip("adapm_param_groups is not there yet")
    model = llama()
    for method in ("adapm", "adapm_mini"):
        groups = param_groups(model, method=method)
        assert_partition(model, groups)
        assert groups == adapm.adapm_param_groups(model, rank=None)   # rank not given: ratio
        groups = param_groups(model, method=method, rank=4, lr=1e-3)
        assert groups == adapm.adapm_param_groups(model, rank=4, lr=1e-3)
        assert any(g.get("rank") == 4 for g in groups)
    with pytest.raises(ValueError, match="target_modules"):
        param_groups(model, method="adapm", target_modules=("attn",))


def test_make_optimizer_splits_keywords():
    model = llama()
    opt = make_optimizer(model, "galore", rank=4, update_proj_gap=7, scale=0.5, lr=2e-2,
                         weight_decay=0.1, backend="reference")
    assert type(opt).__name__ == "GaLoreAdamW"
    low, rest = opt.param_groups
    assert (low["rank"], low["update_proj_gap"], low["scale"]) == (4, 7, 0.5)
    assert low["lr"] == rest["lr"] == 2e-2 and rest["weight_decay"] == 0.1
    assert "rank" not in rest
    opt = make_optimizer(model, "adafactor", lr=1e-2, relative_step=False, backend="reference")
    assert type(opt).__name__ == "Adafactor" and len(opt.param_groups) == 1
    opt = make_optimizer(model, "adamw", hf=True, backend="reference")
    assert opt.hf and opt.defaults["eps"] == 1e-6
    with pytest.raises(ValueError, match="rank"):
        make_optimizer(model, "adamw", rank=8)
    with pytest.raises(TypeError):
        make_optimizer(model, "adamw", update_proj_gap=8)          # not an AdamW keyword


def test_every_method_has_its_class():
    for method in METHODS:
        cls = optimizer_class(method)
        assert cls.__name__ == routing.OPTIMIZER_CLASSES[method][1]
    with pytest.raises(ValueError, match="no_such_method"):
        optimizer_class("no_such_method")


@pytest.mark.parametrize("method", METHODS)
def test_make_optimizer_trains_tiny_model(method):
    """One call from the model to a working optimizer, for every method."""
    model = llama()
    kw = {} if method in DENSE_METHODS else dict(rank=4)
    if method == "adafactor":
        kw.update(lr=1e-2, relative_step=False)
    opt = make_optimizer(model, method, backend="reference", **kw)
    assert type(opt).__name__ == routing.OPTIMIZER_CLASSES[method][1]
    g = torch.Generator().manual_seed(1)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        x = torch.randint(0, 32, (4, 9), generator=g)
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert all(moved), f"{method}: {moved.count(False)} parameters never moved"
    assert all(torch.isfinite(p).all() for p in model.parameters())
