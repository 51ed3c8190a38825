"""Norm-growth limiter (Fira / APOLLO), eager reference (docs/methods/adaptive_adamw.md, phase B).

AdaptiveAdamW and its repository variants apply it to the normalised low-rank step
``N = exp_avg / denom`` before back-projection; since ``||P @ N|| = ||N||`` for an orthonormal
P, limiting N is the same as limiting the full-size update.
"""
import torch

from lowrank_fused.dispatch import register

NL_TINY = 1e-8   # Fira fira_adamw.py#L139: ``norm / (prev + 1e-8)``


@register("norm_growth_limit", "reference")
def norm_growth_limit_ref(N: torch.Tensor, nl_prev: torch.Tensor, *, gamma: float,
                          first: bool, sumsq=None) -> None:
    """In place on ``N`` (any shape) and the 0-dim fp32 memory ``nl_prev``.

    ``z = ||N||``; on the first call only ``nl_prev = z``. Afterwards
    ``f = max(z / (nl_prev + 1e-8), gamma) / gamma``, ``N = N / f``, ``nl_prev = z / f``:
    the norm of the step may grow by at most a factor ``gamma`` per step. Math in fp32.

    A memory of exactly 0 (the previous step was zero: a zero gradient) counts as no memory
    (``f = 1``, record ``z``), where Fira's formula would throttle the layer to grow from
    1e-8 by ``gamma`` per step (AdaptiveAdamW guards zero gradients; this is the same
    guard for the limiter, a design choice). Otherwise this is Fira's formula exactly.

    ``sumsq`` (optional, a 1-element fp32 tensor): ``||N||^2`` already computed, e.g. by K2's
    side output (``adam_moments(..., sumsq=)``); then ``z = sqrt(sumsq)`` and N is not read
    for its norm.
    """
    if sumsq is None:
        z = torch.linalg.vector_norm(N.float())
    else:
        z = sumsq.float().reshape(()).sqrt()
    if first:
        nl_prev.copy_(z)
        return
    prev = nl_prev.float()
    f = torch.clamp(z / (prev + NL_TINY), min=float(gamma)) / float(gamma)
    f = torch.where(prev > 0, f, torch.ones_like(f))
    N.copy_(N.float() / f)
    nl_prev.copy_(z / f)


def grouped_norm_growth_limit_ref(Ns, norms, prevs, *, gamma: float, skip=None) -> None:
    """The limiter (not the first call) on every member of a stack: ``Ns`` (count, ...),
    ``norms`` (count,) fp32 with every ``||N_b||^2``, ``prevs`` the members' 1-element fp32
    memories; member b as ``norm_growth_limit_ref(Ns[b], prevs[b], gamma=gamma, first=False,
    sumsq=norms[b:b+1])``. ``skip`` (0-dim bool on the device): when True every memory keeps
    its bits (N is divided regardless: it is the caller's workspace)."""
    from lowrank_fused.reference._skip import run_unless

    for b, prev in enumerate(prevs):
        if skip is None:
            norm_growth_limit_ref(Ns[b], prev, gamma=gamma, first=False, sumsq=norms[b:b + 1])
        else:
            run_unless(skip, [prev], norm_growth_limit_ref, Ns[b], prev, gamma=gamma,
                       first=False, sumsq=norms[b:b + 1])
