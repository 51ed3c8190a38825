"""K1 projection of a group of same-shape matrices (issue 4), eager reference: a loop over the
single-matrix reference ``project_ref`` (ALGORITHMS.md section 4.3 line 3, section 10 K1)."""
from lowrank_fused.dispatch import register
from lowrank_fused.reference.project import project_ref


@register("grouped_project", "reference")
def grouped_project_ref(Gs, Ps, Rs, precision: str = "ieee") -> None:
    """Left form, for every b: ``Rs[b] = Ps[b]^T @ Gs[b]`` (``project_ref``)."""
    for G, P, R in zip(Gs, Ps, Rs):
        project_ref(G, P, R, precision=precision)
