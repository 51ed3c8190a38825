"""Benchmark of ``adafactor_step`` (docs/methods/adafactor.md; K6 in docs/bytes.md):
one HF Adafactor step on a whole m x n matrix, fused Triton (``kernels/adafactor_step.py``:
three passes over G, no m x n temporary) vs the eager reference
(``lowrank_fused/reference/adafactor_step.py``), both looked up in the dispatch table.

Forms (the row's ``op``): ``adafactor_step`` (factored, a (1, m, n) batch with row and col
statistics, no momentum), ``adafactor_step:momentum`` (beta1 = 0.9, fp32 exp_avg),
``adafactor_step:unfactored`` and ``adafactor_step:unfactored+momentum`` (the flat form on
the same m*n elements with an elementwise V: the path of 1-D parameters, measured at matrix
size for its bandwidth). Scalars as ``lowrank_fused.optim.Adafactor``'s defaults at step 10:
relative step (rho = 1e-2), ``scale_parameter=True`` (RMS(W) read), ``beta2t = 1 - 10^-0.8``,
eps (1e-30, 1e-3), d = 1, no weight decay. States fp32; W and G in the case dtype.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused.dispatch import implementation
from lowrank_fused.optim.adafactor import beta2_at, relative_step_size

OP = "adafactor_step"
STEP = 10
FORMS = ((True, False), (True, True), (False, False), (False, True))  # (factored, momentum)
KW = dict(rho=relative_step_size(STEP, None, True, False), beta2t=beta2_at(STEP, -0.8),
          eps1=1e-30, eps2=1e-3, clip_threshold=1.0, scale_parameter=True, weight_decay=0.0)
BETA1 = 0.9


def _form(factored, momentum):
    bits = ([] if factored else ["unfactored"]) + (["momentum"] if momentum else [])
    return "+".join(bits)


def cases(device, quick, interpret=False):
    """``harness.dense_cases`` (one per shape and dtype) x the four forms."""
    out = []
    for name, p in H.dense_cases(device, quick, interpret):
        for factored, momentum in FORMS:
            form = _form(factored, momentum)
            out.append((name + (f"-{form}" if form else ""),
                        dict(p, factored=factored, momentum=momentum)))
    return out


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, OP)


def make(params, backend, device):
    """A zero-arg callable running one step in place on random W, G and statistics (positive),
    with the step-10 scalars."""
    m, n, dtype = params["m"], params["n"], params["dtype"]
    factored, momentum = params["factored"], params["momentum"]
    impl = implementation(OP, backend, device)
    shape = (1, m, n) if factored else (m * n,)
    f32 = torch.float32

    def factory():
        W = H.random_tensor(shape, dtype, device)
        G = H.random_tensor(shape, dtype, device, scale=1e-2)
        row = col = V = E = None
        if factored:
            row = H.random_tensor((1, m), f32, device, positive=True, scale=1e-4)
            col = H.random_tensor((1, n), f32, device, positive=True, scale=1e-4)
        else:
            V = H.random_tensor(shape, f32, device, positive=True, scale=1e-4)
        if momentum:
            E = H.random_tensor(shape, f32, device, scale=1e-4)
        return lambda: impl(W, G, row, col, V, E, beta1=BETA1 if momentum else None, **KW)

    per_set = m * n * (2 * dtype.itemsize + 4 * (not factored) + 4 * momentum) + 4 * (m + n)
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    form = _form(params["factored"], params["momentum"])
    return dict(op=OP + (f":{form}" if form else ""), r=None, precision=None,
                bytes=B.adafactor_step_bytes(params["m"], params["n"],
                                             param_bytes=params["dtype"].itemsize,
                                             factored=params["factored"],
                                             momentum=params["momentum"],
                                             scale_parameter=KW["scale_parameter"],
                                             weight_decay=KW["weight_decay"] != 0))
