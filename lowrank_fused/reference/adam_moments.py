"""K2 low-rank moment update, eager reference (docs/methods/galore.md; K2 in docs/bytes.md)."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless


@register("adam_moments", "reference")
def adam_moments_ref(R, M, V, N, *, beta1: float, beta2: float, eps: float,
                     c1: float, c2: float, sumsq=None, skip=None) -> None:
    """Update the moments in place and write the normalised step ``N``.

    ``M = beta1*M + (1-beta1)*R``; ``V = beta2*V + (1-beta2)*R^2``;
    ``N = (M/c1) / (sqrt(V/c2) + eps)``. E-torch passes ``c1, c2 = bc1, bc2``; E-hf passes
    ``c1 = c2 = 1`` (its bias correction lives in the step size). Math in fp32; M, V, N are
    stored in their own dtypes (fp32, or the parameter dtype with ``faithful_dtypes``).

    ``sumsq`` (optional, a 1-element fp32 tensor) receives ``sum(N^2)`` of the stored N: the
    norm the norm-growth limiter needs, which the fused kernel computes in its pass.

    ``skip`` (optional, 0-dim bool): where True, M, V, N and ``sumsq`` keep their bits.
    """
    if skip is not None:
        return run_unless(skip, (M, V, N, sumsq), adam_moments_ref, R, M, V, N, beta1=beta1,
                          beta2=beta2, eps=eps, c1=c1, c2=c2, sumsq=sumsq)
    r = R.float()
    m = M.float() * beta1 + (1.0 - beta1) * r
    v = V.float() * beta2 + (1.0 - beta2) * (r * r)
    M.copy_(m)
    V.copy_(v)
    N.copy_((M.float() / c1) / (torch.sqrt(V.float() / c2) + eps))
    if sumsq is not None:
        sumsq.copy_(N.float().square().sum().reshape(sumsq.shape))
