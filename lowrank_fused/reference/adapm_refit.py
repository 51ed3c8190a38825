"""AdaPM factor maintenance, eager reference: the basis initialisation at t = 1 and the periodic
refit of (L, R) by alternating gradient descent (docs/methods/adapm.md, update lines 1
and 3)."""
import torch

from lowrank_fused.dispatch import register


def _qr(Y: torch.Tensor, sign_canon: bool):
    """Reduced QR of fp32 ``Y``; with ``sign_canon`` each column of Q (and the matching row of
    R) is flipped so that ``diag(R) >= 0`` (``orth``, docs/conventions.md)."""
    Q, Rq = torch.linalg.qr(Y)
    if sign_canon:
        sign = torch.where(torch.diagonal(Rq) < 0, -1.0, 1.0).to(Q.dtype)
        Q = Q * sign.unsqueeze(0)
        Rq = Rq * sign.unsqueeze(1)
    return Q, Rq


@register("adapm_init_basis", "reference")
def adapm_init_basis_ref(G, Omega, L, *, sign_canon: bool = True, precision: str = "ieee") -> None:
    """Update line 1 of docs/methods/adapm.md: ``L = orth(G @ Omega)``, then one power iteration
    ``L = orth(G @ orth(G^T @ L))`` (SSRF, docs/methods/adarankgrad.md). G m x n (storage dtype),
    Omega n x r (fp32 Gaussian sketch), L m x r written in its own dtype. The zero initialisation
    of Alg. 1 is a saddle of ``||LR - m||^2``, hence this start (docs/methods/adapm.md)."""
    g = G.float()
    Y, _ = _qr(g @ Omega.float(), sign_canon)
    Z, _ = _qr(g.t() @ Y, sign_canon)
    Y, _ = _qr(g @ Z, sign_canon)
    L.copy_(Y)


@register("adapm_refit", "reference")
def adapm_refit_ref(G, L0, R0, Rg, L, R, *, beta1: float, iters: int, sign_canon: bool = True,
                    precision: str = "ieee") -> None:
    """Line 4 of 9.6 (refit branch), left form. Writes the refitted factors into L (m x r) and
    R (r x n) given the previous ones L0, R0 and ``Rg = L0^T @ G`` (r x n, fp32).

    Target ``M* = beta1*L0@R0 + (1-beta1)*G`` (never materialised). Start:
    ``L = L0``, ``R = beta1*R0 + (1-beta1)*Rg`` (the exact least-squares R for L0). Then
    ``iters`` alternating gradient steps, each with step ``1/lmax`` of the *current* Gram
    matrix (a zero Gram matrix skips that half-step):

        L -= (L(RR^T) - beta1*L0(R0R^T) - (1-beta1)*G@R^T) / lmax(RR^T)
        R -= ((L^TL)R - beta1*(L^TL0)R0 - (1-beta1)*L^T@G) / lmax(L^TL)

    and finally ``L, Rq = qr(L)``, ``R = Rq@R`` (L orthonormal, L@R unchanged).
    """
    g = G.float()
    l0, r0 = L0.float(), R0.float()
    Lc = l0.clone()
    Rc = beta1 * r0 + (1.0 - beta1) * Rg.float()
    for _ in range(int(iters)):
        gram = Rc @ Rc.t()
        lmax = torch.linalg.eigvalsh(gram)[-1].item()
        if lmax > 0.0:
            grad_L = Lc @ gram - beta1 * (l0 @ (r0 @ Rc.t())) - (1.0 - beta1) * (g @ Rc.t())
            Lc = Lc - grad_L / lmax
        gram = Lc.t() @ Lc
        lmax = torch.linalg.eigvalsh(gram)[-1].item()
        if lmax > 0.0:
            grad_R = gram @ Rc - beta1 * ((Lc.t() @ l0) @ r0) - (1.0 - beta1) * (Lc.t() @ g)
            Rc = Rc - grad_R / lmax
    Q, Rq = _qr(Lc, sign_canon)
    L.copy_(Q)
    R.copy_(Rq @ Rc)
