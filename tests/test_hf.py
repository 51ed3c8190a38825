"""HF integration (lowrank_fused.hf): the target-module rules of transformers'
``optim_target_modules``, and, when ``transformers`` is installed, a few Trainer steps of a
tiny randomly initialised LlamaForCausalLM with each method (no downloads)."""
import pytest
import torch

from lowrank_fused.hf import create_optimizer, hf_target_module_names
from lowrank_fused.routing import METHODS

from _methods import KW, model


def test_target_rules_follow_transformers():
    net = model()
    names = hf_target_module_names(net, ["attn", "mlp"])
    assert names and all(("attn" in n or "mlp" in n) for n in names)
    assert hf_target_module_names(net, r".*\.q_proj") == ["model.layers.0.self_attn.q_proj"]
    assert hf_target_module_names(net, "q_proj") == []                  # fullmatch, not search
    assert hf_target_module_names(net, [r"model\.layers\.\d+\.mlp\.up_proj"]) == [
        "model.layers.0.mlp.up_proj"]
    with pytest.raises(ValueError, match="optim_target_modules"):
        hf_target_module_names(net, [])


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("adamw", "adafactor")])
def test_create_optimizer_projects_exactly_the_targets(method):
    net = model()
    targets = [r".*\.q_proj", "down_proj"]
    if method.startswith("adapm"):                  # AdaPM routes by block role
        with pytest.raises(ValueError, match="AdaPM classifies blocks by role"):
            create_optimizer(net, method, optim_target_modules=targets, **KW[method])
        return
    opt = create_optimizer(net, method, optim_target_modules=targets, **KW[method])
    projected = {name for g in opt.param_groups if g.get("rank") is not None
                 and g.get("enable_lowrank", True) for name in g.get("param_names", [])}
    assert projected == {"model.layers.0.self_attn.q_proj.weight",
                         "model.layers.0.mlp.down_proj.weight"}


def test_create_optimizer_refuses_empty_selection():
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        create_optimizer(model(), "galore", optim_target_modules=["nothing_here"], rank=4)


@pytest.mark.parametrize("method", ["galore", "ldadam", "adamw"])
def test_trainer_runs(method, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=16)
    torch.manual_seed(0)
    net = transformers.LlamaForCausalLM(cfg)
    data = [{"input_ids": torch.randint(0, 64, (9,)), "labels": torch.randint(0, 64, (9,))}
            for _ in range(8)]
    kw = dict(optim_target_modules=["attn", "mlp"], rank=4) if method != "adamw" else {}
    opt = create_optimizer(net, method, **kw)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = transformers.Trainer(model=net, args=args, train_dataset=data,
                                   optimizers=(opt, None))
    before = [p.detach().clone() for p in net.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.isfinite(p).all() for p in net.parameters())
