"""bench.run end to end in its quick mode (CPU: eager only; CUDA: one shape), writing into a
temporary folder: both files exist, hold rows, and every row has a positive floor."""
import json
import time

import pytest
import torch

# CPU: eager only, a few seconds. CUDA: one shape, fused and eager, plus first-time Triton
# compiles and two SVDs for the optimizer's warm state.
BUDGET_S = 120 if torch.cuda.is_available() else 30


def test_bench_run_quick(tmp_path, capsys):
    from bench import run

    t0 = time.perf_counter()
    rc = run.main(["--quick", "--suite", "kernels", "--no-report", "--out", str(tmp_path),
                   "--threads", "1"])
    elapsed = time.perf_counter() - t0
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
    for r in doc["rows"]:
        assert r["bytes_floor"] > 0, r
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"], r
        assert r["achieved_gbps"] > 0 and r["multiple_of_floor"] > 0, r
    md = mds[0].read_text()
    assert md.count("\n| ") >= len(doc["rows"]) + 1
    assert "| galore_step | eager | reference |" in md
    assert elapsed < BUDGET_S, f"bench.run --quick took {elapsed:.1f} s (budget {BUDGET_S} s)"


def test_only_rejects_unknown_module():
    from bench import run

    with pytest.raises(SystemExit):
        run.main(["--quick", "--only", "nonexistent"])
    with pytest.raises(SystemExit):
        run.main(["--quick", "--suite", "kernels,nonexistent"])
    with pytest.raises(SystemExit):
        run.main(["--quick", "--suite", "step", "--methods", "sgd"])
