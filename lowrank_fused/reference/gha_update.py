"""Generalised Hebbian (Sanger) subspace tracking for GHAAdamW, eager reference
(ALGORITHMS.md section 5.6, gha)."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.linalg import orth


@register("gha_update", "reference")
def gha_update_ref(G: torch.Tensor, P: torch.Tensor, *, eta: float, sign_canon: bool = True):
    """Left (canonical) form: G (m x n, any float dtype), P (m x r) orthonormal. Returns the new
    fp32 basis

        Y = G^T @ P                      (n x r)
        H = (Y^T @ Y) / ||G||^2          (r x r)
        P_new = orth(P + eta * ((G @ Y) / ||G||^2 - P @ triu(H)))

    (Sanger's rule on the gradient covariance, normalised by ``||G||^2``), or None when
    ``G == 0`` (the basis is kept: there is nothing to learn from). Two reads of G, like K7.
    ``sign_canon=False`` keeps the library's QR signs. Math in fp32.
    """
    g = G.float()
    p = P.float()
    g2 = (g * g).sum()
    if g2.item() == 0.0:
        return None
    Y = g.t() @ p
    H = (Y.t() @ Y) / g2
    Y = p + float(eta) * ((g @ Y) / g2 - p @ torch.triu(H))
    return orth(Y) if sign_canon else torch.linalg.qr(Y)[0]
