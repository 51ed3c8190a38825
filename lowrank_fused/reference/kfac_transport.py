"""Transport of GaLoreKFACAdamW's momentum and Kronecker factor across a subspace refresh,
eager reference (docs/methods/adaptive_adamw.md: A4 applied to GaLoreKFACAdamW)."""
import torch

from lowrank_fused.dispatch import register


@register("kfac_transport", "reference")
def kfac_transport_ref(P_new: torch.Tensor, P_old: torch.Tensor, M: torch.Tensor,
                       F: torch.Tensor):
    """Left (canonical) form: bases P_new (m x r_new), P_old (m x r_old), momentum M
    (r_old x n), factor F (r_old x r_old). Returns new tensors ``(C @ M, C @ F @ C^T)`` with
    ``C = P_new^T @ P_old``: the momentum moves like a vector, the (covariance-like) factor
    by congruence, which keeps it symmetric positive semi-definite. Math in fp32; outputs
    take the inputs' dtypes.
    """
    C = P_new.float().t() @ P_old.float()
    return (C @ M.float()).to(M.dtype), (C @ F.float() @ C.t()).to(F.dtype)
