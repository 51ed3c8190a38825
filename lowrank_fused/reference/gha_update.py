"""Generalised Hebbian (Sanger) subspace tracking for GHAAdamW, eager reference
(docs/methods/adaptive_adamw.md, GHAAdamW)."""
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

    (Sanger's rule on the gradient covariance, normalised by ``||G||^2``). When ``G == 0`` or
    is not finite there is nothing to learn from: the result is P itself, chosen on the device
    with no host synchronisation. Two reads of G, like K7.
    ``sign_canon=False`` keeps the library's QR signs. Math in fp32.
    """
    g = G.float()
    p = P.float()
    return gha_finish(g.t() @ p, g @ (g.t() @ p), (g * g).sum(), p, eta, sign_canon)


def gha_finish(Y, GY, g2, p, eta, sign_canon):
    """The r x r and m x r tail shared by every backend: Y = G^T P (n x r), GY = G @ Y
    (m x r), g2 = ||G||^2 (0-d), p = P (fp32)."""
    ok = (g2 > 0) & torch.isfinite(g2)
    g2s = torch.where(ok, g2, torch.ones_like(g2))
    H = (Y.t() @ Y) / g2s
    Z = torch.where(ok, p + float(eta) * (GY / g2s - p @ torch.triu(H)), p)
    Q = orth(Z) if sign_canon else torch.linalg.qr(Z)[0]
    return torch.where(ok, Q, p)                  # exactly P when there is nothing to learn
