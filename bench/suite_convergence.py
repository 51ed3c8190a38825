"""Suite ``convergence``: every method on the tiny CPU config for a fixed token budget.

Each method trains the tiny model (dim 128, 2 layers, byte-level stdlib corpus) with the
driver's defaults, the same for all: peak lr 0.01 (GaLore's README; no per-method tuning),
10% warm-up then cosine to 0.1x, grad clip 1.0, seed 0, rank 8 and refresh interval 50 for
the low-rank methods; 150 steps of 8 x 128 tokens (153,600 tokens), validation loss every 25
steps on 4 fixed batches. Then the seed comparison: AdaptiveAdamW vs GaLore at equal rank
budget, ranks 4 and 8 (rank 8 is shared with the first table).

Runs in-process, on CPU unless ``device`` is CUDA (same config: a convergence check, not a
speed measurement). ``--quick``: 10 steps. One lr for all is a check that every method trains,
not a ranking of the methods: ``suite_convergence_study`` tunes the lr per method, repeats
seeds and pairs AdaptiveAdamW with GaLore seed by seed.
"""
from __future__ import annotations

import contextlib
import io
import math
import time

from lowrank_fused.routing import METHODS

STEPS, BATCH, SEQ, RANK, GAP, EVAL_EVERY, EVAL_BATCHES = 150, 8, 128, 8, 50, 25, 4
RANK_STUDY = (("adaptive_adamw", 4), ("galore", 4), ("adaptive_adamw", 8), ("galore", 8))


def _flags(method, rank, steps, threads, device, backend="auto"):
    return ["--model", "tiny", "--optimizer", method, "--steps", str(steps),
            "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--rank", str(rank),
            "--update-proj-gap", str(GAP), "--eval-every", str(EVAL_EVERY if steps > 20 else 5),
            "--eval-batches", str(EVAL_BATCHES), "--log-every", "25", "--max-bytes", "1000000",
            "--seed", "0", "--progress", "none", "--device", device.type, "--backend", backend,
            "--threads", str(max(1, threads))]


def train_one(method, rank, steps, threads, device, backend="auto"):
    from lowrank_fused.train import main
    with contextlib.redirect_stdout(io.StringIO()):
        return main(_flags(method, rank, steps, threads, device, backend))


def run(device, *, quick: bool, methods=None, threads: int = 1, backend: str = "auto",
        log=print) -> dict:
    steps = 10 if quick else STEPS
    names = [m for m in METHODS if methods is None or m in methods]
    runs, errors = [], []
    todo = [(m, RANK) for m in names]
    todo += [(m, r) for m, r in RANK_STUDY if m in names and (m, r) not in todo]
    for method, rank in todo:
        t0 = time.perf_counter()
        try:
            m = train_one(method, rank, steps, threads, device, backend)
        except (Exception, SystemExit) as exc:   # one diverging method must not end the suite
            errors.append({"case": f"convergence {method} r{rank}",
                           "error": f"{type(exc).__name__}: {exc}"})
            log(f"ERROR convergence {method} r{rank}: {type(exc).__name__}: {exc}")
            continue
        row = {"method": method, "rank": rank if method not in ("adamw", "adafactor") else None,
               "steps": steps, "tokens": steps * m["tokens_per_step"],
               "first_loss": m["first_loss"], "final_val_loss": m["final_val_loss"],
               "final_val_ppl": m["final_val_ppl"], "final_train_loss": m["final_train_loss"],
               "state_bytes": m["optimizer_state_bytes"], "state_ratio": m["state_ratio"],
               "curve": [[e["step"], e["val_loss"]] for e in m["evals"]],
               "seconds": time.perf_counter() - t0}
        runs.append(row)
        log(f"  convergence {method:15s} r{rank:<3d} val loss {row['final_val_loss']:.4f} "
            f"ppl {row['final_val_ppl']:7.2f}  state {row['state_ratio']:.3f}x  "
            f"({row['seconds']:.1f} s)")
    for r in runs:
        if not math.isfinite(r["final_val_loss"]):
            errors.append({"case": f"convergence {r['method']}", "error": "non-finite loss"})
    return {"suite": "convergence",
            "config": {"model": "tiny", "steps": steps, "batch_size": BATCH, "seq_len": SEQ,
                       "rank": RANK, "update_proj_gap": GAP, "lr": 0.01, "warmup": max(1, steps // 10),
                       "eval_every": EVAL_EVERY if steps > 20 else 5, "eval_batches": EVAL_BATCHES,
                       "tokens": steps * BATCH * SEQ},
            "rank_study": [list(x) for x in RANK_STUDY], "rows": runs, "errors": errors}
