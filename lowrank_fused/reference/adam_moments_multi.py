"""K2 over many tensors at once (multi-tensor apply), eager reference: a loop over
the single-op reference ``adam_moments_ref``, the norms and the non-finite flag in torch."""
import torch

from lowrank_fused.dispatch import register
from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference.adam_moments import adam_moments_ref


@register("adam_moments_multi", "reference")
def adam_moments_multi_ref(Rs, Ms, Vs, Ns, *, beta1, beta2, eps, c1, c2, norms=None,
                           nonfinite=None, skip=None) -> None:
    """For every i: ``adam_moments_ref(Rs[i], Ms[i], Vs[i], Ns[i])`` with the i-th scalars
    (``beta1, beta2, eps, c1, c2`` are sequences, one value per tensor).

    ``norms`` (fp32, ``(len(Rs),)``), if given, receives ``sum(N_i^2)`` of the stored N_i;
    ``nonfinite`` (int32, one element), if given, is set to 1 when some R_i holds a NaN or an
    infinity, and is otherwise left as it was (the caller zeroes it and reads it once).
    ``skip`` (optional, 0-dim bool): where True, the Ms, Vs, Ns and ``norms`` keep their bits;
    ``nonfinite`` is set as without it (it reports the inputs).
    """
    if skip is not None:
        return run_unless(skip, [*Ms, *Vs, *Ns, norms], adam_moments_multi_ref, Rs, Ms, Vs, Ns,
                          beta1=beta1, beta2=beta2, eps=eps, c1=c1, c2=c2, norms=norms,
                          nonfinite=nonfinite)
    for i, (R, M, V, N) in enumerate(zip(Rs, Ms, Vs, Ns)):
        adam_moments_ref(R, M, V, N, beta1=float(beta1[i]), beta2=float(beta2[i]),
                         eps=float(eps[i]), c1=float(c1[i]), c2=float(c2[i]))
        if norms is not None:
            norms[i] = N.float().square().sum()
        if nonfinite is not None:   # set on the device, no host read
            nonfinite.masked_fill_(~torch.isfinite(R).all(), 1)
