"""bench.run's suites step, e2e and convergence at their smallest (--quick, one method), and
bench.report's summary page and plots (CPU, well under 30 s)."""
import json
import time

import pytest
import torch

BUDGET_S = 120 if torch.cuda.is_available() else 30


def test_suites_quick(tmp_path, capsys):
    from bench import run

    t0 = time.perf_counter()
    rc = run.main(["--quick", "--suite", "step,e2e,convergence", "--methods", "galore",
                   "--out", str(tmp_path), "--threads", "1"])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert rc == 0, out
    from bench import harness as H
    slug = H.device_slug("cuda" if torch.cuda.is_available() else "cpu")
    docs = {s: json.loads(next(tmp_path.glob(f"{s}-*.json")).read_text())
            for s in ("step", "e2e", "convergence")}
    for doc in docs.values():
        assert doc["errors"] == [] and doc["rows"] and doc["environment"]["torch"]
    step = {(r["method"], r["variant"]): r for r in docs["step"]["rows"]}
    g = step[("galore", "eager")]
    assert 0 < g["steady_p50_ms"] and g["refresh_p50_ms"] > 0 and g["refresh_interval"] == 200
    assert g["steady_p50_ms"] <= g["amortised_ms"] and 0 < g["state_ratio"] < 1
    assert any(m == "torch.optim.AdamW" for m, _ in step)
    e2e = {r["method"]: r for r in docs["e2e"]["rows"]}
    assert set(e2e) == {"galore", "adamw", "torch_adamw"}
    assert e2e["adamw"]["speed_vs_adamw"] == 1.0 and e2e["galore"]["peak_memory_bytes"] > 0
    assert e2e["galore"]["state_ratio"] < 1.0
    conv = {(r["method"], r["rank"]): r for r in docs["convergence"]["rows"]}
    assert set(conv) == {("galore", 8), ("galore", 4)}
    for r in conv.values():
        assert r["final_val_loss"] < r["first_loss"] and len(r["curve"]) >= 2
    page = (tmp_path / "README.md").read_text()
    for title in ("2. Optimizer step", "3. End to end", "4. Convergence", "equal rank budget"):
        assert title in page
    try:
        import matplotlib  # noqa: F401
        pngs = {p.name for p in (tmp_path / "plots").glob("*.png")}
        assert {f"{slug}-step.png", f"{slug}-e2e.png", f"{slug}-convergence.png",
                f"{slug}-rank.png"} <= pngs
    except ImportError:
        assert "Plots skipped" in page
    assert elapsed < BUDGET_S, f"suites took {elapsed:.1f} s (budget {BUDGET_S} s)"


def test_report_without_matplotlib(tmp_path, monkeypatch):
    from bench import report

    doc = {"suite": "convergence", "environment": {"device_name": "cpu", "torch": "x"},
           "meta": {}, "errors": [],
           "config": {"steps": 2, "batch_size": 1, "seq_len": 8, "rank": 8, "lr": 0.01,
                      "warmup": 1, "update_proj_gap": 50, "eval_every": 1, "eval_batches": 1,
                      "tokens": 16},
           "rank_study": [["galore", 8]],
           "rows": [{"method": "galore", "rank": 8, "final_val_loss": 2.0, "final_val_ppl": 7.39,
                     "state_ratio": 0.2, "curve": [[1, 3.0], [2, 2.0]]},
                    {"method": "adamw", "rank": None, "final_val_loss": 2.5,
                     "final_val_ppl": 12.18, "state_ratio": 1.0, "curve": [[1, 3.0], [2, 2.5]]}]}
    (tmp_path / "convergence-cpu.json").write_text(json.dumps(doc))
    monkeypatch.setattr(report, "_plt", lambda: None)
    path = report.write_report(tmp_path, log=lambda *a: None)
    page = path.read_text()
    assert "Plots skipped" in page and "| galore | 8 | 2.0000 | 7.39 | 0.200 |" in page
    assert "| adamw | - | 2.5000 | 12.18 | 1.000 |" in page
    assert not (tmp_path / "plots").exists()
    assert report.main(["--results", str(tmp_path)]) == 0


def test_refresh_suite(tmp_path, capsys):
    """The refresh suite's rows (speed ratio and captured energy, q = 1 and 2, real and
    decaying gradients) and its report section. Only structure and quality are asserted: the
    speedup is measured, not tested (speed targets live in the bench)."""
    from bench import run

    rc = run.main(["--suite", "refresh", "--out", str(tmp_path), "--threads", "1", "--quick"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(next(tmp_path.glob("refresh-*.json")).read_text())
    assert doc["errors"] == [] and len(doc["rows"]) == 4
    for r in doc["rows"]:
        assert r["per_layer_svd_s"] > 0 and r["batched_randomized_s"] > 0
        # captured energy relative to the exact SVD's (quality bar: within 1%)
        assert r["energy_ratio"] > 0.99 and r["energy_ratio"] <= 1.0 + 1e-6
    assert "5. Subspace refresh" in (tmp_path / "README.md").read_text()


def test_whole_model_step_rows_and_report():
    """The whole-model part of the step suite (run on CUDA with LLaMA-1B, GaLore and
    AdaptiveAdamW) on the tiny model under the interpreter: per-matrix and grouped fused rows
    next to torch's fused AdamW, and its report table. Structure only; the ratios are
    measured."""
    from bench import report, suite_step

    errors = []
    wm = suite_step.whole_model(torch.device("cpu"), lambda *_: None, errors,
                                spec=("tiny", 8, ("galore",)), steps=1)
    assert errors == []
    assert [(r["method"], r["variant"]) for r in wm["rows"]] == [
        ("torch.optim.AdamW", "torch-fused"), ("galore", "fused"), ("galore", "fused-grouped")]
    assert all(r["steady_p50_ms"] > 0 and r["state_bytes"] > 0 for r in wm["rows"])
    assert wm["rows"][0]["vs_torch_adamw"] == 1.0
    page = report.whole_model_section(wm)
    assert "Whole model, steady step" in page and "| galore | fused-grouped |" in page
