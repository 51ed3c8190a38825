"""Reference of LDAdam's error-feedback accumulation (docs/methods/ldadam.md, line 3):
``E_i += G_i`` in place for every member, each sum rounded once to E's dtype, as
``torch._foreach_add_``; with ``skip`` (a 0-dim bool tensor) holding True every E_i keeps its
bits (``lowrank_fused.reference._skip``), the flag never read on the host."""
import torch

from lowrank_fused.reference._skip import run_unless


def ldadam_error_accumulate_ref(Es, Gs, *, skip=None) -> None:
    Es, Gs = list(Es), list(Gs)
    if len(Es) != len(Gs):
        raise ValueError(f"Es and Gs must have one entry per member, got {len(Es)} and "
                         f"{len(Gs)}")
    if not Es:
        return
    from lowrank_fused.ops import _check_skip

    _check_skip(skip, Es[0].device)
    if skip is None:
        torch._foreach_add_(Es, Gs)
    else:
        run_unless(skip, Es, torch._foreach_add_, Es, Gs)
