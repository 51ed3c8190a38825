"""LDAdam's warm-started block power iteration (docs/methods/ldadam.md, update line 1 and
its fused form; K4/K7 in docs/bytes.md), eager reference."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference.ldadam_momentum_mix import ldadam_momentum_mix_ref


@register("ldadam_power_iteration", "reference")
def ldadam_power_iteration_ref(A, P_old, M, Y, *, coef_m: float, coef_a: float,
                               explicit: bool = False, b_dtype: torch.dtype = torch.float32,
                               precision: str = "ieee") -> None:
    """Left (canonical) form: one power-iteration step on
    ``b = coef_m*(P_old @ M) + coef_a*A`` warm-started at ``P_old``; writes the un-orthogonalised
    ``Y = b @ (b^T @ P_old)`` (m x r, fp32) into ``Y``. The caller orthogonalises (``orth``).

    ``explicit=False`` (the fused form of docs/methods/ldadam.md, the kernels' form): ``b`` is
    never formed::

        V1 = coef_m * M^T + coef_a * (A^T @ P_old)            # n x r, uses P_old^T P_old = I
        Y  = coef_m * (P_old @ (M @ V1)) + coef_a * (A @ V1)   # m x r

    exact only when P_old has orthonormal columns (fp32 P_old).

    ``explicit=True`` (the update rule literally, as ``ldadamw_torch``): ``b`` is materialised in
    ``b_dtype`` and ``V = b^T @ P_old`` is rounded to ``b_dtype`` before ``Y = b @ V``
    (with ``b_dtype`` the bf16 parameter dtype this reproduces the official rounding points;
    with fp32 it is the textbook formula).

    A (m x n) is read in its storage dtype; P_old (m x r), M (r x n). Math in fp32.
    A right-projected matrix passes ``A^T, Q_old^T, M^T`` and receives ``Q_new^T``'s ``Y``.
    """
    P = P_old.float()
    if explicit:
        B = torch.empty(A.shape, dtype=b_dtype, device=A.device)
        ldadam_momentum_mix_ref(A, P_old, M, B, coef_m=coef_m, coef_a=coef_a)
        b = B.float()
        V = (b.t() @ P).to(b_dtype).float()
        Y.copy_((b @ V).to(b_dtype))
        return
    a = A.float()
    m = M.float()
    V1 = coef_m * m.t() + coef_a * (a.t() @ P)
    Y.copy_(coef_m * (P @ (m @ V1)) + coef_a * (a @ V1))
