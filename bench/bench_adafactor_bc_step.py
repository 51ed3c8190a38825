"""Benchmark of AdaMeM's bias-corrected Adafactor (docs/methods/adamem.md, "Routing";
K6 of docs/bytes.md without the RMS clip), fused Triton (``kernels/adafactor_bc_step.py``) vs the
eager references, both looked up in the dispatch table:

* ``adafactor_bc_factored_step``: an m x n W with row (m) and col (n) statistics; fused: the
  Adafactor stats pass and one apply pass (G read twice, W once), no m x n temporary;
* ``adafactor_bc_unfactored_step``: the elementwise form of 1-D parameters, on the same m*n
  elements (one pass: G, V, W).

Scalars as ``lowrank_fused.optim.AdaMeM``'s defaults at step 10: lr = 1e-3, beta2 = 0.95,
eps1 = 1e-30, eps = 1e-8, ``c2 = 1 - 0.95^10``, weight decay 0.01 applied WD-pre
(``pre_scale = 1 - lr*wd``, no post decay). States fp32; W and G in the case dtype.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops
from lowrank_fused.dispatch import implementation

OPS = ("adafactor_bc_factored_step", "adafactor_bc_unfactored_step")
OP = OPS[0]
STEP, LR, BETA2, WD = 10, 1e-3, 0.95, 0.01
_PRE, _POST = ops.decay_coefficients(LR, WD, "pre")
KW = dict(lr=LR, beta2=BETA2, eps1=1e-30, eps=1e-8, c2=ops.bias_corrections(0.9, BETA2, STEP)[1],
          pre_scale=_PRE, post_decay=_POST)


def cases(device, quick, interpret=False):
    """``harness.dense_cases`` (one per shape and dtype) x (factored, unfactored)."""
    return [(name + ("" if factored else "-unfactored"), dict(p, factored=factored))
            for name, p in H.dense_cases(device, quick, interpret)
            for factored in (True, False)]


def _op(params):
    return OPS[0] if params["factored"] else OPS[1]


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, _op(params))


def make(params, backend, device):
    """A zero-arg callable running one step in place on random W, G and positive statistics."""
    m, n, dtype = params["m"], params["n"], params["dtype"]
    factored = params["factored"]
    impl = implementation(_op(params), backend, device)
    f32 = torch.float32

    def factory():
        W = H.random_tensor((m, n), dtype, device)
        G = H.random_tensor((m, n), dtype, device, scale=1e-2)
        if factored:
            row = H.random_tensor((m,), f32, device, positive=True, scale=1e-4)
            col = H.random_tensor((n,), f32, device, positive=True, scale=1e-4)
            return lambda: impl(W, G, row, col, **KW)
        W, G = W.view(-1), G.view(-1)
        V = H.random_tensor((m * n,), f32, device, positive=True, scale=1e-4)
        return lambda: impl(W, G, V, **KW)

    per_set = m * n * (2 * dtype.itemsize + 4 * (not factored)) + 4 * (m + n)
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    m, n, p = params["m"], params["n"], params["dtype"].itemsize
    flags = dict(param_bytes=p, pre_scale=KW["pre_scale"] != 1.0,
                 post_decay=KW["post_decay"] != 0.0)
    if params["factored"]:
        nbytes = B.adafactor_bc_factored_step_bytes(m, n, **flags)
    else:
        nbytes = B.adafactor_bc_unfactored_step_bytes(m * n, **flags)
    return dict(op=_op(params), r=None, precision=None, bytes=nbytes)
