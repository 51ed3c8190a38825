"""bench/bench_fsdp2_traffic.py at a tiny layer: every row counted, GaLore's steady step
communicates its left projections only (r x n per left-projected matrix), AdamW nothing."""
import json


def test_bench_fsdp2_traffic_tiny(tmp_path, capsys):
    from bench import bench_fsdp2_traffic as b

    assert b.main(["--model", "tiny", "--rank", "4", "--methods", "galore,adamw",
                   "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "fsdp2-traffic-cpu.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert "error" not in rows["galore"], rows["galore"]
    d, f = b.SIZES["tiny"]
    # "std": the d x d and f x d weights are right-projected (no communication), down_proj
    # (d x f, m < n) left-projected: one all-reduce of its rank x f fp32 R per steady step
    assert rows["galore"]["bytes_per_step"][1] == 4 * 4 * f
    assert rows["galore"]["first_step_bytes"] > rows["galore"]["bytes_per_step"][1]
    assert rows["adamw"]["bytes_per_step"] == [0, 0, 0]
    assert "galore" in (tmp_path / "fsdp2-traffic-cpu.md").read_text()
