"""Benchmark of the grouped Adafactor step (``kernels/adafactor_step.py``:
``GroupedAdafactorStep``, what ``lowrank_fused.optim.Adafactor``'s step engine runs per class of
same-shape parameters; docs/methods/adafactor.md): a group of same-shape tensors, as a LLaMA
has tens of layers per shape, stepped three ways:

* ``grouped``/``triton``: one ``GroupedAdafactorStep`` call for the whole group (five
  launches factored, three unfactored, whatever the group size), bound once as the engine
  binds it;
* ``per-matrix``/``triton``: a Python loop of the single-tensor op ``adafactor_step`` (a group
  of one per call: what ``opt.engine = False`` runs);
* ``eager``/``reference``: a loop of the eager reference.

Forms: ``adafactor_grouped_step`` (factored matrices, no momentum) and
``adafactor_grouped_step:unfactored`` (1-D vectors: LLaMA's norms, where the launches, not the
bytes, are the cost). Scalars as ``bench/bench_adafactor_step.py`` (the optimizer's defaults at
step 10). Rows carry the per-tensor shape and the group's total byte floor (count x the single
op's, ``bench.bytes``); the note says the group size. Grid on CUDA: 32 x (4096, 4096) and
32 x (11008, 4096) in bf16, 32 x (4096, 4096) in fp32, and 65 x (4096,) vectors; ``--quick``:
32 x (4096, 4096) bf16 and the vectors. CPU: a group of 4 small matrices, eager only (with
``--interpret``: 3 tiny ones, the Triton variants under the interpreter, not a speed
measurement).

Run it with ``python -m bench.run --only adafactor_grouped_step`` once ``bench/run.py`` lists
it in ``MODULES``.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from bench.bench_adafactor_step import KW
from lowrank_fused.dispatch import implementation

OP = "adafactor_step"
NAME = "adafactor_grouped_step"
LOOP = "loop:"                  # backend prefix of the per-matrix variant
GPU_COUNT, CPU_COUNT, INTERPRET_COUNT, VEC_COUNT = 32, 4, 3, 65


def _grid(device, quick, interpret):
    """``[(count, shape, dtype)]``: (m, n) matrices or (n,) vectors."""
    bf16, f32 = torch.bfloat16, torch.float32
    if torch.device(device).type == "cuda":
        vec = (VEC_COUNT, (4096,), bf16)
        if quick:
            return [(GPU_COUNT, (4096, 4096), bf16), vec]
        return [(GPU_COUNT, (4096, 4096), bf16), (GPU_COUNT, (11008, 4096), bf16),
                (GPU_COUNT, (4096, 4096), f32), vec]
    if interpret:
        return [(INTERPRET_COUNT, H.INTERPRET_SHAPE, dt) for dt in (f32, bf16)] + [
            (INTERPRET_COUNT, (H.INTERPRET_SHAPE[1],), f32)]
    return [(CPU_COUNT, H.CPU_SHAPE, dt) for dt in (f32, bf16)] + [
        (CPU_COUNT, (H.CPU_SHAPE[1],), f32)]


def cases(device, quick, interpret=False):
    out = []
    for count, shape, dt in _grid(device, quick, interpret):
        m, n = shape if len(shape) == 2 else (1, shape[0])
        params = dict(count=count, m=m, n=n, factored=len(shape) == 2, dtype=dt, r=None,
                      precision=None, side=None)
        out.append((f"{NAME}-{count}x{'x'.join(map(str, shape))}-{H.DTYPE_NAMES[dt]}", params))
    return out


def variants(params, device, interpret=False):
    """grouped and per-matrix Triton when the op has a Triton implementation, and the eager
    loop."""
    fused = H.triton_usable(device, interpret) and H.triton_implemented(OP, device)
    out = [("grouped", "triton"), ("per-matrix", LOOP + "triton")] if fused else []
    return out + [("eager", "reference")]


def make(params, backend, device):
    """A zero-arg callable stepping a group of fresh random tensors once."""
    count, m, n, dtype, factored = (params[k] for k in ("count", "m", "n", "dtype", "factored"))
    loop = backend.startswith(LOOP)
    backend = backend[len(LOOP):] if loop else backend
    shape = (1, m, n) if factored else (n,)
    f32 = torch.float32
    scalars = (KW["rho"], KW["beta2t"], KW["eps1"], KW["eps2"], KW["clip_threshold"], None,
               KW["weight_decay"])

    def factory():
        Ws = [H.random_tensor(shape, dtype, device) for _ in range(count)]
        Gs = [H.random_tensor(shape, dtype, device, scale=1e-2) for _ in range(count)]
        if factored:
            rows = [H.random_tensor((1, m), f32, device, positive=True, scale=1e-4)
                    for _ in range(count)]
            cols = [H.random_tensor((1, n), f32, device, positive=True, scale=1e-4)
                    for _ in range(count)]
            Vs = None
        else:
            rows = cols = None
            Vs = [H.random_tensor(shape, f32, device, positive=True, scale=1e-4)
                  for _ in range(count)]
        if backend == "triton" and not loop:
            from lowrank_fused.kernels.adafactor_step import GroupedAdafactorStep

            step = GroupedAdafactorStep(Ws, rows, cols, Vs, None, shape=shape,
                                        scale_parameter=KW["scale_parameter"])
            return lambda: step(Gs, [scalars])
        impl = implementation(OP, backend, device)
        members = [(W, G, rows[i] if factored else None, cols[i] if factored else None,
                    None if factored else Vs[i]) for i, (W, G) in enumerate(zip(Ws, Gs))]
        return lambda: [impl(W, G, r, c, V, None, beta1=None, **KW)
                        for W, G, r, c, V in members]

    per_set = count * (m * n * (2 * dtype.itemsize + 4 * (not factored))
                       + (4 * (m + n) if factored else 0))
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    count, m, n = params["count"], params["m"], params["n"]
    one = B.adafactor_step_bytes(m, n, param_bytes=params["dtype"].itemsize,
                                 factored=params["factored"], momentum=False,
                                 scale_parameter=KW["scale_parameter"],
                                 weight_decay=KW["weight_decay"] != 0)
    out = dict(op=NAME + ("" if params["factored"] else ":unfactored"), r=None,
               precision=None, bytes=B.Bytes(count * one.floor, count * one.eager),
               note=f"group of {count} tensors")
    if backend.startswith(LOOP):
        out["backend"] = backend[len(LOOP):]
    return out
