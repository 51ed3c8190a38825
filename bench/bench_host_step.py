"""Host time of one steady optimizer step, with every kernel launch stubbed out.

On a GPU a step is as fast as the slower of its two halves: the kernels (bytes and FLOPs,
``bench/bytes.py``) and the host work that issues them (Python, argument checks, launches,
synchronisations). This benchmark measures the second half on the CPU: it runs the default
GPU path of every method (``backend="auto"``, which under ``TRITON_INTERPRET=1`` picks the
Triton kernels and the compiled multi-tensor ops, as on CUDA) with

* every Triton launch replaced by a counter (the interpreter's ``run`` returns at once), and
* every call into the compiled extension replaced by a counter (the multi-tensor ops, the
  small Cholesky),

so what is timed is exactly the Python and torch work of ``opt.step()``: what a GPU would
wait on before its first kernel could start, and between kernels when they are short.

The layout is a 24-layer LLaMA (LLaMA-1B's count: 168 projected matrices, 219 tensors) at
tiny widths (hidden 16, MLP 44, vocabulary 32, rank 4: 76k parameters), so every op, ours and
torch's, costs its call overhead, not its arithmetic. Gradients are fixed tensors (as with
``zero_grad(set_to_none=False)``); ``--fresh-grads`` gives every timed step new gradient
tensors at other addresses instead (untimed copies; the engine's plans keyed by gradient
addresses then re-plan every step: its worst case). Each method runs with its defaults (the update gap pushed
past the timed steps, so every timed step is a steady one) after ``--warm`` steps; the timed
value is the median over ``--steps`` steps of the CPU time the calling thread spends in
``opt.step()`` (``time.thread_time``: on a loaded machine the wall time also counts the time
the thread waits for a core; everything timed runs on this one thread, torch's intra-op pool
set to one thread), with the wall time beside it. ``torch.optim.AdamW(fused=True)`` on the
same tensors is timed in the same run, in alternation with each method (Python's cyclic
garbage collector off while the pairs run); ``x_paired`` is the median of each step's time
over the baseline step right after it, which a drift of the machine's speed does not move.

Also per steady step: kernel launches (Triton + extension calls), device-to-host reads (the
``HostReads`` counter of ``lowrank_fused.testing.trace`` plus ``Tensor.tolist``), tensors
allocated (``AllocationTrace``) and per-step scalar tables filled (``table_fills``: one
asynchronous host-to-device copy each on CUDA).

Run ``python -m bench.bench_host_step [--methods a,b] [--steps N] [--out DIR]``; with
``--out`` it writes ``DIR/host-step-cpu.json``. Numbers are host times on this machine's CPU:
ratios against torch's fused AdamW measured side by side are the claim, not the absolute
times.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before any Triton import: auto -> triton

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

LAYOUT = dict(hidden_size=16, num_hidden_layers=24, num_attention_heads=2,
              intermediate_size=44, vocab_size=32, max_position_embeddings=32)
RANK = 4
# methods whose refresh gap is a keyword: pushed past the timed steps
GAP_KEY = {"galore": "update_proj_gap", "adaptive_adamw": "update_proj_gap",
           "rsadamw": "update_proj_gap", "gha": "update_proj_gap",
           "galore_kfac": "update_proj_gap", "adamem": "update_proj_gap"}
NO_RANK = ("adamw", "adafactor")
# stubbed steps before the timed ones: the first steps after the real warm-up are slower on
# and off for some methods (allocator and interpreter caches settling), which a short median
# would catch
STUB_WARM = 15
# ext functions that answer questions instead of running a kernel
_EXT_QUERIES = {"build_info", "cpu_isa", "cpu_isas", "cuda_driver_version",
                "cuda_runtime_status", "has_cuda", "set_cpu_isa", "DTYPE_BFLOAT16",
                "DTYPE_FLOAT32"}


class Launches:
    """Counts the stubbed launches by kernel name; ``real`` (a context) runs them for real
    (the warm-up steps: the state then holds real values, which the stubbed steps keep)."""

    def __init__(self):
        self.count = collections.Counter()
        self.stub = True

    @contextlib.contextmanager
    def real(self):
        self.stub = False
        try:
            yield
        finally:
            self.stub = True

    def total(self):
        return sum(self.count.values())


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch and every compiled-extension kernel call becomes a counter."""
    import triton.runtime.interpreter as interp

    from lowrank_fused import _ext, _ext_ops

    launches = Launches()
    real_run = interp.InterpretedFunction.run

    def run(self, *args, **kwargs):
        if not launches.stub:
            return real_run(self, *args, **kwargs)
        launches.count["triton:" + self.fn.__name__] += 1

    real = _ext.load()

    class StubExt:
        # a wrapper even while the launches run for real: a call bound during the warm-up
        # (the optimizers bind their multi-tensor calls once) is stubbed afterwards
        def __getattr__(self, name):
            attr = getattr(real, name)
            if name in _EXT_QUERIES or not callable(attr):
                return attr

            def stub(*args, **kwargs):
                if not launches.stub:
                    return attr(*args, **kwargs)
                launches.count["ext:" + name] += 1
                return 0
            return stub

    real_flag = _ext_ops.nonfinite_flag_cpu
    saved = (_ext._module, _ext._tried)
    interp.InterpretedFunction.run = run
    _ext._module, _ext._tried = StubExt(), True
    # the GPU path of the non-finite check is torch's multi-tensor reduction
    _ext_ops.nonfinite_flag_cpu = lambda tensors: (real_flag(tensors) if not launches.stub
                                                   else None)
    try:
        yield launches
    finally:
        interp.InterpretedFunction.run = real_run
        _ext._module, _ext._tried = saved
        _ext_ops.nonfinite_flag_cpu = real_flag


def build(method, seed=0, layers=None, **overrides):
    """The 24-layer model (``layers`` overrides the count), fixed gradients, and the method's
    optimizer (its defaults)."""
    import lowrank_fused as lf
    from lowrank_fused.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(LAYOUT, **({} if layers is None else {"num_hidden_layers": layers}))
    net = LlamaForCausalLM(LlamaConfig(**cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    if method == "torch_fused_adamw":
        return net, torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    kw = {} if method in NO_RANK else {"rank": RANK}
    if method in GAP_KEY:
        kw[GAP_KEY[method]] = 10 ** 6
    if method == "adarankgrad":
        kw["t_min"] = 10 ** 6
    if method == "galore_kfac":                 # the factor's root: a periodic refresh too
        kw["kfac_update_freq"] = 10 ** 6
    kw.update(overrides)
    opt = lf.make_optimizer(net, method, **kw)
    # the default on CUDA: the non-finite flag stays on the device (docs/engine.md)
    opt.lagged_nonfinite = True
    return net, opt


def count_matrices(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return len(params), sum(1 for g in opt.param_groups if "rank" in g for p in g["params"]
                            if p.dim() >= 2)


def host_reads_and_allocations(opt):
    """(host reads, tensors allocated) in one step."""
    from lowrank_fused.testing.trace import AllocationTrace, HostReads

    reads = HostReads()
    real_tolist = torch.Tensor.tolist

    def tolist(t):
        reads.count["tolist"] += 1
        return real_tolist(t)

    torch.Tensor.tolist = tolist
    try:
        with reads:
            opt.step()
    finally:
        torch.Tensor.tolist = real_tolist
    allocs = AllocationTrace()
    with allocs:
        opt.step()
    return dict(reads.count), len(allocs.sizes)


def table_fills(opt):
    """The per-step scalar tables one step fills (``lowrank_fused._tables.StagedTable.fill``):
    on CUDA each is one asynchronous host-to-device copy from its pinned staging buffer (a
    copy node of the graph when the step is captured), on the CPU a write in place."""
    from lowrank_fused._tables import StagedTable

    real_fill = StagedTable.fill
    count = [0]

    def fill(self, values):
        count[0] += 1
        return real_fill(self, values)

    StagedTable.fill = fill
    try:
        opt.step()
    finally:
        StagedTable.fill = real_fill
    return count[0]


def measure(methods, steps, warm, log=print, overrides=None, layers=None, fresh_grads=False):
    overrides = overrides or {}
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # host time: one thread, no pool wake-ups in the timing
    try:
        with stubbed_launches() as launches:
            _measure(methods, steps, warm, log, overrides, layers, launches, rows, fresh_grads)
    finally:
        torch.set_num_threads(threads)
    return rows


def _new_grads(net):
    """Every gradient replaced by a copy in a new tensor (untimed): what
    ``zero_grad(set_to_none=True)`` and the next backward give, new tensors, here at other
    addresses than the last step's (the worst case for the engine's address-keyed plans)."""
    for p in net.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


def _timed(opt, base, net, steps, fresh_grads, ours, theirs, ours_cpu, theirs_cpu):
    """``steps`` pairs: one step of ``opt``, then one of the baseline (the same load for
    both), each timed in wall and thread CPU microseconds."""
    for _ in range(steps):
        if fresh_grads:
            _new_grads(net)
        t0, c0 = time.perf_counter(), time.thread_time()
        opt.step()
        t1, c1 = time.perf_counter(), time.thread_time()
        base.step()
        t2, c2 = time.perf_counter(), time.thread_time()
        ours.append((t1 - t0) * 1e6)
        theirs.append((t2 - t1) * 1e6)
        ours_cpu.append((c1 - c0) * 1e6)
        theirs_cpu.append((c2 - c1) * 1e6)


def _measure(methods, steps, warm, log, overrides, layers, launches, rows, fresh_grads=False):
    """``measure``'s loop, inside the stubs: the baseline, then each method in turn."""
    _, base = build("torch_fused_adamw", layers=layers)
    for _ in range(warm):
        base.step()
    for method in methods:
        net, opt = build(method, layers=layers, **overrides.get(method, {}))
        t0 = time.perf_counter()
        with launches.real():
            for _ in range(warm):
                opt.step()
        log(f"{method}: {warm} warm-up steps with real kernels in "
            f"{time.perf_counter() - t0:.1f} s")
        for _ in range(STUB_WARM):             # stubbed steps settle the host's caches
            opt.step()
        launches.count.clear()
        opt.step()
        per_step = dict(launches.count)
        reads, allocs = host_reads_and_allocations(opt)
        fills = table_fills(opt)
        ours, theirs, ours_cpu, theirs_cpu = [], [], [], []
        gc.collect()                           # no cyclic collection inside a timed step
        gc.disable()
        try:
            _timed(opt, base, net, steps, fresh_grads, ours, theirs, ours_cpu, theirs_cpu)
        finally:
            gc.enable()
        tensors, projected = count_matrices(opt)
        row = dict(method=method, host_us=statistics.median(ours),
                   torch_fused_adamw_us=statistics.median(theirs),
                   host_cpu_us=statistics.median(ours_cpu),
                   torch_fused_adamw_cpu_us=statistics.median(theirs_cpu),
                   # each step against the baseline step right after it: the ratio a slow
                   # drift of the machine's speed over the run does not move
                   x_paired=statistics.median(a / b for a, b in zip(ours_cpu, theirs_cpu)),
                   launches=sum(per_step.values()), launches_by_kernel=per_step,
                   host_reads=sum(reads.values()), host_reads_by_op=reads,
                   allocations=allocs, table_fills=fills,
                   tensors=tensors, projected=projected,
                   overrides=overrides.get(method, {}), fresh_grads=bool(fresh_grads))
        row["x_torch_fused_adamw_wall"] = row["host_us"] / row["torch_fused_adamw_us"]
        row["x_torch_fused_adamw"] = row["host_cpu_us"] / row["torch_fused_adamw_cpu_us"]
        rows.append(row)
        log(f"{method:16s} {row['host_cpu_us']:10.0f} us  {row['x_torch_fused_adamw']:6.2f}x "
            f"torch fused AdamW ({row['torch_fused_adamw_cpu_us']:.0f} us; paired "
            f"{row['x_paired']:.2f}x; wall {row['x_torch_fused_adamw_wall']:.2f}x)  launches "
            f"{row['launches']:5d}  host reads {row['host_reads']}  allocations {allocs}  "
            f"table fills {fills}")


def main(argv=None):
    from lowrank_fused.routing import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default="", help="a note stored with the results")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default 24, LLaMA-1B's count)")
    ap.add_argument("--fresh-grads", action="store_true",
                    help="new gradient tensors before every timed step (as zero_grad("
                         "set_to_none=True) gives), at other addresses; writes "
                         "host-step-fresh-grads-cpu.json")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    load0 = os.getloadavg()[0]
    rows = measure(methods, args.steps, args.warm, layers=args.layers,
                   fresh_grads=args.fresh_grads)
    layout = dict(LAYOUT, **({} if args.layers is None else {"num_hidden_layers": args.layers}))
    result = dict(bench="host_step", layout=layout, rank=RANK, steps=args.steps,
                  warm=args.warm, label=args.label, fresh_grads=args.fresh_grads,
                  python=sys.version.split()[0],
                  torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  loadavg=[load0, os.getloadavg()[0]], rows=rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "host-step-fresh-grads-cpu.json" if args.fresh_grads
                            else "host-step-cpu.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
