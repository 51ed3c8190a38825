"""KFAC-whitened low-rank momentum for GaLoreKFACAdamW, eager reference
(docs/methods/adaptive_adamw.md, GaLoreKFACAdamW)."""
import torch

from lowrank_fused.dispatch import register


@register("kfac_precondition", "reference")
def kfac_precondition_ref(R, M, F, root, N, *, beta1: float, beta2: float, c1: float,
                          c2: float, eps_rel: float, recompute: bool) -> bool:
    """Left (canonical) form: projected gradient R (r x n, fp32), momentum M (r x n), Kronecker
    left factor F (r x r), its cached inverse root ``root`` (r x r) and the output N (r x n).
    In place:

        M = beta1*M + (1-beta1)*R
        F = beta2*F + (1-beta2)*(R @ R^T)/n
        if recompute:  root = (F/c2 + eps_k*I)^(-1/2),  eps_k = eps_rel*trace(F/c2)/r   (eigh)
        N = root @ (M/c1)

    ``c1, c2`` are the bias corrections ``bc1(t), bc2(t)`` (1 without correction). Eigenvalues
    are clamped at ``eps_k`` against rounding. Returns False when a recompute found ``F == 0``
    (then ``root = 0``, ``N = 0`` and the caller must recompute at the next step), else True.
    Math in fp32; M, F, root and N keep their own dtypes.
    """
    r, n = R.shape
    Rf = R.float()
    M.copy_(beta1 * M.float() + (1.0 - beta1) * Rf)
    F.copy_(beta2 * F.float() + (1.0 - beta2) * (Rf @ Rf.t()) / n)
    valid = recompute_root(F, root, c2=c2, eps_rel=eps_rel) if recompute else True
    N.copy_(root.float() @ (M.float() / c1))
    return valid


def recompute_root(F, root, *, c2: float, eps_rel: float) -> bool:
    """``root = (F/c2 + eps_k*I)^(-1/2)`` in place (r x r eigh, eigenvalues clamped at
    ``eps_k = eps_rel*trace(F/c2)/r``); False (and ``root = 0``) when ``F == 0``. Shared by
    every backend of ``kfac_precondition`` (small dense algebra: torch)."""
    r = F.shape[0]
    Fh = F.float() / c2
    eps_k = eps_rel * torch.trace(Fh).item() / r
    if not eps_k > 0.0:
        root.zero_()
        return False
    A = Fh + eps_k * torch.eye(r, dtype=Fh.dtype, device=Fh.device)
    evals, evecs = torch.linalg.eigh(0.5 * (A + A.t()))
    evals = torch.clamp(evals, min=eps_k)
    root.copy_((evecs * evals.rsqrt()) @ evecs.t())
    return True
