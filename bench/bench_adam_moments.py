"""Benchmark of K2 ``adam_moments`` (K2 in docs/bytes.md): the low-rank moment
update and normalised step, fused Triton (one pass) vs the eager reference, both through
``lowrank_fused.ops.adam_moments``. R, M, V, N are fp32 whatever the parameter dtype, so the
cases are the (shape, rank, side) combinations of ``harness.matrix_cases`` without repeats."""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops

OP = "adam_moments"


def cases(device, quick, interpret=False):
    return H.low_rank_cases(device, quick, interpret)


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret)


def make(params, backend, device):
    """A zero-arg callable running ``ops.adam_moments`` (E-hf, step 10) once on random
    moments (V positive), in place."""
    shape = ops.low_rank_shape((params["m"], params["n"]), params["r"], params["side"])

    def factory():
        R = H.random_tensor(shape, torch.float32, device, scale=1e-2)
        M = H.random_tensor(shape, torch.float32, device, scale=1e-3)
        V = H.random_tensor(shape, torch.float32, device, positive=True, scale=1e-5)
        N = torch.empty(shape, device=device, dtype=torch.float32)
        return lambda: ops.adam_moments(R, M, V, N, beta1=0.9, beta2=0.999, eps=1e-6, step=10,
                                        eps_mode="hf", backend=backend)

    per_set = 4 * 4 * shape[0] * shape[1]
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    return dict(op=OP, r=params["r"], precision=None,
                bytes=B.adam_moments_bytes(params["m"], params["n"], params["r"],
                                           state_bytes=4, side=params["side"]))
