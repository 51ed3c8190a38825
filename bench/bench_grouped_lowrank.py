"""Benchmark of the grouped K1/K3 (K1 and K3 of docs/bytes.md, times the group
size): a group of same-shape matrices, as a LLaMA has tens of layers per (shape,
rank, side) class, processed three ways, all through ``lowrank_fused``:

* ``grouped``/``triton``: ``ops_grouped.grouped_project`` /
  ``ops_grouped.grouped_backproject_update``, one Triton launch for the whole group;
* ``per-matrix``/``triton``: a Python loop of the single-matrix ``ops.project`` /
  ``ops.backproject_update`` (one Triton launch per matrix: what GaLoreAdamW runs today);
* ``eager``/``reference``: the grouped reference, a loop of the single-matrix eager references.

Rows carry the per-matrix shape (``m``, ``n``, ``r``) and the group's total byte floor
(count x the single op's, ``bench.bytes``); the note says the group size. Grid on CUDA:
LLaMA-7B groups, 32 x (4096, 4096) (the attention projections of one kind, right-projected)
at ranks 128 and 256, bf16 parameters with bf16 GEMM operands and fp32 with TF32, plus
32 x (11008, 4096) and 32 x (4096, 11008) (the MLP kinds) at rank 128 in bf16; ``--quick``:
32 x (4096, 4096), rank 128, bf16. CPU: a group of 4 small matrices, eager only (with
``--interpret``: 3 tiny ones, the Triton variants under the interpreter, not a speed
measurement). K3 runs WD-post as GaLore does, with a different coefficient per matrix.
"""
from __future__ import annotations

import math

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops, ops_grouped

OPS = ("grouped_project", "grouped_backproject_update")
LOOP = "loop:"                  # backend prefix of the per-matrix variant
GPU_COUNT, CPU_COUNT, INTERPRET_COUNT = 32, 4, 3
LR, WD = 1e-3, 1e-2


def _grid(device, quick, interpret):
    """``[(count, (m, n), r, dtype, precision)]``."""
    if torch.device(device).type == "cuda":
        sq = (4096, 4096)
        if quick:
            return [(GPU_COUNT, sq, 128, torch.bfloat16, "bf16")]
        grid = [(GPU_COUNT, sq, r, dt, prec) for r in (128, 256)
                for dt, prec in ((torch.bfloat16, "bf16"), (torch.float32, "tf32"))]
        grid += [(GPU_COUNT, s, 128, torch.bfloat16, "bf16") for s in ((11008, 4096),
                                                                       (4096, 11008))]
        return grid
    if interpret:
        return [(INTERPRET_COUNT, H.INTERPRET_SHAPE, H.INTERPRET_RANK, dt, "ieee")
                for dt in (torch.float32, torch.bfloat16)]
    return [(CPU_COUNT, H.CPU_SHAPE, H.CPU_RANK, dt, "ieee")
            for dt in (torch.float32, torch.bfloat16)]


def cases(device, quick, interpret=False):
    """``[(name, params)]``: every group of the grid, for both ops."""
    out = []
    for count, (m, n), r, dt, prec in _grid(device, quick, interpret):
        for op in OPS:
            params = dict(op=op, count=count, m=m, n=n, r=r, dtype=dt, precision=prec,
                          side=H.galore_side(m, n))
            out.append((f"{op}-{count}x{m}x{n}-r{r}-{H.DTYPE_NAMES[dt]}-{prec}", params))
    return out


def variants(params, device, interpret=False):
    """grouped (one launch) and per-matrix Triton when the grouped op has a Triton
    implementation, and the eager loop."""
    fused = H.triton_usable(device, interpret) and H.triton_implemented(params["op"], device)
    out = [("grouped", "triton"), ("per-matrix", LOOP + "triton")] if fused else []
    return out + [("eager", "reference")]


def make(params, backend, device):
    """A zero-arg callable running the op once over a group of fresh random inputs."""
    count, m, n, r, side = (params[k] for k in ("count", "m", "n", "r", "side"))
    dtype, precision, op = params["dtype"], params["precision"], params["op"]
    loop = backend.startswith(LOOP)
    backend = backend[len(LOOP):] if loop else backend
    kw = dict(side=side, precision=precision, backend=backend)
    # per-matrix K3 scalars: GaLore's step size with each layer's own step count, WD-post
    coef = [LR * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) for t in range(10, 10 + count)]
    post = [LR * WD] * count

    def factory():
        Ps = [H.random_tensor(ops.basis_shape((m, n), r, side), torch.float32, device,
                              scale=1 / math.sqrt(max(m, n))) for _ in range(count)]
        low = ops.low_rank_shape((m, n), r, side)
        if op == "grouped_project":
            Gs = [H.random_tensor((m, n), dtype, device) for _ in range(count)]
            Rs = [torch.empty(low, device=device, dtype=torch.float32) for _ in range(count)]
            if loop:
                return lambda: [ops.project(G, P, R, **kw) for G, P, R in zip(Gs, Ps, Rs)]
            return lambda: ops_grouped.grouped_project(Gs, Ps, Rs, **kw)
        Ws = [H.random_tensor((m, n), dtype, device) for _ in range(count)]
        Ns = [H.random_tensor(low, torch.float32, device) for _ in range(count)]
        if loop:
            return lambda: [ops.backproject_update(W, P, N, coef=c, post_decay=d, **kw)
                            for W, P, N, c, d in zip(Ws, Ps, Ns, coef, post)]
        return lambda: ops_grouped.grouped_backproject_update(Ws, Ps, Ns, coef=coef,
                                                              post_decay=post, **kw)

    per_set = count * (m * n * dtype.itemsize + 4 * (m * r + r * n))
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    count, m, n, r, side = (params[k] for k in ("count", "m", "n", "r", "side"))
    size = params["dtype"].itemsize
    if params["op"] == "grouped_project":
        one = B.project_bytes(m, n, r, g_bytes=size, state_bytes=4, side=side)
    else:
        one = B.backproject_update_bytes(m, n, r, w_bytes=size, state_bytes=4, side=side)
    out = dict(op=params["op"], r=r, precision=params["precision"],
               bytes=B.Bytes(count * one.floor, count * one.eager),
               note=f"group of {count} matrices")
    if backend.startswith(LOOP):
        out["backend"] = backend[len(LOOP):]
    return out
