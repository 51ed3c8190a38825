"""Subspace refresh of a whole LLaMA-style model: batched randomized SVD
(``lowrank_fused.subspace.refresh_bases``: one call per distinct shape) vs the per-layer full
``torch.linalg.svd`` that GaLore runs (``linalg.canonical_svd_basis``).

Reports, per gradient kind, the refresh time of both (median of ``--repeats``), their ratio,
and the captured energy ``||P^T G||^2 / ||G||^2`` summed over layers (randomized / exact).
Gradient kinds: ``real`` (one backward of the model on random tokens) and ``decaying``
(synthetic, s_i = (i+1)^-1 power law with the layers' shapes; the regime the randomized
refresh targets).

    python -m bench.bench_refresh [--dim 256 --layers 4 --rank 32 --device cpu]

On the CPU the refresh runs what a CPU user gets (the CPU extension and torch): a
``TRITON_INTERPRET=1`` in the environment is set aside while measuring (``--interpret`` keeps
it: the interpreted kernels, for correctness, at ~1000x the cost).

Writes ``bench/results/_scratch/refresh-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from lowrank_fused.linalg import canonical_svd_basis
from lowrank_fused.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank_fused.optim.galore_adamw import projection_side
from lowrank_fused.subspace import captured_energy, refresh_bases

OUT_DIR = Path(__file__).resolve().parent / "results" / "_scratch"


def model_gradients(dim, layers, device, seed=0, tokens=(8, 64)):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=dim, intermediate_size=int(round(8 * dim / 3 / 8)) * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, dim // 64),
                      max_position_embeddings=max(128, tokens[1]))
    model = LlamaForCausalLM(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, tokens, device=device)
    _, loss = model(ids, labels=torch.roll(ids, -1, dims=1))
    loss.backward()
    # GaLore's matrices: the attention and MLP weights of every decoder layer
    return cfg, [p.grad.detach().clone() for n, p in model.named_parameters()
                 if ".layers." in n and p.dim() == 2]


def decaying_like(grads, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for G in grads:
        m, n = G.shape
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
        out.append(((U * s) @ V.t()).to(G.device))
    return out


@contextlib.contextmanager
def without_interpreter():
    """``TRITON_INTERPRET`` unset for the duration (dispatch re-resolves its cached
    implementations when it changes), restored after: timings of the CPU's own path."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure(grads, rank, repeats, oversample, power_iters):
    items = [(G, rank, projection_side(tuple(G.shape), "std")) for G in grads]

    def per_layer():
        return [canonical_svd_basis(G, r, side) for G, r, side in items]

    def batched():
        return refresh_bases(items, projector="randomized", oversample=oversample,
                             power_iters=power_iters)

    t_svd = _time(per_layer, repeats)
    t_rnd = _time(batched, repeats)
    e_svd = sum(float(captured_energy(G, P, s) * G.float().pow(2).sum())
                for (G, _, s), P in zip(items, per_layer()))
    e_rnd = sum(float(captured_energy(G, P, s) * G.float().pow(2).sum())
                for (G, _, s), P in zip(items, batched()))
    worst = min(float(captured_energy(G, P, s) / captured_energy(G, Pe, s))
                for (G, _, s), P, Pe in zip(items, batched(), per_layer()))
    return dict(per_layer_svd_s=t_svd, batched_randomized_s=t_rnd, speedup=t_svd / t_rnd,
                energy_ratio=e_rnd / e_svd, worst_layer_energy_ratio=worst,
                energy_svd=e_svd / sum(float(G.float().pow(2).sum()) for G in grads))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU: keep TRITON_INTERPRET=1 (interpreted kernels, not a speed)")
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    cfg, grads = model_gradients(args.dim, args.layers, args.device)
    shapes = sorted({tuple(G.shape) for G in grads})
    rows = {}
    with contextlib.ExitStack() as stack:
        if torch.device(args.device).type == "cpu" and not args.interpret:
            stack.enter_context(without_interpreter())
        for kind, gs in (("real", grads), ("decaying", decaying_like(grads))):
            for q in sorted({args.power_iters, 1}):
                rows[f"{kind}, q={q}"] = measure(gs, args.rank, args.repeats, args.oversample,
                                                 q)
    result = dict(device=args.device, torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(),
                  model=dict(hidden_size=cfg.hidden_size, layers=cfg.num_hidden_layers,
                             intermediate_size=cfg.intermediate_size),
                  matrices=len(grads), shapes=[list(s) for s in shapes], rank=args.rank,
                  oversample=args.oversample, power_iters=args.power_iters, results=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"refresh-{args.device}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Subspace refresh, {len(grads)} matrices of a LLaMA dim {cfg.hidden_size} x "
             f"{cfg.num_hidden_layers} layers ({args.device}, {result['threads']} threads)", "",
             f"rank {args.rank}, oversample {args.oversample}, q = power iterations; "
             f"shapes {shapes}", "",
             "| gradients, q | per-layer SVD (ms) | batched randomized (ms) | speedup | "
             "energy ratio | worst layer | SVD energy |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {1e3 * r['per_layer_svd_s']:.1f} | "
                     f"{1e3 * r['batched_randomized_s']:.1f} | {r['speedup']:.1f}x | "
                     f"{100 * r['energy_ratio']:.2f}% | {100 * r['worst_layer_energy_ratio']:.2f}% "
                     f"| {100 * r['energy_svd']:.1f}% |")
    md = "\n".join(lines) + "\n"
    (out / f"refresh-{args.device}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
