"""Byte model (docs/bytes.md explains it): bytes each kernel must move per call.

Notation (docs/bytes.md): ``A = m*n``, ``S`` = elements of the low-rank tensors (R, M, V, N),
``C`` = elements of the basis. In the left (canonical) form S = r*n and C = m*r; a right
projection swaps them (S = m*r, C = r*n), so every function takes ``side``.

"Fused" (the floor) reads every operand once per unavoidable pass and writes every output once;
"eager" counts every read and write of the straightforward one-kernel-per-op PyTorch code
(GaLore's official code for K2/K3). Caches are ignored. The docs' example uses bf16 G and W
(2 B) and fp32 states and basis (4 B); here those sizes are arguments:

* ``g_bytes`` / ``w_bytes`` / ``param_bytes``: gradient and weight element size (2 for bf16,
  4 for fp32 parameters; G and W share the parameter dtype in every optimizer here);
* ``state_bytes``: M, V, N and the basis P (fp32 = 4 in lowrank_fused unless
  ``faithful_dtypes``). The projection R is fp32 (4 B) always (``lowrank_fused.ops.project``).

With the defaults, ``m, n, r = 4096, 11008, 128`` reproduces the table of docs/bytes.md
(MiB): K1 437/93, K2 97/32, K3 1039/179, GaLore 1574/305,
AdamW 946 (fused).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

R_BYTES = 4  # the projection R is always fp32
MIB = 1 << 20


@dataclass(frozen=True)
class Bytes:
    """Bytes one call moves: ``floor`` (fused ideal) and ``eager`` (None when not modelled)."""

    floor: int
    eager: Optional[int]

    def __add__(self, other: "Bytes") -> "Bytes":
        eager = None if self.eager is None or other.eager is None else self.eager + other.eager
        return Bytes(self.floor + other.floor, eager)


def sizes(m: int, n: int, r: int, side: str = "left"):
    """``(A, S, C)`` element counts: full matrix, low-rank tensors, basis (docs/bytes.md)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    A = m * n
    S, C = (r * n, m * r) if side == "left" else (m * r, r * n)
    return A, S, C


def _cast(elements: int, src_bytes: int) -> int:
    """Bytes of an eager ``.float()``: read src, write fp32; free when already fp32."""
    return 0 if src_bytes == 4 else elements * (src_bytes + 4)


def project_bytes(m, n, r, *, g_bytes=2, state_bytes=4, side="left") -> Bytes:
    """K1 ``R = P^T @ G`` (docs/bytes.md, row K1).

    fused: cast in the GEMM prologue: read G, read P, write R = ``gA + pC + 4S``
    (2A + 4C + 4S in the example). eager: ``G.float()`` (read gA, write 4A; nothing when G is
    fp32), the same for P, then an fp32 GEMM reading 4A + 4C and writing 4S
    (10A + 4C + 4S in the example).
    """
    A, S, C = sizes(m, n, r, side)
    floor = g_bytes * A + state_bytes * C + R_BYTES * S
    eager = _cast(A, g_bytes) + _cast(C, state_bytes) + 4 * A + 4 * C + R_BYTES * S
    return Bytes(floor, eager)


def adam_moments_bytes(m, n, r, *, state_bytes=4, side="left") -> Bytes:
    """K2 low-rank moment update ``(R, M, V) -> (M, V, N)`` (docs/bytes.md, row K2).

    fused: read R, M, V; write M, V, N = ``(4 + 5s)S`` (24S in the example; 20S when N is
    consumed in K3's prologue, not modelled here). eager: GaLore's 7 kernels (adamw.py
    L118-L129; temporaries in the state dtype s, R fp32):
    ``M.mul_`` 2s, ``M.add_(R)`` 2s+4, ``V.mul_`` 2s, ``V.addcmul_(R, R)`` 2s+8,
    ``V.sqrt()`` 2s, ``.add_(eps)`` 2s, ``M / denom`` 3s: ``(15s + 12)S`` (72S in the example).
    """
    _, S, _ = sizes(m, n, r, side)
    s = state_bytes
    return Bytes((R_BYTES + 5 * s) * S, (15 * s + 12) * S)


def adamem_moments_bytes(m, n, r, *, state_bytes=4, side="left") -> Bytes:
    """AdaMeM's K2 ``(R, M, row, col) -> (M, row, col, N)`` (docs/methods/adamem.md, update lines
    5-6; row K2 of docs/bytes.md with AdaMeM's factored second moment), canonical left form: R, M,
    N have S elements, the statistics ``row`` and ``col`` r and S/r (both forms).

    fused (``kernels/adamem_moments.py``): two unavoidable passes, since N needs row and column
    statistics of the whole matrix: R read, M read and written (pass 1), M read again and N
    written (pass 3): ``(4 + 4s)S`` (20S at fp32); the statistics read and written once,
    ``2s(r + S/r)`` (the per-tile partial sums, about ``S/32 + S/128`` floats written and read
    once, are not counted).
    eager (``lowrank_fused/reference/adamem_moments.py``): ``M.float()`` c, ``*beta1`` 8,
    ``(1-beta1)*r`` 8, ``+`` 12, ``M.copy_`` ``4 + s``, ``M.float()`` c, ``/c1`` 8,
    ``x*x`` 12, ``+ eps1`` 8, the two means 4 + 4, ``outer(row, col)`` 4, ``/mean`` 8,
    ``/c2`` 8, ``sqrt`` 8, ``+ eps`` 8, ``mhat/`` 12, ``N.copy_`` ``4 + s``:
    ``2c + (120 + 2s)S`` (128S at fp32; ``c`` = ``s + 4`` per element, 0 at fp32); the
    statistics as in the floor.
    """
    _, S, _ = sizes(m, n, r, side)
    s = state_bytes
    small = 2 * s * (r + S // r)
    return Bytes((4 + 4 * s) * S + small, (2 * _cast(1, s) + 120 + 2 * s) * S + small)


def backproject_update_bytes(m, n, r, *, w_bytes=2, state_bytes=4, side="left") -> Bytes:
    """K3 ``W <- (W - b*P@N)(1-c)`` (docs/bytes.md, row K3).

    fused: GEMM epilogue reads and writes W once, reads P and N: ``2wA + sC + sS``
    (4A + 4C + 4S in the example). eager: the GEMM writes an fp32 U (4A, reading sC + sS),
    ``U * scale`` (8A), ``W.add_(U)`` (read W and U, write W: (2w + 4)A), weight decay
    ``W.add_(W, alpha=-c)`` (2wA): ``(16 + 4w)A + sC + sS`` (24A + 4C + 4S in the example).
    """
    A, S, C = sizes(m, n, r, side)
    small = state_bytes * (C + S)
    return Bytes(2 * w_bytes * A + small, (16 + 4 * w_bytes) * A + small)


def galore_step_bytes(m, n, r, *, param_bytes=2, state_bytes=4, side="left") -> Bytes:
    """One GaLore-AdamW step between refreshes, K1 + K2 + K3 (docs/bytes.md, per-method floors:
    6A + 24S + 8C + 8S = 305 MiB fused, 1574 MiB eager in the example). The SVD refresh every
    ``update_proj_gap`` steps is not counted."""
    return (project_bytes(m, n, r, g_bytes=param_bytes, state_bytes=state_bytes, side=side)
            + adam_moments_bytes(m, n, r, state_bytes=state_bytes, side=side)
            + backproject_update_bytes(m, n, r, w_bytes=param_bytes, state_bytes=state_bytes,
                                       side=side))


def adamw_bytes(m, n, *, param_bytes=2, state_bytes=4) -> Bytes:
    """Dense (full-rank) AdamW step on an m x n matrix (docs/bytes.md, per-method floors: 22A =
    946 MiB in the example).

    fused: read G, read and write W, M, V = ``(g + 2w + 4s)A`` (22A with bf16 G/W and fp32
    states; 28A all fp32; 14A for torch's AdamW on bf16 parameters, whose states are bf16).
    eager (counted here from torch's single-tensor AdamW with weight decay:
    ``W.mul_`` 2w, ``M.lerp_(G)`` 2s+g, ``V.mul_`` 2s, ``V.addcmul_(G, G)`` 2s+2g,
    ``(V.sqrt() / c).add_(eps)`` 6s, ``W.addcdiv_(M, denom)`` 2w+2s):
    ``(4w + 3g + 14s)A`` (70A with bf16 G/W and fp32 states).
    """
    A = m * n
    p, s = param_bytes, state_bytes
    return Bytes((3 * p + 4 * s) * A, (7 * p + 14 * s) * A)


# -------------------------------------------------------------------------------------------
# full-matrix ops: Adafactor (K6), AdaMeM's bias-corrected Adafactor, AdaPM, GHA
#
# Convention for these models: every m x n (A-sized) read and write is counted exactly (the
# eager side one torch kernel at a time, every operand of a kernel read, so ``g * g`` reads g
# twice, as ``addcmul_(R, R)`` above); smaller tensors (vectors, r x n, m x r) are counted as the
# op's operands only, each input read once and each output written once, in both the floor and
# the eager model (small temporaries of either side are not counted). States are fp32 (the
# optimizers' default; the Triton Adafactor launchers require it). ``c`` below is the eager
# ``.float()`` of a G or W of ``p`` bytes: ``p + 4`` per element, 0 for fp32 (``_cast``).


def adafactor_step_bytes(m, n, *, param_bytes=2, factored=True, momentum=False,
                         scale_parameter=True, weight_decay=False, batch=1) -> Bytes:
    """K6 HF Adafactor step (docs/methods/adafactor.md; row K6 of docs/bytes.md) on ``batch`` m x n
    matrices (``factored``: row (batch, m) and col (batch, n) statistics) or on a flat tensor of
    ``A = batch*m*n`` elements (unfactored: V of A elements). G and W have ``p = param_bytes``.

    fused (``kernels/adafactor_step.py`` docstring), per element of A:
      factored: G read in each of the three passes + W read and written: ``3p + 2p`` (10 with
      bf16: K6's 10A); ``+ p`` for the RMS(W) read with ``scale_parameter`` (12);
      unfactored: G read twice, V read, written and read again, W read and written:
      ``2p + 12 + 2p`` (20 with bf16); ``+ p`` with ``scale_parameter`` (22);
      both: ``+ 8`` with momentum (fp32 exp_avg read and written). Factored adds the
      statistics, read and written once: ``8*batch*(m + n)``.
    eager (``lowrank_fused/reference/adafactor_step.py``), per element of A:
      ``G.float()`` c, ``W.float()`` c, RMS(W) 4 (computed even without scale_parameter),
      ``q = g*g + eps1`` 12 + 8, factored: two means of q 8, the outer product of the factors
      4, ``.mul_(g)`` 12; unfactored: ``V.mul_`` 8, ``.add_(q)`` 12, ``V.rsqrt()`` 8,
      ``.mul_(g)`` 12; RMS(U) 4, ``U.div_`` 8, ``U.mul_(a)`` 8; momentum ``exp_avg.mul_`` 8 +
      ``.add_(U)`` 12; weight decay ``w*(-lam*a)`` 8 + ``w.add_`` 12; ``-U`` 8, ``w.add_`` 12;
      ``W.copy_(w)`` c (nothing for fp32 W, which the reference updates in place):
      ``3c + 88`` factored (106 with bf16: the "about 110" of the HF code), ``3c + 104`` unfactored
      (122), ``+ 20`` with momentum, ``+ 20`` with weight decay; statistics as in the floor.
    """
    A = batch * m * n
    p = param_bytes
    c = _cast(1, p)
    floor = 5 * p if factored else 4 * p + 12
    floor += (p if scale_parameter else 0) + (8 if momentum else 0)
    eager = 3 * c + (88 if factored else 104) + (20 if momentum else 0)
    eager += 20 if weight_decay else 0
    stats = 8 * batch * (m + n) if factored else 0
    return Bytes(floor * A + stats, eager * A + stats)


def adafactor_bc_factored_step_bytes(m, n, *, param_bytes=2, pre_scale=True,
                                     post_decay=False) -> Bytes:
    """AdaMeM's bias-corrected factored Adafactor on an m x n W (docs/methods/adamem.md,
    "Routing"; K6 without the RMS clip). ``pre_scale`` / ``post_decay``: whether the WD-pre
    factor differs from 1 / the WD-post coefficient from 0 (each adds an eager pass).

    fused (``kernels/adafactor_bc_step.py``): G read twice (stats pass, apply pass), W read and
    written: ``4p`` per element (8 with bf16), plus row and col read and written,
    ``8(m + n)``.
    eager (``lowrank_fused/reference/adafactor_bc_factored_step.py``), per element:
    ``G.float()`` c, ``q = g*g + eps1`` 20, two means 8, ``outer(row, col)/mean/c2`` 4 + 8 + 8,
    ``W.float()`` c, ``w*pre_scale`` 8, ``sqrt`` 8, ``+ eps`` 8, ``g/`` 12, ``lr*`` 8, ``w -``
    12, WD-post ``post_decay*w`` 8 + ``w -`` 12, ``W.copy_(w)`` ``4 + p`` (always a copy: w is a
    new tensor by then): ``2c + (4 + p) + 96`` (+ 8 pre_scale, + 20 post_decay; 122 with bf16
    and pre_scale); row and col as in the floor.
    """
    A = m * n
    p = param_bytes
    small = 8 * (m + n)
    eager = 2 * _cast(1, p) + 4 + p + 96 + (8 if pre_scale else 0) + (20 if post_decay else 0)
    return Bytes(4 * p * A + small, eager * A + small)


def adafactor_bc_unfactored_step_bytes(numel, *, param_bytes=2, pre_scale=True,
                                       post_decay=False) -> Bytes:
    """AdaMeM's bias-corrected unfactored Adafactor (1-D parameters) on ``numel`` elements.

    fused (``kernels/adafactor_bc_step.py``): one pass, G read, V read and written, W read and
    written: ``3p + 8`` per element (14 with bf16).
    eager (``lowrank_fused/reference/adafactor_bc_unfactored_step.py``), per element:
    ``G.float()`` c; ``V*beta2`` 8, ``g*g`` 12, ``+ eps1`` 8, ``(1-beta2)*`` 8, ``+`` 12,
    ``V.copy_`` 8; ``W.float()`` c, ``w*pre_scale`` 8, ``V/c2`` 8, ``sqrt`` 8, ``+ eps`` 8,
    ``g/`` 12, ``lr*`` 8, ``w -`` 12, WD-post 8 + 12, ``W.copy_(w)`` ``4 + p``:
    ``2c + (4 + p) + 112`` (+ 8 pre_scale, + 20 post_decay; 138 with bf16 and pre_scale).
    """
    p = param_bytes
    eager = 2 * _cast(1, p) + 4 + p + 112 + (8 if pre_scale else 0) + (20 if post_decay else 0)
    return Bytes((3 * p + 8) * numel, eager * numel)


ADAPM_CLIPS = ("elementwise", "rms", "none")


def adapm_update_bytes(m, n, r, *, param_bytes=2, v_blocks=None, clip_mode="elementwise",
                       pre_scale=True) -> Bytes:
    """AdaPM low-rank block step between refits, left form (docs/methods/adapm.md, update lines
    3-7, ``else`` branch; the per-method floors of docs/bytes.md, AdaPM / AdaPM-mini): W, G m x n,
    L m x r (C), R and Rg r x n (S), V m x n fp32 or, ``v_blocks = nb``, Adam-mini's nb block means
    (AdaPM-mini). ``pre_scale``: the WD-pre factor differs from 1.

    fused (``kernels/adapm_update.py`` docstring table), per element: the apply pass reads G,
    V, W and writes V, W (``p + 8 + 2p``, 14 with bf16); ``clip_mode="rms"`` adds a statistics
    pass reading G and V (``+ p + 4``: 20); block-mean V reads G once for the row sums and has
    no m x n V (``2p + 2p``: 8; with rms clip ``3p + 2p``: 10). Plus the operands: L read (4C),
    R read and written and Rg read (12S), the nb block means read and written (8nb).
    eager (``lowrank_fused/reference/adapm_update.py``), per element: ``G.float()`` c (twice:
    once more in ``second_moment_and_apply``), ``e = (1-beta1)*(g - L@Rg)`` 4 + 12 + 8,
    ``mc = s*(L@R) + e_coef*e`` 4 + 8 + 8 + 12; elementwise V: ``V*v_keep`` 8, ``g*g`` 12,
    ``v_add*`` 8, ``+`` 12, ``V.copy_`` 8, ``V/c2`` 8, ``sqrt`` 8, ``+ eps`` 8, ``mc/`` 12
    (= 84); block means: ``g*g`` 12, mean 4, ``mc/h`` 8 (= 24); clip: elementwise ``clamp`` 8,
    rms ``u*u`` 12 + mean 4 + ``u/`` 8 (= 24), none 0; ``W.float()`` c, ``w*pre_scale`` 8,
    ``lr*u`` 8, ``w -`` 12, ``W.copy_`` ``4 + p``: ``3c + (4 + p) + 76 + V + clip`` (+ 8
    pre_scale): 200 with bf16, elementwise V and clip (a rough estimate is about 130), 140
    for AdaPM-mini (about 90). Operands as in the floor.
    """
    if clip_mode not in ADAPM_CLIPS:
        raise ValueError(f"clip_mode must be one of {ADAPM_CLIPS}, got {clip_mode!r}")
    A, S, C = sizes(m, n, r, "left")
    p = param_bytes
    blocks = v_blocks is not None
    rms = clip_mode == "rms"
    floor = p * (1 + blocks + rms) + 2 * p + (0 if blocks else 8 + 4 * rms)
    clip = {"elementwise": 8, "rms": 24, "none": 0}[clip_mode]
    eager = 3 * _cast(1, p) + 4 + p + 76 + (24 if blocks else 84) + clip
    eager += 8 if pre_scale else 0
    small = 4 * C + 12 * S + (8 * v_blocks if blocks else 0)
    return Bytes(floor * A + small, eager * A + small)


def gha_update_bytes(m, n, r, *, g_bytes=2, side="left") -> Bytes:
    """GHAAdamW's basis update (docs/methods/adaptive_adamw.md): ``Y = G^T P``, ``G @ Y``,
    ``||G||^2``, then the r x r / m x r tail and ``orth`` (not counted: the same small work in both
    backends).

    fused (``kernels/gha_update.py``): two K1 passes over G (``R = P^T G`` with the colsum(G^2)
    side output, then ``G R^T``): ``2gA`` (4A with bf16: "2 extra reads of G, the same as K7"),
    plus P read and the new basis written, ``8C``.
    eager (``lowrank_fused/reference/gha_update.py``): ``G.float()`` c, three fp32 GEMMs over G
    (``g.t() @ p`` is computed twice, then ``g @ Y``) 4A each, ``(g*g).sum()`` 12 + 4:
    ``(c + 28)A + 8C`` (34A with bf16, 28A with fp32 G).
    """
    A, S, C = sizes(m, n, r, side)
    return Bytes(2 * g_bytes * A + 8 * C, (_cast(1, g_bytes) + 28) * A + 8 * C)



TRANSPORT_FORMS = ("squared", "linear", "ldadam")


def moment_transport_bytes(m, n, r, *, state_bytes=4, basis_bytes=4, side="left",
                           form="squared") -> Bytes:
    """K8 moment transport at a refresh (row K8 of docs/bytes.md; the A4 and LDAdam transports)
    with ``r_new = r_old = r``: ``C = P_new^T P_old`` (r x r) from the two bases (C elements
    each, ``b = basis_bytes``), then the moments M, V (S elements each, ``s = state_bytes``).
    ``form``: ``"squared"`` (``moment_transport``: ``(C@M, (C*C)@V)``), ``"linear"``
    (``moment_transport_linear``: ``(C@M, C@V)``) or ``"ldadam"`` (``ldadam_moment_transport``,
    LDAdam's variance-aware form, M_tr written and V in place).

    fused (``kernels/moment_transport.py``): the bases read once by C's GEMM, M and V read once
    and the two outputs written once: ``2bC + 4sS`` (``8C + 16S`` at fp32, K8;
    the r x r C, written once and re-read from L2, is not counted).
    eager (the references, one torch kernel at a time, every operand read): the bases' casts
    ``2c(C)`` (``c`` = an eager ``.float()``, ``b + 4`` per element, 0 for fp32), the fp32 GEMM
    ``8C + 4r^2``; then
      squared / linear: per moment its cast ``c(S)``, the GEMM reading r^2 and S, writing S
      (``4r^2 + 8S``) and the cast back ``c(S)``: ``4c(S) + 16S + 8r^2``, plus ``C*C``
      (``12r^2``) for the squared form;
      ldadam: ``M.float()``, ``V.float()`` ``2c(S)``, ``C @ m`` 8S, ``V/bc2`` 8, ``m*m`` 12,
      ``/bc1^2`` 8, ``-`` 12, ``(C*C) @ w`` 8, ``m_tr*m_tr`` 12, ``/bc1^2`` 8, ``+`` 12,
      ``*bc2`` 8, ``abs`` 8 (104S), the copies into M_tr and V ``2(4 + s)S``; ``C*C`` and the
      two GEMMs' reads of r x r ``20r^2``: ``2c(S) + (112 + 2s)S`` (120S at fp32; section
      10.1 estimates about 72S + GEMMs).
    """
    if form not in TRANSPORT_FORMS:
        raise ValueError(f"form must be one of {TRANSPORT_FORMS}, got {form!r}")
    _, S, C = sizes(m, n, r, side)
    b, s, rr = basis_bytes, state_bytes, r * r
    floor = 2 * b * C + 4 * s * S
    eager = 2 * _cast(C, b) + 8 * C + 4 * rr
    if form == "ldadam":
        eager += 2 * _cast(S, s) + (112 + 2 * s) * S + 20 * rr
    else:
        eager += 4 * _cast(S, s) + 16 * S + 8 * rr + (12 * rr if form == "squared" else 0)
    return Bytes(floor, eager)

def residual_col_stats_bytes(m, n, r, *, g_bytes=2, state_bytes=4, side="left",
                             form="identity") -> Bytes:
    """AdaMeM's residual column statistics (docs/methods/adamem.md lines 4 and 7, K5 pass 1),
    canonical left form: the statistics ``c_os``, ``col_scale`` have ``S/r`` elements (the
    long dimension), R has S, G has A, P has C.

    ``form="identity"`` with ``colsum(G^2)`` given (AdaMeM's path: the K1 side output):
    fused (``kernels/residual_col_stats.py``, one launch): R read (4S), ``colsum(G^2)`` read,
    c_os read and written, col_scale written: ``4S + (4 + 3s)S/r``. eager
    (``lowrank_fused/reference/residual_col_stats.py``): ``r*r`` 12S, ``.sum(dim=0)`` 4S (+4),
    ``-`` 12, ``clamp`` 8, ``/m`` 8, ``+eps1`` 8, ``c_os*beta2`` 8, ``(1-beta2)*`` 8, ``+`` 12,
    ``c_os.copy_`` 8, ``/c2`` 8, ``sqrt`` 8, ``+eps`` 8, ``1/`` 16 (reciprocal, then ``*1``),
    ``col_scale.copy_`` 8 (per element of the n-vectors, fp32 states): ``16S + 124 S/r``.
    ``form="explicit"``: fused: G read once, P and R read, the GEMM ``P@R`` in-tile, S never
    stored (the per-slice partial column sums, ``split x S/r`` floats, not counted):
    ``gA + 4C + 4S + 3s S/r``. eager: ``G.float()`` (cast), ``P@R`` (4C + 4S read, 4A
    written), ``-`` 12A, ``s*s`` 12A, ``.sum(dim=0)`` 4A (+4), the vector tail from ``/m``
    on (100): ``cast + 32A + 4C + 4S + 104 S/r``.
    """
    A, S, C = sizes(m, n, r, side)
    vec = S // r
    s = state_bytes
    if form == "identity":
        return Bytes(4 * S + (4 + 3 * s) * vec, 16 * S + 124 * vec)
    if form == "explicit":
        return Bytes(g_bytes * A + 4 * C + 4 * S + 3 * s * vec,
                     _cast(A, g_bytes) + 32 * A + 4 * C + 4 * S + 104 * vec)
    raise ValueError(f"form must be 'identity' or 'explicit', got {form!r}")


METHOD_STEPS = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad",
                "ldadam", "adamem", "adapm", "adapm_mini")


def method_step_bytes(method, m, n, r, *, param_bytes=2, state_bytes=4, side="left") -> Bytes:
    """One optimizer step of ``method`` on an m x n matrix between refreshes (docs/bytes.md's
    whole-step table, 10.2's passes), G and W in the parameter dtype ``p``, states fp32:

    * ``galore``, ``adaptive_adamw``, ``rsadamw``, ``adarankgrad``: K1 + K2 + K3
      (``galore_step_bytes``; 6A + small at bf16). The limiter's ``||N||`` and AdaRankGrad's
      ``||R||`` are side outputs, so the floor has no extra pass (the limiter's in-place scale
      of N, 8S, is outside the floor).
    * ``gha``: the same plus its per-step basis update (``gha_update_bytes``, two more reads of
      G) and moment transport (K8).
    * ``galore_kfac``: K1 + K3 plus the r x n whitening: R read, M read and written, N
      written (16S; r x r terms not counted). eager: not modelled.
    * ``ldadam``: A = E + G formed once (G and E read, A written in E's place), the rest of the
      power iteration, the projection and the error feedback reading A once each (3 reads),
      E written, W read and written: ``(3p + 6e)A`` with ``e`` = E's bytes (the parameter dtype
      by default): 18A at bf16, against the ideal 14A, which takes A = E + G as given.
      Low-rank terms: the projection's and K3's ``4C + 4S`` each, the power iteration's two
      basis reads ``8C``, K2's 24S and LDAdam's transport (``moment_transport_bytes``,
      ``"ldadam"`` form). eager: not modelled (estimated at about 58A).
    * ``adamem``: K5: pass 1 = K1 with ``colsum(G^2)``, pass 2 reads G and reads/writes W with
      ``P@R`` and ``P@N1`` in-tile (``4pA``; 8A at bf16), plus the factored r x n
      moments (``adamem_moments_bytes``) and the residual statistics from the identity
      (``residual_col_stats_bytes``). eager: not modelled (estimated at about 74A).
    * ``adapm`` / ``adapm_mini``: K1 ``Rg = L^T G`` plus ``adapm_update_bytes`` (elementwise V,
      or Adam-mini's per-row block means for an MLP matrix): 16A / 8A at bf16.
    """
    p, s = param_bytes, state_bytes
    A, S, C = sizes(m, n, r, side)
    lowrank = dict(state_bytes=s, side=side)
    if method in ("galore", "adaptive_adamw", "rsadamw", "adarankgrad"):
        return galore_step_bytes(m, n, r, param_bytes=p, **lowrank)
    if method == "gha":
        return (galore_step_bytes(m, n, r, param_bytes=p, **lowrank)
                + gha_update_bytes(m, n, r, g_bytes=p, side=side)
                + moment_transport_bytes(m, n, r, basis_bytes=s, **lowrank))
    if method == "galore_kfac":
        k13 = (project_bytes(m, n, r, g_bytes=p, **lowrank)
               + backproject_update_bytes(m, n, r, w_bytes=p, **lowrank))
        return Bytes(k13.floor + (R_BYTES + 3 * s) * S, None)
    if method == "ldadam":
        e = p
        small = 2 * (s * C + R_BYTES * S) + 2 * s * C
        small += adam_moments_bytes(m, n, r, **lowrank).floor
        small += moment_transport_bytes(m, n, r, basis_bytes=s, form="ldadam", **lowrank).floor
        return Bytes((3 * p + 6 * e) * A + small, None)
    if method == "adamem":
        pass1 = project_bytes(m, n, r, g_bytes=p, **lowrank).floor
        pass2 = 3 * p * A + s * C + 2 * s * S
        small = (adamem_moments_bytes(m, n, r, **lowrank).floor
                 + residual_col_stats_bytes(m, n, r, g_bytes=p, **lowrank).floor)
        return Bytes(pass1 + pass2 + small, None)
    if method in ("adapm", "adapm_mini"):
        return (project_bytes(m, n, r, g_bytes=p, state_bytes=s, side="left")
                + adapm_update_bytes(m, n, r, param_bytes=p,
                                     v_blocks=m if method == "adapm_mini" else None))
    raise ValueError(f"method must be one of {METHOD_STEPS}, got {method!r}")


def iass_select_bytes(m, n, k, *, g_bytes=2, side="left") -> Bytes:
    """IASS rank selection without a given ``E`` (docs/methods/adarankgrad.md, ``prefix`` mode),
    canonical left form: G (A elements), ``B = Qb^T G`` (S = k x n, fp32).

    fused (``kernels/iass_select.py``): ``||G||^2`` reads G once (gA; per-tile partials not
    counted), the row norms of B read it once (4S): ``gA + 4S``. With ``E`` from the
    projection's side output (AdaRankGrad) the A term is 0. eager
    (``lowrank_fused/reference/iass_select.py``): ``G.float()`` (cast), ``square`` 8A,
    ``sum`` 4A, ``B.square()`` 8S, ``.sum(dim=1)`` 4S: ``cast + 12A + 12S``. The k-vectors
    (cumsum, the host read) are not counted.
    """
    A, S, _ = sizes(m, n, k, side)
    return Bytes(g_bytes * A + 4 * S, _cast(A, g_bytes) + 12 * A + 12 * S)


# -------------------------------------------------------------------------------------------
# FLOP model and roofline
#
# A GEMM of an (a x k) by a (k x b) matrix is 2*a*k*b FLOPs; every m x n product with the rank
# is ``2*A*r``. ``Flops.gemm`` are the GEMMs that run at the call's precision (tensor cores for
# tf32 / tf32x3 / bf16); ``Flops.ieee_gemm`` the GEMMs that always multiply in IEEE fp32
# whatever the precision (the ``gha_update`` op and GHA's r x r / m x r tail, the KFAC Gram and
# whitening); ``Flops.elementwise``
# the elementwise arithmetic (one FLOP per add, multiply, divide, sqrt; counted per element
# below, minor next to the GEMMs). The last two run on fp32 CUDA cores. Not counted: QR / eigh /
# SVD of m x r or r x r (O(m r^2), under r/n of the GEMMs), reductions feeding host reads, and
# the r^2 elementwise work of the transports' C*C. The GEMM counts equal what
# ``torch.utils.flop_counter`` counts for the eager references (tests/test_bench_bytes.py),
# except where the reference repeats a product (said per function).

ADAM_FLOPS = 10       # K2 per low-rank element: M (3), V (4), sqrt, + eps, divide
UPDATE_FLOPS = 3      # K3 epilogue per m x n element: b * (P@N), subtract, weight decay
ADAMW_FLOPS = 14      # dense AdamW per element: decay 1, M 3, V 4, sqrt / c2 / + eps 3, step 3


@dataclass(frozen=True)
class Flops:
    """FLOPs of one call: ``gemm`` at the call's GEMM precision, ``ieee_gemm`` GEMMs always in
    fp32 FMA, ``elementwise`` arithmetic."""

    gemm: int
    ieee_gemm: int = 0
    elementwise: int = 0

    @property
    def fp32(self) -> int:
        """The FLOPs on fp32 CUDA cores: ``ieee_gemm + elementwise``."""
        return self.ieee_gemm + self.elementwise

    @property
    def total(self) -> int:
        return self.gemm + self.ieee_gemm + self.elementwise

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.gemm + other.gemm, self.ieee_gemm + other.ieee_gemm,
                     self.elementwise + other.elementwise)


def project_flops(m, n, r, *, side="left") -> Flops:
    """K1 ``R = P^T G``: one m x n x r GEMM, ``2Ar`` (the cast is free)."""
    A, _, _ = sizes(m, n, r, side)
    return Flops(2 * A * r)


def adam_moments_flops(m, n, r, *, side="left") -> Flops:
    """K2 on the S low-rank elements: ``10S`` elementwise (``ADAM_FLOPS``)."""
    _, S, _ = sizes(m, n, r, side)
    return Flops(0, elementwise=ADAM_FLOPS * S)


def backproject_update_flops(m, n, r, *, side="left") -> Flops:
    """K3 ``W <- (W - b*P@N)(1-c)``: the GEMM ``2Ar`` plus a 3-FLOP epilogue per element."""
    A, _, _ = sizes(m, n, r, side)
    return Flops(2 * A * r, elementwise=UPDATE_FLOPS * A)


def galore_step_flops(m, n, r, *, side="left") -> Flops:
    """K1 + K2 + K3: ``4Ar`` GEMM, ``3A + 10S`` elementwise."""
    return (project_flops(m, n, r, side=side) + adam_moments_flops(m, n, r, side=side)
            + backproject_update_flops(m, n, r, side=side))


def adamw_flops(m, n) -> Flops:
    """Dense AdamW: no GEMM, ``14A`` elementwise (``ADAMW_FLOPS``)."""
    return Flops(0, elementwise=ADAMW_FLOPS * m * n)


def moment_transport_flops(m, n, r, *, side="left", form="squared") -> Flops:
    """K8: ``C = P_new^T P_old`` (``2rC``: r x r over the basis dimension C/r), ``C@M`` and
    ``(C*C)@V`` (or ``C@V``; LDAdam's K = 2r GEMM is the same count), ``2rS`` each: ``2rC +
    4rS``. Elementwise: LDAdam's prologue/epilogue about 8S, the plain forms none."""
    if form not in TRANSPORT_FORMS:
        raise ValueError(f"form must be one of {TRANSPORT_FORMS}, got {form!r}")
    _, S, C = sizes(m, n, r, side)
    return Flops(2 * r * C + 4 * r * S, elementwise=8 * S if form == "ldadam" else 0)


def gha_update_flops(m, n, r, *, side="left", k1_at_precision=False) -> Flops:
    """GHA's basis update: two K1 GEMMs over G (``R = P^T G``, then ``G R^T``), ``4Ar``, and
    the tail ``R R^T`` (``2rS``) and ``P @ triu(.)`` (``2rC``); ``||G||^2`` (2A). The
    ``gha_update`` op has no precision argument, so all of it is IEEE fp32. In the
    optimizer's step (``k1_at_precision``) the two K1 run at the step's precision (the
    ``4Ar`` in ``gemm``), and the tail also counts the QR, CholeskyQR2 on the Triton path:
    two Grams and two triangular products, ``8rC`` (fp32: ``ieee``, or ``tf32x3`` under a
    tensor-core precision, counted at the fp32 rate, an upper bound). The eager reference
    computes ``G^T P`` twice (``2Ar`` more)."""
    A, S, C = sizes(m, n, r, side)
    k1, tail = 4 * A * r, 2 * r * (S + C)
    if k1_at_precision:
        return Flops(k1, tail + cholqr2_flops(m, n, r, side=side), 2 * A)
    return Flops(0, k1 + tail, 2 * A)


def cholqr2_flops(m, n, r, *, side="left") -> int:
    """CholeskyQR2 of the (m x r, left) basis-shaped matrix: two Grams and two products with
    the inverse factors, ``2rC`` each (the r x r factorizations are negligible)."""
    return 8 * r * sizes(m, n, r, side)[2]


def adapm_update_flops(m, n, r, *, v_blocks=None) -> Flops:
    """AdaPM's block step, left form: the in-tile ``L@Rg`` and ``L@R`` (K = 2r) GEMM ``4Ar``,
    and about 16 FLOPs per element (error, momentum, second moment, clip, update; about 10 with
    Adam-mini's block means)."""
    A = m * n
    return Flops(4 * A * r, elementwise=(10 if v_blocks is not None else 16) * A)


def adafactor_flops(m, n, *, factored=True) -> Flops:
    """K6 / AdaMeM's Adafactor on m x n: elementwise only, about 12 FLOPs per element
    (square, statistics, scaling, RMS, update; unfactored about the same)."""
    return Flops(0, elementwise=12 * m * n)


def method_step_flops(method, m, n, r, *, side="left") -> Flops:
    """FLOPs of one step of ``method`` between refreshes (the passes of
    ``method_step_bytes``):

    * ``galore``, ``adaptive_adamw``, ``rsadamw``: K1 + K2 + K3, ``4Ar`` GEMM;
      ``adarankgrad`` adds ``||R||^2`` (2S);
    * ``gha``: the same plus its basis update (its two K1, ``4Ar``, at the step's precision;
      the ``2r(S + C)`` tail and the QR's ``8rC`` fp32) and the K8 transport;
    * ``galore_kfac``: K1 + K3 plus the r x r Gram ``R R^T`` and the whitening
      ``root @ M`` (``2rS`` each, IEEE fp32: the KFAC kernels have no precision option);
    * ``ldadam``: the power iteration's two m x n GEMMs (``4Ar``, plus ``M V1`` and
      ``P_old (M V1)``: ``2rS + 2rC``), the projection (``2Ar``), the error feedback (one
      K = 2r GEMM, ``4Ar``) and K3 (``2Ar``): ``12Ar``; LDAdam's transport; elementwise
      ``E + G``, the feedback subtract and K3's epilogue (5A) and K2;
    * ``adamem``: pass 1 = K1 (``2Ar``), pass 2 ``P@R`` and ``P@N1`` in-tile (``4Ar``),
      residual and update about 8 FLOPs per element; the factored moments about 12S;
    * ``adapm``, ``adapm_mini``: K1 ``Rg = L^T G`` (``2Ar``) plus ``adapm_update_flops``.
    """
    A, S, C = sizes(m, n, r, side)
    if method in ("galore", "adaptive_adamw", "rsadamw"):
        return galore_step_flops(m, n, r, side=side)
    if method == "adarankgrad":
        return galore_step_flops(m, n, r, side=side) + Flops(0, elementwise=2 * S)
    if method == "gha":
        return (galore_step_flops(m, n, r, side=side)
                + gha_update_flops(m, n, r, side=side, k1_at_precision=True)
                + moment_transport_flops(m, n, r, side=side))
    if method == "galore_kfac":
        return (project_flops(m, n, r, side=side) + backproject_update_flops(m, n, r, side=side)
                + Flops(0, 4 * r * S, 3 * S))
    if method == "ldadam":
        return (Flops(12 * A * r + 2 * r * S + 2 * r * C, elementwise=5 * A + ADAM_FLOPS * S)
                + moment_transport_flops(m, n, r, side=side, form="ldadam"))
    if method == "adamem":
        return Flops(6 * A * r, elementwise=8 * A + 12 * S)
    if method in ("adapm", "adapm_mini"):
        return project_flops(m, n, r) + adapm_update_flops(
            m, n, r, v_blocks=m if method == "adapm_mini" else None)
    raise ValueError(f"method must be one of {METHOD_STEPS}, got {method!r}")


def op_flops(op, m, n, r=None, *, side=None) -> Optional[Flops]:
    """FLOPs of a benchmark row's ``op`` (``harness.Row.op``), or None where the op is not
    modelled (the grouped ops: their rows do not carry the group size). Elementwise-only ops
    count their arithmetic per element as above."""
    base, _, form = op.partition(":")
    side = side or "left"
    if base == "method_step":
        return method_step_flops(form, m, n, r, side=side)
    if base == "adamw":
        return adamw_flops(m, n)
    if base in ("adafactor_step", "adafactor_bc_factored_step", "adafactor_bc_unfactored_step"):
        return adafactor_flops(m, n)
    if r is None:
        return None
    simple = {"project": project_flops, "adam_moments": adam_moments_flops,
              "backproject_update": backproject_update_flops, "galore_step": galore_step_flops,
              "gha_update": gha_update_flops}
    if base in simple:
        return simple[base](m, n, r, side=side)
    if base == "moment_transport":
        return moment_transport_flops(m, n, r, side=side)
    if base == "moment_transport_linear":
        return moment_transport_flops(m, n, r, side=side, form="linear")
    if base == "ldadam_moment_transport":
        return moment_transport_flops(m, n, r, side=side, form="ldadam")
    if base == "adapm_update":
        return adapm_update_flops(m, n, r, v_blocks=m if form == "mini" else None)
    _, S, _ = sizes(m, n, r, side)
    if base == "adamem_moments":
        return Flops(0, elementwise=12 * S)
    if base == "iass_select":
        return Flops(0, elementwise=2 * m * n + 2 * S)
    if base == "residual_col_stats":
        return (Flops(2 * m * n * r, elementwise=4 * m * n + 3 * S) if form == "explicit"
                else Flops(0, elementwise=3 * S))
    return None


# Per-device peaks. Sources: "spec sheet" = NVIDIA's data sheet (dense, no sparsity);
# "measured" = what a large device-to-device copy achieves (bench.harness.measure_ceilings
# measures it in every run, and the roofline uses that measurement when there is one).
#   H100 SXM5 (80 GB HBM3): HBM 3.35 TB/s spec sheet, about 3.0 TB/s measured-achievable copy;
#     fp32 FMA 67 TFLOP/s, TF32 tensor 495 dense (989 with sparsity), bf16 990 dense (1979
#     with sparsity): spec sheet.
#   H100 PCIe: HBM 2.0 TB/s, fp32 51, TF32 378 dense, bf16 756 dense: spec sheet.
#   H200 (141 GB HBM3e): HBM 4.8 TB/s spec sheet (nominal, not yet measured here); the same
#     compute as the H100 SXM: spec sheet.
# tf32x3 splits each fp32 operand into a TF32 high and low part and sums three TF32 products
# (hi*hi + hi*lo + lo*hi): a third of the TF32 rate. ieee is the fp32 FMA rate.
PRECISION_PASSES = {"ieee": None, "tf32": 1, "tf32x3": 3, "bf16": 1}


@dataclass(frozen=True)
class DevicePeaks:
    name: str
    hbm_gbps: float
    hbm_source: str
    fp32_tflops: float
    tf32_tflops: float
    bf16_tflops: float
    source: str = "spec sheet"

    def tflops(self, precision: Optional[str]) -> float:
        """Peak TFLOP/s of a GEMM at ``precision`` (None or "ieee": fp32 FMA)."""
        if precision in (None, "ieee"):
            return self.fp32_tflops
        if precision in ("tf32", "tf32x3"):
            return self.tf32_tflops / PRECISION_PASSES[precision]
        if precision == "bf16":
            return self.bf16_tflops
        raise ValueError(f"precision must be one of {tuple(PRECISION_PASSES)}, got "
                         f"{precision!r}")

    def as_dict(self) -> dict:
        return {"name": self.name, "hbm_gbps": self.hbm_gbps, "hbm_source": self.hbm_source,
                "tflops": {p: self.tflops(p) for p in PRECISION_PASSES},
                "compute_source": self.source}


DEVICE_PEAKS = {
    "h100 pcie": DevicePeaks("H100 PCIe", 2000.0, "spec sheet", 51.0, 378.0, 756.0),
    "h100": DevicePeaks("H100 SXM", 3000.0, "measured-achievable copy (spec sheet 3350)",
                        67.0, 495.0, 990.0),
    "h200": DevicePeaks("H200", 4800.0, "spec sheet, nominal", 67.0, 495.0, 990.0),
}


def device_peaks(device_name: Optional[str]) -> Optional[DevicePeaks]:
    """The peak table of a GPU by its name (``torch.cuda.get_device_name``), None when
    unknown (a CPU, another GPU): then no roofline is reported."""
    low = (device_name or "").lower()
    for key in ("h100 pcie", "h200", "h100"):
        if key in low:
            return DEVICE_PEAKS[key]
    return None


@dataclass(frozen=True)
class Roofline:
    """``time = max(bytes / bandwidth, gemm / peak(precision) + fp32 / peak(ieee))``, seconds,
    and which term bounds it (``"bytes"`` or ``"flops"``)."""

    seconds: float
    bytes_seconds: float
    flops_seconds: float

    @property
    def bound(self) -> str:
        return "flops" if self.flops_seconds > self.bytes_seconds else "bytes"


def roofline(nbytes: int, flops: Flops, precision: Optional[str], *, bandwidth_gbps: float,
             peaks: DevicePeaks) -> Roofline:
    """The roofline floor of one call: its bytes at ``bandwidth_gbps`` (10^9 B/s) against its
    FLOPs at the peak of ``precision`` (GEMMs) and of fp32 FMA (the ``fp32`` part)."""
    if not bandwidth_gbps or bandwidth_gbps <= 0:
        raise ValueError(f"bandwidth_gbps must be > 0, got {bandwidth_gbps!r}")
    t_bytes = nbytes / (bandwidth_gbps * 1e9)
    t_flops = (flops.gemm / (peaks.tflops(precision) * 1e12)
               + flops.fp32 / (peaks.tflops("ieee") * 1e12))
    return Roofline(max(t_bytes, t_flops), t_bytes, t_flops)


def mib(nbytes: int) -> float:
    return nbytes / MIB


def model_table(shapes, ranks, param_bytes=(2, 4), state_bytes=4):
    """Rows ``(m, n, r, param_bytes, {name: Bytes})`` of the byte model for printing."""
    rows = []
    for (m, n) in shapes:
        side = "right" if m >= n else "left"  # galore_torch proj_type="std"
        for pb in param_bytes:
            for r in ranks:
                rows.append((m, n, r, pb, side, {
                    "K1 project": project_bytes(m, n, r, g_bytes=pb, state_bytes=state_bytes,
                                                side=side),
                    "K2 adam_moments": adam_moments_bytes(m, n, r, state_bytes=state_bytes,
                                                          side=side),
                    "K3 backproject_update": backproject_update_bytes(
                        m, n, r, w_bytes=pb, state_bytes=state_bytes, side=side),
                    "GaLore step": galore_step_bytes(m, n, r, param_bytes=pb,
                                                     state_bytes=state_bytes, side=side),
                    "AdamW dense": adamw_bytes(m, n, param_bytes=pb, state_bytes=state_bytes),
                }))
    return rows


def format_model_table(shapes, ranks, param_bytes=(2, 4), state_bytes=4) -> str:
    """Markdown table of floor / eager MiB per op (fp32 states and basis)."""
    names = ["K1 project", "K2 adam_moments", "K3 backproject_update", "GaLore step",
             "AdamW dense"]
    head = ("| m x n | r | G/W | side | "
            + " | ".join(f"{x} (eager / floor MiB)" for x in names) + " |")
    lines = [head, "|" + "---|" * (4 + len(names))]
    for m, n, r, pb, side, d in model_table(shapes, ranks, param_bytes, state_bytes):
        cells = []
        for name in names:
            b = d[name]
            e = f"{mib(b.eager):.0f}" if b.eager is not None else "n/a"
            cells.append(f"{e} / {mib(b.floor):.0f}")
        dt = {2: "bf16", 4: "fp32"}.get(pb, f"{pb} B")
        lines.append(f"| {m}x{n} | {r} | {dt} | {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_model_table([(4096, 11008)], [128], param_bytes=(2,)))
