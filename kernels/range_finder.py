"""SSRF range finder (AdaRankGrad's subspace selection, docs/methods/adarankgrad.md) and AdaPM's
basis initialisation (docs/methods/adapm.md) on the shared subspace primitives: the G products run
the batched GEMM kernel (``batched_matmul.py``: G read once per product in its storage dtype,
cast in the prologue, fp32 accumulate) and every re-orthonormalisation is CholeskyQR2
(``lowrank_fused.subspace.cholesky_qr2``: two Gram GEMMs and batched k x k Cholesky instead of
Householder QR, Householder only for rank-deficient input).

Not kernels of their own: compositions registered as the ``triton`` implementations of
``range_finder`` and ``adapm_init_basis``. Their references (``reference/range_finder.py``,
``reference/adapm_refit.py``) orthonormalise with Householder QR; both are sign-canonical
(``diag(R) >= 0``), so the results agree to rounding on full-rank input. With
``sign_canon=False`` the bases carry the QR library's own signs, which only the reference
reproduces: those calls run it.
"""
import torch


def range_finder(G: torch.Tensor, Omega: torch.Tensor, Qb: torch.Tensor, *,
                 power_iters: int, sign_canon: bool = True, fill_seed: int = 0,
                 precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.range_finder.range_finder_ref``."""
    from lowrank_fused.subspace import sketched_range

    if not sign_canon:
        from lowrank_fused.reference.range_finder import range_finder_ref

        return range_finder_ref(G, Omega, Qb, power_iters=power_iters, sign_canon=False,
                                fill_seed=fill_seed, precision=precision)
    Qb.copy_(sketched_range(G, Omega, power_iters=power_iters, fill_seed=fill_seed,
                            backend="triton", precision=precision))


def adapm_init_basis(G: torch.Tensor, Omega: torch.Tensor, L: torch.Tensor, *,
                     sign_canon: bool = True, precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.adapm_refit.adapm_init_basis_ref``:
    ``L = orth(G Omega)`` and one power iteration, i.e. SSRF with q = 1."""
    from lowrank_fused.subspace import sketched_range

    if not sign_canon:
        from lowrank_fused.reference.adapm_refit import adapm_init_basis_ref

        return adapm_init_basis_ref(G, Omega, L, sign_canon=False, precision=precision)
    L.copy_(sketched_range(G, Omega, power_iters=1, backend="triton", precision=precision))


def aot_variants():
    """No kernel of its own: the products are ``batched_matmul.py``'s variants."""
    return iter(())
