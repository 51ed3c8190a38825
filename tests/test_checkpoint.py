"""Checkpoints of every method: plain data (weights_only load), bit-identical resume, and a
clear refusal to load into another method or another model."""
import pytest
import torch

import lowrank_fused as lf
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.routing import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

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


@pytest.mark.parametrize("method", [m for m in METHODS if m != "adafactor"])  # (no rename)
def test_checkpoint_with_earlier_key_names_resumes(method):
    """A checkpoint whose keys carry the names an earlier version used (``renamed_keys()``:
    state and group keys the one-vocabulary renaming changed) loads and resumes bit for bit."""
    kw = dict(KW[method], backend="reference")     # the keys do not depend on the backend
    full = _model()
    opt = lf.make_optimizer(full, method, **kw)
    _steps(full, opt, 0, 5)

    part = _model()
    opt = lf.make_optimizer(part, method, **kw)
    _steps(part, opt, 0, 3)
    sd = opt.state_dict()
    names = opt.renamed_keys()
    old = {new: old for old, new in names["state"].items()}
    old_group = {new: old for old, new in names["group"].items()}
    sd["state"] = {i: {old.get(k, k): v for k, v in st.items()} for i, st in sd["state"].items()}
    sd["param_groups"] = [{old_group.get(k, k): v for k, v in g.items()}
                          for g in sd["param_groups"]]
    renamed = ({k for st in sd["state"].values() for k in st} & set(old.values())) | \
        ({k for g in sd["param_groups"] for k in g} & set(old_group.values()))
    assert renamed, f"{method}: the checkpoint holds none of the renamed keys"

    resumed = _model(seed=1)
    resumed.load_state_dict(part.state_dict())
    opt2 = lf.make_optimizer(resumed, method, **kw)
    opt2.load_state_dict(sd)
    assert not any(k in st for st in opt2.state.values() for k in old.values())
    _steps(resumed, opt2, 3, 5)
    for (name, a), b in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.equal(a, b), f"{method}: {name} diverged after resuming the old format"


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_of_another_method_is_refused(method):
    model = _model()
    opt = lf.make_optimizer(model, method, **KW[method])
    _steps(model, opt, 0, 1)
    other = "adafactor" if method != "adafactor" else "adamw"
    opt2 = lf.make_optimizer(_model(), other, **KW[other])
    with pytest.raises(ValueError, match=f"saved by {type(opt).__name__}"):
        opt2.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("method", METHODS)
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


LOW_RANK = [m for m in METHODS if m not in ("adamw", "adafactor")]


@pytest.mark.parametrize("method", LOW_RANK)
def test_checkpoint_of_another_rank_layout_is_refused(method):
    """Same class, same model, another rank: torch would silently take the saved rank."""
    model = _model()
    opt = lf.make_optimizer(model, method, **KW[method])
    _steps(model, opt, 0, 2)
    other = lf.make_optimizer(_model(), method, **{**KW[method], "rank": 3})
    ranks = [g.get("rank") for g in other.param_groups]
    assert 3 in ranks
    with pytest.raises(ValueError, match=r"group \d has rank=4, this optimizer's has rank=3"):
        other.load_state_dict(opt.state_dict())
    assert len(other.state) == 0
    assert [g.get("rank") for g in other.param_groups] == ranks


@pytest.mark.parametrize("method", ["galore", "ldadam"])
def test_checkpoint_of_another_projection_side_is_refused(method):
    model = _model()
    opt = lf.make_optimizer(model, method, **KW[method])
    _steps(model, opt, 0, 1)
    other = lf.make_optimizer(_model(), method, **KW[method], proj_type="reverse_std")
    with pytest.raises(ValueError, match="proj_type='std', this optimizer's has "
                                         "proj_type='reverse_std'"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_moves_between_cpu_and_cuda(method, tmp_path):
    """Saved on CPU, resumed on CUDA (and back): the state follows the parameters and the
    run continues as the uninterrupted CPU run does (within fp32 tolerance)."""
    full = _model()
    opt = lf.make_optimizer(full, method, **KW[method])
    _steps(full, opt, 0, 4)
    part = _model()
    opt = lf.make_optimizer(part, method, **KW[method])
    _steps(part, opt, 0, 2)
    torch.save({"model": part.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    gpu = _model().cuda()
    gpu.load_state_dict(ckpt["model"])
    opt2 = lf.make_optimizer(gpu, method, **KW[method])
    opt2.load_state_dict(ckpt["opt"])
    assert all(v.device.type == "cuda" for st in opt2.state.values() for v in st.values()
               if torch.is_tensor(v))
    for t in range(2, 4):
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g).cuda()
        _, loss = gpu(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)
    back = lf.make_optimizer(_model(), method, **KW[method])
    back.load_state_dict(opt2.state_dict())
    assert all(v.device.type == "cpu" for st in back.state.values() for v in st.values()
               if torch.is_tensor(v))
    for (name, a), b in zip(gpu.state_dict().items(), full.state_dict().values()):
        err = (a.cpu() - b).abs().max() / b.abs().max().clamp_min(1e-30)
        assert err < 1e-3, f"{method}: {name} differs by {err:.1e} after the CPU -> CUDA resume"
