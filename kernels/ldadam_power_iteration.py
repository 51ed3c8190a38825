"""LDAdam's warm-started power-iteration step (docs/methods/ldadam.md, line 1; K7)
on the batched GEMM kernel of the subspace refresh (``batched_matmul.py``): the two m x n
products read the accumulated gradient A once each in its storage dtype, and b = coef_m *
P_old M + coef_a * A is never formed (the fused form)::

    V1 = coef_m * M^T + coef_a * (A^T @ P_old)              # n x r
    Y  = coef_a * (A @ V1) + coef_m * (P_old @ (M @ V1))     # m x r

Not a kernel of its own: a composition registered as the ``triton`` implementation of
``ldadam_power_iteration``. The ``explicit`` form reproduces the official code's rounding
points in a materialised b, which is the reference's job: those calls run it. The caller's QR
of Y stays Householder (``orth``): Y = b (b^T P_old) has cond(b)^2, beyond CholeskyQR2's fp32
range (cond < ~1e3) for realistic gradient spectra, and a per-step fallback would cost a host
read per matrix.
"""
import torch


def ldadam_power_iteration(A, P_old, M, Y, *, coef_m: float, coef_a: float,
                           explicit: bool = False, b_dtype: torch.dtype = torch.float32,
                           precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.ldadam_power_iteration``."""
    if explicit:
        from lowrank_fused.reference.ldadam_power_iteration import ldadam_power_iteration_ref

        return ldadam_power_iteration_ref(A, P_old, M, Y, coef_m=coef_m, coef_a=coef_a,
                                          explicit=True, b_dtype=b_dtype, precision=precision)
    from lowrank_fused.subspace import batched_matmul

    P = P_old.float()
    Mf = M.float()
    V1 = batched_matmul(A.t().unsqueeze(0), P.unsqueeze(0), backend="triton",
                        precision=precision)[0]
    V1.mul_(coef_a).add_(Mf.t(), alpha=coef_m)
    Yp = batched_matmul(A.unsqueeze(0), V1.unsqueeze(0), backend="triton",
                        precision=precision)[0]
    Y.copy_(Yp.mul_(coef_a).addmm_(P, Mf @ V1, alpha=coef_m))


def aot_variants():
    """No kernel of its own: the products are ``batched_matmul.py``'s variants."""
    return iter(())
