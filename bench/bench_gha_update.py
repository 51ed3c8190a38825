"""Benchmark of ``gha_update`` (docs/methods/adaptive_adamw.md): GHAAdamW's generalised
Hebbian basis update ``P_new = orth(P + eta*(G Y/||G||^2 - P triu(Y^T Y/||G||^2)))``,
``Y = G^T P``. Fused (``kernels/gha_update.py``: two K1 projection passes over G, the first
with its colsum(G^2) side output; no m x n temporary) vs the eager reference
(``lowrank_fused/reference/gha_update.py``: fp32 copy of G, three GEMMs), both looked up in the
dispatch table; both share the r x r / m x r tail (``orth``).

The op is called as GHAAdamW calls it, in the canonical left form: a right-projected matrix
(galore_torch's "std" rule, m >= n) passes the transposed view of G and an n x r basis. The
op has no precision argument: the fused projections run "ieee" (fp32 FMA), so the eager rows
run torch's fp32 matmuls at "highest" too, and every case is "ieee". eta = 0.5 (the default).
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused.dispatch import implementation

OP = "gha_update"
ETA = 0.5


def cases(device, quick, interpret=False):
    """The (shape, rank, dtype) combinations of ``harness.matrix_cases``, once each, at
    precision "ieee"."""
    seen, out = set(), []
    for _, p in H.matrix_cases(device, quick, interpret):
        key = (p["m"], p["n"], p["r"], p["dtype"])
        if key in seen:
            continue
        seen.add(key)
        out.append((f"{p['m']}x{p['n']}-r{p['r']}-{H.DTYPE_NAMES[p['dtype']]}-ieee",
                    dict(p, precision="ieee")))
    return out


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, OP)


def make(params, backend, device):
    """A zero-arg callable computing the new basis from a random G and an orthonormal P (the
    result is a new tensor; P is not modified, so every call does the same work)."""
    m, n, r, dtype, side = params["m"], params["n"], params["r"], params["dtype"], params["side"]
    impl = implementation(OP, backend, device)
    rows = m if side == "left" else n      # rows of the canonical (left-form) G

    def factory():
        G = H.random_tensor((m, n), dtype, device)
        Gc = G if side == "left" else G.t()
        P = torch.linalg.qr(H.random_tensor((rows, r), torch.float32, device))[0].contiguous()
        return lambda: impl(Gc, P, eta=ETA)

    per_set = m * n * dtype.itemsize + 4 * rows * r
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    return dict(op=OP, r=params["r"], precision=params["precision"],
                bytes=B.gha_update_bytes(params["m"], params["n"], params["r"],
                                         g_bytes=params["dtype"].itemsize,
                                         side=params["side"]))
