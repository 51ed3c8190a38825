"""Benchmark of the K8 moment transport between subspaces (docs/methods/adaptive_adamw.md A4,
docs/methods/ldadam.md lines 4 + 6; K8 in docs/bytes.md): ``C = P_new^T P_old``, then
``(C@M, (C*C)@V)``
(``moment_transport``: AdaptiveAdamW, AdaMeM and AdaRankGrad at a refresh),
``(C@M, C@V)`` (``moment_transport_linear``: AdaRankGrad's ``v_transport="linear"``, at the
grid's smallest rank only: the same kernel with another right operand) and LDAdam's
variance-aware form (``ldadam_moment_transport``, every LDAdam step). Fused
(``kernels/moment_transport.py``: C on the K1 projection kernel, then one kernel reading M and V
once for both products, ``C*C`` and LDAdam's ``w`` formed in registers) vs the eager references
(``lowrank_fused/reference/``), both looked up in the dispatch table.

Each case of ``harness.matrix_cases`` in the canonical left form: the bases are (rows x r) for
the canonical rows (m left, n right), the moments r x cols, ``r_new = r_old = r``. The case
dtype is the moments' dtype (fp32 is lowrank_fused's default state dtype, bf16 the
``faithful_dtypes`` one with bf16 parameters); the bases are fp32. The plain transports take no
precision argument and run at torch's fp32 matmul setting, which the runner sets to the case's
precision for both variants; LDAdam gets it as its ``precision`` argument. LDAdam's scalars are
those of step 10 with its default betas (0.908, 0.99).

If the Triton implementation cannot be looked up, ``variants`` offers the eager reference only
and says so on stderr.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops
from lowrank_fused.dispatch import implementation

OPS = {"moment_transport": "squared", "moment_transport_linear": "linear",
       "ldadam_moment_transport": "ldadam"}
BC1, BC2 = ops.bias_corrections(0.908, 0.99, 10)


def cases(device, quick, interpret=False):
    """``harness.matrix_cases`` x the three transports (the linear one at the smallest rank)."""
    grid = H.matrix_cases(device, quick, interpret)
    r0 = min(p["r"] for _, p in grid)
    out = []
    for name, p in grid:
        for op in OPS:
            if op == "moment_transport_linear" and p["r"] != r0:
                continue
            out.append((f"{name}-{OPS[op]}", dict(p, op=op)))
    return out


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, params["op"])


def make(params, backend, device):
    """A zero-arg callable transporting random moments between two random orthonormal bases
    (the plain transports return new tensors; LDAdam writes M_tr and V in place, which only
    changes V's values, so every call does the same work)."""
    m, n, r, dtype, side, op = (params[k] for k in ("m", "n", "r", "dtype", "side", "op"))
    rows, cols = (m, n) if side == "left" else (n, m)
    impl = implementation(op, backend, device)
    f32 = torch.float32

    def factory():
        P_new = torch.linalg.qr(H.random_tensor((rows, r), f32, device))[0].contiguous()
        P_old = torch.linalg.qr(H.random_tensor((rows, r), f32, device))[0].contiguous()
        M = H.random_tensor((r, cols), dtype, device, scale=1e-3)
        V = H.random_tensor((r, cols), dtype, device, positive=True, scale=1e-6)
        if op == "ldadam_moment_transport":
            M_tr = torch.empty_like(M)
            return lambda: impl(P_new, P_old, M, V, M_tr, bc1=BC1, bc2=BC2,
                                precision=params["precision"])
        return lambda: impl(P_new, P_old, M, V)

    per_set = 8 * rows * r + 4 * r * cols * dtype.itemsize
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    return dict(op=params["op"], r=params["r"], precision=params["precision"],
                bytes=B.moment_transport_bytes(params["m"], params["n"], params["r"],
                                               state_bytes=params["dtype"].itemsize,
                                               side=params["side"], form=OPS[params["op"]]))
