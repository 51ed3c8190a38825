"""Random subspace drift for RSAdamW, eager reference (docs/methods/adaptive_adamw.md, RSAdamW)."""
import math

import torch

from lowrank_fused.dispatch import register
from lowrank_fused.linalg import orth


@register("subspace_drift", "reference")
def subspace_drift_ref(P_old, Z: torch.Tensor, *, sigma: float, sign_canon: bool = True):
    """Left (canonical) form. ``Z`` is m x r with i.i.d. N(0, 1/m) entries (drawn by the caller,
    so the draw is seeded and checkpointable); ``P_old`` is the current m x r basis, or None at
    the first refresh. Returns the new fp32 basis

        P_new = orth(sqrt(1 - sigma^2) * P_old + sigma * Z)        (P_old given)
        P_new = orth(Z)                                             (first refresh)

    ``orth`` is the sign-canonical QR (diag(R) >= 0); ``sign_canon=False`` keeps the library's
    QR signs. A right-projected matrix passes ``Q^T`` and transposes the result back.
    """
    if P_old is None:
        Y = Z.float()
    else:
        Y = math.sqrt(1.0 - float(sigma) ** 2) * P_old.float() + float(sigma) * Z.float()
    return orth(Y) if sign_canon else torch.linalg.qr(Y)[0]
