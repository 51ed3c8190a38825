"""AdaPM / AdaPM-mini low-rank step: momentum estimate, second moment, clip and weight update,
eager reference (docs/methods/adapm.md, update line 3 ``else`` branch and lines 4-7, AdaPM-mini;
docs/bytes.md, "Kernel-design notes": L@Rg, and L0@R0 on refit steps).

Also holds the shared tail (second moment, normalisation, clip, decoupled update) that
``adapm_dense_update`` reuses for the full- and no-momentum blocks.
"""
import math

import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul

CLIP_MODES = ("elementwise", "rms", "none")


def second_moment_and_apply(W, G, mc, V, *, v_keep: float, v_add: float, eps: float, c2: float,
                            lr: float, pre_scale: float, clip_mode: str,
                            clip_threshold: float) -> None:
    """Lines 5-7 of the update rule in docs/methods/adapm.md on a (logical) m x n block, in
    place on V and W.

    ``V`` either has W's shape (elementwise second moment, AdaPM) or is a vector of ``nb``
    Adam-mini block means (AdaPM-mini), block ``i`` being rows ``[i*m/nb, (i+1)*m/nb)`` times
    every column (per row: ``nb = m``; per head: ``nb = heads``; whole tensor: ``nb = 1``).

    ``V = v_keep*V + v_add*x`` with ``x = g^2`` (or its block mean): the beta2 EMA passes
    ``(beta2, 1-beta2)``, AdaGrad ``(1, 1)``. Denominator (E-torch): ``sqrt(V/c2) + eps``
    elementwise; ``sqrt(V)/sqrt(c2) + eps`` for block means (Adam-mini's rounding).
    ``u = mc/denominator``, clipped (``elementwise``: clamp to +-threshold; ``rms``: divide by
    ``max(1, rms(u)/threshold)``, Adafactor-style; ``none``), then ``W = W*pre_scale - lr*u``.
    """
    m, n = W.shape
    g = G.float()
    if V.shape == W.shape:
        v = V.float() * v_keep + v_add * (g * g)
        V.copy_(v)
        u = mc / (torch.sqrt(V.float() / c2) + eps)
    else:
        nb = V.numel()
        sq = (g * g).reshape(nb, (m // nb) * n).mean(dim=1)
        v = V.float() * v_keep + v_add * sq
        V.copy_(v)
        h = torch.sqrt(V.float()) / math.sqrt(c2) + eps
        u = (mc.reshape(nb, (m // nb) * n) / h.unsqueeze(1)).reshape(m, n)
    if clip_mode == "elementwise":
        u = u.clamp(-clip_threshold, clip_threshold)
    elif clip_mode == "rms":
        rms = torch.sqrt(torch.mean(u * u))
        u = u / torch.clamp(rms / clip_threshold, min=1.0)
    elif clip_mode != "none":
        raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    W.copy_(w - lr * u)


@register("adapm_update", "reference")
def adapm_update_ref(W, G, L, R, Rg, V, L0=None, R0=None, *, beta1: float, s_coef: float,
                     e_coef: float, v_keep: float, v_add: float, eps: float, c2: float,
                     lr: float, pre_scale: float, clip_mode: str = "elementwise",
                     clip_threshold: float = 1.0, precision: str = "ieee") -> None:
    """One AdaPM step of a low-rank block, left form, in place on R (between refits), V and W.

    Shapes: W, G m x n (storage dtypes), L m x r, R r x n, ``Rg = L^T @ G`` (r x n, fp32, from
    the ``project`` op), V as in :func:`second_moment_and_apply`.

    * Between refits (``L0 is None``): ``R = beta1*R + (1-beta1)*Rg`` (the exact least-squares
      factor for the fixed orthonormal L) and ``e = (1-beta1)*(G - L@Rg)``.
    * On a refit step, (L, R) already hold the refitted factors and (L0, R0) the previous ones:
      ``e = beta1*L0@R0 + (1-beta1)*G - L@R``.

    The momentum estimate is ``mc = s_coef*(L@R) + e_coef*e``; the optimizer picks the
    coefficients for the estimator and bias correction (docs/methods/adapm.md; e.g. the unbiased
    estimator A passes ``s_coef = 1/bc1``, ``e_coef = 1/(1-beta1)``). Then lines 5-7. Math in
    fp32, the products with the operands of ``precision``; every tensor keeps its dtype.
    """
    g = G.float()
    Lf = L.float()
    if L0 is None:
        rg = Rg.float()
        R.copy_(R.float() * beta1 + (1.0 - beta1) * rg)
        e = (1.0 - beta1) * (g - matmul(Lf, rg, precision))
    else:
        e = (beta1 * matmul(L0, R0, precision) + (1.0 - beta1) * g
             - matmul(Lf, R, precision))
    mc = s_coef * matmul(Lf, R, precision) + e_coef * e
    second_moment_and_apply(W, G, mc, V, v_keep=v_keep, v_add=v_add, eps=eps, c2=c2, lr=lr,
                            pre_scale=pre_scale, clip_mode=clip_mode,
                            clip_threshold=clip_threshold)
