"""The one benchmark harness: timer, input rotation, ceilings, the result row and its writers.

How it measures (docs/gpu.md):

* CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, warm-up first)
  returning the 20th/50th/80th percentiles. The benchmark factories additionally rotate their
  inputs over enough copies (``rotating``) that one pass over them exceeds ``ROTATE_BYTES``,
  well above the 50-60 MB L2 of an H100/H200.
* CPU: ``time.perf_counter`` around single calls after one untimed call and a short warm-up.
  Meant for smoke runs of the harness, not as a performance claim.
* The two ceilings are measured in the same run (``measure_ceilings``): a large copy (bytes
  read + written) and, on CUDA, a large bf16 matmul. ``multiple_of_floor`` in a row is
  ``time / (floor bytes / copy bandwidth)``: 1.0 means the kernel moves its floor bytes at copy
  speed. ``multiple_of_roofline`` is ``time / roofline`` with the roofline
  ``max(floor bytes / copy bandwidth, FLOPs / peak at the row's precision)`` (``bench.bytes``:
  the FLOP model and the device's peak table; no roofline where the device has no table).

Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
ROTATE_BYTES = 128 << 20   # working set per rotation: > 2x the L2 of an H100 (50 MB) / H200
MAX_COPIES = 32
QUANTILES = (0.2, 0.5, 0.8)
# torch has no 3xTF32 mode: eager fp32 matmuls of a "tf32x3" row run at "highest" (IEEE), its
# nearest accuracy
_PRECISION_TO_TORCH = {"ieee": "highest", "tf32": "high", "tf32x3": "highest", "bf16": "medium"}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# -------------------------------------------------------------------------------------------
# timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device, warmup: float = 25, rep: float = 100,
            min_reps: int = 3, max_reps: int = 200):
    """``(p20, p50, p80)`` milliseconds of one call of ``fn``.

    ``warmup`` and ``rep`` are time budgets in ms, as in ``triton.testing.do_bench``. On CUDA
    this is do_bench itself (CUDA events, L2 flushed before every call). On CPU: one untimed
    call, warm-up calls for ``warmup`` ms, then between ``min_reps`` and ``max_reps`` calls
    timed one by one with ``time.perf_counter`` to fill ``rep`` ms.
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
        return tuple(float(x) for x in q)
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est = max(time.perf_counter() - t0, 1e-6) * 1e3
    for _ in range(max(0, min(int(warmup / est), max_reps) - 1)):
        fn()
    n = int(min(max(rep / est, min_reps), max_reps))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return tuple(_quantile(sorted(times), q) for q in QUANTILES)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a sorted list."""
    pos = (len(sorted_xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def copies_for(bytes_per_set: int, device, target: int = ROTATE_BYTES) -> int:
    """How many input copies make one rotation touch more than ``target`` bytes (1 on CPU)."""
    if torch.device(device).type != "cuda" or bytes_per_set <= 0:
        return 1
    return int(min(MAX_COPIES, max(1, math.ceil(target / bytes_per_set))))


def rotating(factory: Callable[[], Callable[[], object]], bytes_per_set: int, device):
    """A zero-arg callable cycling over ``copies_for(bytes_per_set)`` independent instances
    built by ``factory()`` (each with its own fresh random inputs), so consecutive timed calls
    never find their operands in L2."""
    calls = [factory() for _ in range(copies_for(bytes_per_set, device))]
    if len(calls) == 1:
        return calls[0]
    cycle = itertools.cycle(calls)

    def run():
        return next(cycle)()

    return run


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Run eager fp32 matmuls at ``precision`` ("ieee" | "tf32" | "bf16"), restoring after.

    The eager references multiply in fp32 with torch's global matmul precision; setting it
    from the row's precision makes the eager and fused GEMMs use the same operand precision.
    """
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(_PRECISION_TO_TORCH[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def warm_step_factory(build, cache: dict, key, shape, dtype, device, backend):
    """For the whole-step benchmarks: a factory of ``opt.step`` callables, each on a fresh
    random parameter of ``shape`` with a fixed random gradient, its optimizer
    (``build(W, backend)``) loaded with the state after one warm ``reference`` step (the step
    that computes the first subspace), taken once per ``key`` and kept in ``cache``."""
    def fresh():
        W = torch.nn.Parameter(random_tensor(shape, dtype, device))
        W.grad = random_tensor(shape, dtype, device, scale=1e-2)
        return W

    if key not in cache:
        opt = build(fresh(), "reference")
        opt.step()
        cache[key] = opt.state_dict()
    warm = cache[key]

    def factory():
        opt = build(fresh(), backend)
        opt.load_state_dict(warm)
        return opt.step

    return factory


def random_tensor(shape, dtype, device, *, positive=False, scale=1.0):
    """Random normal data (never zeros); ``positive`` gives |x| + 1e-3 (for second moments)."""
    x = torch.randn(shape, device=device, dtype=torch.float32) * scale
    if positive:
        x = x.abs_().add_(1e-3 * scale)
    return x.to(dtype)


# -------------------------------------------------------------------------------------------
# ceilings

def measure_ceilings(device, *, quick: bool = False, peaks_for: Optional[str] = None) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and, on CUDA, bf16 matmul TFLOP/s; plus
    ``peaks``, the device's peak table (``bench.bytes.device_peaks``; ``peaks_for`` names the
    device to look up instead, e.g. "H100" for a dry run on a CPU), None when unknown."""
    from bench import bytes as B

    device = torch.device(device)
    out = {"device": device.type}
    pk = B.device_peaks(peaks_for or (device_name(device) if device.type == "cuda" else None))
    out["peaks"] = pk.as_dict() if pk else None
    if pk and peaks_for:
        out["peaks"]["note"] = f"the {pk.name} table, asked for (not this device's)"
    if device.type == "cuda":
        nbytes = (256 if quick else 1024) << 20
        warm, rep = (10, 50) if quick else (25, 200)
    else:
        nbytes = 64 << 20
        warm, rep = 5, 100
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    p = time_fn(lambda: dst.copy_(src), device=device, warmup=warm, rep=rep)
    out.update(copy_bytes=2 * nbytes, copy_ms_p50=p[1],
               copy_gbps=2 * nbytes / (p[1] * 1e-3) / 1e9,
               copy_note=f"{'device-to-device' if device.type == 'cuda' else 'memcpy'} copy of "
                         f"{nbytes >> 20} MiB (fp32), counting read + write")
    del src, dst
    if device.type == "cuda":
        k = 4096 if quick else 8192
        a = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        c = torch.empty(k, k, device=device, dtype=torch.bfloat16)
        p = time_fn(lambda: torch.matmul(a, b, out=c), device=device, warmup=warm, rep=rep)
        out.update(matmul_shape=[k, k, k], matmul_ms_p50=p[1],
                   matmul_tflops=2 * k ** 3 / (p[1] * 1e-3) / 1e12,
                   matmul_note=f"bf16 {k}x{k} @ {k}x{k}, fp32 accumulate (torch.matmul)")
        del a, b, c
    else:
        out.update(matmul_shape=None, matmul_ms_p50=None, matmul_tflops=None,
                   matmul_note="skipped: CPU run (the matmul ceiling is a GPU measurement)")
    return out


# -------------------------------------------------------------------------------------------
# environment

def git_commit() -> str:
    """HEAD of the repository (``+dirty`` with uncommitted tracked changes); falls back to
    ``$LOWRANK_FUSED_COMMIT`` or "unknown" where there is no git checkout (e.g. a copied tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("LOWRANK_FUSED_COMMIT", "unknown")


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(device) -> str:
    """File-name stem for the device: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def environment(device) -> dict:
    device = torch.device(device)
    env = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": device_name(device) if device.type == "cuda" else None,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_sm_count"] = props.multi_processor_count
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


# -------------------------------------------------------------------------------------------
# rows and writers

@dataclass
class Row:
    """One measurement. Times in ms; bytes from ``bench.bytes`` (docs/bytes.md)."""

    op: str                      # "project", ..., "galore_step", "adamw"; ":form" suffixes
                                 # name a module's forms ("adafactor_step:momentum")
    variant: str                 # "fused", "eager", "torch-fused", ...
    backend: str                 # lowrank_fused backend, or "torch"
    m: int
    n: int
    r: Optional[int]
    dtype: str                   # parameter / gradient dtype ("fp32", "bf16")
    precision: Optional[str]     # GEMM operand precision, None for elementwise ops
    p20_ms: float
    p50_ms: float
    p80_ms: float
    bytes_floor: int             # fused ideal bytes of this op (this row's dtypes)
    bytes_eager_model: Optional[int] = None
    side: Optional[str] = None
    achieved_gbps: Optional[float] = None    # bytes_floor / p50
    multiple_of_floor: Optional[float] = None  # p50 / (bytes_floor / copy bandwidth)
    flops: Optional[int] = None              # bench.bytes FLOP model, all kinds
    flops_fp32: Optional[int] = None         # of which on fp32 CUDA cores (IEEE GEMMs, elementwise)
    roofline_ms: Optional[float] = None      # max(bytes / copy bandwidth, FLOPs / peaks)
    multiple_of_roofline: Optional[float] = None  # p50 / roofline_ms
    roofline_bound: Optional[str] = None     # "bytes" or "flops": the larger term
    device: str = "cpu"
    gpu: Optional[str] = None
    torch: str = ""
    triton: Optional[str] = None
    commit: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    def finish(self, env: dict, ceilings: dict, flops=None) -> "Row":
        """Fill the derived columns and the environment fields. ``flops``: the op's
        ``bench.bytes.Flops`` (None: not modelled, no roofline)."""
        t = self.p50_ms * 1e-3
        if t > 0 and self.bytes_floor > 0:
            self.achieved_gbps = self.bytes_floor / t / 1e9
            bw = ceilings.get("copy_gbps")
            if bw:
                self.multiple_of_floor = t / (self.bytes_floor / (bw * 1e9))
        if flops is not None:
            self.flops, self.flops_fp32 = flops.total, flops.fp32
            rl = roofline_of(self.bytes_floor, flops, self.precision, ceilings)
            if rl is not None:
                self.roofline_ms = rl.seconds * 1e3
                self.roofline_bound = rl.bound
                if t > 0 and rl.seconds > 0:
                    self.multiple_of_roofline = t / rl.seconds
        self.device = env["device"]
        self.gpu = env.get("gpu")
        self.torch = env["torch"]
        self.triton = env.get("triton")
        self.commit = env["commit"]
        return self


ROW_FIELDS = [f.name for f in fields(Row)]


def roofline_of(nbytes: int, flops, precision: Optional[str], ceilings: dict):
    """``bench.bytes.roofline`` with the run's measured copy bandwidth (the table's HBM figure
    when none was measured) and the peaks in ``ceilings``; None without a peak table."""
    from bench import bytes as B

    pk = ceilings.get("peaks")
    if not pk:
        return None
    tf = pk["tflops"]
    peaks = B.DevicePeaks(pk["name"], pk["hbm_gbps"], pk["hbm_source"], tf["ieee"], tf["tf32"],
                          tf["bf16"])
    bw = ceilings.get("copy_gbps") or pk["hbm_gbps"]
    return B.roofline(nbytes, flops, precision, bandwidth_gbps=bw, peaks=peaks)


def write_json(path, rows: Iterable[Row], env: dict, ceilings: dict, meta: dict = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"environment": env, "ceilings": ceilings, "meta": meta or {},
           "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _key(row: Row):
    return (row.op, row.m, row.n, row.r, row.dtype, row.precision)


def format_markdown(rows: List[Row], env: dict, ceilings: dict, meta: dict = None,
                    extra_sections: Sequence[str] = ()) -> str:
    """A markdown report: environment, ceilings, one table of rows, then ``extra_sections``."""
    meta = meta or {}
    eager = {_key(r): r.p50_ms for r in rows if r.variant == "eager"}
    lines = [f"# lowrank_fused benchmarks: {env['device_name']}, {env['date'][:10]}", ""]
    if meta.get("command"):
        lines += [f"Command: `{meta['command']}`", ""]
    lines += [f"torch {env['torch']}, triton {env.get('triton')}, CUDA runtime "
              f"{env.get('cuda_runtime')}, commit `{env['commit']}`"
              + (", TRITON_INTERPRET=1" if env.get("triton_interpret") else ""), ""]
    copy, mm = ceilings.get("copy_gbps"), ceilings.get("matmul_tflops")
    lines.append((f"Ceilings (same run): copy {copy:.1f} GB/s ({ceilings.get('copy_note')})"
                  if copy else "Ceilings: copy bandwidth not measured")
                 + (f"; matmul {mm:.1f} TFLOP/s ({ceilings.get('matmul_note')})." if mm
                    else f"; matmul: {ceilings.get('matmul_note', 'not measured')}."))
    pk = ceilings.get("peaks")
    lines.append("Roofline: " + (
        f"{pk['name']} peaks (TFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in pk['tflops'].items())}"
        f"; {pk['compute_source']}), measured copy bandwidth" + (f"; {pk['note']}"
                                                                 if pk.get("note") else "")
        if pk else "no peak table for this device (x roofline not reported)") + ".")
    lines += ["", "| op | variant | backend | m x n | r | side | dtype | precision | p50 ms "
              "| p20-p80 ms | floor MiB | GB/s | x floor | GFLOP | x roofline | bound "
              "| eager/this |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = eager.get(_key(r))
        lines.append(
            f"| {r.op} | {r.variant} | {r.backend} | {r.m}x{r.n} | {r.r if r.r else '-'} "
            f"| {r.side or '-'} | {r.dtype} | {r.precision or '-'} | {r.p50_ms:.4g} "
            f"| {r.p20_ms:.4g}-{r.p80_ms:.4g} | {r.bytes_floor / 2 ** 20:.1f} "
            f"| {_fmt(r.achieved_gbps, '.1f')} | {_fmt(r.multiple_of_floor, '.2f')} "
            f"| {_fmt(r.flops / 1e9 if r.flops is not None else None, '.2f')} "
            f"| {_fmt(r.multiple_of_roofline, '.2f')} | {r.roofline_bound or '-'} "
            f"| {_fmt(rel / r.p50_ms if rel else None, '.2f')} |")
    for section in extra_sections:
        lines += ["", section]
    return "\n".join(lines) + "\n"


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def write_markdown(path, rows: List[Row], env: dict, ceilings: dict, meta: dict = None,
                   extra_sections: Sequence[str] = ()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(rows, env, ceilings, meta, extra_sections))
    return path


# -------------------------------------------------------------------------------------------
# shapes shared by the bench modules

LLAMA_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # LLaMA-7B attention / MLP
RANKS = (128, 256, 512)
GPU_DTYPES = (torch.float32, torch.bfloat16)
GPU_PRECISIONS = ("tf32", "bf16")
IEEE_SHAPE = (4096, 4096)                  # "ieee" (fp32 FMA GEMMs) on this shape only
CPU_SHAPE, CPU_RANK = (256, 512), 32       # CPU smoke runs of the eager path
INTERPRET_SHAPE, INTERPRET_RANK = (128, 256), 16  # Triton interpreter: ~ms per program


def galore_side(m: int, n: int) -> str:
    """galore_torch proj_type="std": project on the right when m >= n."""
    return "right" if m >= n else "left"


def matrix_cases(device, quick: bool, interpret: bool = False):
    """``[(name, params)]`` for the GEMM ops and the optimizer step.

    params: m, n, r, dtype (torch dtype of G/W), precision, side (galore_torch "std" rule).
    CUDA full: LLaMA shapes x ranks 128/256/512 x fp32/bf16 x tf32/bf16, plus ieee on
    4096x4096. CUDA quick: 4096x4096, r=128, fp32/tf32 and bf16/bf16. CPU: one small shape
    in fp32 and bf16 with ieee (the Triton interpreter: an even smaller one).
    """
    device = torch.device(device)
    if device.type == "cuda":
        if quick:
            grid = [((4096, 4096), 128, torch.float32, "tf32"),
                    ((4096, 4096), 128, torch.bfloat16, "bf16")]
        else:
            grid = [(s, r, dt, prec) for s in LLAMA_SHAPES for dt in GPU_DTYPES
                    for prec in GPU_PRECISIONS for r in RANKS]
            grid += [(IEEE_SHAPE, r, dt, "ieee") for dt in GPU_DTYPES for r in RANKS]
    else:
        shape, r = (INTERPRET_SHAPE, INTERPRET_RANK) if interpret else (CPU_SHAPE, CPU_RANK)
        grid = [(shape, r, dt, "ieee") for dt in (torch.float32, torch.bfloat16)]
    out = []
    for (m, n), r, dt, prec in grid:
        params = dict(m=m, n=n, r=r, dtype=dt, precision=prec, side=galore_side(m, n))
        out.append((f"{m}x{n}-r{r}-{DTYPE_NAMES[dt]}-{prec}", params))
    return out


def distinct_cases(device, quick: bool, interpret: bool, keys):
    """The params of ``matrix_cases`` whose ``keys`` values come first, in order, with
    ``precision=None``: for ops that take no matmul precision (and perhaps no dtype or rank),
    one case per distinct class instead of one per precision."""
    seen = set()
    for _, p in matrix_cases(device, quick, interpret):
        key = tuple(p[k] for k in keys)
        if key not in seen:
            seen.add(key)
            yield dict(p, precision=None)


def low_rank_cases(device, quick: bool, interpret: bool = False):
    """``[(name, params)]`` for the elementwise ops on low-rank states (r x n or m x r,
    fp32): the (m, n, r, side) classes of ``matrix_cases``, once each; params as there with
    dtype fp32 and precision None."""
    return [(f"{p['m']}x{p['n']}-r{p['r']}-{p['side']}", dict(p, dtype=torch.float32))
            for p in distinct_cases(device, quick, interpret, ("m", "n", "r", "side"))]


def dense_cases(device, quick: bool, interpret: bool = False):
    """``[(name, params)]`` for the full-matrix elementwise ops (no rank, no GEMM): the
    (shape, dtype) pairs of ``matrix_cases``, once each; params: m, n, dtype, r=None,
    precision=None, side=None."""
    return [(f"{p['m']}x{p['n']}-{DTYPE_NAMES[p['dtype']]}", dict(p, r=None, side=None))
            for p in distinct_cases(device, quick, interpret, ("m", "n", "dtype"))]


def triton_usable(device, interpret: bool) -> bool:
    """Whether the Triton variants are measured: on CUDA always; on CPU only when asked to
    run the interpreter (which is a correctness tool, not a speed measurement)."""
    return torch.device(device).type == "cuda" or bool(interpret)


def op_variants(device, interpret: bool, op: Optional[str] = None):
    """fused (Triton) vs eager (reference) for one op. With ``op``, the fused variant is offered
    only when ``triton_implemented(op, device)`` (a kernel being written may not import yet)."""
    fused = triton_usable(device, interpret) and (op is None or triton_implemented(op, device))
    return ([("fused", "triton")] if fused else []) + [("eager", "reference")]


_NOT_IMPLEMENTED = {}   # op -> why its Triton implementation could not be looked up


def triton_implemented(op: str, device) -> bool:
    """Whether the dispatch table has a Triton implementation of ``op`` that imports. When not
    (``BackendUnavailable``, or the kernel package failing to import), says why on stderr once
    per op, so a GPU run without the fused rows is not silent."""
    from lowrank_fused.dispatch import BackendUnavailable, implementation

    if op in _NOT_IMPLEMENTED:
        return False
    try:
        implementation(op, "triton", device)
        return True
    except BackendUnavailable as exc:
        why = str(exc)
    except Exception as exc:  # noqa: BLE001 - a kernel module in progress may fail any way
        why = f"importing the Triton kernels failed: {type(exc).__name__}: {exc}"
    _NOT_IMPLEMENTED[op] = why
    print(f"note: {op}: no fused variant ({why}); benchmarking the eager reference only",
          file=sys.stderr, flush=True)
    return False
