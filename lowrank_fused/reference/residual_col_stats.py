"""AdaMeM one-sided (per-column) Adafactor statistics of the residual ``S = G - P @ R``, eager
reference (docs/methods/adamem.md, update lines 4 and 7 and the fused identity below them;
the paper's Alg. 4 with the orientation fixed by Claim 3.1; K5 pass 1 in docs/bytes.md)."""
import torch

from lowrank_fused.dispatch import register


def residual_col_sumsq(G, P, R, explicit: bool = False, g_col_sumsq=None) -> torch.Tensor:
    """``colsum(S^2)`` (n) of ``S = G - P @ R``, with R = P^T G.

    identity (default): ``colsum(G^2) - colsum(R^2)``, exact for orthonormal P, so S is never
    formed; fp32 accumulation, clamped at 0 against cancellation. ``g_col_sumsq``, when given,
    is ``colsum(G^2)`` already computed (by the projection's pass over G), so G is not read
    again. explicit: forms S.
    """
    if explicit:
        s = G.float() - P.float() @ R.float()
        return (s * s).sum(dim=0)
    if g_col_sumsq is None:
        g = G.float()
        g_col_sumsq = (g * g).sum(dim=0)
    r = R.float()
    return torch.clamp(g_col_sumsq.float() - (r * r).sum(dim=0), min=0.0)


@register("residual_col_stats", "reference")
def residual_col_stats_ref(G, P, R, c_os, col_scale, *, beta2: float, eps1: float, eps: float,
                           c2: float, explicit: bool = False, g_col_sumsq=None) -> None:
    """Left form: G (m x n) in its storage dtype, P (m x r), R = P^T G (r x n, fp32).
    Updates ``c_os`` (n) in place and writes ``col_scale`` (n):

    ``c_os = beta2*c_os + (1-beta2)*colmean(S^2 + eps1)``, where
    ``colmean(S^2 + eps1) = colsum(S^2)/m + eps1``;
    ``col_scale = 1 / (sqrt(c_os/c2) + eps)``, so that ``N2 = S * col_scale[None, :]``.
    A right-projected (transposed) matrix passes ``G^T``, ``R^T``: its statistics are then
    per row of G.
    """
    m = G.shape[0]
    mean_sq = residual_col_sumsq(G, P, R, explicit, g_col_sumsq) / m + eps1
    c_os.copy_(c_os.float() * beta2 + (1.0 - beta2) * mean_sq)
    col_scale.copy_(1.0 / (torch.sqrt(c_os.float() / c2) + eps))
