"""The summary page: ``<results>/README.md`` plus PNG plots under ``<results>/plots/``.

    python -m bench.report [--results bench/results]

Reads what ``python -m bench.run`` wrote into the folder: the kernel files
``<device>-<YYYY-MM-DD>.json`` (the newest per device) and the suite files
``{step,e2e,convergence}-<device>.json``, and writes one table per benchmark with the machine and
date. Plots need matplotlib (``pip install matplotlib``); without it the tables are still
written and the page links the PNGs already under ``plots/`` (from the last run with
matplotlib, not redrawn: the page says so), or says the plots were skipped when there are none.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("step", "e2e", "convergence", "convergence-study", "refresh")
_KERNEL_RE = re.compile(r"^(?P<slug>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.json$")
HEADLINE = "headline"      # bench.gpu_check's first device command: headline-<slug>-<date>.json


def _mib(n):
    return f"{n / 2 ** 20:,.1f}" if n is not None else "-"


def _f(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def find_results(folder: Path) -> dict:
    """{device slug: {"kernels": doc, "step": doc, ...}} from the JSON files in ``folder``."""
    found: dict = {}
    newest: dict = {}
    for path in sorted(folder.glob("*.json")):
        suite = max((s for s in SUITES if path.name.startswith(s + "-")), key=len, default=None)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if suite:
            found.setdefault(path.stem[len(suite) + 1:], {})[suite] = doc
            continue
        m = _KERNEL_RE.match(path.name)
        if m and m["slug"].startswith(HEADLINE + "-") and doc.get("kind") == HEADLINE:
            slug = m["slug"][len(HEADLINE) + 1:]
            key = (HEADLINE, slug)
            if key not in newest or m["date"] >= newest[key]:
                newest[key] = m["date"]
                found.setdefault(slug, {})[HEADLINE] = doc
            continue
        if m and "rows" in doc and (m["slug"] not in newest or m["date"] > newest[m["slug"]]):
            newest[m["slug"]] = m["date"]
            found.setdefault(m["slug"], {})["kernels"] = doc
    return found


def _env_line(doc) -> str:
    env = doc.get("environment", {})
    bits = [env.get("device_name", "?"), f"torch {env.get('torch', '?')}"]
    if env.get("triton"):
        bits.append(f"triton {env['triton']}")
    if env.get("cpu_threads"):
        bits.append(f"{env['cpu_threads']} torch threads")
    bits.append(f"commit {str(env.get('commit', '?'))[:12]}")
    meta = doc.get("meta", {})
    when = env.get("date", "?")
    cmd = meta.get("command")
    took = meta.get("elapsed_s")
    return (f"*{when} on {', '.join(bits)}" + (f"; `{cmd}`" if cmd else "")
            + (f", {took} s" if took is not None else "") + "*")


def kernels_section(doc) -> str:
    rows = []
    for r in doc["rows"]:
        rows.append([r["op"], r["variant"], r["backend"], f"{r['m']}x{r['n']}", r.get("r") or "-",
                     r["dtype"], r.get("precision") or "-", _f(r["p50_ms"], ".4f"),
                     _f(r["achieved_gbps"], ".1f"), _f(r["multiple_of_floor"], ".2f"),
                     _f(r.get("multiple_of_roofline"), ".2f"), r.get("roofline_bound") or "-"])
    note = ""
    if doc.get("environment", {}).get("device") == "cpu":
        note = ("\nCPU: eager only (the Triton kernels need a GPU or `--interpret`); a smoke test "
                "of the harness, not a performance result.\n")
    return ("### 1. Kernels: fused ops vs eager reference\n\n" + _env_line(doc) + "\n" + note
            + "\n" + _table(["op", "variant", "backend", "shape", "r", "dtype", "precision",
                             "p50 ms", "GB/s", "x floor", "x roofline", "bound"], rows)
            + "\n\n`x floor` = p50 / (floor bytes at the measured copy bandwidth); `x roofline` ="
            " p50 / max(that, FLOPs at the device's peak for the row's precision), `bound` the "
            "larger term (`bench/bytes.py`; no roofline without a peak table, e.g. on a CPU).\n")


def headline_section(doc) -> str:
    """The headline run (``bench.gpu_check``): its stages, then one row per (method, dtype,
    precision, rank) with the fused and eager steps side by side and torch's fused AdamW on
    the same matrix, then the whole-model step."""
    meta = doc.get("meta", {})
    out = ["### Headline: every method's steady step, fused vs eager vs torch AdamW\n",
           _env_line(doc) + "\n"]
    if meta.get("tiny"):
        out.append("**Dry run** (`--tiny`: a CPU, Triton under the interpreter, tiny shapes): "
                   "the numbers check the script, they are not measurements.\n")
    stages = [[name, st.get("status", "?"), _f(st.get("elapsed_s"), ".1f"),
               _f(st.get("budget_s"), ".0f")] for name, st in doc.get("stages", {}).items()]
    out.append(_table(["stage", "status", "s", "budget s"], stages) + "\n")
    for st in doc.get("stages", {}).values():
        for sh in st.get("shards", []):
            out.append(f"- tests `{sh['select']}`: "
                       + ("killed at the budget" if sh["timed_out"] else f"exit {sh['exit']}")
                       + ", " + ", ".join(f"{sh.get(k, 0)} {k}" for k in
                                          ("passed", "failed", "errors", "skipped")))
    c = doc.get("ceilings") or {}
    if c.get("copy_gbps"):
        pk = c.get("peaks")
        out.append(f"\nCeilings: copy {c['copy_gbps']:.1f} GB/s"
                   + (f", bf16 matmul {c['matmul_tflops']:.1f} TFLOP/s"
                      if c.get("matmul_tflops") else "")
                   + (f"; roofline peaks {pk['name']} ("
                      + ", ".join(f"{k} {v:.0f}" for k, v in pk["tflops"].items())
                      + f" TFLOP/s, {pk['compute_source']})" if pk else "; no roofline") + ".\n")
    rows = doc.get("rows", [])
    torch_rows = {r["dtype"]: r for r in rows if r["variant"] == "torch-fused"}
    table, index = [], {}
    for r in rows:
        if r["variant"] not in ("fused", "eager"):
            continue
        key = (r["op"], r["dtype"], r["precision"], r["r"])
        if key not in index:
            index[key] = {}
            table.append(key)
        index[key][r["variant"]] = r
    cells = []
    for key in table:
        fused, eager = index[key].get("fused"), index[key].get("eager")
        base = torch_rows.get(key[1])
        f50 = fused["p50_ms"] if fused else None
        e50 = eager["p50_ms"] if eager else None
        bound = fused.get("roofline_bound") if fused else None
        cells.append([
            key[0].split(":", 1)[-1], key[1], key[2], key[3], _f(f50, ".3f"), _f(e50, ".3f"),
            _f(base["p50_ms"] if base else None, ".3f"),
            _f(e50 / f50 if f50 and e50 else None, ".2f"),
            _f(f50 / base["p50_ms"] if f50 and base else None, ".2f"),
            _f(fused["achieved_gbps"] if fused else None, ".0f"),
            _f(fused["multiple_of_floor"] if fused else None, ".2f"),
            _f(fused.get("multiple_of_roofline") if fused else None, ".2f")
            + (f" ({bound})" if bound else ""),
            _f(eager.get("multiple_of_roofline") if eager else None, ".2f"),
            _f((fused.get("extra") or {}).get("first_call_ms") if fused else None, ".0f")])
    shape = "x".join(str(x) for x in meta.get("shape", [])) or "?"
    out.append(f"\nOne steady step on one {shape} matrix (p50 ms; refreshes out of reach). "
               "`eager/fused` = speed-up of the fused step; `fused/torch` = fused step / "
               "`torch.optim.AdamW(fused=True)` on the same matrix and dtype (its states in the "
               "parameter dtype); GB/s = byte floor / p50; `x floor`, `x roofline` = p50 / the "
               "byte floor at the measured copy bandwidth / the roofline floor "
               "(`bench/bytes.py`, the larger term in brackets); first call = the fused step's "
               "cold call (Triton compiles).\n")
    out.append(_table(["method", "dtype", "precision", "r", "fused ms", "eager ms",
                       "torch AdamW ms", "eager/fused", "fused/torch", "fused GB/s",
                       "fused x floor", "fused x roofline", "eager x roofline",
                       "first call ms"], cells) + "\n")
    wm = doc.get("whole_model")
    if wm:
        out.append(whole_model_section(wm))
        if wm.get("skipped"):
            out.append("Not measured (budget spent): " + ", ".join(wm["skipped"]) + "\n")
    if doc.get("notes"):
        out.append("Notes:\n\n" + "\n".join(f"- {n}" for n in doc["notes"]) + "\n")
    if doc.get("errors"):
        out.append("Errors:\n\n" + "\n".join(f"- {e['case']}: {e['error']}"
                                             for e in doc["errors"]) + "\n")
    return "\n".join(out)


def headline_page(doc) -> str:
    """The stand-alone markdown file of a headline run (``headline-<device>-<date>.md``)."""
    env = doc.get("environment", {})
    return (f"# lowrank_fused headline: {env.get('device_name', '?')}, "
            f"{str(env.get('date', '?'))[:10]}\n\n" + headline_section(doc))


def step_section(doc) -> str:
    rows = []
    for r in doc["rows"]:
        rows.append([r["method"], f"{r['variant']}/{r['backend']}", _f(r["steady_p50_ms"]),
                     _f(r["steady_mean_ms"]), _f(r.get("refresh_p50_ms")),
                     r.get("refresh_interval") or "-", _f(r["amortised_ms"]),
                     _f(r.get("vs_torch_adamw"), ".2f"), _mib(r["state_bytes"]),
                     _f(r["state_ratio"], ".3f")])
    return (f"### 2. Optimizer step: every method on the {doc['model']} model's parameters "
            f"({doc['model_params']:,} params, rank {doc['rank']})\n\n" + _env_line(doc) + "\n\n"
            "Steady = refresh out of reach; refresh = a refresh on every step; amortised = steady "
            "+ (refresh - steady) / T at the method's default interval T. "
            f"p50 of {doc['timed_steps']} synchronised steps, gradients fixed. "
            "`x torch` = amortised / `torch.optim.AdamW` (fused where torch has it). "
            "State: optimizer state MiB and ratio to AdamW's two fp32 moments.\n\n"
            + _table(["method", "variant/backend", "steady p50 ms", "steady mean ms",
                      "refresh ms", "T", "amortised ms", "x torch", "state MiB", "state/AdamW"],
                     rows) + "\n" + whole_model_section(doc.get("whole_model")))


def whole_model_section(wm) -> str:
    if not wm:
        return ""
    rows = [[r["method"], r["variant"], _f(r["steady_p50_ms"]), _f(r["steady_mean_ms"]),
             _f(r.get("host_p50_ms")), r.get("graph") or "-", _f(r["vs_torch_adamw"], ".2f"),
             _f(r.get("multiple_of_floor"), ".2f"), _f(r.get("multiple_of_roofline"), ".2f"),
             _mib(r["state_bytes"])] for r in wm["rows"]]
    prec = wm.get("precision")
    return (f"\nWhole model, steady step (between refreshes): LLaMA-{wm['model']} "
            f"({wm['model_params']:,} fp32 params, rank {wm['rank']}"
            + (f", GEMM precision {prec}" if prec else "") + f"), p50 of "
            f"{wm['timed_steps']} steps, against `torch.optim.AdamW(fused=True)`. Host = wall "
            "time of the `opt.step()` call before synchronising (the CPU's issue work); graph = "
            "CUDA-graph capture (`n/a`: the optimizer offers none). `x floor` / `x roofline`: "
            "against the model-wide byte floor / roofline (`bench/bytes.py`).\n\n"
            + _table(["method", "variant", "steady p50 ms", "steady mean ms", "host p50 ms",
                      "graph", "x torch", "x floor", "x roofline", "state MiB"], rows) + "\n")


def e2e_section(doc) -> str:
    rows = []
    for r in doc["rows"]:
        rows.append([r["model"], r["method"], r["backend"], f"{r['tokens_per_s']:,.0f}",
                     _f(r.get("speed_vs_adamw"), ".2f"), _mib(r["peak_memory_bytes"]),
                     _f(r.get("memory_vs_adamw"), ".2f"), _mib(r["optimizer_state_bytes"]),
                     _f(r["state_ratio"], ".3f")])
    kind = doc["rows"][0]["peak_memory_kind"] if doc["rows"] else "peak memory"
    plan = "; ".join(f"{m}: `{' '.join(f)}`" for m, f in doc.get("plan", []))
    return ("### 3. End to end: the training driver, every method vs AdamW\n\n" + _env_line(doc)
            + "\n\n" + f"One `python -m lowrank_fused.train` process per row ({plan}). Tokens/s "
            f"without step 1; peak memory = {kind} of the process; `vs AdamW` against the "
            "library's AdamW on the same model.\n\n"
            + _table(["model", "method", "backend", "tokens/s", "vs AdamW", "peak MiB",
                      "vs AdamW", "state MiB", "state/AdamW"], rows) + "\n")


def convergence_section(doc) -> str:
    cfg = doc["config"]
    study = {tuple(x) for x in doc.get("rank_study", [])}
    main_rows, rank_rows = [], []
    for r in sorted(doc["rows"], key=lambda r: r["final_val_loss"]):
        cells = [r["method"], r["rank"] or "-", _f(r["final_val_loss"], ".4f"),
                 _f(r["final_val_ppl"], ".2f"), _f(r["state_ratio"], ".3f")]
        if r["rank"] in (cfg["rank"], None):
            main_rows.append(cells)
        if (r["method"], r["rank"]) in study:
            rank_rows.append(cells)
    rank_rows.sort(key=lambda c: (c[1], c[0]))
    return ("### 4. Convergence: every method, tiny model, fixed token budget\n\n"
            + _env_line(doc) + "\n\n"
            f"{cfg['steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} = {cfg['tokens']:,} "
            f"tokens, peak lr {cfg['lr']} for every method (no tuning), warm-up {cfg['warmup']}, "
            f"cosine to 0.1x, rank {cfg['rank']}, refresh interval {cfg['update_proj_gap']}; "
            f"validation loss on {cfg['eval_batches']} fixed batches every {cfg['eval_every']} "
            "steps. Sorted by final validation loss. One untuned lr for every method: a check "
            "that each method trains, not a ranking (an lr that suits one method is too large "
            "or too small for another; section 4b tunes the lr per method and repeats seeds)."
            "\n\n"
            + _table(["method", "rank", "val loss", "val ppl", "state/AdamW"], main_rows)
            + "\n\nAdaptiveAdamW vs GaLore at equal rank budget:\n\n"
            + _table(["method", "rank", "val loss", "val ppl", "state/AdamW"], rank_rows) + "\n")


def refresh_section(doc) -> str:
    m = doc["model"]
    rows = [[f"{r['gradients']}, q={r['power_iters']}", _f(1e3 * r["per_layer_svd_s"], ".1f"),
             _f(1e3 * r["batched_randomized_s"], ".1f"), _f(r["speedup"], ".1f") + "x",
             _f(100 * r["energy_ratio"], ".2f") + "%",
             _f(100 * r["worst_layer_energy_ratio"], ".2f") + "%"] for r in doc["rows"]]
    return ("### 5. Subspace refresh: batched randomized SVD vs per-layer SVD\n\n"
            + _env_line(doc) + "\n\n"
            + f"{m['matrices']} matrices of a LLaMA dim {m['hidden_size']} x {m['layers']} "
            f"layers, rank {m['rank']}, oversample {m['oversample']}, q power iterations; "
            "both timed in one process (median); energy = captured energy "
            "`||P^T G||^2` summed over layers, randomized / SVD (worst layer alone).\n\n"
            + _table(["gradients, q", "per-layer SVD ms", "batched randomized ms", "speedup",
                      "energy", "worst layer"], rows) + "\n")


def convergence_study_section(doc) -> str:
    """The convergence study (``bench/suite_convergence_study.py``): every method at its best
    lr over several seeds, and the paired AdaptiveAdamW - GaLore differences."""
    cfg, m = doc["config"], doc["config"]["model"]
    sweep = {}
    for s in doc.get("sweep", []):
        ppl = "diverged" if s["diverged"] else _f(s["final_val_ppl"], ".2f")
        sweep.setdefault((s["method"], s["rank"]), []).append(
            f"{s['lr']:.0e}: " + (f"**{ppl}**" if s["best"] else ppl))
    main = [r for r in doc["rows"] if r["rank"] in (cfg["rank"], None)]
    edge = (cfg["lr_ladder"][0], cfg["lr_ladder"][-1])
    rows = [[r["method"], r["rank"] or "-",
             f"{r['best_lr']:.0e}" + (" (ladder end)" if r["best_lr"] in edge else ""),
             r["ppl_main_seeds"]["n"],
             _f(r["ppl_main_seeds"]["mean"], ".3f"), _f(r["ppl_main_seeds"]["sd"], ".3f"),
             f"{_f(r['ppl_main_seeds']['min'], '.2f')} - {_f(r['ppl_main_seeds']['max'], '.2f')}",
             _f(r["state_ratio"], ".3f"), ", ".join(sweep.get((r["method"], r["rank"]), []))]
            for r in sorted(main, key=lambda r: r["ppl_main_seeds"]["mean"] or 1e9)]
    done = {r["method"] for r in main}
    rows += [[x, "", "-", 0, "-", "-", "-", "-", ", ".join(v)]
             for (x, _), v in sweep.items() if x not in done]
    pair_rows = []
    for p in doc.get("pairs", []):
        d = p["diff_pct"]
        pair_rows.append([p["rank"], f"{p['lr_a']:.0e} / {p['lr_b']:.0e}", d["n"],
                          ", ".join(f"{x['diff_pct']:+.1f}" for x in p["per_seed"]),
                          _f(d["mean"], "+.2f"), _f(d["sd"], ".2f"),
                          f"{_f(d['min'], '+.1f')} .. {_f(d['max'], '+.1f')}",
                          f"{p['a_better']} of {d['n']}"])
    a, b = cfg["pair_methods"]
    runs = doc.get("runs", [])
    return (f"### 4b. Convergence study: every method at its own best lr, up to "
            f"{len(cfg['seeds'])} seeds, paired differences\n\n" + _env_line(doc) + "\n\n"
            f"A LLaMA of dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads, MLP "
            f"{m['mlp_dim']} on byte-level standard-library text ({cfg['corpus']}); "
            f"{cfg['steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} bytes, warm-up "
            f"{cfg['warmup']} then cosine to {cfg['min_lr_ratio']}x, grad clip "
            f"{cfg['grad_clip']}, rank {cfg['rank']} and refresh interval "
            f"{cfg['update_proj_gap']} for the low-rank methods, validation perplexity on "
            f"{cfg['eval_batches']} fixed batches at the end; {len(runs)} runs "
            f"({sum(r.get('seconds', 0) for r in runs) / 60:.0f} min of wall-clock time "
            "summed over runs)"
            + (f" (**stopped before its end: {doc['pending']} more runs are planned** from "
               "these results; the same command continues the study)" if doc.get("pending")
               else "") + ". "
            "lr sweep with seed 0: "
            + ", ".join(f"{x:.0e}" for x in cfg["lr_start"]) + " for every method, extended "
            "along " + ", ".join(f"{x:.0e}" for x in cfg["lr_ladder"]) + " while the best lr "
            f"is at an end of the lrs tried; then seeds {cfg['seeds']} at the best lr. The "
            "seed sets the initial weights and the batch order (same data and validation "
            "bytes for every seed). Mean and sd (sample standard deviation, n - 1) over those "
            "seeds: the sd is the run-to-run spread from initialisation and batch order "
            "alone, not an error bar on a method's quality in general; differences smaller "
            "than about two sds are not a ranking. The sweep column gives seed 0's "
            "perplexity at every lr tried (best in bold); a best lr at the ladder's end may "
            "not be the method's optimum (the ladder stops there).\n\n"
            + _table(["method", "rank", "best lr", "seeds", "mean ppl", "sd", "range",
                      "state/AdamW", "lr sweep, seed 0"], rows)
            + f"\n\n{a} vs {b}, same seed, each at its own best rank-{cfg['rank']} lr, seeds "
            f"{cfg['pair_seeds']}: per-seed difference 100 x (ppl {a} / ppl {b} - 1), percent; "
            f"negative = {a} lower. The same seed gives both the same initial weights and "
            "batches, so the run-to-run noise they share cancels in the difference.\n\n"
            + _table(["rank", f"lr {a} / {b}", "seeds", "per seed %", "mean %", "sd %",
                      "range %", f"{a} lower"], pair_rows)
            + f"\n\nThese are CPU runs of a dim-{m['dim']} model for "
            f"{cfg['steps'] * cfg['batch_size'] * cfg['seq_len']:,} tokens: they say how the "
            "methods compare at this size and budget, not how they rank at LLaMA scale "
            "(60M-1B parameters, billions of tokens), where the rank is a far smaller "
            "fraction of the width and the lr optima differ.\n")


SECTIONS = {HEADLINE: headline_section, "kernels": kernels_section, "step": step_section,
            "e2e": e2e_section,
            "convergence": convergence_section, "convergence-study": convergence_study_section,
            "refresh": refresh_section}


# ---- plots ---------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def existing_plots(plots_dir: Path, slug: str, suite: str) -> list:
    """(alt text, file name) of the PNGs under ``plots_dir`` that a run with matplotlib drew for
    this device and suite (the names write_report gives them), for a page written without
    matplotlib."""
    if suite == "convergence":
        names = [("validation loss of every method", f"{slug}-convergence.png"),
                 ("AdaptiveAdamW vs GaLore", f"{slug}-rank.png")]
    else:
        names = [(suite, f"{slug}-{suite}.png")]
    return [(alt, name) for alt, name in names if (plots_dir / name).is_file()]


def plot_convergence(plt, doc, path_all, path_rank):
    cfg = doc["config"]
    fig, ax = plt.subplots(figsize=(8, 5))
    shown = [r for r in doc["rows"] if r["rank"] in (cfg["rank"], None)]
    for i, r in enumerate(shown):
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="os^v"[i % 4], ms=3, ls=("-", "--", ":")[i % 3],
                color=plt.cm.tab20(i % 20), label=f"{r['method']} ({r['final_val_ppl']:.1f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"tiny LLaMA, {cfg['tokens']:,} tokens, rank {cfg['rank']} (final ppl)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    lows = [min(y for _, y in r["curve"]) for r in doc["rows"]]
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(lows) + 2.0)
    fig.tight_layout()
    fig.savefig(path_all, dpi=90)
    plt.close(fig)
    study = {tuple(x) for x in doc.get("rank_study", [])}
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in doc["rows"]:
        if (r["method"], r["rank"]) in study:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", ms=3, ls="-" if r["method"] == "galore" else "--",
                    label=f"{r['method']} r{r['rank']} ({r['final_val_ppl']:.1f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("AdaptiveAdamW vs GaLore, equal rank (final ppl)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if lows:
        ax.set_ylim(min(lows) - 0.1, min(lows) + 2.0)
    fig.tight_layout()
    fig.savefig(path_rank, dpi=90)
    plt.close(fig)


def _barh(plt, labels, values, xlabel, title, path):
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_step(plt, doc, path):
    rows = doc["rows"]
    _barh(plt, [f"{r['method']} {r['variant']}" for r in rows], [r["amortised_ms"] for r in rows],
          "ms per step (amortised over refreshes)",
          f"optimizer step, {doc['model']} model, rank {doc['rank']}", path)


def plot_e2e(plt, doc, path):
    rows = doc["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.3 * len(rows) + 1.5), sharey=True)
    labels = [f"{r['model']} {r['method']}" for r in rows]
    axes[0].barh(range(len(rows)), [r["tokens_per_s"] for r in rows], color="tab:green")
    axes[0].set_xlabel("tokens/s")
    axes[1].barh(range(len(rows)), [r["peak_memory_bytes"] / 2 ** 20 for r in rows],
                 color="tab:orange")
    axes[1].set_xlabel("peak memory, MiB" + (" (RSS)" if rows and "RSS" in
                                            rows[0]["peak_memory_kind"] else ""))
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(labels, fontsize=8)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("end to end: the training driver", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_kernels(plt, doc, path):
    rows = doc["rows"]
    _barh(plt, [f"{r['op']} {r['variant']} {r['m']}x{r['n']} {r['dtype']}" for r in rows],
          [r["multiple_of_floor"] for r in rows], "p50 / byte floor at copy speed (1 = ideal)",
          "kernels", path)


def plot_convergence_study(plt, doc, path):
    """Left: each method's final perplexity per seed (dots) and mean +- sd at its best lr;
    right: the per-seed paired differences of the pair methods, per rank."""
    cfg = doc["config"]
    main = sorted((r for r in doc["rows"] if r["rank"] in (cfg["rank"], None)
                   and r["ppl_main_seeds"]["n"]), key=lambda r: r["ppl_main_seeds"]["mean"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.32 * max(len(main), 4) + 1.6),
                                 gridspec_kw={"width_ratios": [2, 1]})
    for i, r in enumerate(main):
        st = r["ppl_main_seeds"]
        ys = [p for p, s in zip(r["val_ppl"], r["seeds"]) if p is not None and s in cfg["seeds"]]
        ax.plot(ys, [i] * len(ys), "o", ms=4, color="tab:gray", alpha=0.7)
        ax.errorbar([st["mean"]], [i], xerr=[st["sd"] or 0], fmt="D", ms=5, color="tab:blue",
                    capsize=3)
    ax.set_yticks(range(len(main)))
    ax.set_yticklabels([f"{r['method']} (lr {r['best_lr']:.0e})" for r in main], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final validation perplexity (dots: seeds; diamond: mean +- sd)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"each method at its best lr, {len(cfg['seeds'])} seeds", fontsize=10)
    pairs = doc.get("pairs", [])
    for i, p in enumerate(pairs):
        xs = [x["diff_pct"] for x in p["per_seed"]]
        bx.plot(xs, [i] * len(xs), "o", ms=5, color="tab:gray", alpha=0.7)
        if p["diff_pct"]["mean"] is not None:
            bx.errorbar([p["diff_pct"]["mean"]], [i], xerr=[p["diff_pct"]["sd"] or 0], fmt="D",
                        ms=6, color="tab:red", capsize=3)
    bx.axvline(0, color="k", lw=0.8)
    bx.set_yticks(range(len(pairs)))
    bx.set_yticklabels([f"rank {p['rank']}" for p in pairs])
    bx.set_ylim(-0.7, max(len(pairs), 1) - 0.3)
    bx.invert_yaxis()
    a, b = cfg["pair_methods"]
    bx.set_xlabel("ppl ratio - 1, % (dots: seeds)")
    bx.set_title(f"{a} vs {b}, paired", fontsize=10)
    bx.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


PLOTS = {"kernels": plot_kernels, "step": plot_step, "e2e": plot_e2e,
         "convergence-study": plot_convergence_study}
NO_PLOT = ("refresh",)


def write_report(folder: Path, log=print) -> Path:
    folder = Path(folder)
    found = find_results(folder)
    plt = _plt()
    plots_dir = folder / "plots"
    parts = ["# Benchmark results\n",
             "Generated by `python -m bench.report` from the JSON files in this folder "
             "(`python -m bench.run --out bench/results` reruns every benchmark and regenerates "
             "this page; see `bench/README.md` for what is measured and how).\n"]
    if plt is None and any(plots_dir.glob("*.png")):
        parts.append("**matplotlib is not installed: the plots are the PNGs already in `plots/`, "
                     "drawn by the last run with matplotlib and not redrawn from these tables** "
                     "(`pip install matplotlib`, then `python -m bench.report`).\n")
    elif plt is None:
        parts.append("**Plots skipped: matplotlib is not installed** (`pip install matplotlib`, "
                     "then `python -m bench.report`).\n")
        log("bench.report: matplotlib is not installed; writing the tables without plots "
            "(pip install matplotlib)")
    if not found:
        parts.append("No results yet: run `python -m bench.run --out " + str(folder) + "`.\n")
    # GPU results first, then CPU
    for slug in sorted(found, key=lambda s: (s == "cpu", s)):
        docs = found[slug]
        parts.append(f"## {slug}\n")
        for suite in (HEADLINE, "kernels") + SUITES:
            doc = docs.get(suite)
            if not doc:
                continue
            if not doc.get("rows"):
                parts.append(f"### {suite}: no rows\n")
                continue
            parts.append(SECTIONS[suite](doc))
            if plt is not None:
                plots_dir.mkdir(parents=True, exist_ok=True)
                if suite == "convergence":
                    a, b = plots_dir / f"{slug}-convergence.png", plots_dir / f"{slug}-rank.png"
                    plot_convergence(plt, doc, a, b)
                    parts.append(f"![validation loss of every method](plots/{a.name})\n\n"
                                 f"![AdaptiveAdamW vs GaLore](plots/{b.name})\n")
                elif suite not in NO_PLOT + (HEADLINE,):
                    p = plots_dir / f"{slug}-{suite}.png"
                    PLOTS[suite](plt, doc, p)
                    parts.append(f"![{suite}](plots/{p.name})\n")
            else:
                parts.extend(f"![{alt}](plots/{name})\n"
                             for alt, name in existing_plots(plots_dir, slug, suite))
            errs = doc.get("errors") or doc.get("meta", {}).get("errors") or []
            if errs:
                parts.append("Errors:\n\n" + "\n".join(f"- {e['case']}: {e['error']}"
                                                       for e in errs) + "\n")
    path = folder / "README.md"
    path.write_text("\n".join(parts))
    log(f"wrote {path}" + (f" and plots under {plots_dir}" if plt is not None and found else ""))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    write_report(Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
