"""Benchmark of ``adapm_update`` (docs/methods/adapm.md, update lines 3-7 between
refits, and AdaPM-mini; docs/bytes.md): one AdaPM low-rank block step, fused Triton
(``kernels/adapm_update.py``: ``L@R`` and ``L@Rg`` as one K = r GEMM, the second moment, clip
and W update in its epilogue, no m x n temporary) vs the eager reference
(``lowrank_fused/reference/adapm_update.py``), both looked up in the dispatch table.

Forms (the row's ``op``): ``adapm_update`` (AdaPM: elementwise fp32 V, elementwise clip),
``adapm_update:mini`` (AdaPM-mini: Adam-mini per-row block means, nb = m, as for MLP and
attention-output rows), ``adapm_update:rms`` (elementwise V, RMS clip: one more pass) and
``adapm_update:class`` (the step engine's form: ``CLASS`` same-shape blocks in one
``ops_adapm_grouped.BoundAdapmClass`` call, the grouped launches of
``kernels/grouped_adapm_update.py`` on Triton, the per-member reference otherwise; its bytes are
``CLASS`` times one block's). The extra forms run at the smallest rank of the grid only. AdaPM works in the left form (L is m x r) whatever the shape, so ``side`` is "left".
Scalars as ``lowrank_fused.optim.AdaPM``'s defaults at step 10 (betas (0.9, 0.95), eps 1e-8,
lam 0.1 WD-pre, clip 1, the unbiased estimator ``s = 1/bc1``, ``e = 1/(1-beta1)``), lr 1e-3.
L, R, Rg and V are fp32; W and G in the case dtype.

If the Triton implementation cannot be looked up (``kernels/adapm_update.py`` missing or not
importing), ``variants`` offers the eager reference only and says so on stderr.
"""
from __future__ import annotations

import torch

from bench import bytes as B
from bench import harness as H
from lowrank_fused import ops
from lowrank_fused.dispatch import implementation

OP = "adapm_update"
FORMS = {"": (False, "elementwise"), "mini": (True, "elementwise"),
         "rms": (False, "rms"), "class": (False, "elementwise")}   # form -> (block-mean V, clip)
CLASS = 8    # members of the "class" form
STEP, LR, BETA1, BETA2, LAM = 10, 1e-3, 0.9, 0.95, 0.1
_C1, _C2 = ops.bias_corrections(BETA1, BETA2, STEP)
KW = dict(beta1=BETA1, s_coef=1.0 / _C1, e_coef=1.0 / (1.0 - BETA1), v_keep=BETA2,
          v_add=1.0 - BETA2, eps=1e-8, c2=_C2, lr=LR,
          pre_scale=ops.decay_coefficients(LR, LAM, "pre")[0], clip_threshold=1.0)


def cases(device, quick, interpret=False):
    """``harness.matrix_cases`` in the left form; the ``mini`` and ``rms`` forms only at the
    grid's smallest rank."""
    grid = H.matrix_cases(device, quick, interpret)
    r0 = min(p["r"] for _, p in grid)
    out = []
    for name, p in grid:
        for form in FORMS:
            if form and p["r"] != r0:
                continue
            out.append((name + (f"-{form}" if form else ""), dict(p, side="left", form=form)))
    return out


def variants(params, device, interpret=False):
    return H.op_variants(device, interpret, OP)


def make(params, backend, device):
    """A zero-arg callable running one step between refits, in place on W, R and V: random W
    and G, an orthonormal L, ``Rg = L^T G``, positive V."""
    m, n, r, dtype = params["m"], params["n"], params["r"], params["dtype"]
    blocks, clip_mode = FORMS[params["form"]]
    impl = implementation(OP, backend, device)
    f32 = torch.float32

    if params["form"] == "class":
        return _make_class(params, backend, device)

    def factory():
        W = H.random_tensor((m, n), dtype, device)
        G = H.random_tensor((m, n), dtype, device, scale=1e-2)
        L = torch.linalg.qr(H.random_tensor((m, r), f32, device))[0].contiguous()
        Rg = L.t() @ G.float()
        R = H.random_tensor((r, n), f32, device, scale=1e-3)
        V = H.random_tensor((m,) if blocks else (m, n), f32, device, positive=True, scale=1e-4)
        return lambda: impl(W, G, L, R, Rg, V, clip_mode=clip_mode,
                            precision=params["precision"], **KW)

    per_set = m * n * (2 * dtype.itemsize + 4 * (not blocks)) + 4 * (m * r + 2 * r * n)
    return H.rotating(factory, per_set, device)


def _make_class(params, backend, device):
    """``CLASS`` blocks as one class of the step engine (one bound call per step)."""
    from lowrank_fused.ops_adapm_grouped import BoundAdapmClass, adapm_rows

    m, n, r, dtype = params["m"], params["n"], params["r"], params["dtype"]
    f32 = torch.float32
    scalars = {k: v for k, v in KW.items() if k != "clip_threshold"}
    rows = adapm_rows(CLASS, clip=KW["clip_threshold"], coef_g=KW["e_coef"] * (1.0 - BETA1),
                      **scalars)

    def factory():
        Ws = [H.random_tensor((m, n), dtype, device) for _ in range(CLASS)]
        Gs = [H.random_tensor((m, n), dtype, device, scale=1e-2) for _ in range(CLASS)]
        Ls = [torch.linalg.qr(H.random_tensor((m, r), f32, device))[0].contiguous()
              for _ in range(CLASS)]
        Rgs = [L.t() @ G.float() for L, G in zip(Ls, Gs)]
        Rs = [H.random_tensor((r, n), f32, device, scale=1e-3) for _ in range(CLASS)]
        Vs = [H.random_tensor((m, n), f32, device, positive=True, scale=1e-4)
              for _ in range(CLASS)]
        bound = BoundAdapmClass(Ws, Gs, Vs, Ls=Ls, Rs=Rs, Rgs=Rgs, backend=backend)
        return lambda: bound(Gs, rows, precision=params["precision"])

    per_set = CLASS * (m * n * (2 * dtype.itemsize + 4) + 4 * (m * r + 3 * r * n))
    return H.rotating(factory, per_set, device)


def describe(params, backend):
    blocks, clip_mode = FORMS[params["form"]]
    m, n, r = params["m"], params["n"], params["r"]
    one = B.adapm_update_bytes(m, n, r, param_bytes=params["dtype"].itemsize,
                               v_blocks=m if blocks else None, clip_mode=clip_mode,
                               pre_scale=KW["pre_scale"] != 1.0)
    if params["form"] == "class":
        one = B.Bytes(one.floor * CLASS, None if one.eager is None else one.eager * CLASS)
    return dict(op=OP + (f":{params['form']}" if params["form"] else ""), r=r,
                precision=params["precision"], bytes=one)
