"""Accuracy of the fused GEMMs' operand precisions (``ieee | tf32x3 | tf32 | bf16``), on CPU.

Not a timing: what each mode costs in accuracy, the other half of the choice that
docs/precision.md makes with the GPU roofline.

1. ops: K1 (``R = P^T G``) and K3 (``P @ N``, written by backproject_update into a zero W with
   coef -1) at LLaMA-like shapes, each mode's result against the fp64 product of the same fp32
   operands: ``max_rel = max|err| / max|exact|`` (normwise) and ``mean_rel = mean|err| /
   mean|exact|``. The eager reference computes every mode as the kernels do (operands rounded
   to TF32/bf16, or split hi + lo for tf32x3, products exact, fp32 sums); with ``--interpret``
   the Triton kernels themselves run too (the interpreter emulates the same rounding) on the
   smaller shape.
2. trajectory: GaLore-AdamW on the tiny LLaMA (dim 128, 2 layers, rank 32, refresh every 10
   steps) for 30 steps on byte-level standard-library text, one run per mode from the same
   initial weights and batches; each mode's weights and first moments against the ieee run's:
   ``weights = max|W - W_ieee| / max|W_ieee - W_0|`` (relative to the distance travelled) and
   ``exp_avg = max|M - M_ieee| / max|M_ieee|``, the worst projected matrix. The row "ieee
   (triton)" (``--interpret``) is the same ieee run with the Triton kernels' summation order:
   the fp32 reordering noise floor the other modes compare against.

    python -m bench.bench_matmul_precision --out bench/results/matmul-precision-cpu.json \
        [--interpret] [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

MODES = ("ieee", "tf32x3", "tf32", "bf16")
OP_CASES = [((1024, 2752), 128), ((1024, 2752), 512), ((4096, 11008), 128)]
INTERPRET_CASES = [((1024, 2752), 128)]


def _orthonormal(m, r, gen):
    import torch

    return torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))[0].float()


def _errors(out, exact):
    err = (out.double() - exact).abs()
    return dict(max_rel=(err.max() / exact.abs().max()).item(),
                mean_rel=(err.mean() / exact.abs().mean()).item())


def op_rows(cases, backend, seed=0):
    """One row per (op, shape, rank, mode): the errors against fp64."""
    import torch

    from lowrank_fused import ops

    rows = []
    for (m, n), r in cases:
        gen = torch.Generator().manual_seed(seed)
        P = _orthonormal(m, r, gen)
        G = torch.randn(m, n, generator=gen)
        N = torch.randn(r, n, generator=gen)    # an Adam-normalised step: entries ~1
        exact = {"project": P.double().t() @ G.double(),
                 "backproject_update": P.double() @ N.double()}
        for op in ("project", "backproject_update"):
            for mode in MODES:
                t0 = time.perf_counter()
                if op == "project":
                    out = ops.project(G, P, precision=mode, backend=backend)
                else:
                    out = ops.backproject_update(torch.zeros(m, n), P, N, coef=-1.0,
                                                 precision=mode, backend=backend)
                rows.append(dict(op=op, m=m, n=n, r=r, mode=mode, backend=backend,
                                 seconds=round(time.perf_counter() - t0, 3),
                                 **_errors(out, exact[op])))
                print(f"{op:20s} {m}x{n} r{r:<4d} {backend:9s} {mode:7s} "
                      f"max {rows[-1]['max_rel']:.2e} mean {rows[-1]['mean_rel']:.2e}",
                      flush=True)
    return rows


def trajectory(mode, backend, steps, seed=0):
    """GaLore-AdamW on the tiny LLaMA: (initial projected weights, final projected weights,
    their first moments, final loss)."""
    import torch

    from lowrank_fused import GaLoreAdamW
    from lowrank_fused.data import BatchSampler, load_stdlib_corpus
    from lowrank_fused.models.llama import LlamaForCausalLM, llama_config
    from lowrank_fused.routing import galore_param_groups

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config("tiny"))
    groups = galore_param_groups(model, rank=32, update_proj_gap=10, scale=0.25)
    opt = GaLoreAdamW(groups, lr=1e-2, backend=backend, matmul_precision=mode)
    projected = groups[0]["params"]
    W0 = [p.detach().clone() for p in projected]
    corpus = load_stdlib_corpus(max_bytes=1 << 20, seed=seed)
    sampler = BatchSampler(corpus.train, batch_size=8, seq_len=128, seed=seed)
    for _ in range(steps):
        x, y = sampler.next_batch()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    W = [p.detach().clone() for p in projected]
    M = [opt.state[p]["exp_avg"].clone() for p in projected]
    return W0, W, M, loss.item()


def trajectory_rows(steps, interpret):
    runs = [(mode, "reference") for mode in MODES]
    if interpret:
        runs += [(mode, "triton") for mode in MODES]
    base = None
    rows = []
    for mode, backend in runs:
        t0 = time.perf_counter()
        W0, W, M, loss = trajectory(mode, backend, steps)
        if base is None:
            base = (W, M)
        weights = max(((w - b).abs().max() / (b - w0).abs().max()).item()
                      for w, b, w0 in zip(W, base[0], W0))
        moments = max(((m - b).abs().max() / b.abs().max()).item()
                      for m, b in zip(M, base[1]))
        rows.append(dict(mode=mode, backend=backend, steps=steps, loss=loss,
                         weights_vs_ieee=weights, exp_avg_vs_ieee=moments,
                         seconds=round(time.perf_counter() - t0, 1)))
        print(f"trajectory {mode:7s} {backend:9s} loss {loss:.4f} weights {weights:.2e} "
              f"exp_avg {moments:.2e}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.bench_matmul_precision")
    ap.add_argument("--out", default="bench/results/_scratch/matmul-precision-cpu.json")
    ap.add_argument("--interpret", action="store_true",
                    help="also run the Triton kernels (TRITON_INTERPRET=1)")
    ap.add_argument("--quick", action="store_true", help="the first shape and 5 steps only")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.interpret:
        if "lowrank_fused.kernels" in sys.modules:
            raise SystemExit("--interpret must be set before the kernels are imported")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from bench.harness import environment, git_commit

    torch.set_num_threads(args.threads)
    cases = OP_CASES[:1] if args.quick else OP_CASES
    steps = 5 if args.quick else args.steps
    ops_out = op_rows(cases, "reference")
    if args.interpret:
        ops_out += op_rows(INTERPRET_CASES, "triton")
    result = dict(what="matmul precision accuracy (CPU); see bench/bench_matmul_precision.py",
                  commit=git_commit(), environment=environment(torch.device("cpu")),
                  threads=args.threads, ops=ops_out,
                  trajectory=trajectory_rows(steps, args.interpret))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
