"""Suite ``refresh`` of ``bench.run``: the subspace refresh of a whole LLaMA-style
model's matrices, batched randomized SVD (``lowrank_fused.subspace.refresh_bases``) vs the
per-layer ``torch.linalg.svd`` GaLore runs, timed side by side in one process, with the
captured-energy ratio; real gradients (one backward on random tokens) and synthetic decaying
spectra of the same shapes, at q = 1 and the default q = 2 power iterations.

Model: CPU dim 256 x 4 layers, rank 32 (``quick``: dim 128 x 2, rank 16); CUDA dim 1024 x 8
layers, rank 128 (``quick``: dim 512 x 4, rank 64). The measurement itself is
``bench_refresh.measure`` (also runnable alone: ``python -m bench.bench_refresh``).
"""
from __future__ import annotations

import contextlib
import time

import torch

from bench.bench_refresh import decaying_like, measure, model_gradients, without_interpreter


def config(device, quick):
    if device.type == "cuda":
        return (512, 4, 64) if quick else (1024, 8, 128)
    return (128, 2, 16) if quick else (256, 4, 32)


def run(device, *, quick: bool, methods=None, threads: int = 1, backend: str = "auto",
        log=print) -> dict:
    """``methods`` does not apply (the refresh is the same for every method that has one).
    ``backend``: ``reference`` on the CPU times what a CPU user runs (the CPU extension and
    torch) even under ``TRITON_INTERPRET=1``, where the refresh's small Cholesky would
    otherwise run the interpreted kernel (a correctness tool at ~1000x the cost, not a
    speed); ``bench.run`` passes ``reference`` on the CPU unless asked for ``--interpret``.
    ``threads``: the CPU measures with ``max(threads, 2)`` threads, the configuration of the
    committed numbers."""
    dim, layers, rank = config(device, quick)
    old = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(2, int(threads)))
    try:
        with contextlib.ExitStack() as stack:
            if device.type == "cpu" and backend == "reference":
                stack.enter_context(without_interpreter())
            return _run(device, dim, layers, rank, quick, log)
    finally:
        torch.set_num_threads(old)


def _run(device, dim, layers, rank, quick, log) -> dict:
    cfg, grads = model_gradients(dim, layers, device)
    rows, errors = [], []
    for kind, gs in (("real", grads), ("decaying", decaying_like(grads))):
        for q in (1, 2):
            t0 = time.perf_counter()
            try:
                r = measure(gs, rank, 3 if quick else 5, 8, q)
            except Exception as exc:    # record, go on
                errors.append({"case": f"refresh {kind} q={q}",
                               "error": f"{type(exc).__name__}: {exc}"})
                continue
            r.update(gradients=kind, power_iters=q, seconds=time.perf_counter() - t0)
            rows.append(r)
            log(f"  refresh {kind:8s} q={q}: per-layer SVD {1e3 * r['per_layer_svd_s']:.1f}"
                f" ms, batched randomized {1e3 * r['batched_randomized_s']:.1f} ms, "
                f"{r['speedup']:.1f}x, energy {100 * r['energy_ratio']:.2f}%")
    return {"suite": "refresh", "rows": rows, "errors": errors,
            "model": {"hidden_size": dim, "layers": layers, "matrices": len(grads),
                      "shapes": [list(s) for s in sorted({tuple(G.shape) for G in grads})],
                      "rank": rank, "oversample": 8, "threads": torch.get_num_threads()}}
