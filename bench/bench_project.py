"""Benchmark of K1 ``project`` (K1 in docs/bytes.md): fused Triton
(cast in the GEMM prologue, one read of G) vs the eager reference (``G.float()``, fp32 GEMM),
both through ``lowrank_fused.ops.project``."""
from __future__ import annotations

import math

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops

OP = "project"


def cases(device, quick, interpret=False):
    """``[(name, params)]``: see ``harness.matrix_cases``."""
    return H.matrix_cases(device, quick, interpret)


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret)


def make(params, backend, device):
    """A zero-arg callable running ``ops.project`` once on fresh random inputs (rotated over
    enough copies to defeat L2 on CUDA)."""
    m, n, r, side = params["m"], params["n"], params["r"], params["side"]
    dtype, precision = params["dtype"], params["precision"]

    def factory():
        G = H.random_tensor((m, n), dtype, device)
        P = H.random_tensor(ops.basis_shape((m, n), r, side), torch.float32, device,
                            scale=1 / math.sqrt(max(m, n)))
        R = torch.empty(ops.low_rank_shape((m, n), r, side), device=device,
                        dtype=torch.float32)
        return lambda: ops.project(G, P, R, side=side, precision=precision, backend=backend)

    per_set = m * n * dtype.itemsize + 4 * (m * r + r * n)
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    g = params["dtype"].itemsize
    return dict(op=OP, r=params["r"], precision=params["precision"],
                bytes=B.project_bytes(params["m"], params["n"], params["r"], g_bytes=g,
                                      state_bytes=4, side=params["side"]))
