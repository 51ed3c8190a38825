"""CPU benchmark of the dense AdamW step: ``lowrank_fused.AdamW`` under ``backend="auto"``
(the compiled CPU twin, ``csrc/cpu``) against ``torch.optim.AdamW(fused=True)`` and
``torch.optim.AdamW(foreach=True)``, side by side in one process.

Parameter sets:
  ``4x4096x4096``: four 4096 x 4096 fp32 matrices (67M elements);
  ``llama-60m``: every parameter of LLaMA-60M (``LLAMA_CONFIGS["60m"]``, shapes only: 2
    embeddings, 8 x 7 matrices, 17 norm vectors; 58M elements), fp32, and again in bf16
    (``llama-60m-bf16``: bf16 parameters and gradients, fp32 states for lowrank_fused, the
    parameter dtype for torch, which keeps its states there).

Variants (one ``step()`` each, fixed gradients): ``lowrank_fused.AdamW`` with its default
``nonfinite="raise"`` (a check of every gradient for NaN/Inf before anything is written: one
more read of G, which torch does not do) and with ``nonfinite="ignore"``; with
``backend="reference"`` (the eager reference: what ``auto`` ran on the CPU before) on the
first set only; torch fused and foreach. All variants share the parameters and gradients and
keep their own states; the variants are timed in alternation, round after round, and the
median per variant is reported, so load on a shared machine hits every variant alike.

Bandwidth: bytes = elements x (read+write W, read G, read+write M and V) = 28 B/element for
fp32 (torch's states in bf16 for the bf16 set count as 2 B). The JSON records the machine's
load average at the start and the end: on a shared machine the absolute numbers mean little,
the ratios between variants (timed in alternation) are what the run shows.

Second part, ``ops``: each op whose CPU twin ``auto`` takes (``dispatch.AUTO_ON_CPU``) against
its eager reference, and the optimizer's non-finite check (``ops.nonfinite_flag``: compiled
pass vs torch's ``_foreach_norm(ord=inf)``); third, ``isa``: the multi-tensor AdamW op with
each instruction set of the twin (``_C.set_cpu_isa``).

``python -m bench.bench_adamw_cpu [--part optimizer,ops,isa] [--repeats N] [--threads T]
[--sets NAME,...] [--out DIR]`` prints the table and with ``--out`` writes
``DIR/adamw-cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.bench_multi_tensor import llama_state_shapes
from lowrank_fused import _ext, ops, ops_multi
from lowrank_fused.dispatch import available, choose_backend, lookup
from lowrank_fused.models import LLAMA_CONFIGS
from lowrank_fused.optim import AdamW

LR, WD = 1e-3, 1e-2


def llama_shapes(name: str = "60m"):
    cfg = LLAMA_CONFIGS[name]
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    per_layer = [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)] + [(h,)] * 2
    return [(vocab, h)] + per_layer * layers + [(h,), (vocab, h)]


SETS = {
    "4x4096x4096": ([(4096, 4096)] * 4, torch.float32),
    "llama-60m": (llama_shapes("60m"), torch.float32),
    "llama-60m-bf16": (llama_shapes("60m"), torch.bfloat16),
}


def variants(with_reference: bool):
    out = {
        "lowrank_fused.AdamW (auto)": lambda ps: AdamW(ps, lr=LR, weight_decay=WD),
        "lowrank_fused.AdamW (auto, nonfinite='ignore')":
            lambda ps: AdamW(ps, lr=LR, weight_decay=WD, nonfinite="ignore"),
        "torch.optim.AdamW(fused=True)":
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True),
        "torch.optim.AdamW(foreach=True)":
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, foreach=True),
    }
    if with_reference:
        out["lowrank_fused.AdamW (backend='reference')"] = (
            lambda ps: AdamW(ps, lr=LR, weight_decay=WD, backend="reference"))
    return out


def step_bytes(params, opt) -> int:
    total = 0
    for p in params:
        st = opt.state[p]
        s_size = st["exp_avg"].element_size() if "exp_avg" in st else 4
        total += p.numel() * (2 * p.element_size() + p.grad.element_size() + 4 * s_size)
    return total


def optimizer_part(args):
    results = []
    for set_name in args.sets:
        shapes, dtype = SETS[set_name]
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(dtype))
                  for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(dtype)
        numel = sum(p.numel() for p in params)
        opts = {name: make(params) for name, make in
                variants(set_name == "4x4096x4096" and not args.no_reference).items()}
        times = {name: [] for name in opts}
        for name, opt in opts.items():         # first step: state allocation, not timed
            opt.step()
        for r in range(args.repeats):
            for name, opt in opts.items():
                if "reference" in name and r >= args.reference_repeats:
                    continue
                t0 = time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t0)
        print(f"{set_name}: {len(params)} tensors, {numel:,} elements, {dtype}; torch threads "
              f"{torch.get_num_threads()}")
        base = statistics.median(times["torch.optim.AdamW(fused=True)"])
        for name, opt in opts.items():
            t = statistics.median(times[name])
            nbytes = step_bytes(params, opt)
            row = dict(set=set_name, variant=name, tensors=len(params), elements=numel,
                       dtype=str(dtype).replace("torch.", ""), ms=t * 1e3,
                       ms_min=min(times[name]) * 1e3, repeats=len(times[name]),
                       bytes=nbytes, gbps=nbytes / t / 1e9,
                       gbps_28=28 * numel / t / 1e9, vs_torch_fused=base / t)
            results.append(row)
            print(f"  {name:48s} {t * 1e3:9.1f} ms (min {row['ms_min']:8.1f})  "
                  f"{row['gbps']:6.1f} GB/s  x{row['vs_torch_fused']:.2f} of torch fused")
        del opts, params
    return results


def _pair(label, fns, repeats):
    """Alternating medians of {variant: fn}."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
    ref = med.get("reference")
    print(f"  {label:58s} " + "  ".join(f"{k} {v:9.3f} ms" for k, v in med.items())
          + (f"  ref/twin {ref / med['cpu']:.2f}x" if ref and "cpu" in med else ""))
    return dict(op=label, ms=med)


def ops_part(args):
    if not available("cpu", "cpu"):
        print("ops: the extension is not built; nothing to compare")
        return []
    print(f"ops: CPU twin vs eager reference; torch threads {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(1)
    rows = []
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, c1=0.5, c2=0.1, pre_scale=0.99999,
              post_decay=0.0)
    for shape in [(4096, 4096), (512,), (32000, 512)]:
        W, G = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        M, V = torch.zeros(shape), torch.zeros(shape)
        fns = {b: (lambda b=b: lookup("adamw_step", b)(W, G, M, V, **kw))
               for b in ("cpu", "reference")}
        rows.append(_pair(f"adamw_step {shape}", fns, args.repeats))
    shapes = llama_shapes("60m")
    Ws = [torch.randn(s, generator=gen) for s in shapes]
    Gs = [torch.randn(s, generator=gen) for s in shapes]
    Ms = [torch.zeros(s) for s in shapes]
    Vs = [torch.zeros(s) for s in shapes]
    mkw = {k: [v] * len(shapes) for k, v in kw.items()}
    fns = {b: (lambda b=b: lookup("adamw_step_multi", b)(Ws, Gs, Ms, Vs, **mkw))
           for b in ("cpu", "reference")}
    rows.append(_pair(f"adamw_step_multi llama-60m ({len(shapes)} tensors)", fns, args.repeats))
    del Ws, Gs, Ms, Vs
    rank = 128
    low, _ = llama_state_shapes("60m", rank)
    Rs = [torch.randn(s, generator=gen) for s in low]
    Ms = [torch.zeros(s) for s in low]
    Vs = [torch.zeros(s) for s in low]
    Ns = [torch.empty(s) for s in low]
    norms = torch.zeros(len(low))
    flag = torch.zeros(1, dtype=torch.int32)
    mkw = dict(beta1=[0.9] * len(low), beta2=[0.999] * len(low), eps=[1e-6] * len(low),
               c1=[1.0] * len(low), c2=[1.0] * len(low), norms=norms, nonfinite=flag)
    fns = {b: (lambda b=b: lookup("adam_moments_multi", b)(Rs, Ms, Vs, Ns, **mkw))
           for b in ("cpu", "reference")}
    rows.append(_pair(f"adam_moments_multi llama-60m rank {rank} ({len(low)} tensors, "
                      f"norms+flag)", fns, args.repeats))
    A = torch.randn(16, 40, 40, generator=gen, dtype=torch.float64).float()
    Gram = A @ A.transpose(-1, -2) + 40 * torch.eye(40)
    Linv, okf = torch.empty_like(Gram), torch.empty(16, dtype=torch.int32)
    fns = {b: (lambda b=b: lookup("small_cholesky_inverse", b)(Gram, Linv, okf,
                                                                 pivot_ratio_tol=1e-6))
           for b in ("cpu", "reference")}
    rows.append(_pair("small_cholesky_inverse 16 x 40 x 40", fns, args.repeats))
    grads = [torch.randn(4096, 4096, generator=gen) for _ in range(4)]
    from lowrank_fused import _ext_ops

    fns = {"cpu": lambda: _ext_ops.nonfinite_flag_cpu(grads),
           "reference": lambda: ~torch.isfinite(torch.stack(
               torch._foreach_norm(grads, ord=math.inf))).all()}
    rows.append(_pair("nonfinite_flag 4 x 4096 x 4096 (twin vs torch _foreach_norm inf)", fns,
                      args.repeats))
    auto = {op: choose_backend("auto", "cpu", (op,)) for op in
            ("adamw_step", "adamw_step_multi", "adam_moments", "adam_moments_multi",
             "small_cholesky_inverse")}
    print(f"  auto on CPU takes: {auto}")
    return rows


def isa_part(args):
    if not available("cpu", "cpu"):
        return []
    mod = _ext.load()
    shapes = [(4096, 4096)] * 4
    gen = torch.Generator().manual_seed(2)
    Ws = [torch.randn(s, generator=gen) for s in shapes]
    Gs = [torch.randn(s, generator=gen) for s in shapes]
    Ms = [torch.zeros(s) for s in shapes]
    Vs = [torch.zeros(s) for s in shapes]
    numel = sum(w.numel() for w in Ws)
    fns = {}
    for isa in mod.cpu_isas():
        def run(isa=isa):
            old = mod.set_cpu_isa(isa)
            try:
                ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, lr=1e-3, beta1=0.9, beta2=0.999,
                                           eps=1e-8, step=3, weight_decay=WD, backend="cpu")
            finally:
                mod.set_cpu_isa(old)
        fns[isa] = run
    print(f"isa: adamw_step_multi over 4 x 4096 x 4096 fp32 per instruction set "
          f"(default {mod.cpu_isa()})")
    row = _pair("adamw_step_multi 4x4096x4096", fns, args.repeats)
    row["gbps_28"] = {k: 28 * numel / (v / 1e3) / 1e9 for k, v in row["ms"].items()}
    print("  GB/s at 28 B/element: " + ", ".join(f"{k} {v:.1f}"
                                                 for k, v in row["gbps_28"].items()))
    return [row]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="optimizer,ops,isa")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--reference-repeats", type=int, default=3)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.sets = [s for s in args.sets.split(",") if s]
    for s in args.sets:
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r} (have {', '.join(SETS)})")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    parts = args.part.split(",")
    out = dict(benchmark="adamw-cpu", torch=torch.__version__, threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(),
               cpu_capability=torch.backends.cpu.get_cpu_capability(),
               twin_isa=_ext.load().cpu_isa() if available("cpu", "cpu") else None,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        out["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    if "optimizer" in parts:
        out["optimizer"] = optimizer_part(args)
    if "ops" in parts:
        out["ops"] = ops_part(args)
    if "isa" in parts:
        out["isa"] = isa_part(args)
    try:
        out["load_average_at_end"] = os.getloadavg()
    except OSError:
        pass
    if args.out:
        path = Path(args.out) / "adamw-cpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
