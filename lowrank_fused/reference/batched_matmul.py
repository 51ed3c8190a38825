"""Batched GEMM of the batched subspace refresh (K7 of docs/bytes.md), eager
reference."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._precision import matmul


@register("batched_matmul", "reference")
def batched_matmul_ref(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, *,
                       precision: str = "ieee") -> None:
    """``C[b] = float32(A[b]) @ B[b]`` into fp32 C (batch, M, N); A (batch, M, K) in its
    storage dtype, any strides; B (batch or 1, K, N) fp32; the operands rounded as
    ``precision`` rounds them."""
    C.copy_(matmul(A, B, precision))
