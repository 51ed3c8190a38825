"""Suite ``e2e``: tokens/s and peak memory of the training driver for every method vs AdamW.

Each run is a fresh ``python -m lowrank_fused.train`` process (so the peak memory is that run's
own: peak CUDA memory allocated on GPU, the process's peak RSS on CPU) writing ``--json``.
CPU: the tiny model on the standard-library byte corpus. CUDA: the GaLore paper's 130M and
350M (``--quick``: 60M) in bf16 autocast on random uint16 tokens of a 32000-word vocabulary
(throughput does not depend on the text). Tokens/s leave out step 1 (allocations, first SVDs,
kernel compilation). ``vs adamw`` divides by the library's AdamW on the same model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from lowrank_fused.routing import METHODS

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINES = ("adamw", "torch_adamw")


def plan(device, quick: bool):
    """[(model, extra driver flags)] for this device."""
    if device.type == "cuda":
        models = ("60m",) if quick else ("130m", "350m")
        common = ["--steps", "10" if quick else "20", "--batch-size", "16", "--seq-len", "256",
                  "--rank", "128", "--autocast", "--eval-batches", "2"]
        return [(m, common) for m in models]
    common = ["--steps", "6" if quick else "40", "--batch-size", "8", "--seq-len", "128",
              "--rank", "8", "--eval-batches", "2", "--max-bytes", "1000000"]
    return [("tiny", common)]


def _token_file(folder: Path, vocab: int = 32000, n: int = 2_000_000) -> Path:
    path = folder / "tokens.bin"
    rng = np.random.default_rng(0)
    rng.integers(0, vocab, size=n, dtype=np.uint16).tofile(path)
    return path


def run(device, *, quick: bool, methods=None, threads: int = 1, backend: str = "auto", log=print,
        timeout=900) -> dict:
    names = [m for m in METHODS if methods is None or m in methods]
    for b in BASELINES:
        if b not in names:
            names.append(b)
    rows, errors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = ["--data", str(_token_file(tmp))] if device.type == "cuda" else []
        for model, flags in plan(device, quick):
            base = None
            for method in names:
                out = tmp / f"{model}-{method}.json"
                cmd = [sys.executable, "-m", "lowrank_fused.train", "--model", model,
                       "--optimizer", method, "--eval-every", "0", "--progress", "none",
                       "--device", device.type, "--backend", backend, "--json", str(out),
                       *flags, *data]
                if device.type != "cuda":
                    cmd += ["--threads", str(max(1, threads))]
                env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep
                           + os.environ.get("PYTHONPATH", ""))
                if backend == "reference":   # e.g. under the test suite's TRITON_INTERPRET=1
                    env.pop("TRITON_INTERPRET", None)
                try:
                    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                                          text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    errors.append({"case": f"e2e {model} {method}", "error": "timeout"})
                    log(f"ERROR e2e {model} {method}: timeout")
                    continue
                if proc.returncode != 0 or not out.is_file():
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                    errors.append({"case": f"e2e {model} {method}",
                                   "error": f"exit {proc.returncode}: {tail[0][:300]}"})
                    log(f"ERROR e2e {model} {method}: {tail[0][:300]}")
                    continue
                m = json.loads(out.read_text())
                row = {"model": model, "method": method, "backend": m["backend"],
                       "params": m["model_params"], "steps": m["steps"],
                       "tokens_per_step": m["tokens_per_step"],
                       "tokens_per_s": m["tokens_per_s"],
                       "peak_memory_bytes": m["peak_memory_bytes"],
                       "peak_memory_kind": m["peak_memory_kind"],
                       "optimizer_state_bytes": m["optimizer_state_bytes"],
                       "state_ratio": m["state_ratio"], "final_train_loss": m["final_train_loss"]}
                rows.append(row)
                log(f"  e2e {model:5s} {method:15s} {row['tokens_per_s']:10,.0f} tok/s  "
                    f"peak {row['peak_memory_bytes'] / 2**20:8.1f} MiB  "
                    f"state {row['state_ratio']:.3f}x AdamW")
            base = {r["model"]: r for r in rows if r["method"] == "adamw"}
        for r in rows:
            b = base.get(r["model"]) if base else None
            r["speed_vs_adamw"] = r["tokens_per_s"] / b["tokens_per_s"] if b else None
            r["memory_vs_adamw"] = r["peak_memory_bytes"] / b["peak_memory_bytes"] if b else None
    return {"suite": "e2e", "plan": [[m, f] for m, f in plan(device, quick)], "rows": rows,
            "errors": errors}
