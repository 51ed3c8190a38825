"""Distributed and per-layer sanity figures on CPU, measured side by side in one run:

* DDP with 2 gloo processes vs one process on the same global batch: optimizer step time and
  whole-iteration time (median over steps after warm-up), per method. On a 2-core CPU the two
  ranks share the cores, so this is a sanity figure (the wrapper costs what the all-reduce
  costs), not a scaling measurement.
* Per-layer update in backward (``lowrank_fused.per_layer.PerLayerStep``) vs ``opt.step()``:
  the peak bytes of gradients alive at once (counted with hooks: deterministic) and the
  iteration time, on a GaLore-paper model size.

    python -m bench.bench_distributed [--model tiny] [--steps 12] [--methods galore,adamw]
                                      [--per-layer-model 60m]

Writes ``bench/results/_scratch/distributed-cpu.{json,md}`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OUT_DIR = Path(__file__).resolve().parent / "results" / "_scratch"
PER_RANK = 4
SEQ = 64


def _model(name):
    from lowrank_fused.models.llama import LlamaForCausalLM, llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(name, max_position_embeddings=SEQ + 1))


def _batch(t, rows, vocab):
    g = torch.Generator().manual_seed(t)
    return torch.randint(0, vocab, (rows, SEQ + 1), generator=g)


def _kwargs(method):
    return {} if method in ("adamw", "adafactor") else dict(rank=32, update_proj_gap=200)


def _iterate(model, forward, opt, steps, rows_of, vocab):
    """(median iteration s, median optimizer-step s) after 2 warm-up steps."""
    it, st = [], []
    for t in range(steps + 2):
        ids = rows_of(_batch(t, 2 * PER_RANK, vocab))
        t0 = time.perf_counter()
        _, loss = forward(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if t >= 2:
            it.append(t2 - t0)
            st.append(t2 - t1)
    return statistics.median(it), statistics.median(st)


def _ddp_worker(rank, world, port, model_name, methods, steps, out):
    import lowrank_fused as lf
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {}
        for method in methods:
            model = _model(model_name)
            ddp = DDP(model)
            opt = lf.make_optimizer(model, method, **_kwargs(method))
            res[method] = _iterate(model, ddp, opt, steps,
                                   lambda ids: ids[rank * PER_RANK:(rank + 1) * PER_RANK],
                                   model.config.vocab_size)
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def ddp_vs_single(model_name, methods, steps):
    import lowrank_fused as lf
    from lowrank_fused.testing.distributed import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ddp.pt")
        mp.spawn(_ddp_worker, args=(2, free_port(), model_name, methods, steps, out),
                 nprocs=2, join=True)
        ddp = torch.load(out, weights_only=True)
    torch.set_num_threads(2)
    rows = []
    for method in methods:
        model = _model(model_name)
        opt = lf.make_optimizer(model, method, **_kwargs(method))
        single = _iterate(model, model, opt, steps, lambda ids: ids, model.config.vocab_size)
        rows.append(dict(method=method, single_iter_s=single[0], single_step_s=single[1],
                         ddp_iter_s=ddp[method][0], ddp_step_s=ddp[method][1],
                         iter_ratio=ddp[method][0] / single[0],
                         step_ratio=ddp[method][1] / single[1]))
    return rows


def per_layer_memory(model_name, method, steps):
    import lowrank_fused as lf
    from lowrank_fused.per_layer import PerLayerStep

    torch.set_num_threads(2)
    out = {}
    for mode in ("step", "per_layer"):
        model = _model(model_name)
        opt = lf.make_optimizer(model, method, **_kwargs(method))
        params = list(model.parameters())
        peak = [0]

        def count(_):        # runs before the stepper's hook (registered first): the gradient
            alive = sum(p.grad.numel() * p.grad.element_size() for p in params   # just made
                        if p.grad is not None)                                  # is counted
            peak[0] = max(peak[0], alive)
        hooks = [p.register_post_accumulate_grad_hook(count) for p in params]
        stepper = PerLayerStep(opt) if mode == "per_layer" else None
        times = []
        for t in range(steps + 1):
            ids = _batch(t, 1, model.config.vocab_size)
            t0 = time.perf_counter()
            _, loss = model(ids[:, :-1], labels=ids[:, 1:])
            loss.backward()
            if stepper is None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if t >= 1:
                times.append(time.perf_counter() - t0)
        for h in hooks:
            h.remove()
        out[mode] = dict(peak_grad_bytes=peak[0], iter_s=statistics.median(times))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(model=model_name, method=method, param_bytes=total, **{
        f"{k}_{m}": v for m, d in out.items() for k, v in d.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--methods", default="galore,ldadam,adamw")
    ap.add_argument("--per-layer-model", default="60m")
    ap.add_argument("--per-layer-steps", type=int, default=3)
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    ddp_rows = ddp_vs_single(args.model, methods, args.steps)
    pl = per_layer_memory(args.per_layer_model, "galore", args.per_layer_steps)
    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed-cpu.json").write_text(json.dumps(
        dict(env=env, ddp=ddp_rows, per_layer=pl, model=args.model, steps=args.steps), indent=1))
    lines = [f"# DDP (2 gloo processes) vs one process, LLaMA {args.model}, global batch "
             f"{2 * PER_RANK} x {SEQ} tokens (CPU, {os.cpu_count()} cores; sanity figure)", "",
             "| method | single iter (ms) | DDP iter (ms) | ratio | single opt.step (ms) | "
             "DDP opt.step (ms) | ratio |", "|---|---|---|---|---|---|---|"]
    for r in ddp_rows:
        lines.append(f"| {r['method']} | {1e3 * r['single_iter_s']:.1f} | "
                     f"{1e3 * r['ddp_iter_s']:.1f} | {r['iter_ratio']:.2f}x | "
                     f"{1e3 * r['single_step_s']:.2f} | {1e3 * r['ddp_step_s']:.2f} | "
                     f"{r['step_ratio']:.2f}x |")
    mib = 2 ** 20
    lines += ["", f"# Per-layer update in backward, LLaMA {pl['model']}, GaLore rank 32, "
              "1 x 64 tokens", "",
              "| mode | peak gradient bytes alive | iteration (s) |", "|---|---|---|",
              f"| opt.step() | {pl['peak_grad_bytes_step'] / mib:.1f} MiB | "
              f"{pl['iter_s_step']:.2f} |",
              f"| per-layer | {pl['peak_grad_bytes_per_layer'] / mib:.1f} MiB | "
              f"{pl['iter_s_per_layer']:.2f} |", "",
              f"Parameters: {pl['param_bytes'] / mib:.1f} MiB; per-layer mode keeps "
              f"{pl['peak_grad_bytes_per_layer'] / pl['peak_grad_bytes_step']:.1%} of the "
              "gradient memory of a normal step alive at its peak."]
    (out / "distributed-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
