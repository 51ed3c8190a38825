"""The one GPU entry point (docs/gpu.md): by default the first device command, the headline
run of at most 8 minutes on a bare machine; ``--full`` is the whole suite and every benchmark.

    make gpu-check OUT=DIR                              # headline (build + this, <= 8 min)
    make gpu-check OUT=DIR GPU_CHECK_ARGS="--full ..."  # the second, optional command(s)
    python -m bench.gpu_check [--out DIR] [--precisions tf32x3,ieee] [--skip-tests]
    python -m bench.gpu_check --tiny [--out DIR]        # the same code on a CPU, tiny shapes

Headline (default), in stages, each with its own time budget (``STAGE_BUDGETS_S``) inside one
overall deadline (``TOTAL_BUDGET_S`` after ``$GPU_CHECK_T0``, the make target's start, so the
build counts). After every stage, and after every benchmark case, ``<out>/headline-<gpu>-<date>
.{json,md}`` are rewritten, so a command cut short still returns what it measured:

1. ``environment``: GPU, torch, triton, nvcc, the CUDA extension (``<out>/environment.txt``);
2. ``tests``: the CUDA parity tests of the hot kernels (``HOT_TEST_SHARDS``: K1 project, K2
   adam_moments, K3 backproject_update, K4 adamw_step (Triton and CUDA), K8 moment_transport,
   the grouped ops, the multi-tensor ops), in parallel pytest processes (their Triton compiles
   run on separate cores), killed at the stage's budget; logs ``<out>/pytest-<i>.log``;
3. ``ceilings``: copy bandwidth and bf16 matmul, plus the device's peak table (roofline);
4. ``method_step``: one steady step of every low-rank method on 4096x11008 at ranks 128 and
   512, bf16 and fp32 parameters, for each precision of ``--precisions`` (a mode that
   ``lowrank_fused.ops.PRECISIONS`` does not know is skipped with a note): fused (Triton) vs
   eager (reference), and ``torch.optim.AdamW(fused=True)`` on the same matrix; each row with
   GB/s, the multiple of the byte floor and of the roofline floor, and its first call's time
   (``first_call_ms``: the cold Triton compiles);
5. ``whole_model``: the LLaMA-1B step of GaLore and AdaptiveAdamW (engine, per matrix) vs torch's
   fused AdamW, with host time, and CUDA-graph rows where an optimizer offers capture
   (``suite_step.whole_model``).

``--tiny`` runs the same stages on a CPU (Triton under ``TRITON_INTERPRET=1``, tiny shapes, two
quick test shards, the H100 peak table as a dry run) so the script cannot rot
(``tests/test_gpu_check.py``). Exit status: 0 when every stage passed, 1 when a test, a case or
a stage failed or ran out of budget, 2 without CUDA (and without ``--tiny``).

Full run (``--full``, the former default):

1. prints the environment (GPU, torch, triton, nvcc, the CUDA extension's status) and writes
   it to ``<out>/environment.txt``;
2. runs ``python -m pytest -q tests -x --junitxml <out>/pytest.xml``, output teed to
   ``<out>/pytest.log`` (tests use CUDA tensors whenever CUDA is available);
3. runs ``python -m bench.run --out <out>``: every suite (kernels ``<out>/<gpu>-<date>.{json,md}``,
   ``<out>/{step,e2e,convergence,refresh}-<gpu>.json``) and the summary page
   ``<out>/README.md`` with its plots, then ``python -m bench.bench_multi_tensor --part gpu``
   (``<out>/multi-tensor-cuda.json``).

``<out>`` is ``--out``, else ``$OUT``, else ``bench/results/``. Needs CUDA (exit 2 without).
Exit status: 0 when tests and benchmarks passed, 1 when either failed (the benchmarks run even
after a test failure). Budget: well under 20 minutes on an H100; a device command has 10, so
split: ``--full --skip-bench``, then ``--full --skip-tests --suite kernels``, then ``--full
--skip-tests --suite step,e2e,convergence,refresh,multi-tensor`` (each writes its own files
into ``<out>``; ``--suite``, ``--only``, ``--skip-bench`` and ``--quick`` imply ``--full``). The
kernels suite writes one ``<gpu>-<date>`` file per run: a kernels run split further with
``--only`` needs its own ``--out``.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 900

# ---- the headline run: its grid, its test selection and its time budgets -------------------
# Budget of the first device command (8 minutes, start of `make gpu-check` to the last file
# written), seconds. Estimate on an H100 from a bare machine (no GPU measurement yet):
# * the build (venv bootstrap, the CUDA extension: 4 .cu files + bindings): 60-120 s;
# * the hot tests (667 tests in 8 files) in 4 processes, capped at 150 s: their cold Triton
#   compiles (1-3 s per variant) dominate; what does not finish is reported as killed;
# * ceilings: under 10 s;
# * the per-method table: the fused steps of all 10 methods x 2 dtypes x 2 precisions launch 49
#   distinct kernel variants at the interpreter's tile sizes (counted with a launch hook: 9-15
#   per method, K1/K2/K3 shared); with the GPU's shape- and rank-dependent tiles perhaps 50-100,
#   i.e. 1-5 minutes of compiles in one process: the 4 warm workers compile them while the
#   tests run (each case's first call, reported as first_call_ms, shows what was left); then
#   164 timed cases (10 methods x 2 ranks x 2 dtypes x 2 precisions x fused/eager + torch's
#   AdamW per dtype) at 0.1-0.4 s each plus 40 reference warm steps: 60-120 s;
# * LLaMA-1B: build ~5 s, 5 rows of 12 steps plus a graph capture, the compiles of its
#   shapes done by the last warm worker: 30-60 s.
# Each stage stops at its own budget (the rest of its cases reported as skipped) and never runs
# past the overall deadline, which keeps STAGE_RESERVE_S for the later stages.
TOTAL_BUDGET_S = 470
STAGE_BUDGETS_S = {"tests": 150, "ceilings": 20, "method_step": 200, "whole_model": 90}
STAGE_RESERVE_S = {"tests": 200, "ceilings": 150, "method_step": 60, "whole_model": 0}
# on CUDA a stage with less than this left is skipped (too short for its first result)
STAGE_MIN_S = {"tests": 20, "ceilings": 3, "method_step": 15, "whole_model": 25}
HEADLINE_SHAPE = (4096, 11008)
HEADLINE_RANKS = (128, 512)
HEADLINE_PRECISIONS = ("tf32x3", "ieee")
# (file, -k expression) shards, each one pytest process; balanced by test count
HOT_TEST_SHARDS = (
    ("tests/test_backproject_update.py",),
    ("tests/test_grouped_lowrank.py",),
    ("tests/test_project.py", "tests/test_moment_transport.py"),
    ("tests/test_adam_moments.py", "tests/test_adamw_step.py", "tests/test_adamw_step_csrc.py",
     "tests/test_multi_tensor.py"),
    ("tests/test_step_engine.py", "tests/test_bound_ops.py"),
)
# --tiny: the same code on a CPU under the interpreter, as small as still exercises it
TINY_SHAPE = (32, 48)
TINY_RANKS = (4,)
TINY_TEST_SHARDS = (("tests/test_bench_bytes.py", "-k", "roofline"),
                    ("tests/test_bench_bytes.py", "-k", "device_peaks"))
# LLaMA "tiny" made smaller still: one layer of 32 (the interpreter pays per launch)
TINY_WHOLE_MODEL = ("tiny", 4, ("galore",),
                    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default: $OUT or bench/results/)")
    ap.add_argument("--quick", action="store_true", help="benchmarks: the quick grid")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    ap.add_argument("--skip-bench", action="store_true", help="do not run the benchmarks")
    ap.add_argument("--suite", default=None,
                    help="benchmarks: comma-separated bench.run suites, plus 'multi-tensor' "
                         "(default: all of them), to split the benchmarks over several "
                         "device commands of at most 10 minutes")
    ap.add_argument("--only", default=None,
                    help="the kernels suite: comma-separated modules (bench.run --only), e.g. "
                         "method_step alone in its own device command")
    ap.add_argument("--full", action="store_true",
                    help="the whole suite on CUDA and every benchmark (the second, optional "
                         "device command(s)); default: the headline run")
    ap.add_argument("--tiny", action="store_true",
                    help="headline run on a CPU: Triton interpreter, tiny shapes (a dry run "
                         "of the same code path)")
    ap.add_argument("--precisions", default=",".join(HEADLINE_PRECISIONS),
                    help="headline: GEMM precisions of the per-method table, in order "
                         f"(default {','.join(HEADLINE_PRECISIONS)}; modes lowrank_fused.ops "
                         "does not know are skipped with a note)")
    ap.add_argument("--tests", default=None,
                    help="headline: pytest selections, one process each, separated by ';' "
                         "(e.g. \"tests/test_project.py -k split; tests/test_adam_moments.py\"; "
                         "default: the hot kernels' test files)")
    ap.add_argument("--methods", default=None,
                    help="headline: comma-separated low-rank methods of the per-method table "
                         "(default: every one of bench.bytes.METHOD_STEPS)")
    ap.add_argument("--warm-workers", type=int, default=None,
                    help="headline: processes that compile the per-method table's Triton "
                         "variants (one fused step per case, the on-disk Triton cache) while "
                         "the tests run (default 4 on CUDA, 1 with --tiny; 0: none)")
    ap.add_argument("--warm-shard", default=None, help=argparse.SUPPRESS)  # I/N: a warm worker
    ap.add_argument("--budget", type=float, default=None,
                    help=f"headline: overall budget in seconds after $GPU_CHECK_T0 (default "
                         f"{TOTAL_BUDGET_S})")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.suite is not None or args.only is not None or args.skip_bench or args.quick:
        args.full = True
    if args.full and args.tiny:
        ap.error("--tiny is a headline run: it cannot be combined with --full (nor with "
                 "--suite, --only, --skip-bench or --quick)")
    args.precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not args.precisions:
        ap.error("--precisions: give at least one precision, e.g. tf32x3,ieee")
    if args.tests is not None:
        import shlex

        args.tests = [tuple(shlex.split(x)) for x in args.tests.split(";") if x.strip()]
    if args.methods is not None:
        from bench.bytes import METHOD_STEPS

        args.methods = [x.strip() for x in args.methods.split(",") if x.strip()]
        bad = [x for x in args.methods if x not in METHOD_STEPS]
        if bad or not args.methods:
            ap.error(f"--methods: unknown {bad or args.methods!r}; choose from "
                     f"{', '.join(METHOD_STEPS)}")
    if args.warm_workers is not None and args.warm_workers < 0:
        ap.error(f"--warm-workers must be >= 0, got {args.warm_workers}")
    if args.warm_shard is not None:
        try:
            i, n = (int(x) for x in args.warm_shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            ap.error(f"--warm-shard must be I/N with 0 <= I < N, got {args.warm_shard!r}")
        args.warm_shard = (i, n)
    if args.budget is not None and not args.budget > 0:
        ap.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.only is not None:
        from bench.run import MODULES

        bad = [x for x in args.only.split(",") if x.strip() not in MODULES]
        if bad:
            ap.error(f"--only: unknown {bad}; choose from {', '.join(MODULES)}")
    if args.suite is not None:
        from bench.run import SUITES

        wanted = [x.strip() for x in args.suite.split(",") if x.strip()]
        bad = [x for x in wanted if x not in SUITES + ("multi-tensor",)]
        if bad or not wanted:
            ap.error(f"--suite: unknown {bad or args.suite!r}; choose from "
                     f"{', '.join(SUITES + ('multi-tensor',))}")
        args.suite = wanted
    return args


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            c = Path(os.environ[var]) / "bin" / "nvcc"
            if c.is_file():
                return str(c)
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def environment_lines():
    import torch

    from bench.harness import git_commit, triton_version
    from lowrank_fused import _ext

    props = torch.cuda.get_device_properties(0)
    nvcc = find_nvcc()
    nvcc_version = "not found"
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
            nvcc_version = f"{nvcc}: " + (out.stdout.strip().splitlines() or ["?"])[-1]
        except (OSError, subprocess.SubprocessError) as exc:
            nvcc_version = f"{nvcc}: failed ({exc})"
    why = _ext.why_no_cuda()
    return [
        f"gpu: {torch.cuda.get_device_name(0)} (capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2 ** 30:.1f} GiB, {props.multi_processor_count} SMs, "
        f"{torch.cuda.device_count()} device(s))",
        f"torch: {torch.__version__} (CUDA {torch.version.cuda})",
        f"triton: {triton_version()}",
        f"nvcc: {nvcc_version}",
        "cuda extension: " + ("ok" if why is None else f"unavailable: {why}"),
        f"python: {sys.version.split()[0]} ({sys.executable})",
        f"commit: {git_commit()}",
    ]


def run_tests(out: Path) -> int:
    """pytest on CUDA, output teed to ``out/pytest.log``; the exit status (124 on timeout)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "tests", "-x",
           "--junitxml", str(out / "pytest.xml")]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    with open(out / "pytest.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        watchdog = threading.Timer(TEST_TIMEOUT_S, proc.kill)  # a hang must not eat the bench
        watchdog.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            rc = proc.wait()
        finally:
            watchdog.cancel()
        if time.monotonic() - t0 >= TEST_TIMEOUT_S and rc != 0:
            msg = f"[gpu_check] killed: tests ran past {TEST_TIMEOUT_S} s"
            log.write(msg + "\n")
            print(msg, flush=True)
            rc = 124
    print(f"[gpu_check] tests: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        # before any kernel module is imported (the interpreter is chosen at import)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("bench.gpu_check needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). On a CPU-only "
              "machine run `make test` and `python -m bench.run` instead (or `python -m "
              "bench.gpu_check --tiny`, a dry run of the headline script).", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.warm_shard is not None:
        return Headline(args, out, record=False).warm(*args.warm_shard)
    if not args.full:
        return Headline(args, out).run()
    return full(args, out)


def full(args, out: Path) -> int:
    """The whole suite on CUDA, then the benchmarks (``--full``)."""
    t0 = time.monotonic()

    lines = environment_lines()
    print("\n".join("# " + x for x in lines), flush=True)
    (out / "environment.txt").write_text("\n".join(lines) + "\n")

    test_rc = 0 if args.skip_tests else run_tests(out)

    bench_rc = 0
    if not args.skip_bench:
        from bench import run as bench_run

        suites = [x for x in (args.suite or bench_run.SUITES) if x != "multi-tensor"]
        bench_argv = (["--out", str(out)] + (["--quick"] if args.quick else [])
                      + (["--suite", ",".join(suites)] if args.suite else [])
                      + (["--only", args.only] if args.only else []))
        if suites:
            print("$ python -m bench.run " + " ".join(bench_argv), flush=True)
            try:
                bench_rc = bench_run.main(bench_argv)
            except Exception as exc:  # report, and still give the exit status below
                print(f"[gpu_check] benchmarks failed: {type(exc).__name__}: {exc}",
                      flush=True)
                bench_rc = 1
        # the multi-tensor launch vs Triton per tensor vs eager, LLaMA-1B states
        if args.suite is None or "multi-tensor" in args.suite:
            from bench import bench_multi_tensor

            mt_argv = ["--part", "gpu", "--out", str(out)] + (
                ["--model", "350m", "--repeats", "10"] if args.quick else [])
            print("$ python -m bench.bench_multi_tensor " + " ".join(mt_argv), flush=True)
            try:
                bench_multi_tensor.main(mt_argv)
            except (Exception, SystemExit) as exc:
                print(f"[gpu_check] multi-tensor benchmark failed: {type(exc).__name__}: "
                      f"{exc}", flush=True)
                bench_rc = 1
    print(f"[gpu_check] tests exit {test_rc}, benchmarks exit {bench_rc}, "
          f"{time.monotonic() - t0:.0f} s; results in {out}", flush=True)
    return 0 if test_rc == 0 and bench_rc == 0 else 1


# -------------------------------------------------------------------------------------------
# the headline run (the default): the first device command

def _environment_lines(device):
    """``environment_lines`` on CUDA; on a CPU (``--tiny``) the same fields that apply."""
    if device.type == "cuda":
        return environment_lines()
    import torch

    from bench.harness import device_name, git_commit, triton_version

    return [f"device: {device_name(device)} (no CUDA: a dry run)",
            f"torch: {torch.__version__}", f"triton: {triton_version()}",
            f"TRITON_INTERPRET: {os.environ.get('TRITON_INTERPRET', '0')}",
            f"python: {sys.version.split()[0]} ({sys.executable})", f"commit: {git_commit()}"]


def _t0_from_env():
    """``$GPU_CHECK_T0``: the epoch second the make target started (the build counts against
    the budget); None when unset or not a number."""
    try:
        return float(os.environ["GPU_CHECK_T0"])
    except (KeyError, ValueError):
        return None


_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(\[\s*\d+%\])?\s*$")


def parse_pytest_log(text: str) -> dict:
    """Counts of a ``pytest -q -rfE`` log: from its final summary line, or, for a process
    killed before it (timeout), from the progress characters so far; plus the FAILED / ERROR
    lines (at most 20)."""
    counts = {}
    summary = [ln for ln in text.splitlines() if _SUMMARY.search(ln) and " in " in ln]
    if summary:
        for num, what in _SUMMARY.findall(summary[-1]):
            counts["errors" if what.startswith("error") else what] = int(num)
        counts["complete"] = True
    else:
        chars = "".join(m.group(1) for m in map(_PROGRESS.match, text.splitlines()) if m)
        counts = {"passed": chars.count("."), "failed": chars.count("F"),
                  "errors": chars.count("E"), "skipped": chars.count("s"), "complete": False}
    counts["failures"] = [ln.strip() for ln in text.splitlines()
                          if ln.startswith(("FAILED ", "ERROR "))][:20]
    return counts


def _time_once(fn, device) -> float:
    """Milliseconds of one synchronised call."""
    from bench import harness as H

    t = time.perf_counter()
    fn()
    H._sync(device)
    return (time.perf_counter() - t) * 1e3


class Headline:
    """The stages of the headline run (module docstring), each under its own budget inside the
    overall deadline; the results are rewritten after every stage and benchmark case."""

    def __init__(self, args, out: Path, record: bool = True):
        import datetime as _dt

        import torch

        from bench import harness as H

        self.args, self.out = args, out
        self.tiny = bool(args.tiny)
        self.device = torch.device("cuda" if torch.cuda.is_available() and not self.tiny
                                   else "cpu")
        budget = float(args.budget or TOTAL_BUDGET_S)
        t0 = _t0_from_env()
        spent = max(0.0, time.time() - t0) if t0 is not None else 0.0
        self.t_start = time.monotonic()
        self.deadline = self.t_start + budget - spent
        self.env = H.environment(self.device)
        self.ceilings = {}
        self.rows = []
        self.failed = False
        stem = f"headline-{H.device_slug(self.device)}-{_dt.date.today().isoformat()}"
        self.json_path, self.md_path = out / f"{stem}.json", out / f"{stem}.md"
        self.record = record
        self.doc = {
            "kind": "headline", "environment": self.env, "ceilings": self.ceilings,
            "meta": {"command": "python -m bench.gpu_check " + " ".join(
                         shlex.quote(a) for a in (args.argv or [])),
                     "tiny": self.tiny, "budget_s": budget,
                     "spent_before_start_s": round(spent, 1),
                     "precisions_asked": list(args.precisions),
                     "shape": list(TINY_SHAPE if self.tiny else HEADLINE_SHAPE),
                     "ranks": list(TINY_RANKS if self.tiny else HEADLINE_RANKS)},
            "stages": {}, "notes": [], "errors": [], "rows": [], "whole_model": None}

    # ---- bookkeeping ------------------------------------------------------------------------
    def log(self, msg):
        print(f"[gpu_check {time.monotonic() - self.t_start:6.1f} s] {msg}", flush=True)

    def note(self, msg):
        self.doc["notes"].append(msg)
        self.log("note: " + msg)

    def error(self, case, exc):
        self.doc["errors"].append({"case": case, "error": f"{type(exc).__name__}: {exc}"})
        self.log(f"ERROR {case}: {type(exc).__name__}: {exc}")

    def save(self):
        """Rewrite ``headline-<device>-<date>.{json,md}`` with everything so far."""
        import json
        from dataclasses import asdict

        from bench import report

        if not self.record:
            return
        self.doc["rows"] = [asdict(r) for r in self.rows]
        self.doc["meta"]["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        self.json_path.write_text(json.dumps(self.doc, indent=1) + "\n")
        self.md_path.write_text(report.headline_page(self.doc))

    def stage_budget(self, name) -> float:
        left = self.deadline - time.monotonic() - STAGE_RESERVE_S[name]
        return min(STAGE_BUDGETS_S[name], left)

    def stage(self, name, fn):
        """Run ``fn(stage_deadline) -> status`` ("ok", "skipped: ...", or a failure such as
        "failed", "budget", "error"), record it, save."""
        budget = self.stage_budget(name)
        rec = {"budget_s": round(budget, 1), "status": "running", "elapsed_s": 0.0}
        self.doc["stages"][name] = rec
        t = time.monotonic()
        need = 0 if self.tiny else STAGE_MIN_S[name]
        if budget <= need:
            rec["status"] = (f"skipped: no time left before the overall deadline ({budget:.0f} s,"
                             f" {need} s needed)")
            self.failed = True
            self.log(f"stage {name}: {rec['status']}")
            self.save()
            return
        self.log(f"stage {name}: budget {budget:.0f} s")
        try:
            status = fn(t + budget, rec) or "ok"
        except Exception as exc:   # a stage's failure must not cost the later stages
            status = "error"
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc(limit=8)
            self.log(f"stage {name} failed: {rec['error']}")
        rec.update(status=status, elapsed_s=round(time.monotonic() - t, 1))
        if status != "ok" and not status.startswith("skipped by request"):
            self.failed = True
        self.log(f"stage {name}: {status} in {rec['elapsed_s']} s")
        self.save()

    def run(self) -> int:
        lines = _environment_lines(self.device)
        print("\n".join("# " + x for x in lines), flush=True)
        (self.out / "environment.txt").write_text("\n".join(lines) + "\n")
        self.doc["environment_lines"] = lines
        self.save()
        self.stage("tests", self.tests)
        self.stage("ceilings", self.measure_ceilings)
        self.stage("method_step", self.method_steps)
        self.stage("whole_model", self.whole_model)
        self.log(f"done: {'FAILED' if self.failed else 'ok'}; {self.json_path} and "
                 f"{self.md_path}")
        return 1 if self.failed else 0

    # ---- stage 2: the hot kernels' tests -----------------------------------------------------
    def tests(self, deadline, rec):
        if self.args.skip_tests:
            return "skipped by request (--skip-tests)"
        shards = self.args.tests or (TINY_TEST_SHARDS if self.tiny else HOT_TEST_SHARDS)
        procs = []
        for i, sel in enumerate(shards):
            cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                   *sel]
            log = open(self.out / f"pytest-{i}.log", "w")
            self.log("$ " + " ".join(cmd))
            procs.append((sel, log, subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log,
                                                     stderr=subprocess.STDOUT)))
        warm = self.start_warm_workers()
        everything = [p for _, _, p in procs] + [p for _, p in warm]
        while any(p.poll() is None for p in everything) and time.monotonic() < deadline:
            time.sleep(0.2)
        rec["warm_workers"] = self.stop_warm_workers(warm)
        shards_out, status = [], "ok"
        for i, (sel, log, p) in enumerate(procs):
            timed_out = p.poll() is None
            if timed_out:
                p.kill()
            rc = p.wait()
            log.close()
            counts = parse_pytest_log((self.out / f"pytest-{i}.log").read_text(errors="replace"))
            shards_out.append({"select": " ".join(sel), "exit": rc, "timed_out": timed_out,
                               "log": f"pytest-{i}.log", **counts})
            if timed_out:
                status = "budget" if status == "ok" else status
            elif rc != 0:
                status = "failed"
            self.log(f"tests {' '.join(sel)}: "
                     + ("killed at the budget" if timed_out else f"exit {rc}") + ", "
                     + ", ".join(f"{counts.get(k, 0)} {k}" for k in
                                 ("passed", "failed", "errors", "skipped")))
            for line in counts["failures"]:
                self.log("  " + line)
        rec["shards"] = shards_out
        return status

    def start_warm_workers(self):
        """Warm workers (``--warm-shard I/N``): each runs its share of the per-method table's
        fused cases once, so their Triton compiles happen here, in parallel with the tests,
        and the timed stage loads them from Triton's on-disk cache."""
        n = self.args.warm_workers
        n = (1 if self.tiny else 4) if n is None else n
        out = []
        for i in range(n):
            cmd = [sys.executable, "-m", "bench.gpu_check", "--warm-shard", f"{i}/{n}",
                   "--out", str(self.out), "--precisions", ",".join(self.args.precisions)]
            cmd += ["--methods", ",".join(self.args.methods)] if self.args.methods else []
            cmd += ["--tiny"] if self.tiny else []
            log = open(self.out / f"warm-{i}.log", "w")
            self.log("$ " + " ".join(cmd))
            out.append((log, subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log,
                                              stderr=subprocess.STDOUT)))
        return out

    def stop_warm_workers(self, warm):
        """Kill what is still running at the stage's end; what each worker warmed."""
        out = []
        for i, (log, p) in enumerate(warm):
            killed = p.poll() is None
            if killed:
                p.kill()
            rc = p.wait()
            log.close()
            text = (self.out / f"warm-{i}.log").read_text(errors="replace")
            out.append({"log": f"warm-{i}.log", "exit": rc, "killed": killed,
                        "cases": text.count("\nwarm "), "errors": text.count("\nwarm-error ")})
            self.log(f"warm worker {i}: " + ("killed at the budget" if killed else f"exit {rc}")
                     + f", {out[-1]['cases']} cases, {out[-1]['errors']} errors")
        return out

    def warm(self, index: int, count: int) -> int:
        """A warm worker: its share of the per-method table's fused cases (whole (method, rank,
        dtype) groups), one call each (the compiles, and the reference warm step each needs);
        on CUDA the last worker then steps the whole-model optimizers (``--tiny`` leaves that
        out: the interpreter has no compile cache to fill)."""
        from bench import bench_method_step as MS
        from bench import harness as H

        cases = [c for c in self.method_cases(self.precisions()) if c[0] == "triton"]
        # whole (method, rank, dtype) groups per worker: one reference warm step per group
        groups = list(dict.fromkeys((p["method"], p["r"], p["dtype"]) for _, p in cases))
        mine = {g for i, g in enumerate(groups) if i % count == index}
        print("", flush=True)
        for kind, params in cases:
            if (params["method"], params["r"], params["dtype"]) not in mine:
                continue
            label = (f"{params['method']} r{params['r']} {H.DTYPE_NAMES[params['dtype']]} "
                     f"{params['precision']}")
            try:
                with H.matmul_precision(params["precision"]):
                    ms = _time_once(MS.make(params, kind, self.device), self.device)
                print(f"warm {label}: {ms:.0f} ms", flush=True)
            except Exception as exc:   # the timed stage reports it; here it only costs time
                print(f"warm-error {label}: {type(exc).__name__}: {exc}", flush=True)
            if self.device.type == "cuda":
                import torch

                torch.cuda.empty_cache()
        if index == count - 1 and not self.tiny:
            # the last worker also steps the whole-model optimizers once (their shapes' compiles)
            from bench import suite_step

            precisions = self.precisions()
            try:
                suite_step.warm_whole_model(self.device, suite_step.WHOLE_MODEL,
                                            precisions[0] if precisions else None)
            except Exception as exc:
                print(f"warm-error whole-model: {type(exc).__name__}: {exc}", flush=True)
        return 0

    # ---- stage 3: ceilings --------------------------------------------------------------------
    def measure_ceilings(self, deadline, rec):
        from bench import harness as H

        self.ceilings.update(H.measure_ceilings(self.device, quick=self.tiny,
                                                peaks_for="H100" if self.tiny else None))
        c = self.ceilings
        self.log(f"copy {c['copy_gbps']:.1f} GB/s; matmul "
                 + (f"{c['matmul_tflops']:.1f} TFLOP/s" if c.get("matmul_tflops") else "-")
                 + f"; peaks: {c['peaks']['name'] if c.get('peaks') else 'none'}")
        if not c.get("peaks"):
            self.note(f"no peak table for {self.env['device_name']}: no roofline multiples "
                      "(bench.bytes.DEVICE_PEAKS)")
        return "ok"

    # ---- stage 4: the per-method table -------------------------------------------------------
    def precisions(self):
        from lowrank_fused import ops

        known = tuple(getattr(ops, "PRECISIONS", ()))
        out = []
        for p in self.args.precisions:
            if p in known:
                out.append(p)
            elif f"precision {p!r}" not in " ".join(self.doc["notes"]):
                self.note(f"precision {p!r} skipped: lowrank_fused.ops.PRECISIONS is {known} "
                          "in this checkout (the mode is not implemented here)")
        return out

    def method_cases(self, precisions):
        """``(kind, params)`` in order of importance (the budget cuts the tail): per precision,
        per dtype (bf16 first): torch's AdamW once per dtype, then per rank every method,
        fused then eager."""
        import torch

        from bench import bytes as B
        from bench import harness as H

        (m, n), ranks = (TINY_SHAPE, TINY_RANKS) if self.tiny else (HEADLINE_SHAPE,
                                                                    HEADLINE_RANKS)
        side = H.galore_side(m, n)
        for i, prec in enumerate(precisions):
            for dt in (torch.bfloat16, torch.float32):
                if i == 0:
                    yield "torch", dict(m=m, n=n, r=None, dtype=dt, precision=None, side=None)
                for r in ranks:
                    for method in self.args.methods or B.METHOD_STEPS:
                        for backend in ("triton", "reference"):
                            yield backend, dict(method=method, m=m, n=n, r=r, dtype=dt,
                                                precision=prec, side=side)

    def method_steps(self, deadline, rec):
        import torch

        from bench import bench_galore_step as GS
        from bench import bench_method_step as MS
        from bench import bytes as B
        from bench import harness as H

        precisions = self.precisions()
        rec["precisions"] = precisions
        if not precisions:
            return "skipped: none of the asked precisions is implemented"
        cases = list(self.method_cases(precisions))
        rec["cases"] = len(cases)
        warmup, rep, min_reps = 10, 40, 3
        status = "ok"
        for i, (kind, params) in enumerate(cases):
            if time.monotonic() > deadline:
                rec["skipped_cases"] = len(cases) - i
                self.note(f"method_step: budget spent, {len(cases) - i} of {len(cases)} cases "
                          "not measured")
                return "budget"
            dtype = H.DTYPE_NAMES[params["dtype"]]
            if kind == "torch":
                label = f"adamw {params['m']}x{params['n']} {dtype} torch-fused"
                d, variant = GS.describe(params, "torch"), "torch-fused"
                flops = B.adamw_flops(params["m"], params["n"])
            else:
                variant = "fused" if kind == "triton" else "eager"
                label = (f"{params['method']} {params['m']}x{params['n']} r{params['r']} {dtype} "
                         f"{params['precision']} {variant}")
                d = MS.describe(params, kind)
                flops = d["flops"]
            try:
                with H.matmul_precision(params["precision"] or "ieee"):
                    fn = (GS.make(params, "torch", self.device) if kind == "torch"
                          else MS.make(params, kind, self.device))
                    first = _time_once(fn, self.device)
                    if self.tiny:      # a dry run: one more call is all the timing it needs
                        p20 = p50 = p80 = _time_once(fn, self.device)
                    else:
                        p20, p50, p80 = H.time_fn(fn, device=self.device, warmup=warmup,
                                                  rep=rep, min_reps=min_reps)
                del fn
            except Exception as exc:   # record, go on: one bad case must not end the run
                self.error(label, exc)
                status = "failed"
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            row = H.Row(op=d["op"], variant=variant, backend=d.get("backend", kind),
                        m=params["m"], n=params["n"], r=d["r"], dtype=dtype,
                        precision=d["precision"], p20_ms=p20, p50_ms=p50, p80_ms=p80,
                        bytes_floor=d["bytes"].floor, bytes_eager_model=d["bytes"].eager,
                        side=params["side"] if d["r"] else None, note=d.get("note", ""),
                        extra={"first_call_ms": round(first, 3)}
                        ).finish(self.env, self.ceilings, flops=flops)
            self.rows.append(row)
            self.log(f"{label:58s} p50 {p50:9.4f} ms  {row.achieved_gbps:8.1f} GB/s  "
                     f"x{row.multiple_of_floor:.2f} floor"
                     + (f"  x{row.multiple_of_roofline:.2f} roofline ({row.roofline_bound})"
                        if row.multiple_of_roofline is not None else "")
                     + f"  first call {first:.0f} ms")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()
        MS.clear_cache()
        return status

    # ---- stage 5: LLaMA-1B -------------------------------------------------------------------
    def whole_model(self, deadline, rec):
        import torch

        from bench import suite_step

        spec = TINY_WHOLE_MODEL if self.tiny else suite_step.WHOLE_MODEL
        steps, warm = (1, 0) if self.tiny else (10, 2)
        precisions = self.precisions()
        errors = []
        wm = suite_step.whole_model(self.device, self.log, errors, spec=spec, steps=steps,
                                    warm=warm, precision=precisions[0] if precisions else None,
                                    ceilings=self.ceilings, deadline=deadline)
        self.doc["whole_model"] = wm
        self.doc["errors"] += errors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if wm.get("skipped"):
            return "budget"
        return "failed" if errors else "ok"


if __name__ == "__main__":
    sys.exit(main())
