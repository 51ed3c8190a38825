"""GHAAdamW's generalised Hebbian basis update (docs/methods/adaptive_adamw.md) on the fused K1
projection: two reads of G, no m x n temporary.

    R  = P^T G  and colsum(G^2)      (K1 with its sum-of-squares side output; R = Y^T)
    GY = G @ Y = G R^T               (K1 on the right, with R as the basis)
    P_new = orth(P + eta*(GY/||G||^2 - P triu(R R^T/||G||^2)))

Everything after the two passes is r x r or m x r work. Not a kernel of its own: a composition
of the projection kernel, registered as the ``triton`` implementation of ``gha_update``.
"""
import torch

from lowrank_fused.reference.gha_update import gha_finish


def gha_update(G: torch.Tensor, P: torch.Tensor, *, eta: float, sign_canon: bool = True):
    """Same contract as ``lowrank_fused.reference.gha_update.gha_update_ref`` (left form)."""
    from lowrank_fused import ops   # lazy: ops imports dispatch, which imports this package

    p = P.float().contiguous()
    m, n = G.shape
    sumsq = torch.empty(n, dtype=torch.float32, device=G.device)
    R = ops.project(G, p, side="left", backend="triton", sumsq=sumsq)          # r x n = Y^T
    GY = ops.project(G, R, side="right", backend="triton")                       # m x r
    return gha_finish(R.t(), GY, sumsq.sum(), p, eta, sign_canon)


def aot_variants():
    """No kernel of its own: the two projections are ``project.py``'s variants."""
    return iter(())
