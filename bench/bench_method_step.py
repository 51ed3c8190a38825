"""Benchmark of one whole optimizer step of every low-rank method on one matrix between
refreshes (the per-method targets: the fused step within 1.3x of its byte floor on
4096x11008, and faster than the eager reference by about their byte ratio), fused
(``backend="triton"``) vs the eager reference (``backend="reference"``) of the same optimizer
class. The byte model is ``bytes.method_step_bytes`` (docs/bytes.md); GaLore's
own step, with the dense comparators, is ``bench_galore_step``.

Refreshes are pushed out of reach (each method's interval keywords set to 10**9) and every
optimizer starts from the state of one warm reference step (shared per method, shape, rank and
dtype, loaded with ``load_state_dict``), so the timed steps are steady ones: LDAdam's per-step
power iteration and GHA's per-step basis update are part of their steps, as in training.

Cases: CUDA: 4096x11008 (LLaMA-7B's MLP) at ranks 128/256/512, fp32 parameters with tf32
GEMMs and bf16 parameters with bf16 GEMMs (``--quick``: 4096x4096, rank 128); CPU: the
harness's small shape (the interpreter's with ``--interpret``).
"""
from __future__ import annotations

import inspect

import torch

from bench import bytes as B
from bench import harness as H
from bench.suite_step import FAR, REFRESH
from lowrank_fused.routing import optimizer_class

OP = "method_step"
METHODS = tuple(m for m in B.METHOD_STEPS if m != "galore")   # galore: bench_galore_step
LR, WD = 1e-3, 1e-2
TARGET_SHAPE = (4096, 11008)
_WARM_STATES = {}


def _grid(device, quick, interpret):
    device = torch.device(device)
    if device.type == "cuda":
        if quick:
            return [((4096, 4096), 128, torch.float32, "tf32"),
                    ((4096, 4096), 128, torch.bfloat16, "bf16")]
        return [(TARGET_SHAPE, r, dt, "tf32" if dt == torch.float32 else "bf16")
                for r in H.RANKS for dt in H.GPU_DTYPES]
    shape, r = (H.INTERPRET_SHAPE, H.INTERPRET_RANK) if interpret else (H.CPU_SHAPE, H.CPU_RANK)
    return [(shape, r, dt, "ieee") for dt in (torch.float32, torch.bfloat16)]


def cases(device, quick, interpret=False):
    out = []
    for method in METHODS:
        for (m, n), r, dt, prec in _grid(device, quick, interpret):
            params = dict(method=method, m=m, n=n, r=r, dtype=dt, precision=prec,
                          side=H.galore_side(m, n))
            out.append((f"{method}-{m}x{n}-r{r}-{H.DTYPE_NAMES[dt]}-{prec}", params))
    return out


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret)


def _group(method, W, rank):
    """The method's group for one matrix, every refresh out of reach (its interval keys,
    ``suite_step.REFRESH``; LDAdam has none: its subspace moves every step)."""
    group = {"params": [W], "rank": rank}
    group.update({key: FAR for key in REFRESH.get(method, ((), None))[0]})
    if method.startswith("adapm"):
        group["block"] = "mlp"
    elif method == "ldadam":
        group["enable_lowrank"] = True
    return group


def _optimizer(params, W, backend):
    """The method's optimizer on W. Where the class offers ``projector="randomized"`` the
    warm step's subspace comes from the randomized range finder instead of a full SVD (the
    timed steps never refresh, so only the warm-up gets shorter)."""
    cls = optimizer_class(params["method"])
    extra = ({"projector": "randomized"}
             if "projector" in inspect.signature(cls).parameters else {})
    return cls([_group(params["method"], W, params["r"])], lr=LR, weight_decay=WD,
               backend=backend, matmul_precision=params["precision"], **extra)


def clear_cache():
    _WARM_STATES.clear()


def make(params, backend, device):
    """A zero-arg callable running one steady optimizer step on a random m x n parameter with
    a fixed random gradient."""
    m, n, dtype = params["m"], params["n"], params["dtype"]
    key = (params["method"], m, n, params["r"], dtype, str(device))
    factory = H.warm_step_factory(lambda W, b: _optimizer(params, W, b), _WARM_STATES, key,
                                  (m, n), dtype, device, backend)
    # W, G and the method's m x n state (LDAdam's error buffer, AdaPM's V) per instance
    per_set = m * n * (2 * dtype.itemsize + 4)
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    m, n, r, p = params["m"], params["n"], params["r"], params["dtype"].itemsize
    return dict(op=f"{OP}:{params['method']}", r=r, precision=params["precision"],
                bytes=B.method_step_bytes(params["method"], m, n, r, param_bytes=p,
                                          state_bytes=4, side=params["side"]),
                flops=B.method_step_flops(params["method"], m, n, r, side=params["side"]),
                note=params["method"])
