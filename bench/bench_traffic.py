"""Measured memory traffic of one steady optimizer step per method: the bytes the Triton
kernels request (every load and store, masked-off elements excluded, counted under the
interpreter by ``lowrank_fused.testing.traffic``) with the tile configurations the launchers
choose on an H100 (``kernels._common.gpu_tiling``: sm_90 tensor-core configs, 132 SMs for
split-K), against the byte floor of ``bench.bytes`` (``method_step_bytes``; dense AdamW
``adamw_bytes``, Adafactor ``adafactor_step_bytes``).

    python -m bench.bench_traffic [--quick] [--full [--full-ranks 128,256,512]] [--methods M,...] [--out FILE]
    python -m bench.run --suite traffic       (the same, opt-in suite: <out>/traffic-<device>.json)

Runs in a subprocess of its own with ``TRITON_INTERPRET=1`` (the kernels must be imported
interpreted), on CPU tensors whatever the machine. The counts are the kernels' requests before
any cache: a tile re-read by several programs counts each time (on a GPU the L2 may serve it).
Eager aten ops left in a step (outside the kernels) are modelled separately (``eager_bytes``:
each op's inputs read once, outputs written once), not measured; the optimizers' non-finite
check of the gradient (``nonfinite="raise"``, the default: on CUDA one more read of G per step,
``nonfinite_check_bytes``) is outside the floor and outside both counts.

Cases: every low-rank method of ``bytes.METHOD_STEPS`` plus dense AdamW and Adafactor; a
scaled LLaMA MLP shape (512x1376, 4096x11008 / 8) at the real ranks 128 and 256 (the rank
decides the tile choice; 512 would be the full rank there): rank 128 with fp32 parameters and
tf32 GEMMs and with bf16 parameters and bf16 GEMMs (the GPU benchmark's pairs), rank 256 bf16. ``--full`` adds
4096x11008 at rank 128 (`--full-ranks`: others), bf16, for ``--full-methods`` (default GaLore and AdamW: interpreter
minutes per method). ``--quick``: 256x688, rank 128,
bf16. Steady step: refreshes out of reach, state from one warm reference step
(``bench_method_step``), then the counted Triton step.

Columns: ``requested`` (bytes of every load and store), ``ratio`` = requested / floor;
``mn_bytes_per_element``: the traffic on the m x n tensors (G, W, LDAdam's E, AdaPM's V) per
element, to compare with the floor's A coefficient (``floor_per_element``; 6 for a bf16 GaLore
step): a re-read of
an m x n tensor is DRAM traffic on any GPU; ``l2_model_bytes`` / ``ratio_l2_model``: the
same launches with every tensor of at most ``L2_RESIDENT`` bytes (the traffic counter's: half
an H100's L2, a re-read this small stays there) counted once per launch
(a re-read tile of P, N or R served by the H100's 50 MB L2), larger ones as requested;
``l2_window_bytes`` / ``ratio_l2_window``: as the L2 model, but a larger tensor's elements
counted once per window of programs that run side by side (``lowrank_fused.testing.traffic``:
``WINDOW_PROGRAMS`` consecutive programs in launch order), so a re-read by a neighbouring
program (K1's rank tiles of one column slab) is an L2 hit and one by a far program is not;
``rereads``: the launches that load a tensor more than once over (largest excess first).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCALED_SHAPE = (512, 1376)
FULL_SHAPE = (4096, 11008)
QUICK_SHAPE = (256, 688)
DENSE = ("adamw", "adafactor")
TOP_REREADS = 6
FULL_METHODS = ("galore", "adamw")


def methods_all():
    from bench import bytes as B
    return tuple(B.METHOD_STEPS) + DENSE


def grid(quick: bool, full: bool, shapes=None, full_ranks=(128,)):
    """[(shape, rank, dtype name)] of the run (``shapes``: only these m x n; ``full_ranks``:
    the ranks of the full shape, bf16)."""
    if quick:
        return [(QUICK_SHAPE, 128, "bf16")]
    out = [(SCALED_SHAPE, 128, "fp32"), (SCALED_SHAPE, 128, "bf16"), (SCALED_SHAPE, 256, "bf16")]
    if full:
        out += [(FULL_SHAPE, r, "bf16") for r in full_ranks]
    return [c for c in out if shapes is None or c[0] in shapes]


def floor_bytes(method, m, n, r, p, side):
    from bench import bytes as B
    if method == "adamw":
        return B.adamw_bytes(m, n, param_bytes=p, state_bytes=4).floor
    if method == "adafactor":
        return B.adafactor_step_bytes(m, n, param_bytes=p, factored=True, momentum=False,
                                      scale_parameter=True).floor
    return B.method_step_bytes(method, m, n, r, param_bytes=p, state_bytes=4, side=side).floor


def floor_per_element(method, m, n, r, p, side) -> float:
    """The floor's A coefficient (bytes per m x n element): with f = aA + bm + dn + k at a
    fixed rank (A = mn; C = mr, S = rn are linear in m and n), a = f(2m, 2n) - f(m, 2n) -
    f(2m, n) + f(m, n), over mn."""
    f = lambda mm, nn: floor_bytes(method, mm, nn, r, p, side)   # noqa: E731
    return (f(2 * m, 2 * n) - f(m, 2 * n) - f(2 * m, n) + f(m, n)) / (m * n)


def _build(method, params, W, backend):
    from bench import bench_method_step as MS
    from lowrank_fused.routing import optimizer_class
    cls = optimizer_class(method)
    if method == "adamw":
        return cls([W], lr=MS.LR, weight_decay=MS.WD, backend=backend)
    if method == "adafactor":
        return cls([W], backend=backend)
    return MS._optimizer(params, W, backend)


def measure(method, shape, r, dtype_name, log=print) -> dict:
    """One counted steady step of ``method`` (in this process: TRITON_INTERPRET=1 must have
    been set before the kernels were imported)."""
    import torch

    from bench import harness as H
    from lowrank_fused.kernels._common import H100_SM_COUNT, gpu_tiling
    from lowrank_fused.testing.traffic import L2_RESIDENT, TrafficCounter

    m, n = shape
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    precision = "tf32" if dtype == torch.float32 else "bf16"
    side = H.galore_side(m, n)
    dense = method in DENSE
    params = dict(method=method, m=m, n=n, r=r, dtype=dtype, precision=precision, side=side)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with H.matmul_precision(precision), gpu_tiling(H100_SM_COUNT):
        factory = H.warm_step_factory(lambda W, b: _build(method, params, W, b), {}, None,
                                      (m, n), dtype, torch.device("cpu"), "triton")
        step = factory()
        with TrafficCounter(count_eager=True) as tc:
            step()
    floor = floor_bytes(method, m, n, r, dtype.itemsize, side)
    A = m * n
    # the optimizers' non-finite check (nonfinite="raise"): on CUDA one torch._foreach_norm
    # read of the gradient (nonfinite_check_bytes), on a CPU build a compiled pass that the
    # eager model does not see: left out of eager_bytes so both count alike
    eager = tc.eager_bytes - tc.eager_ops.get("_foreach_norm", 0)
    big = small = l2_model = l2_window = 0
    rereads = []
    for ln in tc.launches:
        l2_model += ln.unattributed
        l2_window += ln.unattributed
        for t in ln.tensors:
            moved = t.loaded + t.stored
            # G, W, E, V (not a split-K buffer), also as a batch of one (Adafactor's (1, m, n))
            if sorted(d for d in t.shape if d != 1) == sorted((m, n)):
                big += moved
            else:
                small += moved
            if t.nbytes <= L2_RESIDENT:
                once = min(t.loaded, t.touched) + min(t.stored, t.touched)
                l2_model += once
                l2_window += once
            else:
                l2_model += moved
                # by program order: a re-read by programs that run beside the first reader
                # is an L2 hit (TensorTraffic.window_loaded; requested where not tracked)
                l2_window += (t.loaded if t.window_loaded is None else t.window_loaded) \
                    + t.stored
            if t.reads > 1.0 + 1e-9:
                rereads.append(dict(kernel=ln.kernel, grid=list(ln.grid), tensor=t.name,
                                    shape=list(t.shape), dtype=t.dtype, reads=round(t.reads, 3),
                                    extra_bytes=t.loaded - t.nbytes))
    rereads.sort(key=lambda d: -d["extra_bytes"])
    kernels = {}
    for ln in tc.launches:
        k = kernels.setdefault(ln.kernel, dict(launches=0, requested=0, grids=[]))
        k["launches"] += 1
        k["requested"] += ln.requested
        if list(ln.grid) not in k["grids"]:
            k["grids"].append(list(ln.grid))
    row = dict(method=method, m=m, n=n, r=None if dense else r, side=None if dense else side,
               dtype=dtype_name, precision=precision, bytes_floor=floor,
               requested=tc.requested, loaded=tc.loaded, stored=tc.stored,
               ratio=round(tc.requested / floor, 4),
               mn_bytes_per_element=round(big / A, 3),
               floor_per_element=round(floor_per_element(method, m, n, r, dtype.itemsize, side),
                                       3),
               small_bytes=small,
               l2_model_bytes=l2_model, ratio_l2_model=round(l2_model / floor, 4),
               l2_window_bytes=l2_window, ratio_l2_window=round(l2_window / floor, 4),
               unattributed=tc.unattributed, eager_bytes=eager,
               ratio_with_eager=round((tc.requested + eager) / floor, 4),
               nonfinite_check_bytes=A * dtype.itemsize,
               eager_ops=dict(sorted(tc.eager_ops.items(), key=lambda kv: -kv[1])[:6]),
               launches=len(tc.launches), kernels=kernels,
               rereads=rereads[:TOP_REREADS], seconds=round(time.perf_counter() - t0, 1))
    log(f"  {method:14s} {m}x{n} r{r} {dtype_name}: requested {tc.requested / 2**20:8.2f} MiB"
        f" = {row['ratio']:.2f}x floor ({floor / 2**20:.2f} MiB), L2 model "
        f"{row['ratio_l2_model']:.2f}x, by program window {row['ratio_l2_window']:.2f}x; "
        f"m x n tensors "
        f"{row['mn_bytes_per_element']:.1f} B/elem; eager model {eager / 2**20:.2f} MiB;"
        f" {len(tc.launches)} launches; {row['seconds']:.0f} s")
    return row


def _numel(shape):
    out = 1
    for s in shape:
        out *= s
    return out


def _commit() -> str:
    from bench import harness as H
    return H.git_commit()


def _tiles() -> dict:
    """The GEMM launchers' GPU config tables the counts were taken with."""
    import importlib
    out = {}
    for name in ("project", "backproject_update", "moment_transport", "adapm_update"):
        mod = importlib.import_module(f"lowrank_fused.kernels.{name}")
        out[name] = {key: [list(vars(c).values()) for c in getattr(mod, key)]
                     for key in ("CONFIGS_FMA", "CONFIGS_MMA", "CONFIGS_TF32X3")
                     if hasattr(mod, key)}
    return out


def run_inprocess(quick=False, full=False, methods=None, full_methods=FULL_METHODS,
                  shapes=None, ranks=None, log=print, full_ranks=(128,)) -> dict:
    import torch
    import triton

    from lowrank_fused.kernels._common import H100_SM_COUNT
    rows, errors = [], []
    names = methods or methods_all()
    t0 = time.perf_counter()
    for shape, r, dt in grid(quick, full, shapes, full_ranks):
        if ranks is not None and r not in ranks:
            continue
        for method in names:
            if shape == FULL_SHAPE and method not in full_methods:
                continue
            if method in DENSE and r != 128:
                continue                       # no rank: once per shape and dtype
            try:
                rows.append(measure(method, shape, r, dt, log=log))
            except Exception as exc:           # record, go on
                errors.append({"case": f"{method} {shape[0]}x{shape[1]} r{r} {dt}",
                               "error": f"{type(exc).__name__}: {exc}"})
                log(f"ERROR {errors[-1]['case']}: {errors[-1]['error']}")
    return {"suite": "traffic", "rows": rows, "errors": errors,
            "config": {"gpu_tiling_sm_count": H100_SM_COUNT, "counted": "interpreter",
                       "commit": _commit(), "tiles": _tiles(),
                       "torch": torch.__version__, "triton": triton.__version__,
                       "quick": quick, "full": full, "full_ranks": list(full_ranks),
                       "elapsed_s": round(time.perf_counter() - t0, 1)}}


def run(device=None, *, quick: bool = False, methods=None, threads: int = 1,
        backend: str = "auto", full: bool = False, out=None, jobs: int = 1) -> dict:
    """Suite entry of ``bench.run`` (``bench.suite_traffic``): the counting runs in a child
    process with ``TRITON_INTERPRET=1``, its JSON returned (``device``, ``backend``, ``out`` and
    ``jobs`` do not apply: always interpreted CPU tensors, one process)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traffic.json"
        cmd = [sys.executable, "-m", "bench.bench_traffic", "--out", str(path)]
        cmd += ["--quick"] if quick else []
        cmd += ["--full"] if full else []
        cmd += ["--methods", ",".join(methods)] if methods else []
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=str(max(1, threads)))
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(cmd, env=env, cwd=root)
        if proc.returncode not in (0, 1) or not path.exists():
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
        return json.loads(path.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_traffic",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_SHAPE}, rank 128, bf16 only")
    ap.add_argument("--full", action="store_true",
                    help=f"also {FULL_SHAPE}, bf16, at --full-ranks")
    ap.add_argument("--full-methods", default=",".join(FULL_METHODS),
                    help="methods measured at the full shape (default: %(default)s)")
    ap.add_argument("--full-ranks", default="128",
                    help="the ranks of the full shape with --full (default: %(default)s; "
                         "e.g. 128,256,512)")
    ap.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    ap.add_argument("--shapes", default=None, help="only these shapes, e.g. 4096x11008")
    ap.add_argument("--ranks", default=None, help="only these ranks, e.g. 256")
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        os.environ["TRITON_INTERPRET"] = "1"   # before the first import of the kernels
    import torch
    torch.set_num_threads(1)
    methods = [x.strip() for x in args.methods.split(",")] if args.methods else None
    if methods:
        bad = [x for x in methods if x not in methods_all()]
        if bad:
            raise SystemExit(f"--methods: unknown method(s) {bad}; choose from {methods_all()}")
    shapes = ([tuple(int(v) for v in x.split("x")) for x in args.shapes.split(",")]
              if args.shapes else None)
    ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else None
    full_ranks = tuple(int(x) for x in args.full_ranks.split(","))
    doc = run_inprocess(args.quick, args.full, methods,
                        tuple(x.strip() for x in args.full_methods.split(",")), shapes, ranks,
                        full_ranks=full_ranks)
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(doc['rows'])} rows, {len(doc['errors'])} errors)")
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
