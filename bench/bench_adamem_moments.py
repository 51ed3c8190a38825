"""Benchmark of AdaMeM's K2 ``adamem_moments`` (docs/methods/adamem.md, update
lines 5-6; K2 in docs/bytes.md): the low-rank momentum, the factored (Adafactor) row/column
statistics and the normalised step N1 on the r x n projection, fused Triton
(``kernels/adamem_moments.py``: three launches, no host read) vs the eager reference, both
looked up in the dispatch table.

AdaMeM runs every matrix in its canonical left form (the transpose when m > n), so each case of
``harness.matrix_cases`` gives an ``r x max(m, n)`` problem; (shape, rank) pairs are not
repeated. States are fp32 (``AdaMeM`` keeps them so); the scalars are the optimizer's defaults
at step 10 (betas (0.9, 0.95), eps 1e-8, eps1 1e-30, bias correction on, statistics from the
momentum as in the paper).

If the Triton implementation cannot be looked up, ``variants`` offers the eager reference only
and says so on stderr.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops
from lowrank_fused.dispatch import implementation

OP = "adamem_moments"
STEP, BETA1, BETA2 = 10, 0.9, 0.95
C1, C2 = ops.bias_corrections(BETA1, BETA2, STEP)
KW = dict(beta1=BETA1, beta2=BETA2, eps=1e-8, eps1=1e-30, c1=C1, c2=C2,
          stats_from_momentum=True)


def cases(device, quick, interpret=False):
    return H.low_rank_cases(device, quick, interpret)


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, OP)


def make(params, backend, device):
    """A zero-arg callable running ``adamem_moments`` once on random state (positive
    statistics), in place."""
    r, cols = params["r"], max(params["m"], params["n"])
    impl = implementation(OP, backend, device)
    f32 = torch.float32

    def factory():
        R = H.random_tensor((r, cols), f32, device, scale=1e-2)
        M = H.random_tensor((r, cols), f32, device, scale=1e-3)
        row = H.random_tensor((r,), f32, device, positive=True, scale=1e-5)
        col = H.random_tensor((cols,), f32, device, positive=True, scale=1e-5)
        N = torch.empty((r, cols), device=device, dtype=f32)
        return lambda: impl(R, M, row, col, N, **KW)

    per_set = 3 * 4 * r * cols
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    return dict(op=OP, r=params["r"], precision=None,
                bytes=B.adamem_moments_bytes(params["m"], params["n"], params["r"],
                                             state_bytes=4, side=params["side"]))
