"""Run the benchmark suites and write their results and the summary page into ``<out>``.

    python -m bench.run [--out DIR] [--suite kernels,step,e2e,convergence,refresh] [--quick]
                        [--only NAME[,NAME]] [--methods M[,M]] [--interpret] [--threads N]

Suites: ``kernels`` (every fused op vs eager: ``<out>/<gpu-or-cpu>-<YYYY-MM-DD>.{json,md}``),
``step`` (one optimizer step of every method on a whole model, ``bench.suite_step``), ``e2e``
(the training driver's tokens/s and peak memory, ``bench.suite_e2e``) and ``convergence``
(every method on the tiny config, ``bench.suite_convergence``), ``refresh`` (batched randomized
subspace refresh vs per-layer SVD, ``bench.suite_refresh``): ``<out>/<suite>-<device>.json``.
Opt-in, only when named in ``--suite``: ``convergence-study`` (every method at its own best lr
over several seeds, ``bench.suite_convergence_study``; about an hour of one CPU core, resumable,
``--jobs 2`` trains two runs at a time); ``traffic`` (the bytes the Triton kernels request in
one steady step of every method with the H100 tile configs, counted under the interpreter in a
child process, ``bench.bench_traffic``; CPU minutes on any machine).
Then ``bench.report`` writes ``<out>/README.md`` and the plots ``<out>/plots/*.png``.
Default: every suite (``--only`` alone selects the kernel suite).

On CUDA: the full grid of ``harness.matrix_cases`` (``--quick``: one shape). On a CPU-only
machine the run is always quick and eager-only, a smoke test of the harness plus the byte model
(``--interpret`` adds the Triton kernels under ``TRITON_INTERPRET=1``: a correctness tool, not
a speed measurement). Default ``--out``: ``bench/results/`` on CUDA, the git-ignored
``bench/results/_scratch/`` on CPU (CPU numbers are not results to commit).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

MODULES = ("project", "adam_moments", "backproject_update", "galore_step", "adafactor_step",
           "adafactor_bc_step", "adapm_update", "gha_update", "moment_transport",
           "adamem_moments", "grouped_lowrank")
MODULES += ("iass_select", "residual_col_stats", "method_step", "adafactor_grouped_step")
SUITES = ("kernels", "step", "e2e", "convergence", "refresh")
# run only when named in --suite: bench.suite_convergence_study (about an hour of one CPU
# core), bench.suite_traffic (bytes the kernels request, counted under the Triton interpreter)
OPT_IN_SUITES = ("convergence-study", "traffic")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="output folder (default: bench/results/, on CPU bench/results/_scratch/)")
    ap.add_argument("--quick", action="store_true",
                    help="small grid (always on without CUDA)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated modules to run, from {', '.join(MODULES)}")
    ap.add_argument("--interpret", action="store_true",
                    help="without CUDA: also time the Triton kernels under TRITON_INTERPRET=1")
    ap.add_argument("--suite", default=None,
                    help=f"comma-separated suites from {','.join(SUITES)} (default: all; "
                         "kernels only when --only is given)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated methods for step/e2e/convergence (default: all)")
    ap.add_argument("--no-report", action="store_true",
                    help="do not regenerate <out>/README.md and the plots")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU runs: torch intra-op threads (default 1: on a small shared machine "
                         "more threads mostly measure OpenMP wake-ups)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="convergence-study: training processes at a time (default 1: in "
                         "this process)")
    return ap.parse_args(argv)


def select_modules(only):
    if not only:
        return list(MODULES)
    names = [x.strip().removeprefix("bench_") for x in only.split(",") if x.strip()]
    bad = [x for x in names if x not in MODULES]
    if bad:
        raise SystemExit(f"--only: unknown module(s) {bad}; choose from {list(MODULES)}")
    return names


def select_suites(suite, only):
    if not suite:
        return ["kernels"] if only else list(SUITES)
    names = [x.strip() for x in suite.split(",") if x.strip()]
    bad = [x for x in names if x not in SUITES + OPT_IN_SUITES]
    if bad or not names:
        raise SystemExit(f"--suite: unknown suite(s) {bad}; choose from "
                         f"{list(SUITES + OPT_IN_SUITES)}")
    return names


def select_methods(methods):
    if not methods:
        return None
    from lowrank_fused.routing import METHODS
    names = [x.strip() for x in methods.split(",") if x.strip()]
    bad = [x for x in names if x not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown method(s) {bad}; choose from {list(METHODS)}")
    return names


def budget(device, quick, interpret):
    """(warmup ms, rep ms) for ``harness.time_fn``."""
    if device.type == "cuda":
        return (10, 40) if quick else (25, 100)
    return (0, 0) if interpret else (2, 20)


def row_flops(d, params):
    """The FLOPs of a described case: the module's own ``flops`` when it gives one, else the
    FLOP model of the row's op (``bench.bytes.op_flops``; None where it has none)."""
    from bench import bytes as B

    if d.get("flops") is not None:
        return d["flops"]
    return B.op_flops(d["op"], params["m"], params["n"], d["r"],
                      side=params.get("side") if d["r"] else None)


def _note(d, backend, interpret):
    note = d.get("note", "")
    if interpret and "triton" in backend:
        note = "; ".join(x for x in (note, "TRITON_INTERPRET=1: not a speed measurement") if x)
    return note


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if torch.cuda.is_available():
        return _run(args, argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args, argv) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if args.interpret and not cuda:
        # must precede the first import of the kernel modules (docs/backends.md)
        os.environ["TRITON_INTERPRET"] = "1"
    interpret = bool(args.interpret) and not cuda
    if args.interpret and cuda:
        print("note: --interpret ignored: CUDA is available", file=sys.stderr)

    device = torch.device("cuda" if cuda else "cpu")
    out = Path(args.out) if args.out else (RESULTS if cuda else RESULTS / "_scratch")
    suites = select_suites(args.suite, args.only)
    methods = select_methods(args.methods)
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    rc = 0
    if "kernels" in suites:
        rc |= _run_kernels(args, command, device, interpret, out)
    for suite in suites:
        if suite != "kernels":
            rc |= _run_suite(suite, args, command, device, interpret, out, methods)
    if not args.no_report:
        from bench import report
        report.write_report(out)
    return rc


def _run_suite(suite, args, command, device, interpret, out, methods) -> int:
    import json

    from bench import harness as H

    quick = bool(args.quick)
    t0 = time.perf_counter()
    env = H.environment(device)
    print(f"# suite {suite}: {env['device_name']}" + (" (quick)" if quick else ""), flush=True)
    mod = importlib.import_module(f"bench.suite_{suite.replace('-', '_')}")
    kw = dict(quick=quick, methods=methods)
    if suite == "step":
        kw["interpret"] = interpret
    else:
        kw["threads"] = args.threads
        # CPU without --interpret: the eager reference, whatever TRITON_INTERPRET says
        kw["backend"] = "auto" if (device.type == "cuda" or interpret) else "reference"
    if suite in OPT_IN_SUITES:    # resumable: rewrites its JSON in <out> after every run
        kw.update(out=out, jobs=max(1, args.jobs))
    try:
        doc = mod.run(device, **kw)
    except Exception as exc:  # record and go on with the next suite
        doc = {"suite": suite, "rows": [], "errors": [
            {"case": suite, "error": f"{type(exc).__name__}: {exc}",
             "traceback": traceback.format_exc(limit=6)}]}
        print(f"ERROR suite {suite}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    doc["environment"] = env
    doc["meta"] = {"command": command, "quick": quick, "elapsed_s": round(elapsed, 1)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}-{H.device_slug(device)}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path} ({len(doc['rows'])} rows, {len(doc['errors'])} errors, "
          f"{elapsed:.1f} s)", flush=True)
    return 1 if doc["errors"] else 0


def _run_kernels(args, command, device, interpret, out) -> int:
    import torch

    from bench import bytes as B
    from bench import harness as H

    cuda = device.type == "cuda"
    quick = args.quick or not cuda
    names = select_modules(args.only)
    warmup, rep = budget(device, quick, interpret)

    t_start = time.perf_counter()
    env = H.environment(device)
    ceilings = H.measure_ceilings(device, quick=quick)
    mm = ceilings.get("matmul_tflops")
    print(f"# {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"commit {env['commit'][:12]}")
    print(f"# ceilings: copy {ceilings['copy_gbps']:.1f} GB/s; matmul "
          + (f"{mm:.1f} TFLOP/s" if mm else ceilings["matmul_note"]), flush=True)
    if not cuda:
        print("# CPU run: quick, eager" + (" + Triton interpreter" if interpret else " only")
              + "; timings are a smoke test, not a performance result", flush=True)

    rows, errors = [], []
    for name in names:
        mod = importlib.import_module(f"bench.bench_{name}")
        for case_name, params in mod.cases(device, quick, interpret=interpret):
            for variant, backend in mod.variants(params, device, interpret=interpret):
                d = mod.describe(params, backend)
                label = f"{d['op']} {case_name} {variant}/{d.get('backend', backend)}"
                try:
                    with H.matmul_precision(params.get("precision") or "ieee"):
                        fn = mod.make(params, backend, device)
                        p20, p50, p80 = H.time_fn(fn, device=device, warmup=warmup, rep=rep)
                    del fn
                except Exception as exc:  # record and go on: one bad case must not end a GPU run
                    errors.append({"case": label, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc(limit=6)})
                    print(f"ERROR {label}: {type(exc).__name__}: {exc}", file=sys.stderr,
                          flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                row = H.Row(op=d["op"], variant=variant, backend=d.get("backend", backend),
                            m=params["m"], n=params["n"], r=d["r"],
                            dtype=H.DTYPE_NAMES[params["dtype"]], precision=d["precision"],
                            p20_ms=p20, p50_ms=p50, p80_ms=p80, bytes_floor=d["bytes"].floor,
                            bytes_eager_model=d["bytes"].eager,
                            side=params.get("side") if d["r"] else None,
                            note=_note(d, backend, interpret)
                            ).finish(env, ceilings, flops=row_flops(d, params))
                rows.append(row)
                print(f"{label:60s} p50 {p50:9.4f} ms  {row.achieved_gbps:8.1f} GB/s  "
                      f"x{row.multiple_of_floor:.2f} floor"
                      + (f"  x{row.multiple_of_roofline:.2f} roofline ({row.roofline_bound})"
                         if row.multiple_of_roofline is not None else ""), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if hasattr(mod, "clear_cache"):
            mod.clear_cache()

    model = B.format_model_table(H.LLAMA_SHAPES, H.RANKS)
    model_section = ("## Byte model (docs/bytes.md), LLaMA shapes, fp32 states and basis, "
                     "side by galore_torch's \"std\" rule\n\n" + model)
    elapsed = time.perf_counter() - t_start
    meta = {"command": command,
            "quick": quick, "interpret": interpret, "modules": names,
            "warmup_ms": warmup, "rep_ms": rep, "elapsed_s": round(elapsed, 1),
            "errors": errors}
    stem = f"{H.device_slug(device)}-{_dt.date.today().isoformat()}"
    jpath = H.write_json(out / f"{stem}.json", rows, env, ceilings, meta)
    err_section = ["## Errors\n\n" + "\n".join(f"- {e['case']}: {e['error']}" for e in errors)
                   ] if errors else []
    mpath = H.write_markdown(out / f"{stem}.md", rows, env, ceilings, meta,
                             extra_sections=err_section + [model_section])
    print()
    print(H.format_markdown(rows, env, ceilings, meta, extra_sections=err_section))
    print(model_section)
    print(f"\nwrote {jpath} and {mpath} ({len(rows)} rows, {len(errors)} errors, "
          f"{elapsed:.1f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
