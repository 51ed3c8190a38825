"""AdaMeM's factored Adafactor step with the on-device ``skip`` flag, eager reference:
``adafactor_bc_factored_step_ref`` (docs/methods/adamem.md, "Routing") whose W, row and col
are put back when the flag holds True (``lowrank_fused.reference._skip``: a snapshot and a
select, the flag never read on the host; no snapshot without a flag)."""
from lowrank_fused.reference._skip import run_unless


def adamem_factored_step_ref(W, G, row, col, *, lr: float, beta2: float, eps1: float,
                             eps: float, c2: float, pre_scale: float, post_decay: float,
                             skip=None) -> None:
    from lowrank_fused.reference.adafactor_bc_factored_step import (
        adafactor_bc_factored_step_ref)

    kw = dict(lr=lr, beta2=beta2, eps1=eps1, eps=eps, c2=c2, pre_scale=pre_scale,
              post_decay=post_decay)
    if skip is None:
        adafactor_bc_factored_step_ref(W, G, row, col, **kw)
        return
    from lowrank_fused.ops import _check_skip

    _check_skip(skip, W.device)
    run_unless(skip, [W, row, col], adafactor_bc_factored_step_ref, W, G, row, col, **kw)
