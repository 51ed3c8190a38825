"""CPU benchmark of the multi-tensor ops: one call of the CPU twin over every state of
a model vs the per-tensor eager reference loop.

Model: ``lowrank_fused.models.LlamaForCausalLM`` with its default config; GaLore groups
(``routing.galore_param_groups``, rank 32): every targeted Linear contributes low-rank states
R, M, V, N of GaLore's shape ((m, r) when m >= n, else (r, n)), every other parameter a dense
(W, G, M, V). One optimizer step's elementwise work is then

  multi: ``ops_multi.adam_moments_multi`` (with the norms and the non-finite flag) over all
         low-rank states + ``ops_multi.adamw_step_multi`` over all dense parameters, backend
         "cpu": two calls;
  eager: ``ops.adam_moments`` per low-rank tensor + ``ops.adamw_step`` per dense parameter,
         backend "reference" (what the optimizers run on CPU today).

Second part, ``--part optimizer``: one whole ``AdamW.step()`` (torch semantics) over the
dense parameters of LLaMA-60M (``LLAMA_CONFIGS["60m"]``, shapes only): the 17 RMSNorm weights
alone ("norms": many small tensors, where per-tensor call overhead dominates) and with the
token embedding and the output head ("norms+embeddings": GaLore's dense group), with the
optimizer's multi-tensor path (one ``adamw_step_multi`` per step) vs its per-tensor loop
(``opt.multi_tensor = False``: one ``adamw_step`` per parameter), on backend "cpu" (the C++
twin) and "reference" (eager; its multi-tensor op is a loop over the same per-tensor math).

Third part, ``--part gpu`` (CUDA only; what ``bench.gpu_check`` runs): the GPU
comparison on LLaMA-1B's optimizer states (shapes from ``LLAMA_CONFIGS["1b"]``, GaLore rank
256 by default, fp32 states allocated on the device): K2 of every low-rank state as one
``adam_moments_multi`` launch (backend "cuda", the compiled extension) vs one Triton
``adam_moments`` launch per tensor vs the eager reference per tensor, and the dense AdamW step
of the norms and embeddings the same three ways; launch overhead included (wall time around a
synchronised call, median).

Run ``python -m bench.bench_multi_tensor [--part ops,optimizer,gpu] [--repeats N] [--rank R]
[--model NAME] [--threads T] [--out DIR]``; it prints the timings and the ratios, and with
``--out`` writes them to ``DIR/multi-tensor-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lowrank_fused import ops, ops_multi
from lowrank_fused.dispatch import available
from lowrank_fused.models import LLAMA_CONFIGS, LlamaForCausalLM, llama_config
from lowrank_fused.optim import AdamW
from lowrank_fused.routing import galore_param_groups

BETA1, BETA2, EPS, LR, WD, STEP = 0.9, 0.999, 1e-6, 1e-3, 0.01, 10


def build_states(rank: int, model_name: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(model_name) if model_name else None)
    groups = galore_param_groups(model, rank=rank)
    low = groups[0]["params"]
    dense = groups[1]["params"] if len(groups) > 1 else []
    lowrank = []
    for p in low:
        m, n = p.shape
        shape = (m, rank) if m >= n else (rank, n)
        lowrank.append((torch.randn(shape) * 1e-2, torch.randn(shape) * 1e-3,
                        torch.rand(shape) * 1e-5, torch.empty(shape)))
    dense_states = [(p.detach().clone().float(), torch.randn(p.shape) * 1e-2,
                     torch.randn(p.shape) * 1e-3, torch.rand(p.shape) * 1e-5) for p in dense]
    return lowrank, dense_states


def multi_step(lowrank, dense, norms, flag):
    Rs, Ms, Vs, Ns = (list(x) for x in zip(*lowrank))
    ops_multi.adam_moments_multi(Rs, Ms, Vs, Ns, beta1=BETA1, beta2=BETA2, eps=EPS, step=STEP,
                                 eps_mode="hf", norms=norms, nonfinite=flag, backend="cpu")
    if dense:
        Ws, Gs, Ms, Vs = (list(x) for x in zip(*dense))
        ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS,
                                   step=STEP, weight_decay=WD, eps_mode="hf", wd_mode="post",
                                   nonfinite=flag, backend="cpu")


def eager_step(lowrank, dense):
    for R, M, V, N in lowrank:
        ops.adam_moments(R, M, V, N, beta1=BETA1, beta2=BETA2, eps=EPS, step=STEP,
                         eps_mode="hf", backend="reference")
    for W, G, M, V in dense:
        ops.adamw_step(W, G, M, V, lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, step=STEP,
                       weight_decay=WD, eps_mode="hf", wd_mode="post", backend="reference")


def timeit(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_shapes(name: str = "60m"):
    """The dense parameters of a LLaMA config: (norms, embeddings) shapes."""
    cfg = LLAMA_CONFIGS[name]
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    return [(h,)] * (2 * layers + 1), [(vocab, h), (vocab, h)]


def optimizer_step_times(shapes, backend: str, repeats: int):
    """Median times of one ``AdamW.step()`` over parameters of ``shapes`` (fixed gradients),
    multi-tensor and per-tensor path, measured on the same optimizer in alternation (separate
    optimizers and back-to-back blocks bias the comparison with first-touch page faults and
    drift)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opt = AdamW(params, lr=LR, weight_decay=WD, backend=backend)
    times = {True: [], False: []}
    for i in range(2 * (repeats + 2)):
        multi = bool(i % 2)
        opt.multi_tensor = multi
        t0 = time.perf_counter()
        opt.step()
        if i >= 4:                                  # two warm-up steps of each
            times[multi].append(time.perf_counter() - t0)
    return statistics.median(times[True]), statistics.median(times[False])


def optimizer_part(args):
    norms, embeddings = dense_shapes("60m")
    cases = [("norms", norms), ("norms+embeddings", norms + embeddings)]
    backends = [b for b in ("cpu", "reference") if available(b, "cpu")]
    print(f"AdamW.step() over LLaMA-60M dense parameters; torch threads "
          f"{torch.get_num_threads()}")
    ratios = {}
    for label, shapes in cases:
        numel = sum(torch.Size(s).numel() for s in shapes)
        for backend in backends:
            reps = args.repeats if label == "norms" else max(3, args.repeats // 10)
            t_multi, t_loop = optimizer_step_times(shapes, backend, reps)
            ratios[label, backend] = t_loop / t_multi
            print(f"  {label:17s} ({len(shapes)} tensors, {numel} elements), backend "
                  f"{backend!r:11s}: multi-tensor {t_multi * 1e3:8.3f} ms, per-tensor "
                  f"{t_loop * 1e3:8.3f} ms, ratio per-tensor / multi {t_loop / t_multi:.2f}x")
    return ratios


def ops_part(args):
    lowrank, dense = build_states(args.rank, args.model)
    n_low = sum(t[0].numel() for t in lowrank)
    n_dense = sum(t[0].numel() for t in dense)
    norms = torch.zeros(len(lowrank))
    flag = torch.zeros(1, dtype=torch.int32)
    t_multi = timeit(lambda: multi_step(lowrank, dense, norms, flag), args.repeats)
    t_eager = timeit(lambda: eager_step(lowrank, dense), args.repeats)
    print(f"LLaMA {args.model or '(default config)'}, GaLore rank {args.rank}: "
          f"{len(lowrank)} low-rank states ({n_low} elements) + {len(dense)} dense params "
          f"({n_dense} elements); torch threads {torch.get_num_threads()}")
    print(f"  multi-tensor cpu twin (2 calls, norms + flag): {t_multi * 1e3:8.3f} ms")
    print(f"  per-tensor eager reference ({len(lowrank) + len(dense)} calls):  "
          f"{t_eager * 1e3:8.3f} ms")
    print(f"  ratio eager / multi: {t_eager / t_multi:.2f}x")
    return t_eager / t_multi


def _cuda_timeit(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def llama_state_shapes(name: str, rank: int):
    """(low-rank state shapes, dense parameter shapes) of a LLaMA config under GaLore's
    default groups: attention and MLP weights projected ((m, r) when m >= n, else (r, n)),
    norms and embeddings dense; computed from the config, no model built."""
    cfg = LLAMA_CONFIGS[name]
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    mats = [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]
    low = [((m, rank) if m >= n else (rank, n)) for m, n in mats] * layers
    norms, embeddings = dense_shapes(name)
    return low, norms + embeddings


def gpu_part(args):
    """K2 over every low-rank state and the dense AdamW step: one multi-tensor CUDA launch vs
    one Triton launch per tensor vs the eager reference per tensor (module docstring)."""
    if not torch.cuda.is_available():
        raise SystemExit("--part gpu needs CUDA")
    dev = torch.device("cuda")
    name = args.model or "1b"
    rank = args.rank if args.rank != 32 else 256
    low, dense = llama_state_shapes(name, rank)
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(shape, scale):
        return torch.randn(shape, device=dev, generator=gen) * scale

    states = [(randn(s, 1e-2), randn(s, 1e-3), randn(s, 1e-3).abs() * 1e-2,
               torch.empty(s, device=dev)) for s in low]
    params = [(randn(s, 2e-2), randn(s, 1e-2), randn(s, 1e-3), randn(s, 1e-3).abs() * 1e-2)
              for s in dense]
    Rs, Ms, Vs, Ns = (list(x) for x in zip(*states))
    Ws, Gs, Ms2, Vs2 = (list(x) for x in zip(*params))
    kw2 = dict(beta1=BETA1, beta2=BETA2, eps=EPS, step=STEP, eps_mode="hf")
    kwa = dict(lr=LR, beta1=BETA1, beta2=BETA2, eps=EPS, step=STEP, weight_decay=WD,
               eps_mode="hf", wd_mode="post")
    rows = []
    reps = args.repeats

    def k2_multi():
        ops_multi.adam_moments_multi(Rs, Ms, Vs, Ns, backend="cuda", **kw2)

    def k2_loop(backend):
        return lambda: [ops.adam_moments(R, M, V, N, backend=backend, **kw2)
                        for R, M, V, N in states]

    def adamw_multi():
        ops_multi.adamw_step_multi(Ws, Gs, Ms2, Vs2, backend="cuda", **kwa)

    def adamw_loop(backend):
        return lambda: [ops.adamw_step(W, G, M, V, backend=backend, **kwa)
                        for W, G, M, V in params]

    for label, n_t, numel, cases in (
            ("K2 low-rank moments", len(states), sum(t[0].numel() for t in states),
             (("multi-tensor cuda (1 launch)", k2_multi, "cuda"),
              ("triton per tensor", k2_loop("triton"), "triton"),
              ("eager reference per tensor", k2_loop("reference"), "reference"))),
            ("dense AdamW (norms + embeddings)", len(params), sum(t[0].numel() for t in params),
             (("multi-tensor cuda (1 launch)", adamw_multi, "cuda"),
              ("triton per tensor", adamw_loop("triton"), "triton"),
              ("eager reference per tensor", adamw_loop("reference"), "reference")))):
        times = {}
        for case, fn, backend in cases:
            if not available(backend, dev):
                print(f"  {label}: {case}: skipped, backend {backend!r} unavailable")
                continue
            times[case] = _cuda_timeit(fn, reps)
        base = times.get("multi-tensor cuda (1 launch)")
        for case, t in times.items():
            rows.append(dict(op=label, case=case, tensors=n_t, elements=numel,
                             median_ms=t * 1e3, vs_multi=(t / base) if base else None))
            print(f"  {label:34s} {case:30s} {n_t:4d} tensors {numel:>11,d} elements: "
                  f"{t * 1e3:8.3f} ms" + (f"  ({t / base:.2f}x the multi-tensor launch)"
                                          if base else ""))
    return dict(model=name, rank=rank, device=torch.cuda.get_device_name(0), rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="ops,optimizer",
                    help="comma-separated parts: ops (the multi-tensor ops alone), optimizer "
                         "(whole AdamW steps, multi-tensor vs per-tensor), gpu (CUDA: one "
                         "launch vs Triton per tensor vs eager); default ops,optimizer")
    ap.add_argument("--out", default=None, help="write DIR/multi-tensor-<device>.json")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--model", default=None,
                    help="ops part: a name of lowrank_fused.models.LLAMA_CONFIGS (default: the "
                         "default LlamaConfig, the tiny one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    parts = [x.strip() for x in args.part.split(",") if x.strip()]
    bad = [x for x in parts if x not in ("ops", "optimizer", "gpu")]
    if bad or not parts:
        raise SystemExit(f"--part: unknown part(s) {bad}; choose from ops, optimizer, gpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = {}
    if "ops" in parts:
        out["ops"] = ops_part(args)
    if "optimizer" in parts:
        out["optimizer"] = {f"{label} / {backend}": ratio
                            for (label, backend), ratio in optimizer_part(args).items()}
    if "gpu" in parts:
        out["gpu"] = gpu_part(args)
    if args.out:
        device = "cuda" if "gpu" in parts else "cpu"
        path = Path(args.out) / f"multi-tensor-{device}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        out["threads"] = torch.get_num_threads()
        out["torch"] = torch.__version__
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
