"""Benchmark of AdaMeM's residual column statistics ``residual_col_stats``
(docs/methods/adamem.md, update lines 4 and 7; K5 pass 1 in docs/bytes.md): the EMA of the
per-column residual statistics ``c_os`` and the column scales, fused Triton
(``kernels/residual_col_stats.py``) vs the eager reference, both looked up in the dispatch
table.

Two forms per case: ``residual_col_stats`` is AdaMeM's path (identity form, ``colsum(G^2)``
given by the projection's side output: r x n + n work, no pass over G);
``residual_col_stats:explicit`` forms ``S = G - P R`` (in-tile in the kernel) and reads G.
AdaMeM runs every matrix in its canonical left form (the transpose when m > n), so each case
of ``harness.matrix_cases`` gives a ``min(m, n) x max(m, n)`` G (contiguous here; a
right-projected matrix passes a transposed view), an orthonormal P and ``R = P^T G``. States
are fp32; the scalars are the optimizer's defaults at step 10.

If the Triton implementation cannot be looked up, ``variants`` offers the eager reference only
and says so on stderr.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops
from lowrank_fused.dispatch import implementation

OP = "residual_col_stats"
FORMS = ("identity", "explicit")
STEP, BETA1, BETA2 = 10, 0.9, 0.95
_, C2 = ops.bias_corrections(BETA1, BETA2, STEP)
KW = dict(beta2=BETA2, eps1=1e-30, eps=1e-8, c2=C2)


def cases(device, quick, interpret=False):
    return [(f"{p['m']}x{p['n']}-r{p['r']}-{H.DTYPE_NAMES[p['dtype']]}-{form}",
             dict(p, form=form))
            for p in H.distinct_cases(device, quick, interpret,
                                      ("m", "n", "r", "side", "dtype"))
            for form in FORMS]


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, OP)


def make(params, backend, device):
    """A zero-arg callable running ``residual_col_stats`` once on random inputs (orthonormal
    P, ``R = P^T G``, positive ``c_os``), in place on ``c_os``."""
    r, dtype = params["r"], params["dtype"]
    rows, cols = min(params["m"], params["n"]), max(params["m"], params["n"])
    explicit = params["form"] == "explicit"
    impl = implementation(OP, backend, device)
    f32 = torch.float32

    def factory():
        G = H.random_tensor((rows, cols), dtype, device, scale=1e-2)
        P = torch.linalg.qr(H.random_tensor((rows, r), f32, device))[0].contiguous()
        R = P.t() @ G.float()
        g_cs = None if explicit else G.float().square().sum(dim=0)
        c_os = H.random_tensor((cols,), f32, device, positive=True, scale=1e-5)
        scale = torch.empty(cols, device=device, dtype=f32)
        return lambda: impl(G, P, R, c_os, scale, **KW, explicit=explicit, g_col_sumsq=g_cs)

    per_set = 4 * r * cols + 16 * cols + (dtype.itemsize * rows * cols if explicit else 0)
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    form = params["form"]
    op = OP if form == "identity" else f"{OP}:{form}"
    return dict(op=op, r=params["r"], precision=None,
                bytes=B.residual_col_stats_bytes(params["m"], params["n"], params["r"],
                                                 g_bytes=params["dtype"].itemsize,
                                                 side=params["side"], form=form))
