"""AdaPM / AdaPM-mini full-momentum and no-momentum blocks, eager reference
(docs/methods/adapm.md: the full- and no-momentum blocks; AdaPM-mini for block means)."""
from lowrank_fused.dispatch import register
from lowrank_fused.reference.adapm_update import second_moment_and_apply


@register("adapm_dense_update", "reference")
def adapm_dense_update_ref(W, G, M, V, *, beta1: float, c1: float, v_keep: float, v_add: float,
                           eps: float, c2: float, lr: float, pre_scale: float,
                           clip_mode: str = "elementwise", clip_threshold: float = 1.0) -> None:
    """In place on M, V and W (W, G, M m x n; V m x n or Adam-mini block means).

    Full momentum (V blocks, lm_head, 1-D): ``M = beta1*M + (1-beta1)*G`` and ``mc = M/c1``.
    No momentum (``M is None``: embeddings, attention out-projection, "AdaGrad-style"):
    ``mc = G``. Second moment, clip and the decoupled update as in ``adapm_update``.
    """
    g = G.float()
    if M is None:
        mc = g
    else:
        M.copy_(M.float() * beta1 + (1.0 - beta1) * g)
        mc = M.float() / c1
    second_moment_and_apply(W, G, mc, V, v_keep=v_keep, v_add=v_add, eps=eps, c2=c2, lr=lr,
                            pre_scale=pre_scale, clip_mode=clip_mode,
                            clip_threshold=clip_threshold)
