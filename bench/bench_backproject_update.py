"""Benchmark of K3 ``backproject_update`` (K3 in docs/bytes.md): ``W <- (W -
coef*P@N)(1 - c)``, fused Triton (update and weight decay in the GEMM epilogue, W read and
written once) vs the eager reference (fp32 product materialised), both through
``lowrank_fused.ops.backproject_update``."""
from __future__ import annotations

import math

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops

OP = "backproject_update"


def cases(device, quick, interpret=False):
    """``[(name, params)]``: see ``harness.matrix_cases``."""
    return H.matrix_cases(device, quick, interpret)


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret)


def make(params, backend, device):
    """A zero-arg callable running ``ops.backproject_update`` (WD-post, as GaLore) once, in
    place on a random W."""
    m, n, r, side = params["m"], params["n"], params["r"], params["side"]
    dtype, precision = params["dtype"], params["precision"]

    def factory():
        W = H.random_tensor((m, n), dtype, device)
        P = H.random_tensor(ops.basis_shape((m, n), r, side), torch.float32, device,
                            scale=1 / math.sqrt(max(m, n)))
        N = H.random_tensor(ops.low_rank_shape((m, n), r, side), torch.float32, device)
        return lambda: ops.backproject_update(W, P, N, side=side, coef=1e-3, pre_scale=1.0,
                                              post_decay=1e-5, precision=precision,
                                              backend=backend)

    per_set = m * n * dtype.itemsize + 4 * (m * r + r * n)
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    w = params["dtype"].itemsize
    return dict(op=OP, r=params["r"], precision=params["precision"],
                bytes=B.backproject_update_bytes(params["m"], params["n"], params["r"],
                                                 w_bytes=w, state_bytes=4, side=params["side"]))
