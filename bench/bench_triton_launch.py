"""Host time of Triton's own launcher: what ``bench_host_step`` stubs out with every launch.

``bench_host_step`` times a steady ``opt.step()`` with each Triton launch replaced by a
counter, so the Python work of Triton's launcher on a GPU (``JITFunction.run``: binding and
specialising the arguments, the kernel-cache lookup, the grid) is not in its figures. This
benchmark measures that part, per method, on this CPU and with no GPU:

1. **Record** (under the interpreter, with the launches stubbed as in ``bench_host_step`` and
   the GPU tile choices of ``kernels._common.gpu_tiling``, so split-K and its reduction
   launches are the H100's): the Triton launches of one steady step of every method on the
   same 24-layer layout, each as (kernel, arguments, grid, options), tensors kept as their
   shape, strides and dtype.
2. **Replay** (in a subprocess per Triton version, without the interpreter): the same
   launches through the real ``JITFunction`` objects, with the stand-in driver of
   ``lowrank_fused.testing.standin_driver`` (an sm_90 target, device 0, stream 0, compiled
   kernels whose CUDA launch call returns at once: no module load, no ``cuLaunchKernelEx``).
   The kernels compile for sm_90 on first use (Triton's disk cache keeps them); the timed
   replays then pay only ``JITFunction.run``'s host work.

Reported per method and Triton version: launches per steady step, the launcher's host time per
step (median of ``--reps`` replays of the whole step's launches, thread CPU time, one thread)
and per launch, and the step's host time with it added (``bench_host_step``'s stubbed median
of this run plus the launcher's time) as a multiple of ``torch.optim.AdamW(fused=True)``'s step
measured beside it. Not included: the CUDA driver's launch call itself (``cuLaunchKernelEx``,
a few microseconds per launch on a GPU), and the difference between this CPU and a GPU host's.

Run ``python -m bench.bench_triton_launch [--methods a,b] [--out DIR]``; with ``--out`` it
writes ``DIR/triton-launch-cpu.json``. The GPU machines run Triton ``aot.GPU_TRITON`` (3.6),
installed side by side for the AOT test; the installed Triton is measured too.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

ALL = ("adamw", "galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad",
       "ldadam", "adamem", "adapm", "adapm_mini", "adafactor")


class _TensorSpec:
    """A tensor argument of a recorded launch: what the launcher reads of it."""
    __slots__ = ("shape", "stride", "dtype", "offset", "numel")

    def __init__(self, t):
        self.shape, self.stride = tuple(t.shape), tuple(t.stride())
        self.dtype, self.offset = str(t.dtype).replace("torch.", ""), t.storage_offset()
        self.numel = t.untyped_storage().nbytes() // max(1, t.element_size())


def _spec(x):
    import torch
    if isinstance(x, torch.Tensor):
        return _TensorSpec(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_spec(v) for v in x)
    return x


# -- 1. record (interpreter) -----------------------------------------------------------------
def record(methods, warm=3, stub_warm=5, log=print):
    """{method: [(module, kernel, args, kwargs, grid), ...]} of one steady step."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton.runtime.interpreter as interp

    from bench import bench_host_step as H
    from lowrank_fused.kernels._common import H100_SM_COUNT, gpu_tiling
    from lowrank_fused.kernels._launch import in_planned_launch

    out = {}
    torch.set_num_threads(1)
    with H.stubbed_launches() as launches:
        stub_run = interp.InterpretedFunction.run
        for method in methods:
            with gpu_tiling(H100_SM_COUNT):   # every plan made with the H100's tiles
                net, opt = H.build(method)
                launches.stub = False
                for _ in range(warm):
                    opt.step()
                launches.stub = True
                for _ in range(stub_warm):
                    opt.step()
            tape = []

            def rec(self, *args, grid, warmup, **kwargs):
                if warmup:
                    return None
                fn = self.fn
                g = grid(dict(zip(self.arg_names, args))) if callable(grid) else grid
                tape.append((fn.__module__, fn.__name__, _spec(args), _spec(kwargs),
                             tuple(g), in_planned_launch()))
                return None
            interp.InterpretedFunction.run = rec
            try:
                with gpu_tiling(H100_SM_COUNT):
                    opt.step()
            finally:
                interp.InterpretedFunction.run = stub_run
            out[method] = tape
            log(f"  {method:<15} {len(tape)} Triton launches recorded")
    return out


# -- 2. replay (a subprocess per Triton, no interpreter) ---------------------------------------
def _materialise(x, dev_tensors):
    import torch
    if type(x).__name__ == "_TensorSpec":   # (pickled from __main__ or from this module)
        key = (x.shape, x.stride, x.dtype, x.offset)
        t = dev_tensors.get(key)
        if t is None:
            base = torch.empty(max(x.numel, x.offset + 1) + 64, dtype=getattr(torch, x.dtype))
            t = dev_tensors[key] = base.as_strided(x.shape, x.stride, x.offset)
        return t
    if isinstance(x, (tuple, list)):
        return type(x)(_materialise(v, dev_tensors) for v in x)
    if isinstance(x, dict):
        return {k: _materialise(v, dev_tensors) for k, v in x.items()}
    return x


def replay(path, reps, log=print):
    """{"triton", "methods": {method: {mode: {"launches", "planned", "us_per_step",
    "us_per_launch", "compile_s"}}}} under this process's Triton, for the two modes:
    ``plain`` (every launch through ``JITFunction.run``) and ``planned`` (the launches the
    engine makes through ``kernels/_launch.py: PlannedLaunch`` take its direct path)."""
    import importlib

    import torch
    import triton

    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "replay needs no interpreter"
    from lowrank_fused.kernels._launch import PlannedLaunch
    from lowrank_fused.testing import standin_driver

    standin_driver.install()
    torch.set_num_threads(1)
    with open(path, "rb") as f:
        tapes = pickle.load(f)
    result = {"triton": triton.__version__, "methods": {}}
    tensors = {}
    for method, tape in tapes.items():
        result["methods"][method] = {}
        for mode in ("plain", "planned"):
            calls = []
            planned = 0
            for module, name, args, kwargs, grid, is_planned in tape:
                fn = getattr(importlib.import_module(module), name)
                args, kwargs = _materialise(args, tensors), _materialise(kwargs, tensors)
                if is_planned and mode == "planned":
                    planned += 1
                    calls.append((PlannedLaunch(fn, grid, kwargs), args, {}))
                else:
                    calls.append((fn[grid], args, kwargs))
            t0 = time.perf_counter()
            for launch, args, kwargs in calls:      # compiles each variant once
                launch(*args, **kwargs)
            compile_s = time.perf_counter() - t0
            times = []
            for _ in range(reps):
                c0 = time.thread_time()
                for launch, args, kwargs in calls:
                    launch(*args, **kwargs)
                times.append((time.thread_time() - c0) * 1e6)
            us = statistics.median(times)
            per = round(us / len(calls), 2) if calls else None
            result["methods"][method][mode] = dict(
                launches=len(calls), planned=planned, us_per_step=round(us, 1),
                us_per_launch=per, compile_s=round(compile_s, 1))
            log(f"  [{triton.__version__} {mode:>7}] {method:<15} {len(calls):3d} launches "
                f"({planned} planned): {us:8.1f} us/step, {per} us/launch")
    return result


def _run_replay(path, reps, triton_path=None, version=None):
    from lowrank_fused.testing.standin_driver import process_env
    env = process_env(triton_path, version)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "bench.bench_triton_launch", "--replay", path,
                           "--reps", str(reps)], env=env, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:] if proc.returncode else "")
    if proc.returncode:
        raise RuntimeError(f"replay under Triton {version or 'installed'} failed "
                           f"(exit {proc.returncode})")
    print(proc.stdout.split("\n@@RESULT@@\n")[0], end="")
    return json.loads(proc.stdout.split("\n@@RESULT@@\n")[1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_triton_launch")
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--host-steps", type=int, default=40,
                    help="paired steps of bench_host_step for the stubbed host time")
    ap.add_argument("--out", default=None, help="write DIR/triton-launch-cpu.json")
    ap.add_argument("--replay", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.replay:
        res = replay(args.replay, args.reps)
        print("\n@@RESULT@@\n" + json.dumps(res))
        return
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(ALL))
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; known {list(ALL)}")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from bench import bench_host_step as H
    from lowrank_fused.testing.aot import GPU_TRITON, ensure_triton

    print("recording one steady step's Triton launches per method (H100 tiles)")
    tapes = record(methods)
    print(f"host time with the launches stubbed ({args.host_steps} paired steps)")
    host = {r["method"]: r for r in H.measure(methods, args.host_steps, 3, log=lambda *a: None)}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tapes.pkl")
        with open(path, "wb") as f:
            pickle.dump(tapes, f)
        runs = [_run_replay(path, args.reps)]
        if triton.__version__ != GPU_TRITON:
            where, reason = ensure_triton(GPU_TRITON)
            if where is None:
                print(f"Triton {GPU_TRITON} unavailable ({reason}): installed Triton only")
            else:
                runs.append(_run_replay(path, args.reps, where, GPU_TRITON))
    rows = []
    print(f"\n{'method':<15} {'launches':>8} {'planned':>8} {'stubbed us':>11} {'x AdamW':>8}"
          + "".join(f" {r['triton'] + ' ' + mode:>16} {'x AdamW':>8}"
                    for r in runs for mode in ("plain", "planned")))
    for m in methods:
        h = host[m]
        row = dict(method=m, launches=runs[0]["methods"][m]["plain"]["launches"],
                   planned=runs[0]["methods"][m]["planned"]["planned"],
                   stubbed_us=round(h["host_cpu_us"], 1),
                   base_us=round(h["torch_fused_adamw_cpu_us"], 1),
                   x_stubbed=round(h["x_paired"], 3))
        line = (f"{m:<15} {row['launches']:>8} {row['planned']:>8} {row['stubbed_us']:>11.0f} "
                f"{h['x_paired']:>8.2f}")
        for r in runs:
            row[r["triton"]] = {}
            for mode in ("plain", "planned"):
                lm = r["methods"][m][mode]
                total = row["stubbed_us"] + lm["us_per_step"]
                # the paired ratio scaled by what the launcher adds to this method's step
                x = h["x_paired"] * total / row["stubbed_us"]
                row[r["triton"]][mode] = dict(lm, host_us_with_launcher=round(total, 1),
                                              x_with_launcher=round(x, 3))
                line += f" {total:>16.0f} {x:>8.2f}"
        rows.append(row)
        print(line)
    doc = dict(benchmark="triton_launch", device="cpu", layout=H.LAYOUT, rank=H.RANK,
               tritons=[r["triton"] for r in runs], reps=args.reps,
               host_steps=args.host_steps, rows=rows,
               note="launcher = Triton's host work per launch with a stand-in driver and a "
                    "no-op CUDA launch call, replaying one steady step's recorded launches "
                    "(H100 tiles): 'plain' every launch through JITFunction.run, 'planned' "
                    "the engine's PlannedLaunch launches direct after their first; "
                    "x_with_launcher = x_paired * (stubbed + launcher) / stubbed, "
                    "bench_host_step's paired ratio to torch fused AdamW scaled by what the "
                    "launcher adds")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "triton-launch-cpu.json"), "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
