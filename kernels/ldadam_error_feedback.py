"""LDAdam's generalised error feedback, fused (docs/methods/ldadam.md, update lines 3 and 5 and
the fused form; K4 in docs/bytes.md).

``E = A - hcat(P_new, P_old) @ vcat(Rg + c*M_tr, -c*M)``: one GEMM with K = 2r whose
subtract epilogue reads A once and writes E once (``backproject_update``'s kernel with a
separate source), instead of the official code's three full-size passes. Only r-sized
operands (the concatenated basis, m x 2r, and coefficients, 2r x n) are built with torch.
"""
import torch

from .backproject_update import backproject_update


def ldadam_error_feedback(A, P_new, P_old, Rg, M, M_tr, E, *, c: float, explicit: bool = False,
                          precision: str = "ieee") -> None:
    """Same contract as ``lowrank_fused.reference.ldadam_error_feedback``: left form, into E
    (which may alias A). ``explicit=True`` runs the official three updates in order, each
    rounded to E's dtype, as three fused passes."""
    kw = dict(pre_scale=1.0, post_decay=0.0, precision=precision)
    if explicit:
        backproject_update(E, P_new, Rg, coef=1.0, source=A, **kw)
        backproject_update(E, P_old, M, coef=-float(c), **kw)
        backproject_update(E, P_new, M_tr, coef=float(c), **kw)
        return
    K = torch.cat([P_new.float(), P_old.float()], dim=1)
    L = torch.cat([Rg.float() + c * M_tr.float(), -c * M.float()], dim=0)
    backproject_update(E, K, L, coef=1.0, source=A, **kw)


def aot_variants():
    """No kernel of its own: it launches ``backproject_update``'s kernel, whose variants
    (including the separate-source ones) are compiled there."""
    return iter(())
