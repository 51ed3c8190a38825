"""Checkpoints of every method: plain data (weights_only load), bit-identical resume, and a
clear refusal to load into another method or another model."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.routing import METHODS

CFG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
           vocab_size=64, max_position_embeddings=16)
KW = {"galore": dict(rank=4, update_proj_gap=2), "adaptive_adamw": dict(rank=4, update_proj_gap=2),
      "rsadamw": dict(rank=4, update_proj_gap=2), "gha": dict(rank=4, update_proj_gap=2),
      "galore_kfac": dict(rank=4, update_proj_gap=2), "adarankgrad": dict(rank=4),
      "ldadam": dict(rank=4), "adamem": dict(rank=4, update_proj_gap=2), "adapm": dict(rank=4),
      "adapm_mini": dict(rank=4), "adamw": {}, "adafactor": {}}


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CFG, **over}))


def _steps(model, opt, start, stop):
    for t in range(start, stop):
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g)
        _, loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _config_fields():
    import dataclasses
    return {f.name for f in dataclasses.fields(LlamaConfig)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_config_fields_exist():
    assert set(CFG) <= _config_fields()


@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical_and_plain_data(method, tmp_path):
    full = _model()
    opt = lf.make_optimizer(full, method, **KW[method])
    _steps(full, opt, 0, 5)

    part = _model()
    opt = lf.make_optimizer(part, method, **KW[method])
    _steps(part, opt, 0, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)           # plain data only

    resumed = _model(seed=1)                              # different init: all from the file
    resumed.load_state_dict(ckpt["model"])
    opt2 = lf.make_optimizer(resumed, method, **KW[method])
    opt2.load_state_dict(ckpt["opt"])
    _steps(resumed, opt2, 3, 5)
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(a, b), f"{method}: {name} diverged after resume"


@pytest.mark.parametrize("method", ["galore", "ldadam", "adamw"])
def test_checkpoint_of_another_method_is_refused(method):
    model = _model()
    opt = lf.make_optimizer(model, method, **KW[method])
    _steps(model, opt, 0, 1)
    other = "adafactor" if method != "adafactor" else "adamw"
    opt2 = lf.make_optimizer(_model(), other, **KW[other])
    with pytest.raises(ValueError, match=f"saved by {type(opt).__name__}"):
        opt2.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("method", ["galore", "adapm"])
def test_checkpoint_of_another_model_is_refused(method):
    model = _model()
    opt = lf.make_optimizer(model, method, **KW[method])
    _steps(model, opt, 0, 1)
    bigger = _model(intermediate_size=64)
    opt2 = lf.make_optimizer(bigger, method, **KW[method])
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    with pytest.raises(ValueError, match="first difference at parameter"):
        opt2.load_state_dict(opt.state_dict())
    assert len(opt2.state) == 0, "a refused checkpoint must not load any state"
    assert all(torch.equal(v, before[k]) for k, v in bigger.state_dict().items())
