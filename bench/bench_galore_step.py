"""Benchmark of one whole GaLore-AdamW step between subspace refreshes (K1 + K2 + K3,
the per-method floors of docs/bytes.md), fused (``backend="triton"``) vs the eager
reference (``backend="reference"``): the same ``GaLoreAdamW`` class, so they cannot drift.

The SVD is excluded: ``update_proj_gap`` is huge, and every optimizer starts from the state
of one warm step (taken once per shape/rank/dtype and loaded with ``load_state_dict``), so the
timed steps never refresh the basis.

Dense comparators on the same matrix (op ``adamw``, once per shape and dtype): torch's own
AdamW (``fused=True`` on CUDA, ``foreach=True`` on CPU; its states are in the parameter dtype)
and lowrank_fused's dense ``ops.adamw_step`` (fp32 states) with the Triton kernel and, when
built, the compiled extension's kernel.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import GaLoreAdamW, ops

OP = "galore_step"
DENSE = "adamw:"            # backend prefix of the dense ops.adamw_step variants
LR, WD, SCALE = 1e-3, 1e-2, 0.25
_WARM_STATES = {}           # (m, n, r, dtype, device) -> state_dict after one step


def cases(device, quick, interpret=False):
    """``harness.matrix_cases``; the first case of each (shape, dtype) also carries the dense
    comparators (they do not depend on rank or GEMM precision)."""
    seen, out = set(), []
    for name, p in H.matrix_cases(device, quick, interpret):
        key = (p["m"], p["n"], p["dtype"])
        out.append((name, dict(p, with_dense=key not in seen)))
        seen.add(key)
    return out


def variants(params, device, interpret=False):
    device = torch.device(device)
    out = H.op_variants(device, interpret)
    if params.get("with_dense"):
        out.append(("torch-fused" if device.type == "cuda" else "torch-foreach", "torch"))
        if H.triton_usable(device, interpret):
            out.append(("fused", DENSE + "triton"))
        from lowrank_fused import _ext
        if device.type == "cuda" and _ext.why_no_cuda() is None:
            out.append(("fused-csrc", DENSE + "cuda"))
        if device.type == "cpu" and _ext.why_no_cpu() is None:
            out.append(("fused-csrc", DENSE + "cpu"))
    return out


def _galore(W, params, backend):
    group = dict(params=[W], rank=params["r"], update_proj_gap=10 ** 9, scale=SCALE,
                 proj_type="std")
    return GaLoreAdamW([group], lr=LR, weight_decay=WD, backend=backend,
                       matmul_precision=params["precision"])


def clear_cache():
    _WARM_STATES.clear()


def make(params, backend, device):
    """A zero-arg callable running one optimizer step on a random m x n parameter with a
    random gradient (the gradient stays fixed between calls: the step does not read it twice
    differently)."""
    m, n, dtype = params["m"], params["n"], params["dtype"]
    per_set = 2 * m * n * dtype.itemsize

    if backend == "torch":
        cuda = torch.device(device).type == "cuda"

        def factory():
            W = torch.nn.Parameter(H.random_tensor((m, n), dtype, device))
            W.grad = H.random_tensor((m, n), dtype, device, scale=1e-2)
            opt = torch.optim.AdamW([W], lr=LR, weight_decay=WD, fused=True if cuda else None,
                                    foreach=None if cuda else True)
            opt.step()  # allocate the state outside the timing
            return opt.step
    elif backend.startswith(DENSE):
        impl = backend[len(DENSE):]

        def factory():
            W = H.random_tensor((m, n), dtype, device)
            G = H.random_tensor((m, n), dtype, device, scale=1e-2)
            M = H.random_tensor((m, n), torch.float32, device, scale=1e-3)
            V = H.random_tensor((m, n), torch.float32, device, positive=True, scale=1e-5)
            return lambda: ops.adamw_step(W, G, M, V, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
                                          step=10, weight_decay=WD, eps_mode="torch",
                                          wd_mode="pre", backend=impl)
        per_set = m * n * (2 * dtype.itemsize + 8)
    else:
        factory = H.warm_step_factory(lambda W, b: _galore(W, params, b), _WARM_STATES,
                                      (m, n, params["r"], dtype, str(device)), (m, n), dtype,
                                      device, backend)

    return H.rotating(factory, per_set, device)


def describe(params, backend):
    m, n, r, p = params["m"], params["n"], params["r"], params["dtype"].itemsize
    if backend == "torch":
        return dict(op="adamw", r=None, precision=None,
                    bytes=B.adamw_bytes(m, n, param_bytes=p, state_bytes=p),
                    note="torch.optim.AdamW, states in the parameter dtype")
    if backend.startswith(DENSE):
        return dict(op="adamw", r=None, precision=None, backend=backend[len(DENSE):],
                    bytes=B.adamw_bytes(m, n, param_bytes=p, state_bytes=4),
                    note="lowrank_fused.ops.adamw_step, fp32 states")
    return dict(op=OP, r=r, precision=params["precision"],
                bytes=B.galore_step_bytes(m, n, r, param_bytes=p, state_bytes=4,
                                          side=params["side"]))
