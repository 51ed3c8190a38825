"""The one GPU entry point (shared/GPU.md): environment, the test suite on CUDA, benchmarks.

    python -m bench.gpu_check [--out DIR] [--quick] [--skip-tests] [--skip-bench]
                              [--suite kernels,step,e2e,convergence,refresh,multi-tensor]
                              [--only MODULE[,MODULE]]
    make gpu-check OUT=DIR [GPU_CHECK_ARGS="--skip-tests --suite kernels"]

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
split: ``--skip-bench``, then ``--skip-tests --suite kernels``, then ``--skip-tests --suite
step,e2e,convergence,refresh,multi-tensor`` (each writes its own files into ``<out>``). The
kernels suite writes one ``<gpu>-<date>`` file per run: a kernels run split further with
``--only`` needs its own ``--out``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 900


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
    args = ap.parse_args(argv)
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
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_check needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}). On a CPU-only "
              "machine run `make test` and `python -m bench.run` instead.", file=sys.stderr)
        return 2
    out = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
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
        # issue 6: the multi-tensor launch vs Triton per tensor vs eager, LLaMA-1B states
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


if __name__ == "__main__":
    sys.exit(main())
