"""bench.run's suites step, e2e and convergence at their smallest (--quick, one method), and
bench.report's summary page and plots (CPU). Structure only: how long they take is the
bench's to report, not a test's to assert."""
import json

import pytest
import torch


def test_suites_quick(tmp_path, capsys):
    from bench import run

    rc = run.main(["--quick", "--suite", "step,e2e,convergence", "--methods", "galore",
                   "--out", str(tmp_path), "--threads", "1"])
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


def _tiny_convergence_doc():
    return {"suite": "convergence", "environment": {"device_name": "cpu", "torch": "x"},
           "meta": {}, "errors": [],
           "config": {"steps": 2, "batch_size": 1, "seq_len": 8, "rank": 8, "lr": 0.01,
                      "warmup": 1, "update_proj_gap": 50, "eval_every": 1, "eval_batches": 1,
                      "tokens": 16},
           "rank_study": [["galore", 8]],
           "rows": [{"method": "galore", "rank": 8, "final_val_loss": 2.0, "final_val_ppl": 7.39,
                     "state_ratio": 0.2, "curve": [[1, 3.0], [2, 2.0]]},
                    {"method": "adamw", "rank": None, "final_val_loss": 2.5,
                     "final_val_ppl": 12.18, "state_ratio": 1.0, "curve": [[1, 3.0], [2, 2.5]]}]}


def test_report_without_matplotlib(tmp_path, monkeypatch):
    from bench import report

    (tmp_path / "convergence-cpu.json").write_text(json.dumps(_tiny_convergence_doc()))
    monkeypatch.setattr(report, "_plt", lambda: None)
    path = report.write_report(tmp_path, log=lambda *a: None)
    page = path.read_text()
    assert "Plots skipped" in page and "| galore | 8 | 2.0000 | 7.39 | 0.200 |" in page
    assert "| adamw | - | 2.5000 | 12.18 | 1.000 |" in page
    assert not (tmp_path / "plots").exists()
    assert report.main(["--results", str(tmp_path)]) == 0


def test_report_without_matplotlib_links_existing_plots(tmp_path, monkeypatch):
    """Without matplotlib the page links the PNGs a run with matplotlib left (only those that
    exist, only for the suites on the page) and says they were not redrawn."""
    from bench import report

    (tmp_path / "convergence-cpu.json").write_text(json.dumps(_tiny_convergence_doc()))
    (tmp_path / "plots").mkdir()
    for name in ("cpu-convergence.png", "cpu-step.png", "gpu-convergence.png"):
        (tmp_path / "plots" / name).write_bytes(b"\x89PNG")
    monkeypatch.setattr(report, "_plt", lambda: None)
    page = report.write_report(tmp_path, log=lambda *a: None).read_text()
    assert "Plots skipped" not in page and "not redrawn" in page
    assert "![validation loss of every method](plots/cpu-convergence.png)" in page
    assert "cpu-rank.png" not in page           # not on disk
    assert "cpu-step.png" not in page           # no step results on the page
    assert "gpu-convergence.png" not in page    # no gpu results on the page
    assert sorted(report.existing_plots(tmp_path / "plots", "cpu", "convergence")) == [
        ("validation loss of every method", "cpu-convergence.png")]


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
        ("torch.optim.AdamW", "torch-fused"), ("galore", "fused"), ("galore", "fused-per-matrix")]
    assert all(r["steady_p50_ms"] > 0 and r["state_bytes"] > 0 for r in wm["rows"])
    assert wm["rows"][0]["vs_torch_adamw"] == 1.0
    page = report.whole_model_section(wm)
    assert "Whole model, steady step" in page and "| galore | fused-per-matrix |" in page


def _study_done(cfg, losses):
    """A ``done`` map for the convergence study's plan: {(method, lr): loss} at seed 0."""
    from bench import suite_convergence_study as S
    out = {}
    for (method, lr), loss in losses.items():
        rank = S._rank(cfg, method)
        out[S.run_key(method, rank, lr, 0)] = {
            "method": method, "rank": rank, "lr": lr, "seed": 0,
            "final_val_loss": loss, "final_val_ppl": None if loss is None else 2.0 ** loss}
    return out


def test_convergence_study_plan():
    """The study's lr sweep: the start grid first, one more ladder lr beyond an edge best (up
    and down), a diverged lr never best, every lr diverging walks down the ladder; seed and
    pair runs only once the sweep has a best lr."""
    from bench import suite_convergence_study as S

    cfg = S.config(quick=False)
    start, ladder = cfg["lr_start"], cfg["lr_ladder"]
    assert S.best_lr(cfg, "galore", {}) == (None, start)
    # best at the top of the start grid -> the next lr up; then inside -> done
    done = _study_done(cfg, {("galore", 3e-3): 3.0, ("galore", 1e-2): 2.5, ("galore", 3e-2): 2.0})
    assert S.best_lr(cfg, "galore", done) == (None, [1e-1])
    done.update(_study_done(cfg, {("galore", 1e-1): 2.2}))
    assert S.best_lr(cfg, "galore", done) == (3e-2, [])
    # best at the bottom -> down the ladder until inside
    done = _study_done(cfg, {("adamw", 3e-3): 2.0, ("adamw", 1e-2): 2.1, ("adamw", 3e-2): None})
    assert S.best_lr(cfg, "adamw", done) == (None, [1e-3])
    done.update(_study_done(cfg, {("adamw", 1e-3): 2.05}))
    assert S.best_lr(cfg, "adamw", done) == (3e-3, [])
    # a best at the ladder's end stays there
    done = _study_done(cfg, {("adamw", lr): 3.0 - i for i, lr in enumerate(ladder)})
    assert S.best_lr(cfg, "adamw", done) == (ladder[-1], [])
    # every lr diverged: down to the ladder's bottom, then no best
    done = _study_done(cfg, {("adamw", lr): None for lr in start})
    assert S.best_lr(cfg, "adamw", done) == (None, [1e-3])
    done = _study_done(cfg, {("adamw", lr): None for lr in ladder})
    assert S.best_lr(cfg, "adamw", done) == (None, [])
    # the plan: sweeps first; seeds and pairs at the best lr once it is known
    methods = ["galore", "adaptive_adamw", "adamw"]
    done = _study_done(cfg, {("galore", 3e-3): 3.0, ("galore", 1e-2): 2.0,
                             ("galore", 3e-2): 2.5})
    todo = S.pending(cfg, methods, done)
    assert [t[0] for t in todo] == sorted(t[0] for t in todo)
    sweep = [t for t in todo if t[5] == "sweep"]
    assert {(t[1], t[3]) for t in sweep} == {(m, lr) for m in methods[1:] for lr in start}
    later = [t for t in todo if t[5] != "sweep"]
    assert {t[1] for t in later} == {"galore"} and {t[3] for t in later} == {1e-2}
    assert {(t[2], t[4]) for t in later} == (
        {(8, s) for s in cfg["pair_seeds"] if s != 0} | {(4, s) for s in cfg["pair_seeds"]})
    assert {(t[2], t[4]) for t in later if t[0] == 1} == {(8, 1), (8, 2), (4, 0), (4, 1), (4, 2)}
    # seed by seed across methods: a study cut short has the same seeds for every method
    done.update(_study_done(cfg, {("adamw", 1e-3): 2.2, ("adamw", 3e-3): 2.0,
                                  ("adamw", 1e-2): 2.1, ("adamw", 3e-2): 2.3}))
    seeds = [(t[4], t[1]) for t in S.pending(cfg, ["galore", "adamw"], done) if t[0] == 1]
    assert seeds == sorted(seeds, key=lambda x: (x[0], ["galore", "adamw"].index(x[1])))
    assert ("adamw" in {m for s, m in seeds if s == 1}) and seeds[-1][0] == 2
    # without its partner, a pair method gets only its seeds
    todo = S.pending(cfg, ["galore"], done)
    assert {(t[2], t[4]) for t in todo} == {(8, 1), (8, 2)}


def test_convergence_study_quick_and_resume(tmp_path, capsys):
    """The convergence study at its smallest (2 methods, 2 seeds): its JSON, the report's
    section and plot, and a second run that continues from the file instead of retraining."""
    from bench import run

    argv = ["--quick", "--suite", "convergence-study", "--methods", "galore,adaptive_adamw",
            "--out", str(tmp_path), "--threads", "1"]
    assert run.main(argv) == 0, capsys.readouterr().out
    path = tmp_path / "convergence-study-cpu.json"
    doc = json.loads(path.read_text())
    assert doc["errors"] == [] and doc["environment"]["torch"]
    # sweep 2 x 3 lrs; seed 1 at rank 8; seeds 0 and 1 at rank 4
    assert len(doc["runs"]) == 12 and doc["pending"] == 0
    rows = {(r["method"], r["rank"]): r for r in doc["rows"]}
    assert set(rows) == {("galore", 8), ("galore", 4), ("adaptive_adamw", 8),
                         ("adaptive_adamw", 4)}
    for r in rows.values():
        assert r["seeds"] == [0, 1] and r["ppl"]["n"] == 2 and r["ppl"]["sd"] is not None
        assert r["best_lr"] in doc["config"]["lr_start"]
    for p in doc["pairs"]:
        assert p["diff_pct"]["n"] == 2
        for x in p["per_seed"]:
            assert abs(x["diff_pct"] - 100 * (x["adaptive_adamw"] / x["galore"] - 1)) < 1e-9
    page = (tmp_path / "README.md").read_text()
    assert "4b. Convergence study" in page and "not how they rank at LLaMA scale" in page
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "plots" / "cpu-convergence-study.png").stat().st_size > 0
    except ImportError:
        assert "Plots skipped" in page
    capsys.readouterr()
    assert run.main(argv + ["--no-report"]) == 0
    assert "continuing from 12 runs" in capsys.readouterr().out
    assert json.loads(path.read_text())["runs"] == doc["runs"]
