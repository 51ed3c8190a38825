"""Benchmark of IASS rank selection ``iass_select`` (docs/methods/adarankgrad.md,
``prefix`` mode; the refresh's one more read of G for ``||G||^2``), Triton
(``kernels/iass_select.py``: ``||G||^2`` by a Triton reduction reading G once in its storage
dtype, the k x n row norms and cumulative sums on torch) vs the eager reference (an fp32 copy
of G squared and summed), both looked up in the dispatch table.

Measured without ``E``: the op's own pass over G. AdaRankGrad passes ``E`` from the
projection's ``colsum(G^2)`` side output, where neither implementation reads G and the two
are the same torch code. Each call includes the op's two host reads (E, then the k
cumulative energies: the selected rank is a Python int).

Each case of ``harness.matrix_cases`` gives the canonical left form ``min(m, n) x max(m, n)``
(contiguous), a sketch width ``k = r``, an orthonormal Qb (m x k, fp32) and ``B = Qb^T G``.

If the Triton implementation cannot be looked up, ``variants`` offers the eager reference only
and says so on stderr.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused.dispatch import implementation

OP = "iass_select"


def cases(device, quick, interpret=False):
    return [(f"{p['m']}x{p['n']}-k{p['r']}-{H.DTYPE_NAMES[p['dtype']]}", p)
            for p in H.distinct_cases(device, quick, interpret,
                                      ("m", "n", "r", "side", "dtype"))]


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, OP)


def make(params, backend, device):
    """A zero-arg callable selecting a rank once (``eta_th = 0.5``, prefix mode) on random
    inputs."""
    k, dtype = params["r"], params["dtype"]
    rows, cols = min(params["m"], params["n"]), max(params["m"], params["n"])
    impl = implementation(OP, backend, device)

    def factory():
        G = H.random_tensor((rows, cols), dtype, device, scale=1e-2)
        Qb = torch.linalg.qr(H.random_tensor((rows, k), torch.float32, device))[0].contiguous()
        Bm = Qb.t() @ G.float()
        return lambda: impl(G, Qb, Bm, eta_th=0.5, r_max=k, mode="prefix")

    per_set = dtype.itemsize * rows * cols + 4 * k * cols
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    return dict(op=OP, r=params["r"], precision=None,
                bytes=B.iass_select_bytes(params["m"], params["n"], params["r"],
                                          g_bytes=params["dtype"].itemsize,
                                          side=params["side"]))
