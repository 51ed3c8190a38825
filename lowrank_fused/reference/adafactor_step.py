"""Adafactor step (HF ``transformers`` version as vendored in GaLore), eager reference.

docs/methods/adafactor.md (the update rule); primitive K6 of docs/bytes.md.
The order of operations follows ``galore_torch/adafactor.py#L232-L269`` so that this
reference agrees with the official code to fp32 rounding.
"""
from __future__ import annotations

from typing import Optional

import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


@register("adafactor_step", "reference")
def adafactor_step_ref(W, G, row: Optional[torch.Tensor], col: Optional[torch.Tensor],
                       V: Optional[torch.Tensor], exp_avg: Optional[torch.Tensor], *,
                       rho: float, beta2t: float, eps1: float, eps2: float,
                       clip_threshold: float, scale_parameter: bool,
                       beta1: Optional[float], weight_decay: float, skip=None) -> None:
    """One Adafactor step, in place on W and the statistics.

    Canonical form:
      * factored (a parameter with ndim >= 2): W, G are (B, m, n), a batch of B matrices
        (B = prod(shape[:-2]), 1 for a matrix); ``row`` is (B, m), ``col`` is (B, n); V is None;
      * unfactored (ndim < 2): W, G and V have one shape; row and col are None.
    ``exp_avg`` (shape of W, fp32) is the momentum when ``beta1`` is not None, else None.

    Scalars: ``rho`` is the relative (or absolute) step size rho_t; the step size is
    ``a = rho*max(eps2, RMS(W))`` when ``scale_parameter`` else ``rho`` (RMS of W before this
    step, over all B matrices); ``beta2t = 1 - t^decay_rate``; ``clip_threshold`` is d.

        q    = g^2 + eps1
        row  = beta2t*row + (1-beta2t)*mean_n(q) ; col = beta2t*col + (1-beta2t)*mean_m(q)
        U    = rsqrt(row/mean_m(row))[:, :, None] * rsqrt(col)[:, None, :] * g
               (unfactored: V = beta2t*V + (1-beta2t)*q ; U = rsqrt(V)*g)
        U    = U / max(1, RMS(U)/d) ; U = a*U
        if beta1 is not None: exp_avg = beta1*exp_avg + (1-beta1)*U ; U = exp_avg
        W    = W - weight_decay*a*W (if weight_decay != 0) ; W = W - U
    W is read and written in its own dtype; all math is fp32.

    ``skip``: None, or the on-device non-finite flag (a 0-dim bool tensor): when it holds
    True, W, the statistics and exp_avg are left bit-identical (``_skip.run_unless``; the
    flag is not read on the host).
    """
    if skip is not None:
        run_unless(skip, (W, row, col, V, exp_avg), adafactor_step_ref, W, G, row, col, V,
                   exp_avg, rho=rho, beta2t=beta2t, eps1=eps1, eps2=eps2,
                   clip_threshold=clip_threshold, scale_parameter=scale_parameter,
                   beta1=beta1, weight_decay=weight_decay)
        return
    g = G.float()
    w = W.float()
    rms_w = _rms(w)
    # a 0-d fp32 tensor when scaled (no host synchronisation), as in the HF code
    a = rms_w.clamp(min=eps2) * rho if scale_parameter else rho
    q = g * g + eps1
    if row is not None:
        row.mul_(beta2t).add_(q.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(q.mean(dim=-2), alpha=1.0 - beta2t)
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        u = torch.mul(r_factor, c_factor).mul_(g)
    else:
        V.mul_(beta2t).add_(q, alpha=1.0 - beta2t)
        u = V.rsqrt().mul_(g)
    u.div_((_rms(u) / clip_threshold).clamp_(min=1.0))
    u.mul_(a)
    if beta1 is not None:
        exp_avg.mul_(beta1).add_(u, alpha=1.0 - beta1)
        u = exp_avg
    if weight_decay != 0:
        w.add_(w * (-weight_decay * a))
    w.add_(-u)
    W.copy_(w)
