"""K1 projection of a group of same-shape matrices, eager reference: a loop over the
single-matrix reference ``project_ref`` (docs/methods/galore.md; K1 in docs/bytes.md)."""
from lowrank_fused.dispatch import register
from lowrank_fused.reference.project import project_ref


@register("grouped_project", "reference")
def grouped_project_ref(Gs, Ps, Rs, precision: str = "ieee", r_sumsq=None,
                        col_sumsq=None) -> None:
    """Left form, for every b: ``Rs[b] = Ps[b]^T @ Gs[b]`` (``project_ref``); with ``r_sumsq``
    (one fp32 element per member) also ``||Rs[b]||^2``; with ``col_sumsq`` (fp32, (count, n))
    also ``colsum(Gs[b]^2)`` in row b."""
    for b, (G, P, R) in enumerate(zip(Gs, Ps, Rs)):
        project_ref(G, P, R, precision=precision,
                    r_sumsq=None if r_sumsq is None else r_sumsq[b:b + 1],
                    col_sumsq=None if col_sumsq is None else col_sumsq[b])
