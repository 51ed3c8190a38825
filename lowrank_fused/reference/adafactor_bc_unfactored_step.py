"""Unfactored Adafactor with a fixed beta2 and bias correction, no momentum, no clipping: AdaMeM's
optimizer for 1-D parameters (norm weights, biases), eager reference (docs/methods/adamem.md,
"Routing"; the ``ndim < 2`` branch of docs/methods/adafactor.md with a fixed beta2)."""
import torch

from lowrank_fused.dispatch import register


@register("adafactor_bc_unfactored_step", "reference")
def adafactor_bc_unfactored_step_ref(W, G, V, *, lr: float, beta2: float, eps1: float,
                                     eps: float, c2: float, pre_scale: float,
                                     post_decay: float) -> None:
    """Elementwise, in place on W and V (same shape as G):

    ``V = beta2*V + (1-beta2)*(G^2 + eps1)``; ``W = W*pre_scale``;
    ``W = W - lr * G / (sqrt(V/c2) + eps)``; ``W = W - post_decay*W``. Math in fp32.
    """
    g = G.float()
    V.copy_(V.float() * beta2 + (1.0 - beta2) * (g * g + eps1))
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * (g / (torch.sqrt(V.float() / c2) + eps))
    if post_decay != 0.0:
        w = w - post_decay * w
    W.copy_(w)
