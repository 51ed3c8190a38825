"""K8 moment transport between subspaces, eager reference (docs/methods/adaptive_adamw.md,
A4; K8 in docs/bytes.md). Used by AdaptiveAdamW and AdaRankGrad across refreshes and rank
changes."""
import torch

from lowrank_fused.dispatch import register


@register("moment_transport", "reference")
def moment_transport_ref(P_new: torch.Tensor, P_old: torch.Tensor, M: torch.Tensor,
                         V: torch.Tensor):
    """Left (canonical) form: bases P_new (m x r_new), P_old (m x r_old), moments M, V
    (r_old x n). Returns new tensors ``(C @ M, (C*C) @ V)`` of shape (r_new x n), with
    ``C = P_new^T @ P_old``; ``C*C >= 0`` keeps V non-negative. Math in fp32; outputs take
    the moments' dtype. A right-projected matrix passes ``Q^T`` bases and ``M^T, V^T``.
    """
    C = P_new.float().t() @ P_old.float()
    return (C @ M.float()).to(M.dtype), ((C * C) @ V.float()).to(V.dtype)
