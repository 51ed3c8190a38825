"""The pretraining driver's options: every method by name, --opt-arg, model presets, text data,
gradient accumulation, the progress display, and checkpoint / --resume (bit-identical)."""
import io
import json
import math

import pytest
import torch

from lowrank_fused.models import LLAMA_CONFIGS, llama_config
from lowrank_fused.train import Progress, main, optimizer_kwargs, build_parser, parse_opt_args

TINY = ["--batch-size", "4", "--seq-len", "32", "--dim", "32", "--n-heads", "2",
        "--mlp-dim", "64", "--n-layers", "1", "--rank", "4", "--update-proj-gap", "3",
        "--warmup", "2", "--log-every", "2", "--eval-every", "4", "--eval-batches", "2",
        "--max-bytes", "100000", "--device", "cpu", "--backend", "reference",
        "--progress", "lines"]


def test_paper_model_configs():
    assert set(LLAMA_CONFIGS) == {"tiny", "60m", "130m", "350m", "1b"}
    dims = {k: (v["hidden_size"], v["num_hidden_layers"], v["num_attention_heads"],
                v["intermediate_size"]) for k, v in LLAMA_CONFIGS.items()}
    assert dims["60m"] == (512, 8, 8, 1376) and dims["130m"] == (768, 12, 12, 2048)
    assert dims["350m"] == (1024, 24, 16, 2736) and dims["1b"] == (2048, 24, 32, 5461)
    assert llama_config("60m").vocab_size == 32000
    assert llama_config("tiny", hidden_size=64, num_attention_heads=None).hidden_size == 64
    with pytest.raises(ValueError):
        llama_config("7b")


def test_opt_args_and_method_kwargs():
    assert parse_opt_args(["betas=(0.9,0.95)", "rank_metric=entropy", "eps=1e-8",
                           "relative-step=True"]) == {
        "betas": (0.9, 0.95), "rank_metric": "entropy", "eps": 1e-8, "relative_step": True}
    with pytest.raises(SystemExit):
        parse_opt_args(["novalue"])
    args = build_parser().parse_args(["--optimizer", "adamem", "--rank", "8"])
    kw = optimizer_kwargs(args, "adamem")
    assert kw["rank"] == 8 and kw["update_proj_gap"] == 50 and "scale" not in kw
    assert optimizer_kwargs(args, "adapm")["refit_T"] == 50
    assert "rank" not in optimizer_kwargs(args, "adamw")
    assert optimizer_kwargs(args, "galore")["scale"] == 0.25
    assert optimizer_kwargs(args, "adafactor")["relative_step"] is False


@pytest.mark.parametrize("method", ["adaptive_adamw", "ldadam", "adapm_mini", "adafactor",
                                    "torch_adamw"])
def test_methods_by_name(method, capsys):
    m = main(TINY + ["--steps", "5", "--optimizer", method, "--opt-arg", "weight_decay=0.0"])
    assert m["optimizer"] == method and math.isfinite(m["final_val_loss"])
    assert m["optimizer_state_bytes"] > 0 and m["peak_memory_bytes"] > 0
    assert m["final_val_ppl"] == pytest.approx(math.exp(m["final_val_loss"]))
    out = capsys.readouterr().out
    assert "val_ppl" in out and "tok/s" in out and "rss" in out


def test_unknown_method_rejected():
    with pytest.raises(SystemExit):
        main(TINY + ["--optimizer", "sgd"])


def test_text_data_and_grad_accum(tmp_path):
    (tmp_path / "a.txt").write_text("hello world, " * 400)
    sub = tmp_path / "dir"
    sub.mkdir()
    (sub / "b.md").write_text("the quick brown fox " * 300)
    m1 = main(TINY + ["--steps", "2", "--data", str(tmp_path / "a.txt"), str(sub)])
    assert m1["config"]["vocab_size"] == 256 and math.isfinite(m1["final_val_loss"])
    m2 = main(TINY + ["--steps", "2", "--grad-accum", "2", "--data", str(tmp_path / "a.txt")])
    assert m2["tokens_per_step"] == 2 * 4 * 32
    with pytest.raises(SystemExit):
        main(TINY + ["--steps", "2", "--data", str(tmp_path / "missing.txt")])


def test_progress_tty_and_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    s = Tty()
    p = Progress("auto", stream=s)
    assert p.live
    p.update("step 1 loss 5.0", force=True)
    p.update("step 2 loss 4.0", force=True)
    p.note("val")
    p.close()
    text = s.getvalue()
    assert text.count("\r") >= 2 and "\n" in text and "step 2" in text
    s2 = io.StringIO()
    p2 = Progress("auto", stream=s2)
    p2.update("ignored")
    p2.line("step 3")
    assert not p2.live and s2.getvalue() == "step 3\n"


@pytest.mark.parametrize("method", ["galore", "adamw"])
def test_resume_is_bit_identical(method, tmp_path):
    run = TINY + ["--steps", "8", "--optimizer", method, "--seed", "3"]
    full = main(run + ["--save", str(tmp_path / "full.pt")])
    # stop right after the checkpoint of step 5 (not a log, eval or refresh boundary)
    part_args = run + ["--save", str(tmp_path / "part.pt"), "--save-every", "5"]
    _stop_after(part_args, 5)
    resumed = main(run + ["--resume", str(tmp_path / "part.pt"), "--save", str(tmp_path / "res.pt")])
    assert resumed["resumed_from"] == 5
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["evals"][0]["val_loss"] == full["evals"][0]["val_loss"]
    assert resumed["final_val_loss"] == full["final_val_loss"]
    a = torch.load(tmp_path / "full.pt", weights_only=False)
    b = torch.load(tmp_path / "res.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["sampler"]["generator"], b["sampler"]["generator"])
    assert a["scheduler"] == b["scheduler"]
    # a resume with other flags is refused
    with pytest.raises(SystemExit, match="differ"):
        main(run + ["--rank", "2", "--resume", str(tmp_path / "part.pt")])


def _stop_after(argv, step):
    """Run the driver but stop it right after the checkpoint of ``step`` is written."""
    import lowrank_fused.train as T

    real = T.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(path, payload):
        real(path, payload)
        if payload["step"] == step:
            raise Stop

    T.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            main(argv)
    finally:
        T.save_checkpoint = real


def test_autocast_bf16_on_cpu():
    m = main(TINY + ["--steps", "2", "--autocast"])
    assert math.isfinite(m["final_val_loss"]) and m["args"]["autocast"] is True
