"""Factored Adafactor with a fixed beta2 and bias correction, no momentum, no update clipping and
no relative step: AdaMeM's optimizer for its 2-D non-low-rank weights (first and last layers),
eager reference (docs/methods/adamem.md, "Routing"; K6 of docs/bytes.md without the RMS clip).
This is not HF Adafactor (docs/methods/adafactor.md): that one uses the ``1 - t^-0.8`` schedule
and clips."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference.adamem_moments import factored_second_moment


@register("adafactor_bc_factored_step", "reference")
def adafactor_bc_factored_step_ref(W, G, row, col, *, lr: float, beta2: float, eps1: float,
                                   eps: float, c2: float, pre_scale: float,
                                   post_decay: float) -> None:
    """In place on W (m x n), row (m) and col (n), with G (m x n):

    ``row = beta2*row + (1-beta2)*rowmean(G^2 + eps1)``; same for ``col`` with colmean;
    ``W = W*pre_scale``; ``W = W - lr * G / (sqrt(outer(row, col)/mean(row)/c2) + eps)``;
    ``W = W - post_decay*W``. Math in fp32; W written back in its own dtype.
    """
    g = G.float()
    q = g * g + eps1
    row.copy_(row.float() * beta2 + (1.0 - beta2) * q.mean(dim=1))
    col.copy_(col.float() * beta2 + (1.0 - beta2) * q.mean(dim=0))
    v_hat = factored_second_moment(row.float(), col.float(), c2)
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * (g / (torch.sqrt(v_hat) + eps))
    if post_decay != 0.0:
        w = w - post_decay * w
    W.copy_(w)
