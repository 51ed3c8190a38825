"""Dense AdamW step for non-projected parameters, eager reference (docs/methods/adamw.md)."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless


@register("adamw_step", "reference")
def adamw_step_ref(W, G, M, V, *, lr: float, beta1: float, beta2: float, eps: float,
                   c1: float, c2: float, pre_scale: float, post_decay: float,
                   skip=None) -> None:
    """One elementwise AdamW step, in place on W, M, V (all the same shape).

    ``W = W*pre_scale``; moments as in ``adam_moments``;
    ``W = W - lr*(M/c1)/(sqrt(V/c2)+eps)``; ``W = W - post_decay*W``.
    torch AdamW: ``c = bc``, ``lr = lr``, WD-pre. HF AdamW (GaLore's dense groups):
    ``c = 1``, ``lr = lr*sqrt(bc2)/bc1``, WD-post with ``post_decay = lr*wd``.
    ``skip`` (optional, 0-dim bool): where True, W, M and V keep their bits.
    """
    if skip is not None:
        return run_unless(skip, (W, M, V), adamw_step_ref, W, G, M, V, lr=lr, beta1=beta1,
                          beta2=beta2, eps=eps, c1=c1, c2=c2, pre_scale=pre_scale,
                          post_decay=post_decay)
    g = G.float()
    m = M.float() * beta1 + (1.0 - beta1) * g
    v = V.float() * beta2 + (1.0 - beta2) * (g * g)
    M.copy_(m)
    V.copy_(v)
    w = W.float()
    if pre_scale != 1.0:
        w = w * pre_scale
    w = w - lr * ((M.float() / c1) / (torch.sqrt(V.float() / c2) + eps))
    if post_decay != 0.0:
        w = w - post_decay * w
    W.copy_(w)
