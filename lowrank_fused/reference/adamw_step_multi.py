"""Dense AdamW step over many tensors at once (multi-tensor apply), eager reference:
a loop over the single-op reference ``adamw_step_ref``, the non-finite flag in torch."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference.adamw_step import adamw_step_ref


@register("adamw_step_multi", "reference")
def adamw_step_multi_ref(Ws, Gs, Ms, Vs, *, lr, beta1, beta2, eps, c1, c2, pre_scale,
                         post_decay, nonfinite=None, skip=None) -> None:
    """For every i: ``adamw_step_ref(Ws[i], Gs[i], Ms[i], Vs[i])`` with the i-th scalars (each
    scalar argument is a sequence, one value per tensor).

    ``nonfinite`` (int32, one element), if given, is set to 1 when some G_i holds a NaN or an
    infinity, and is otherwise left as it was. ``skip`` (optional, 0-dim bool): where True,
    the Ws, Ms and Vs keep their bits; ``nonfinite`` is set as without it.
    """
    if skip is not None:
        return run_unless(skip, [*Ws, *Ms, *Vs], adamw_step_multi_ref, Ws, Gs, Ms, Vs, lr=lr,
                          beta1=beta1, beta2=beta2, eps=eps, c1=c1, c2=c2,
                          pre_scale=pre_scale, post_decay=post_decay, nonfinite=nonfinite)
    for i, (W, G, M, V) in enumerate(zip(Ws, Gs, Ms, Vs)):
        adamw_step_ref(W, G, M, V, lr=float(lr[i]), beta1=float(beta1[i]),
                       beta2=float(beta2[i]), eps=float(eps[i]), c1=float(c1[i]),
                       c2=float(c2[i]), pre_scale=float(pre_scale[i]),
                       post_decay=float(post_decay[i]))
        if nonfinite is not None:   # set on the device, no host read
            nonfinite.masked_fill_(~torch.isfinite(G).all(), 1)
