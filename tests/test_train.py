"""The training driver, the model, GaLore routing and the data loaders (CPU, a few seconds)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lowrank_fused.data import BatchSampler, load_bin, load_stdlib_corpus, select_files, stdlib_py_files
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.routing import galore_param_groups
from lowrank_fused.train import lr_lambda, main

TINY = ["--steps", "30", "--batch-size", "8", "--seq-len", "64", "--dim", "64", "--n-heads", "4",
        "--mlp-dim", "172", "--n-layers", "2", "--rank", "8", "--update-proj-gap", "10",
        "--warmup", "3", "--log-every", "10", "--eval-every", "0", "--eval-batches", "2",
        "--max-bytes", "300000", "--device", "cpu", "--backend", "reference"]


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               max_position_embeddings=16)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg))


# ---- driver -------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["galore", "adamw"])
def test_train_loss_decreases(optimizer, tmp_path, capsys):
    out = tmp_path / "m.json"
    m = main(TINY + ["--optimizer", optimizer, "--json", str(out)])
    losses = [h["loss"] for h in m["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert math.isfinite(m["final_train_loss"]) and math.isfinite(m["final_val_loss"])
    assert m["first_loss"] > 5.0                        # ~ln(256) at init
    assert losses[-1] < m["first_loss"] - 1.5
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    assert m["tokens_per_s"] > 0
    assert json.loads(out.read_text())["final_val_loss"] == m["final_val_loss"]
    text = capsys.readouterr().out
    assert "optimizer state" in text and "tok/s" in text
    if optimizer == "galore":
        assert m["backend"] == "reference"
        assert 0 < m["optimizer_state_bytes"] < m["adamw_state_bytes"]


def test_train_deterministic():
    a = main(TINY + ["--steps", "5", "--log-every", "1"])
    b = main(TINY + ["--steps", "5", "--log-every", "1"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_lr_schedule_through_param_groups():
    model = tiny_model()
    groups = galore_param_groups(model, rank=4)
    opt = torch.optim.SGD(groups, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(20, 4, 0.1))
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(len(set(s)) == 1 for s in seen)           # every group scheduled alike
    lrs = [s[0] for s in seen]
    assert lrs[0] == pytest.approx(0.5 / 4) and lrs[3] == pytest.approx(0.5)
    assert all(x >= y for x, y in zip(lrs[3:], lrs[4:]))  # cosine decays monotonically
    assert lrs[-1] > 0.05 - 1e-9 and opt.param_groups[0]["lr"] == pytest.approx(0.05)


# ---- model --------------------------------------------------------------------------------

def test_model_names_and_causality():
    model = tiny_model()
    names = dict(model.named_modules())
    for n in ("model.embed_tokens", "lm_head", "model.norm", "model.layers.1.input_layernorm",
              "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
              "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.down_proj"):
        assert n in names, n
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    x = torch.randint(0, 256, (2, 16))
    logits, loss = model(x, x)
    assert logits.shape == (2, 16, 256) and loss.ndim == 0
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256                 # changing the future ...
    assert torch.allclose(model(x2)[0][:, :10], logits[:, :10], atol=1e-5)  # ... not the past


def test_model_longer_than_configured_positions():
    model = tiny_model()
    assert model(torch.randint(0, 256, (1, 40)))[0].shape == (1, 40, 256)


def test_model_bf16_rotary_tables_stay_fp32():
    model = tiny_model().to(torch.bfloat16)
    logits, loss = model(torch.randint(0, 256, (1, 16)), torch.randint(0, 256, (1, 16)))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    cos, _ = model.model.rotary_emb._tables(16, torch.device("cpu"))
    assert cos.dtype == torch.float32


# ---- routing ------------------------------------------------------------------------------

def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_routing_default_targets():
    model = tiny_model()
    groups = galore_param_groups(model, rank=8, update_proj_gap=20, scale=0.5, proj_type="std",
                                 foo=1)
    assert len(groups) == 2
    lr_group, plain = groups
    assert (lr_group["rank"], lr_group["update_proj_gap"], lr_group["scale"],
            lr_group["proj_type"], lr_group["foo"]) == (8, 20, 0.5, "std", 1)
    assert "rank" not in plain
    g = _names(model, lr_group["params"])
    expected = {f"model.layers.{i}.{blk}.{p}.weight" for i in range(2)
                for blk, ps in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps}
    assert g == expected
    other = _names(model, plain["params"])
    assert "model.embed_tokens.weight" in other and "lm_head.weight" in other
    assert "model.norm.weight" in other and "model.layers.0.input_layernorm.weight" in other
    assert not g & other
    assert len(lr_group["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_routing_all_linear_regex_and_errors():
    model = tiny_model()
    g = _names(model, galore_param_groups(model, target_modules="all-linear")[0]["params"])
    assert len(g) == 14 and "lm_head.weight" not in g
    g = _names(model, galore_param_groups(model, target_modules=r"mlp\.(gate|up)_proj")[0]["params"])
    assert g == {f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj")}
    g = _names(model, galore_param_groups(model, target_modules=["q_proj"])[0]["params"])
    assert g == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"}
    with pytest.raises(ValueError, match="target_modules"):
        galore_param_groups(model, target_modules=("nonexistent",))
    with pytest.raises(ValueError, match="target_modules"):
        galore_param_groups(model, target_modules="norm")      # matches only non-Linear modules
    with pytest.raises(ValueError, match="target_modules"):
        galore_param_groups(model, target_modules=[])


def test_routing_skips_frozen_and_drops_empty_groups():
    model = tiny_model()
    for n, p in model.named_parameters():
        if "q_proj" in n or "embed" in n:
            p.requires_grad_(False)
    groups = galore_param_groups(model)
    names = set().union(*(_names(model, g["params"]) for g in groups))
    assert not any("q_proj" in n or "embed" in n for n in names)
    for p in model.parameters():                          # everything else frozen too
        if p not in set(groups[0]["params"]):
            p.requires_grad_(False)
    groups = galore_param_groups(model)
    assert len(groups) == 1 and "rank" in groups[0]


# ---- data ---------------------------------------------------------------------------------

def test_stdlib_corpus_deterministic():
    a = load_stdlib_corpus(max_bytes=200_000, seed=3)
    b = load_stdlib_corpus(max_bytes=200_000, seed=3)
    c = load_stdlib_corpus(max_bytes=200_000, seed=4)
    assert a.vocab_size == 256 and a.train.dtype == torch.int64
    assert 0 < a.num_tokens <= 200_000 + a.num_files
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert not torch.equal(a.train[:1000], c.train[:1000])
    assert int(a.train.max()) < 256 and int(a.train.min()) >= 0
    files = stdlib_py_files()
    assert files == sorted(files) and not any("site-packages" in str(f) for f in files)
    assert select_files(files, 100_000, 7) == select_files(files, 100_000, 7)


def test_batch_sampler_deterministic():
    tokens = torch.arange(1000) % 256
    s1, s2 = BatchSampler(tokens, 4, 32, seed=1), BatchSampler(tokens, 4, 32, seed=1)
    for _ in range(3):
        (x1, y1), (x2, y2) = s1.next_batch(), s2.next_batch()
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.shape == (4, 32) and x1.dtype == torch.int64
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    with pytest.raises(ValueError):
        BatchSampler(tokens[:10], 2, 32)


def test_bin_file(tmp_path):
    ids = (np.arange(5000) * 7919 % 1000).astype(np.uint16)
    path = tmp_path / "data.bin"
    ids.tofile(path)
    corpus = load_bin(path, vocab_size=1000)
    assert corpus.vocab_size == 1000 and len(corpus.train) + len(corpus.val) == 5000
    assert np.array_equal(np.asarray(corpus.train[:10]), ids[:10])
    x, y = BatchSampler(corpus.train, 3, 16, seed=0).next_batch()
    assert x.dtype == torch.int64 and x.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
    start = int(np.nonzero(ids == int(x[0, 0]))[0][0])  # windows are contiguous runs of the file
    assert np.array_equal(ids[start:start + 16], x[0].numpy())
    assert load_bin(path).vocab_size == int(ids.max()) + 1
    with pytest.raises(ValueError, match="vocab-size"):
        load_bin(path, vocab_size=10)
    with pytest.raises(FileNotFoundError):
        load_bin(tmp_path / "missing.bin")
    # train.bin + val.bin side by side: val.bin is the validation split
    ids[:3000].tofile(tmp_path / "train.bin")
    ids[3000:].tofile(tmp_path / "val.bin")
    c2 = load_bin(tmp_path / "train.bin", vocab_size=1000)
    assert len(c2.train) == 3000 and len(c2.val) == 2000
    # and the driver trains on it
    m = main(TINY + ["--steps", "3", "--data", str(path), "--vocab-size", "1000", "--log-every", "1"])
    assert m["config"]["vocab_size"] == 1000 and all(math.isfinite(h["loss"]) for h in m["history"])


def test_empty_corpus_error(tmp_path):
    with pytest.raises(RuntimeError, match="empty"):
        load_stdlib_corpus(root=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_stdlib_corpus(root=tmp_path / "nope")
