"""AdaPM's periodic refit of (L, R) (docs/methods/adapm.md, update line 3) on the fused K1
projection: per alternating iteration two reads of G, no m x n temporary, G never cast to a
full-size fp32 copy.

    L-step:  G @ R^T   (m x r: K1 on the right, R as the basis)
    R-step:  L^T @ G   (r x n: K1 on the left, L as the basis)

Both products run ``kernels/project.py`` (G read in its storage dtype, cast in the GEMM
prologue, fp32 accumulate). Everything else is m x r, r x n or r x r work and stays in torch:
the Gram matrices, their largest eigenvalue (``eigvalsh``), the terms in L0 and R0. The final
re-orthonormalisation is CholeskyQR2 (``lowrank_fused.subspace.cholesky_qr2``, sign-canonical
like the reference's sign-fixed Householder QR, Householder fallback for ill-conditioned L)
with its triangular factor, so ``R = Rq @ R`` keeps ``L @ R``.

No host read: the reference skips a half-step when ``lmax <= 0`` after reading lmax with
``.item()``; here the step is selected on the device, ``torch.where(lmax > 0, X - grad/lmax,
X)`` with the same division by the same lmax (a denominator of 1 where not taken), so the
results are the reference's up to the rounding of the G products and of the QR.

Not a kernel of its own: a composition registered as the ``triton`` implementation of
``adapm_refit``. ``sign_canon=False`` asks for the QR library's own signs, which only the
reference reproduces: those calls run it.
"""
import torch


def _step(X: torch.Tensor, grad: torch.Tensor, lmax: torch.Tensor) -> torch.Tensor:
    """``X - grad/lmax`` where ``lmax > 0``, else ``X`` (a zero Gram matrix skips the
    half-step), decided on the device."""
    take = lmax > 0
    return torch.where(take, X - grad / torch.where(take, lmax, torch.ones_like(lmax)), X)


def adapm_refit(G: torch.Tensor, L0: torch.Tensor, R0: torch.Tensor, Rg: torch.Tensor,
                L: torch.Tensor, R: torch.Tensor, *, beta1: float, iters: int,
                sign_canon: bool = True, precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.adapm_refit.adapm_refit_ref`` (left form):
    writes the refitted L (m x r, orthonormal) and R (r x n) in their own dtypes."""
    m, n = G.shape
    r = L0.shape[1]
    if not sign_canon or r > m:
        from lowrank_fused.reference.adapm_refit import adapm_refit_ref

        return adapm_refit_ref(G, L0, R0, Rg, L, R, beta1=beta1, iters=iters,
                               sign_canon=sign_canon, precision=precision)
    from lowrank_fused import ops   # lazy: ops imports dispatch, which imports this package
    from lowrank_fused.subspace import cholesky_qr2

    beta1 = float(beta1)
    l0, r0 = L0.float(), R0.float()
    Lc = l0.clone()
    Rc = beta1 * r0 + (1.0 - beta1) * Rg.float()
    GRt = torch.empty(m, r, dtype=torch.float32, device=G.device)
    LtG = torch.empty(r, n, dtype=torch.float32, device=G.device)
    for _ in range(int(iters)):
        gram = Rc @ Rc.t()
        lmax = torch.linalg.eigvalsh(gram)[-1]
        ops.project(G, Rc, GRt, side="right", precision=precision, backend="triton")
        grad_L = Lc @ gram - beta1 * (l0 @ (r0 @ Rc.t())) - (1.0 - beta1) * GRt
        Lc = _step(Lc, grad_L, lmax)
        gram = Lc.t() @ Lc
        lmax = torch.linalg.eigvalsh(gram)[-1]
        ops.project(G, Lc, LtG, side="left", precision=precision, backend="triton")
        grad_R = gram @ Rc - beta1 * ((Lc.t() @ l0) @ r0) - (1.0 - beta1) * LtG
        Rc = _step(Rc, grad_R, lmax)
    Q, Rq = cholesky_qr2(Lc, return_r=True)
    L.copy_(Q)
    R.copy_(Rq @ Rc)


def aot_variants():
    """No kernel of its own: the G products are ``project.py``'s variants."""
    return iter(())
