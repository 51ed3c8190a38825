"""AdaMeM low-rank momentum and factored (Adafactor) preconditioner, eager reference
(docs/methods/adamem.md, update lines 5-6; the paper's Alg. 1 l.8-9 and Alg. 3; K2)."""
import torch

from lowrank_fused.dispatch import register


def factored_second_moment(row: torch.Tensor, col: torch.Tensor, c2: float) -> torch.Tensor:
    """Adafactor's rank-1 second-moment estimate ``outer(row, col) / mean(row) / c2``
    (Alg. 3 l.4 written with means; ``c2`` is bc2(t), or 1 without bias correction)."""
    return torch.outer(row, col) / row.mean() / c2


@register("adamem_moments", "reference")
def adamem_moments_ref(R, M, row, col, N, *, beta1: float, beta2: float, eps: float,
                       eps1: float, c1: float, c2: float, stats_from_momentum: bool) -> None:
    """Left form, in place on M (r x n), row (r), col (n); the normalised step into N (r x n).

    ``M = beta1*M + (1-beta1)*R``; ``Mhat = M/c1``;
    ``X = Mhat`` (``stats_from_momentum``, the paper's Alg. 1 l.9) or ``X = R``;
    ``row = beta2*row + (1-beta2)*rowmean(X^2 + eps1)``;
    ``col = beta2*col + (1-beta2)*colmean(X^2 + eps1)``;
    ``N = Mhat / (sqrt(outer(row, col)/mean(row)/c2) + eps)``.
    ``c1, c2`` are bc1(t), bc2(t) with bias correction, else 1. Math in fp32.
    """
    r = R.float()
    m = M.float() * beta1 + (1.0 - beta1) * r
    M.copy_(m)
    m_hat = M.float() / c1
    x = m_hat if stats_from_momentum else r
    q = x * x + eps1
    row.copy_(row.float() * beta2 + (1.0 - beta2) * q.mean(dim=1))
    col.copy_(col.float() * beta2 + (1.0 - beta2) * q.mean(dim=0))
    v_hat = factored_second_moment(row.float(), col.float(), c2)
    N.copy_(m_hat / (torch.sqrt(v_hat) + eps))
