"""AdaPM / AdaPM-mini steady step of a whole class of same-shape matrices, eager reference
(docs/methods/adapm.md; the fused form is ``kernels/grouped_adapm_update.py``): every member
runs the single-matrix reference (``adapm_update_ref`` for low-rank blocks between refits,
``adapm_dense_update_ref`` for full- and no-momentum blocks) with its own scalars, and with
``skip`` every tensor a member writes is put back (``reference/_skip.py``).

The per-member scalars come as one table: ``rows[i][b]`` is scalar ``ROWS[i]`` of member b
(or ``rows[i]``, one float, that of every member).
``clip`` is the clamp threshold (infinite: ``clip_mode="none"``); the RMS clip is not grouped.
"""
import math

from lowrank_fused.reference._skip import run_unless
from lowrank_fused.reference.adapm_dense_update import adapm_dense_update_ref
from lowrank_fused.reference.adapm_update import adapm_update_ref

ROWS = ("beta1", "c1", "s_coef", "e_coef", "coef_g", "v_keep", "v_add", "eps", "c2",
        "sqrt_c2", "lr", "pre_scale", "clip")


def _run(skip, outputs, op, *args, **kwargs):
    if skip is None:
        op(*args, **kwargs)
    else:
        run_unless(skip, outputs, op, *args, **kwargs)


def grouped_adapm_step_ref(Ws, Gs, Vs, rows, *, Ls=None, Rs=None, Rgs=None, Ms=None,
                           precision: str = "ieee", skip=None) -> None:
    """In place on every member's state and weight. Low-rank class (``Ls`` given): ``Rs``,
    ``Vs`` and ``Ws`` as ``adapm_update_ref`` between refits, ``Rgs`` the projections
    ``L^T @ G`` (fp32). Otherwise ``Ms`` (None: no momentum), ``Vs`` and ``Ws`` as
    ``adapm_dense_update_ref``."""
    for b in range(len(Ws)):
        s = {name: float(row) if isinstance(row, (int, float)) else row[b]
             for name, row in zip(ROWS, rows)}
        clip = dict(clip_mode="none" if math.isinf(s["clip"]) else "elementwise",
                    clip_threshold=s["clip"])
        common = dict(v_keep=s["v_keep"], v_add=s["v_add"], eps=s["eps"], c2=s["c2"],
                      lr=s["lr"], pre_scale=s["pre_scale"], **clip)
        if Ls is not None:
            _run(skip, (Rs[b], Vs[b], Ws[b]), adapm_update_ref, Ws[b], Gs[b], Ls[b], Rs[b],
                 Rgs[b], Vs[b], beta1=s["beta1"], s_coef=s["s_coef"], e_coef=s["e_coef"],
                 precision=precision, **common)
        else:
            M = None if Ms is None else Ms[b]
            _run(skip, (M, Vs[b], Ws[b]), adapm_dense_update_ref, Ws[b], Gs[b], M, Vs[b],
                 beta1=s["beta1"], c1=s["c1"], **common)
