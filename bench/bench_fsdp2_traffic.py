"""Bytes each method communicates under FSDP2, counted (not timed: gloo on a CPU times noise).

One LLaMA decoder layer's seven matrices at a named size (``1b``: q, k, v, o 2048 x 2048;
gate, up 5461 x 2048; down 2048 x 5461), each ``fully_shard``-ed over 2 gloo processes (dim-0
row shards, unequal where 5461 rows split 2731 / 2730). Every method runs three steps from
``make_optimizer`` with its defaults and ``rank``; ``lowrank_fused.sharded`` counts the bytes
each rank sends into the optimizer's all-reduces and gathers. Reported per method, as a
multiple of the layer's fp32 gradient bytes (what a gathered gradient would move):

* ``first step``: the first refresh (every method computes its first basis there) and the step;
* ``steady step``: the mean of steps 2 and 3 (no refresh for a method whose interval is longer).

FSDP2's own reduce-scatter of the gradients and all-gather of the weights are not counted:
they are the same for every optimizer.

    python -m bench.bench_fsdp2_traffic [--model 1b] [--rank 512] [--methods galore,ldadam]

Writes ``bench/results/fsdp2-traffic-cpu.{json,md}`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

OUT_DIR = Path(__file__).resolve().parent / "results"
SIZES = {"1b": (2048, 5461), "60m": (512, 1376), "tiny": (48, 67)}
STEPS = 3
SIZE_D = [0]            # the worker's hidden size (AdaPM-mini's head_dim)


class Layer(torch.nn.Module):
    """The seven matrices of a decoder layer as a chain of Linear maps (a gradient for each)."""

    NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")

    def __init__(self, d, f):
        super().__init__()
        dims = ((d, d), (d, d), (d, d), (d, d), (d, f), (f, d), (d, f))
        for name, (i, o) in zip(self.NAMES, dims):
            setattr(self, name, torch.nn.Linear(i, o, bias=False))

    def forward(self, x):
        for name in self.NAMES:
            x = getattr(self, name)(x)
        return x


def _kwargs(method, rank):
    """Each method's defaults, with the rank of its low-rank groups and a learning rate."""
    if method == "adafactor":
        return {}                       # relative step sizes: no lr
    if method in ("adamw", "adapm"):
        return {"lr": 1e-4}             # one group of every parameter (AdaPM classifies them)
    if method == "adapm_mini":
        return {"lr": 1e-4, "head_dim": 64 if SIZE_D[0] % 64 == 0 else 16}
    return {"lr": 1e-4, "rank": rank, "target_modules": "proj"}


def _worker(rank, world, port, size, rank_r, methods, out_dir):
    import lowrank_fused as lf
    from lowrank_fused import sharded
    from torch.distributed.fsdp import fully_shard

    from lowrank_fused.testing.distributed import gloo_group

    with gloo_group(rank, world, port):
        d, f = SIZES[size]
        SIZE_D[0] = d
        rows = {}
        for method in methods:
            torch.manual_seed(0)
            layer = Layer(d, f)
            for name in Layer.NAMES:
                fully_shard(getattr(layer, name))
            fully_shard(layer)
            try:
                opt = lf.make_optimizer(layer, method, backend="reference",
                                        **_kwargs(method, min(rank_r, d - 1)))
                sent = []
                for t in range(STEPS):
                    g = torch.Generator().manual_seed(t)
                    x = torch.randn(4, d, generator=g)
                    layer(x).square().mean().backward()
                    before = sharded.traffic()["bytes"]
                    opt.step()
                    sent.append(sharded.traffic()["bytes"] - before)
                    opt.zero_grad(set_to_none=True)
                rows[method] = {"bytes_per_step": sent}
            except Exception as e:            # a method without a sharded path says so
                rows[method] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.save(rows, os.path.join(out_dir, f"traffic-{rank}.pt"))


def measure(size, rank_r, methods, world=2):
    from lowrank_fused.testing.distributed import free_port

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, free_port(), size, rank_r, list(methods), tmp),
                 nprocs=world, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"traffic-{r}.pt"), weights_only=True)
                    for r in range(world)]
    d, f = SIZES[size]
    grad_bytes = 4 * (4 * d * d + 3 * d * f)
    out = []
    for method in methods:
        row = {"method": method, "gradient_bytes": grad_bytes}
        r0 = per_rank[0][method]
        if "error" in r0:
            row["error"] = r0["error"]
        else:
            sent = [max(r[method]["bytes_per_step"][t] for r in per_rank) for t in range(STEPS)]
            steady = sum(sent[1:]) / (STEPS - 1)
            row.update(bytes_per_step=sent, first_step_bytes=sent[0], steady_step_bytes=steady,
                       first_step_x_gradient=sent[0] / grad_bytes,
                       steady_step_x_gradient=steady / grad_bytes)
        out.append(row)
    return out


def markdown(rows, size, rank_r):
    lines = [f"# Bytes communicated by the optimizer under FSDP2 (2 ranks, one LLaMA-{size} "
             f"layer, rank {rank_r})", "",
             "Bytes one rank sends into the optimizer's all-reduces and gathers (the larger "
             "rank), as a multiple of the layer's fp32 gradient bytes.", "",
             "| method | first step (refresh) | x gradient | steady step | x gradient |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | refused: {r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['first_step_bytes'] / 1e6:.2f} MB | "
                     f"{r['first_step_x_gradient']:.3f} | {r['steady_step_bytes'] / 1e6:.2f} MB | "
                     f"{r['steady_step_x_gradient']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from lowrank_fused.routing import METHODS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(SIZES))
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    rows = measure(args.model, args.rank, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": args.model, "rank": args.rank, "world": 2, "rows": rows}
    (out / "fsdp2-traffic-cpu.json").write_text(json.dumps(doc, indent=1))
    md = markdown(rows, args.model, args.rank)
    (out / "fsdp2-traffic-cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
