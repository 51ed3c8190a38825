"""Linear moment transport (AdaRankGrad's ``v_transport="linear"``), eager reference
(docs/methods/adarankgrad.md, design choices: unsafe, V can turn negative)."""
import torch

from lowrank_fused.dispatch import register


@register("moment_transport_linear", "reference")
def moment_transport_linear_ref(P_new: torch.Tensor, P_old: torch.Tensor, M: torch.Tensor,
                                V: torch.Tensor):
    """Left (canonical) form, the signature of ``moment_transport``: returns new tensors
    ``(C @ M, C @ V)`` of shape (r_new x n) with ``C = P_new^T @ P_old``.

    This is the paper's transform as transcribed by a third-party source (``v <- R_t v``). Unlike
    ``moment_transport``'s ``(C*C) @ V`` it can make V negative, which turns
    ``sqrt(V)`` into NaN: unsafe, kept only as the flag's alternative. Math in fp32;
    outputs take the moments' dtype.
    """
    C = P_new.float().t() @ P_old.float()
    return (C @ M.float()).to(M.dtype), (C @ V.float()).to(V.dtype)
