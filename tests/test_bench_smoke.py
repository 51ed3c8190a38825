"""bench.run end to end in its quick mode (CPU: eager only; CUDA: one shape), writing into a
temporary folder: both files exist, hold rows, and every row has a positive floor."""
import json

import pytest
import torch


def test_bench_run_quick(tmp_path, capsys):
    from bench import run

    rc = run.main(["--quick", "--suite", "kernels", "--no-report", "--out", str(tmp_path),
                   "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    jsons, mds = sorted(tmp_path.glob("*.json")), sorted(tmp_path.glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1
    assert jsons[0].stem == mds[0].stem
    doc = json.loads(jsons[0].read_text())
    assert doc["rows"], "no rows"
    assert doc["ceilings"]["copy_gbps"] > 0
    assert doc["meta"]["errors"] == []
    ops = {r["op"] for r in doc["rows"]}
    assert {"project", "adam_moments", "backproject_update", "galore_step", "adamw"} <= ops
    assert {"adafactor_step", "adafactor_step:momentum", "adafactor_step:unfactored",
            "adafactor_bc_factored_step", "adafactor_bc_unfactored_step", "adapm_update",
            "adapm_update:mini", "adapm_update:rms", "gha_update", "adamem_moments"} <= ops
    from bench.bench_method_step import METHODS
    assert {f"method_step:{m}" for m in METHODS} <= ops       # every low-rank method's step
    for r in doc["rows"]:
        assert r["bytes_floor"] > 0, r
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"], r
        assert r["achieved_gbps"] > 0 and r["multiple_of_floor"] > 0, r
    md = mds[0].read_text()
    assert md.count("\n| ") >= len(doc["rows"]) + 1
    assert "| galore_step | eager | reference |" in md


def test_only_rejects_unknown_module():
    from bench import run

    with pytest.raises(SystemExit):
        run.main(["--quick", "--only", "nonexistent"])
    with pytest.raises(SystemExit):
        run.main(["--quick", "--suite", "kernels,nonexistent"])
    with pytest.raises(SystemExit):
        run.main(["--quick", "--suite", "step", "--methods", "sgd"])


def test_fused_variant_needs_a_triton_implementation(monkeypatch, capsys):
    """A kernel module missing or failing to import (e.g. still being written) leaves its
    benchmark with the eager reference only, and says so; the other ops keep their fused
    variant."""
    import lowrank_fused.dispatch as D
    from bench import bench_adapm_update, bench_gha_update
    from bench import harness as H

    device = "cuda" if torch.cuda.is_available() else "cpu"
    interpret = not torch.cuda.is_available()   # conftest sets TRITON_INTERPRET=1 on CPU
    both = [("fused", "triton"), ("eager", "reference")]
    params = bench_adapm_update.cases(device, True, interpret)[0][1]
    monkeypatch.setattr(H, "_NOT_IMPLEMENTED", {})
    assert bench_adapm_update.variants(params, device, interpret) == both

    real = D.implementation

    def broken(op, backend, dev):
        if op == "adapm_update" and backend == "triton":
            raise ImportError("cannot import name 'adapm_update' (simulated)")
        return real(op, backend, dev)

    monkeypatch.setattr(D, "implementation", broken)
    monkeypatch.setattr(H, "_NOT_IMPLEMENTED", {})
    assert bench_adapm_update.variants(params, device, interpret) == [("eager", "reference")]
    assert "adapm_update: no fused variant" in capsys.readouterr().err
    gha = bench_gha_update.cases(device, True, interpret)[0][1]
    assert bench_gha_update.variants(gha, device, interpret) == both

    def unregistered(op, backend, dev):
        if op == "adapm_update" and backend == "triton":
            raise D.BackendUnavailable("op 'adapm_update' has no 'triton' implementation")
        return real(op, backend, dev)

    monkeypatch.setattr(D, "implementation", unregistered)
    monkeypatch.setattr(H, "_NOT_IMPLEMENTED", {})
    assert bench_adapm_update.variants(params, device, interpret) == [("eager", "reference")]


def test_bench_multi_tensor_runs_and_writes(tmp_path):
    """The stand-alone multi-tensor benchmark: both CPU parts run and write their
    ratios (the C++ twin's parts need the extension; without it only the check runs). On
    CUDA the gpu part runs (one launch vs Triton per tensor vs eager) on a small model."""
    from bench import bench_multi_tensor as B
    from lowrank_fused.dispatch import available

    if not available("cpu", "cpu"):
        pytest.skip("the compiled extension (cpu backend) is not built")
    parts = "ops,optimizer" + (",gpu" if torch.cuda.is_available() else "")
    args = ["--part", parts, "--repeats", "2", "--out", str(tmp_path)]
    if torch.cuda.is_available():
        args += ["--model", "60m", "--rank", "64"]
    out = B.main(args)
    assert out["ops"] > 0 and all(r > 0 for r in out["optimizer"].values())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    doc = json.loads((tmp_path / f"multi-tensor-{dev}.json").read_text())
    assert doc["optimizer"] == out["optimizer"]
    if torch.cuda.is_available():
        assert {r["case"] for r in doc["gpu"]["rows"]} >= {"multi-tensor cuda (1 launch)"}


def test_bench_host_step_counts_launches_and_reads():
    """bench.bench_host_step at 1 layer: every row has a host time, the torch baseline and
    the counts; GaLore's steady step is a few launches per class with the flag left on the
    device (no host read), AdamW's two calls: the per-tensor non-finite flags and the
    multi-tensor step."""
    from bench import bench_host_step

    rows = bench_host_step.measure(["galore", "adamw"], steps=2, warm=2, layers=1,
                                   log=lambda *a: None)
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert r["host_us"] > 0 and r["torch_fused_adamw_us"] > 0 and r["x_paired"] > 0
        assert r["host_reads"] == 0, r["host_reads_by_op"]
    assert by["adamw"]["launches_by_kernel"] == {"ext:nonfinite_flags_multi_cpu": 1,
                                                 "ext:adamw_step_multi_cpu": 1}
    assert 0 < by["galore"]["launches"] <= 4 * 4
    # one table for AdamW's multi-tensor call; GaLore's: its dense AdamW set, per class its
    # moments and its update, at most one per launch
    assert by["adamw"]["table_fills"] == 1
    assert 1 < by["galore"]["table_fills"] <= by["galore"]["launches"]
