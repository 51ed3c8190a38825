"""Suite ``convergence-study``: every method at its own best learning rate, several seeds, and
AdaptiveAdamW vs GaLore as same-seed pairs (opt-in: ``python -m bench.run --suite
convergence-study --jobs 2``; about an hour of one CPU core).

The ``convergence`` suite gives every method one untuned lr, which ranks the methods by how well
that lr happens to suit them. This study tunes first and then measures the spread:

1. lr sweep, seed 0, rank 8: every method at lr 3e-3, 1e-2 and 3e-2; when the best of the lrs
   tried is the smallest or the largest, the next lr of the ladder (3e-4, 1e-3, ..., 1e-1)
   beyond it is tried too, until the best is inside the tried range or at the ladder's end;
2. seeds: every method at its best lr with seeds 1 and 2 (seed 0 comes from the sweep);
3. pairs: AdaptiveAdamW and GaLore at ranks 4 and 8 with seeds 0 to 4, each at its own best
   rank-8 lr. Runs with the same seed start from the same initial weights and see
   the same batches and their difference is a paired difference. The seed sets the model's
   initialisation and the batch order; the corpus is the same for every run (the driver's
   default for seed 0: about 1 MB of standard-library ``.py`` files, its last 10% the
   validation split), so runs of different seeds are scored on the same validation bytes.

A run is one ``python -m lowrank_fused.train`` (a model between the driver's tiny one and the
dim-256 / 4-layer one: dim 128, 3 layers, 4 heads, MLP 344, byte-level stdlib text; 150 steps of
8 x 128 bytes, warm-up 15 then cosine to 0.1x, grad clip 1.0, refresh interval 50; validation
loss on 8 fixed batches every 50 steps). A diverged run (non-finite loss) counts as the worst
result of its lr.

Resumable: ``<out>/convergence-study-<device>.json`` is rewritten after every run with all
runs so far and the summary they give; a rerun with the same configuration skips the runs
already there (and so continues an interrupted study). ``--quick``: a 1-layer dim-32 model,
6 steps, no lr extension, seeds 0 and 1 (a smoke test of the plan, seconds).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from pathlib import Path

from lowrank_fused.routing import DENSE_METHODS, METHODS

NAME = "convergence-study"
PAIR = ("adaptive_adamw", "galore")

FULL = {"model": {"dim": 128, "n_layers": 3, "n_heads": 4, "mlp_dim": 344},
        "steps": 150, "batch_size": 8, "seq_len": 128, "rank": 8, "update_proj_gap": 50,
        "eval_every": 50, "eval_batches": 8, "max_bytes": 1_000_000,
        "warmup": 15, "min_lr_ratio": 0.1, "grad_clip": 1.0,
        "lr_start": [3e-3, 1e-2, 3e-2], "lr_ladder": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
        "corpus": "stdlib seed-0 selection, fixed for every seed",
        "seeds": [0, 1, 2], "pair_methods": list(PAIR), "pair_ranks": [4, 8],
        "pair_seeds": [0, 1, 2, 3, 4]}
QUICK = dict(FULL, model={"dim": 32, "n_layers": 1, "n_heads": 2, "mlp_dim": 64}, steps=6,
             batch_size=2, seq_len=32, update_proj_gap=3, eval_every=3, eval_batches=1,
             max_bytes=200_000, warmup=1, lr_ladder=[3e-3, 1e-2, 3e-2], seeds=[0, 1],
             pair_seeds=[0, 1])


def config(quick: bool) -> dict:
    return json.loads(json.dumps(QUICK if quick else FULL))


# ---- the plan: which runs are still needed, a function of the runs done ---------------------

def _rank(cfg, method, rank=None):
    return None if method in DENSE_METHODS else (cfg["rank"] if rank is None else rank)


def run_key(method, rank, lr, seed):
    return (method, rank, f"{lr:.0e}", seed)


def _loss(run):
    v = run.get("final_val_loss")
    return math.inf if v is None or not math.isfinite(v) else v


def best_lr(cfg, method, done):
    """(best lr or None, lrs still to try) of ``method``'s sweep (seed 0, rank ``cfg['rank']``).
    ``done`` maps ``run_key`` to a run. The best is the lowest final validation loss; when it
    sits at an end of the tried lrs, the ladder's next lr beyond it is still to try. None with
    nothing to try: every lr of the ladder diverged."""
    rank, seed, ladder = _rank(cfg, method), cfg["seeds"][0], cfg["lr_ladder"]
    tried = {lr: _loss(done[run_key(method, rank, lr, seed)]) for lr in ladder
             if run_key(method, rank, lr, seed) in done}
    todo = [lr for lr in cfg["lr_start"] if lr not in tried]
    if todo:
        return None, todo
    lrs = sorted(tried)
    best = min(lrs, key=lambda lr: (tried[lr], lr))   # ties: the smaller lr
    if not math.isfinite(tried[best]):
        best = lrs[0]                                 # all diverged: go lower
    i = ladder.index(best)
    if best == lrs[0] and i > 0:
        return None, [ladder[i - 1]]
    if best == lrs[-1] and i + 1 < len(ladder) and math.isfinite(tried[best]):
        return None, [ladder[i + 1]]
    return (best if math.isfinite(tried[best]) else None), []


def pending(cfg, methods, done):
    """Runs still needed as ``(priority, method, rank, lr, seed, stage)``, most urgent first:
    the sweeps (0), then every method's seeds at its best lr and the pairs on the sweep's seeds
    (1), then the pairs' extra seeds (2); within a priority seed by seed, so that a study cut
    short has the same seeds for every method. Only what the runs so far decide is listed: a
    method whose sweep is unfinished has no seed runs yet."""
    out = []
    for method in methods:
        best, todo = best_lr(cfg, method, done)
        rank = _rank(cfg, method)
        out += [(0, method, rank, lr, cfg["seeds"][0], "sweep") for lr in todo]
        if best is None:
            continue
        want = [(1, rank, s, "seeds") for s in cfg["seeds"][1:]]
        if method in cfg["pair_methods"] and all(m in methods for m in cfg["pair_methods"]):
            for r in cfg["pair_ranks"]:
                for s in cfg["pair_seeds"]:
                    if (r, s) != (rank, cfg["seeds"][0]):
                        want.append((1 if s in cfg["seeds"] else 2, r, s, "pairs"))
        seen = set()
        for prio, r, s, stage in want:
            if (r, s) not in seen and run_key(method, r, best, s) not in done:
                seen.add((r, s))
                out.append((prio, method, r, best, s, stage))
    return sorted(out, key=lambda t: (t[0], t[4], methods.index(t[1]), -(t[2] or 0), t[3]))


# ---- the summary: per method at its best lr, and the paired differences ---------------------

def _spread(xs):
    return {"n": len(xs), "mean": statistics.fmean(xs) if xs else None,
            "sd": statistics.stdev(xs) if len(xs) > 1 else None,
            "min": min(xs) if xs else None, "max": max(xs) if xs else None}


def summarize(cfg, methods, done) -> dict:
    """``rows`` (one per method and rank at the method's best lr: the seeds' final validation
    perplexities, mean, sample sd, min, max), ``sweep`` (seed 0's perplexity at every lr tried)
    and ``pairs`` (per rank: the per-seed relative perplexity difference of the first pair
    method against the second, in percent, and its mean, sd, min, max)."""
    rows, sweep, best = [], [], {}
    for method in methods:
        b, _ = best_lr(cfg, method, done)
        best[method] = b
        rank = _rank(cfg, method)
        for lr in cfg["lr_ladder"]:
            run = done.get(run_key(method, rank, lr, cfg["seeds"][0]))
            if run:
                sweep.append({"method": method, "rank": rank, "lr": lr,
                              "final_val_ppl": run.get("final_val_ppl"),
                              "diverged": run.get("final_val_loss") is None, "best": lr == b})
        if b is None:
            continue
        ranks = [rank] + ([r for r in cfg["pair_ranks"] if r != rank]
                          if method in cfg["pair_methods"] else [])
        for r in ranks:
            want = set(cfg["seeds"]) if r == rank else set()
            if method in cfg["pair_methods"]:
                want |= set(cfg["pair_seeds"])
            seeds = sorted(s for s in want if run_key(method, r, b, s) in done)
            runs = [done[run_key(method, r, b, s)] for s in seeds]
            ok = [x for x in runs if x.get("final_val_loss") is not None]
            ppl = [x["final_val_ppl"] for x in ok]
            main_seeds = [x["final_val_ppl"] for x, s in zip(runs, seeds)
                          if s in cfg["seeds"] and x.get("final_val_loss") is not None]
            rows.append({"method": method, "rank": r, "best_lr": b, "seeds": seeds,
                         "val_ppl": [x.get("final_val_ppl") for x in runs],
                         "diverged": len(runs) - len(ok),
                         "ppl": _spread(ppl), "ppl_main_seeds": _spread(main_seeds),
                         "val_loss": _spread([x["final_val_loss"] for x in ok]),
                         "state_ratio": runs[0]["state_ratio"] if runs else None,
                         "curve": ok[0]["curve"] if ok else []})
    pairs = []
    a, g = cfg["pair_methods"]
    if best.get(a) is not None and best.get(g) is not None:
        for r in cfg["pair_ranks"]:
            diffs, per_seed = [], []
            for s in cfg["pair_seeds"]:
                x, y = (done.get(run_key(a, r, best[a], s)), done.get(run_key(g, r, best[g], s)))
                if not x or not y or x.get("final_val_loss") is None \
                        or y.get("final_val_loss") is None:
                    continue
                d = 100.0 * (x["final_val_ppl"] / y["final_val_ppl"] - 1.0)
                diffs.append(d)
                per_seed.append({"seed": s, a: x["final_val_ppl"], g: y["final_val_ppl"],
                                 "diff_pct": d})
            pairs.append({"rank": r, "a": a, "b": g, "lr_a": best[a], "lr_b": best[g],
                          "per_seed": per_seed, "diff_pct": _spread(diffs),
                          "a_better": sum(d < 0 for d in diffs)})
    return {"rows": rows, "sweep": sweep, "pairs": pairs}


# ---- running ---------------------------------------------------------------------------------

def write_corpus(cfg, folder) -> Path:
    """The driver's default corpus for seed 0 (standard-library ``.py`` files, ``max_bytes``)
    as one text file: every run reads it with ``--data``, so the seed changes the model's
    initialisation and the batch order but not the data or the validation split."""
    from lowrank_fused.data import select_files, stdlib_py_files
    chunks = []
    for f in select_files(stdlib_py_files(None), cfg["max_bytes"], 0):
        with contextlib.suppress(OSError):
            chunks.append(f.read_bytes())
    path = Path(folder) / "corpus.txt"
    path.write_bytes(b"\n".join(c for c in chunks if c))
    return path


def train_flags(cfg, method, rank, lr, seed, threads, device, backend, corpus):
    m = cfg["model"]
    return ["--data", str(corpus), "--max-bytes", str(Path(corpus).stat().st_size), "--model", "tiny", "--dim", str(m["dim"]), "--n-layers", str(m["n_layers"]),
            "--n-heads", str(m["n_heads"]), "--mlp-dim", str(m["mlp_dim"]),
            "--optimizer", method, "--rank", str(rank or cfg["rank"]),
            "--update-proj-gap", str(cfg["update_proj_gap"]), "--lr", repr(lr),
            "--warmup", str(cfg["warmup"]), "--min-lr-ratio", str(cfg["min_lr_ratio"]),
            "--grad-clip", str(cfg["grad_clip"]), "--steps", str(cfg["steps"]),
            "--batch-size", str(cfg["batch_size"]), "--seq-len", str(cfg["seq_len"]),
            "--eval-every", str(cfg["eval_every"]), "--eval-batches", str(cfg["eval_batches"]),
            "--log-every", str(cfg["steps"]),
            "--seed", str(seed), "--progress", "none", "--device", device.type,
            "--backend", backend, "--threads", str(max(1, threads))]


def _record(method, rank, lr, seed, stage, m, seconds):
    return {"method": method, "rank": rank, "lr": lr, "seed": seed, "stage": stage,
            "final_val_loss": m["final_val_loss"], "final_val_ppl": m["final_val_ppl"],
            "final_train_loss": m["final_train_loss"], "first_loss": m["first_loss"],
            "state_ratio": m["state_ratio"],
            "curve": [[e["step"], e["val_loss"]] for e in m["evals"]],
            "seconds": round(seconds, 1)}


def _diverged(method, rank, lr, seed, stage, why, seconds):
    return {"method": method, "rank": rank, "lr": lr, "seed": seed, "stage": stage,
            "final_val_loss": None, "final_val_ppl": None, "diverged": why,
            "seconds": round(seconds, 1)}


def train_one(job, cfg, threads, device, backend, corpus):
    """One training run in this process: its record (``final_val_loss`` None when the loss
    went non-finite), or raises."""
    from lowrank_fused.train import main
    _, method, rank, lr, seed, stage = job
    flags = train_flags(cfg, method, rank, lr, seed, threads, device, backend, corpus)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            m = main(flags)
    except FloatingPointError as exc:
        return _diverged(method, rank, lr, seed, stage, str(exc), time.perf_counter() - t0)
    return _record(method, rank, lr, seed, stage, m, time.perf_counter() - t0)


def load_runs(path: Path, cfg) -> list:
    """The runs of an earlier study in ``path`` with the same configuration (else none)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return list(doc.get("runs", [])) if doc.get("config") == cfg else []


def document(cfg, methods, runs, errors) -> dict:
    done = {run_key(r["method"], r["rank"], r["lr"], r["seed"]): r for r in runs}
    return {"suite": NAME, "config": cfg, "methods": list(methods), **summarize(cfg, methods, done),
            "pending": len(pending(cfg, list(methods), done)), "runs": runs, "errors": errors}


def _write(path: Path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def run(device, *, quick: bool, methods=None, threads: int = 1, backend: str = "auto",
        out=None, jobs: int = 1, log=print) -> dict:
    """Run (or continue) the study; with ``out``, ``<out>/convergence-study-<device>.json`` is
    rewritten after every run. ``jobs`` > 1 trains in that many worker processes at a time
    (each with ``threads`` torch threads); 1 trains in this process."""
    from bench import harness as H

    cfg = config(quick)
    names = [m for m in METHODS if methods is None or m in methods]
    path = Path(out) / f"{NAME}-{H.device_slug(device)}.json" if out is not None else None
    runs = load_runs(path, cfg) if path is not None else []
    if runs:
        log(f"  {NAME}: continuing from {len(runs)} runs in {path}")
    errors, failed = [], set()
    done = {run_key(r["method"], r["rank"], r["lr"], r["seed"]): r for r in runs}
    t_start = time.perf_counter()

    def todo():
        return [j for j in pending(cfg, names, done)
                if run_key(*j[1:5]) not in failed and run_key(*j[1:5]) not in running]

    running = {}
    # jobs > 1: worker processes (spawned: each imports torch once and trains run after run)
    pool = (ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
            if jobs > 1 else ThreadPoolExecutor(1))
    with tempfile.TemporaryDirectory() as tmp, pool:
        corpus = write_corpus(cfg, tmp)
        while True:
            for job in todo()[:max(1, jobs) - len(running)]:
                fut = pool.submit(train_one, job, cfg, threads, device, backend, corpus)
                running[run_key(*job[1:5])] = (fut, job)
            if not running:
                break
            finished, _ = wait([f for f, _ in running.values()], return_when=FIRST_COMPLETED)
            for key, (fut, job) in list(running.items()):
                if fut not in finished:
                    continue
                del running[key]
                _, method, rank, lr, seed, stage = job
                label = f"{method} r{rank or '-'} lr {lr:.0e} seed {seed}"
                try:
                    rec = fut.result()
                except Exception as exc:   # record and go on; the plan skips it from now on
                    failed.add(key)
                    errors.append({"case": f"{NAME} {label}",
                                   "error": f"{type(exc).__name__}: {exc}"})
                    log(f"ERROR {NAME} {label}: {type(exc).__name__}: {exc}")
                    continue
                runs.append(rec)
                done[key] = rec
                if path is not None:
                    _write(path, document(cfg, names, runs, errors))
                ppl = rec["final_val_ppl"]
                log(f"  {NAME} [{stage:5s}] {label:40s} "
                    + (f"val ppl {ppl:7.3f}" if ppl is not None else "diverged")
                    + f"  ({rec['seconds']:.0f} s; {len(runs)} runs, "
                    f"{time.perf_counter() - t_start:.0f} s)")
    return document(cfg, names, runs, errors)
