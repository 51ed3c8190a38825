"""AdaMeM's Adafactor step of a set of 1-D parameters, eager reference: a loop over the
single-vector ``adafactor_bc_unfactored_step`` (docs/methods/adamem.md, "Routing"), with the
on-device ``skip`` flag (``lowrank_fused.reference._skip``: every W_b and V_b put back when it
holds True, the flag never read on the host)."""
from lowrank_fused.reference._skip import run_unless


def grouped_adamem_vector_step_ref(Ws, Gs, Vs, rows, *, skip=None, impl=None) -> None:
    """In place on every ``Ws[b]``, ``Vs[b]`` with row b of ``rows`` (``(lr, beta2, eps1, eps,
    c2, pre_scale, post_decay)``); ``impl``: the single-vector implementation to loop over
    (default the reference's)."""
    if impl is None:
        from lowrank_fused.reference.adafactor_bc_unfactored_step import (
            adafactor_bc_unfactored_step_ref as impl)
    Ws, Gs, Vs = list(Ws), list(Gs), list(Vs)
    if not (len(Ws) == len(Gs) == len(Vs) == len(rows)):
        raise ValueError(f"Ws, Gs, Vs and rows need one entry per member, got {len(Ws)}, "
                         f"{len(Gs)}, {len(Vs)} and {len(rows)}")

    def run():
        for W, G, V, (lr, beta2, eps1, eps, c2, pre, post) in zip(Ws, Gs, Vs, rows):
            impl(W, G, V, lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2, pre_scale=pre,
                 post_decay=post)
    if not Ws:
        return
    if skip is None:
        run()
    else:
        from lowrank_fused.ops import _check_skip

        _check_skip(skip, Ws[0].device)
        run_unless(skip, Ws + Vs, run)
