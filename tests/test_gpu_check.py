"""bench.gpu_check's arguments (the GPU entry point; its runs need CUDA): the benchmark suites
can be split over several device commands, and a wrong suite name is refused up front."""
import pytest

from bench import gpu_check


def test_suite_selection_splits_the_benchmarks():
    assert gpu_check.parse_args([]).suite is None
    args = gpu_check.parse_args(["--skip-tests", "--suite", "kernels, multi-tensor"])
    assert args.skip_tests and args.suite == ["kernels", "multi-tensor"]
    assert gpu_check.parse_args(["--suite", "step,e2e,convergence,refresh"]).suite == [
        "step", "e2e", "convergence", "refresh"]


@pytest.mark.parametrize("value", ["kernel", "", "step,bogus"])
def test_unknown_suite_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--suite", value])
    assert "--suite" in capsys.readouterr().err


def test_only_selects_kernel_modules():
    args = gpu_check.parse_args(["--skip-tests", "--suite", "kernels", "--only", "method_step"])
    assert args.only == "method_step"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "no_such_module"])


def test_headline_is_the_default_and_full_keeps_the_old_run():
    assert not gpu_check.parse_args([]).full
    assert gpu_check.parse_args(["--full"]).full
    # the full run's selectors imply it
    for argv in (["--suite", "kernels"], ["--only", "method_step"], ["--skip-bench"],
                 ["--quick"]):
        assert gpu_check.parse_args(argv).full, argv
    args = gpu_check.parse_args(["--precisions", "tf32x3, ieee", "--methods", "galore,ldadam",
                                 "--tests", "tests/test_project.py -k split; tests/test_x.py"])
    assert args.precisions == ["tf32x3", "ieee"] and args.methods == ["galore", "ldadam"]
    assert args.tests == [("tests/test_project.py", "-k", "split"), ("tests/test_x.py",)]


@pytest.mark.parametrize("argv, flag", [
    (["--tiny", "--full"], "--tiny"), (["--tiny", "--suite", "kernels"], "--tiny"),
    (["--methods", "galore,sgd"], "--methods"), (["--precisions", ","], "--precisions"),
    (["--warm-shard", "3/2"], "--warm-shard"), (["--budget", "0"], "--budget"),
    (["--warm-workers", "-1"], "--warm-workers")])
def test_bad_headline_arguments_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(argv)
    assert flag in capsys.readouterr().err


def test_parse_pytest_log_complete_and_killed():
    done = ("..F.s\nFAILED tests/test_a.py::test_b - assert 0\n"
            "3 passed, 1 failed, 1 skipped in 2.0s\n")
    c = gpu_check.parse_pytest_log(done)
    assert (c["passed"], c["failed"], c["skipped"], c["complete"]) == (3, 1, 1, True)
    assert c["failures"] == ["FAILED tests/test_a.py::test_b - assert 0"]
    # killed at the budget: no summary line, the progress characters so far
    c = gpu_check.parse_pytest_log("....F.                 [ 10%]\n..s\n")
    assert (c["passed"], c["failed"], c["skipped"], c["complete"]) == (7, 1, 1, False)


def _headline(tmp_path, *argv):
    import json

    rc = gpu_check.main(["--tiny", "--out", str(tmp_path), *argv])
    doc = json.loads(next(tmp_path.glob("headline-cpu-*.json")).read_text())
    md = next(tmp_path.glob("headline-cpu-*.md")).read_text()
    return rc, doc, md


def test_tiny_headline_runs_every_stage(tmp_path):
    """The first device command's script, the same code on the CPU (interpreter, tiny shapes):
    every stage runs and writes its results; rows carry the byte-floor and roofline multiples,
    the whole-model rows their host time; an unknown precision is skipped with a note."""
    from lowrank_fused import ops

    from bench import report

    rc, doc, md = _headline(tmp_path, "--methods", "galore", "--precisions", "ieee,nosuch",
                            "--tests", "tests/test_gpu_check.py -k parse_pytest_log")
    assert rc == 0, (doc["stages"], doc["errors"])
    assert [(k, v["status"]) for k, v in doc["stages"].items()] == [
        ("tests", "ok"), ("ceilings", "ok"), ("method_step", "ok"), ("whole_model", "ok")]
    shards = doc["stages"]["tests"]["shards"]
    assert shards[0]["exit"] == 0 and shards[0]["passed"] == 1
    assert doc["stages"]["tests"]["warm_workers"][0]["cases"] == 2   # galore, fp32 and bf16
    assert any("'nosuch' skipped" in n for n in doc["notes"]) and "nosuch" not in ops.PRECISIONS
    got = sorted((r["op"], r["variant"], r["dtype"], r["precision"]) for r in doc["rows"])
    assert got == sorted([("adamw", "torch-fused", dt, None) for dt in ("bf16", "fp32")]
                         + [("method_step:galore", v, dt, "ieee") for v in ("fused", "eager")
                            for dt in ("bf16", "fp32")])
    for r in doc["rows"]:
        assert r["p50_ms"] > 0 and r["multiple_of_floor"] > 0, r
        assert r["multiple_of_roofline"] > 0 and r["roofline_bound"] in ("bytes", "flops"), r
        assert r["extra"]["first_call_ms"] > 0
    wm = doc["whole_model"]
    assert [(r["method"], r["variant"]) for r in wm["rows"]] == [
        ("torch.optim.AdamW", "torch-fused"), ("galore", "fused"), ("galore", "fused-per-matrix")]
    for r in wm["rows"]:
        assert 0 < r["host_p50_ms"] <= r["steady_p50_ms"] * 1.01 and r["graph"] == "n/a"
        assert r["multiple_of_roofline"] > 0 and r["bytes_floor"] > 0
    assert "| galore | bf16 | ieee | 4 |" in md and "host p50 ms" in md and "Dry run" in md
    # the summary page picks the headline file up
    assert "headline" in report.find_results(tmp_path)["cpu"]


def test_headline_out_of_budget_still_writes_partial_results(tmp_path, monkeypatch):
    """A stage out of budget stops, says so, and the files hold what was measured."""
    monkeypatch.setitem(gpu_check.STAGE_BUDGETS_S, "method_step", 1e-6)
    monkeypatch.setitem(gpu_check.STAGE_BUDGETS_S, "whole_model", 1e-6)
    rc, doc, md = _headline(tmp_path, "--skip-tests", "--methods", "galore",
                            "--precisions", "ieee", "--warm-workers", "0")
    assert rc == 1
    st = doc["stages"]
    assert st["tests"]["status"].startswith("skipped by request")
    assert st["method_step"]["status"] == "budget"
    assert st["method_step"]["skipped_cases"] == st["method_step"]["cases"] == 6
    # the whole-model stage measures its baseline, then skips the rest
    assert st["whole_model"]["status"] == "budget"
    assert [r["variant"] for r in doc["whole_model"]["rows"]] == ["torch-fused"]
    assert doc["whole_model"]["skipped"] == ["galore fused", "galore fused-per-matrix"]
    assert "Not measured (budget spent)" in md
    # under a second in all: the stages before the last keep their reserve for the later
    # ones, so they are skipped; the files are still written
    rc, doc, _ = _headline(tmp_path, "--budget", "1", "--warm-workers", "0")
    st = doc["stages"]
    assert rc == 1 and all(st[k]["status"].startswith("skipped: no time left")
                           for k in ("tests", "ceilings", "method_step"))


def test_warm_whole_model_steps_every_fused_optimizer():
    """What the last warm worker runs on CUDA (the whole-model optimizers' compiles), on the
    tiny spec under the interpreter."""
    import torch

    from bench import suite_step

    logs = []
    n = suite_step.warm_whole_model(torch.device("cpu"), gpu_check.TINY_WHOLE_MODEL, "ieee",
                                    log=logs.append)
    assert n == len(logs) == len(gpu_check.TINY_WHOLE_MODEL[2]) * len(
        suite_step.WHOLE_MODEL_VARIANTS)
