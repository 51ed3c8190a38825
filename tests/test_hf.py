"""HF integration (lowrank_fused.hf): the target-module rules of transformers'
``optim_target_modules``, and real ``transformers.Trainer`` runs of a tiny randomly
initialised LlamaForCausalLM (from a config, no downloads): ``optimizers=(opt, None)``,
``optim_target_modules``, and a checkpoint resumed through ``resume_from_checkpoint``.

transformers and accelerate are optional dependencies (``make`` installs them where it can):
the Trainer tests skip without them, except under CI (``CI`` set), where they must run."""
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from lowrank_fused.hf import create_optimizer, hf_target_module_names
from lowrank_fused.routing import METHODS

from _methods import KW, model

ROOT = Path(__file__).resolve().parents[1]


def _hub_kernels_package():
    """transformers >= 5 depends on the Hub's ``kernels`` package and imports it by that name.
    With the repository root on sys.path (``python -m pytest`` from the root puts it there)
    the name finds this repository's top-level ``kernels/`` folder (the Triton kernels, which
    are installed as ``lowrank_fused.kernels``) and transformers fails to import from it. Load
    the installed ``kernels`` distribution first; without one, transformers does not ask for
    it."""
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if ROOT not in Path(getattr(loaded, "__file__", None) or ROOT).resolve().parents:
            return
        del sys.modules["kernels"]
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if Path(p or os.getcwd()).resolve() != ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


def _transformers():
    """transformers, or a skip where it (or accelerate, which Trainer needs) is not installed;
    under CI a missing one fails."""
    _hub_kernels_package()
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        import accelerate  # noqa: F401  (CI must run these tests: no skip)
        import transformers
        return transformers
    pytest.importorskip("accelerate")
    return pytest.importorskip("transformers")


def _tiny_llama(transformers, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   max_position_embeddings=16)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (9,), generator=g),
             "labels": torch.randint(0, 64, (9,), generator=g)} for _ in range(n)]


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
    transformers = _transformers()
    net = _tiny_llama(transformers)
    kw = dict(optim_target_modules=["attn", "mlp"], rank=4) if method != "adamw" else {}
    opt = create_optimizer(net, method, **kw)
    if method != "adamw":   # the targets are projected, nothing else is
        projected = {n for g in opt.param_groups if g.get("rank") is not None
                     and g.get("enable_lowrank", True) for n in g.get("param_names", [])}
        assert projected and all(".self_attn." in n or ".mlp." in n for n in projected)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                                          per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = transformers.Trainer(model=net, args=args, train_dataset=_data(),
                                   optimizers=(opt, None))
    before = [p.detach().clone() for p in net.parameters()]
    trainer.train()
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for name, p in net.named_parameters():   # every trained weight moved (none left out)
        b = before.pop(0)
        assert not torch.equal(b, p), f"{method}: {name} did not change"
    assert opt.state and all(s for s in opt.state.values())


@pytest.mark.parametrize("method", ["galore", "ldadam"])
def test_trainer_resume_from_checkpoint(method, tmp_path):
    """Four steps straight == two steps, a checkpoint, and a new Trainer (fresh model and
    optimizer) that resumes from it: weights bit-identical, the optimizer's state (bases,
    moments, LDAdam's error buffers, step counters) restored from Trainer's optimizer.pt, and
    the refresh at step 3 (update_proj_gap=2) happens after the resume."""
    transformers = _transformers()
    kw = dict(optim_target_modules=["attn", "mlp"], rank=4, lr=1e-2)
    if method == "galore":
        kw["update_proj_gap"] = 2

    class StopAt2(transformers.TrainerCallback):     # an interrupted run: same schedule
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    def trainer(out, seed_model=0, callbacks=None):
        net = _tiny_llama(transformers, seed=seed_model)
        opt = create_optimizer(net, method, **kw)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=4, per_device_train_batch_size=2,
            report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
            logging_steps=1, seed=7, data_seed=7)
        return transformers.Trainer(model=net, args=args, train_dataset=_data(),
                                    optimizers=(opt, None), callbacks=callbacks)

    straight = trainer(tmp_path / "straight")
    straight.train()
    first = trainer(tmp_path / "resumed", callbacks=[StopAt2()])
    first.train()
    assert first.state.global_step == 2
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed = trainer(tmp_path / "resumed", seed_model=123)   # other weights: all loaded
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"{method}: {name} differs after resume"
    sa, sb = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        for k, v in st.items():
            w = sb["state"][i][k]
            if torch.is_tensor(v):
                assert torch.equal(v, w), f"{method}: state {i}.{k} differs after resume"
            else:
                assert v == w, f"{method}: state {i}.{k}: {v!r} != {w!r}"
