"""Byte model of ALGORITHMS.md section 10.1: bytes each kernel must move per call.

Notation (section 10.1): ``A = m*n``, ``S`` = elements of the low-rank tensors (R, M, V, N),
``C`` = elements of the basis. In the left (canonical) form S = r*n and C = m*r; a right
projection swaps them (S = m*r, C = r*n), so every function takes ``side``.

"Fused" (the floor) reads every operand once per unavoidable pass and writes every output once;
"eager" counts every read and write of the straightforward one-kernel-per-op PyTorch code
(GaLore's official code for K2/K3). Caches are ignored. Section 10.1's example uses bf16 G and W
(2 B) and fp32 states and basis (4 B); here those sizes are arguments:

* ``g_bytes`` / ``w_bytes`` / ``param_bytes``: gradient and weight element size (2 for bf16,
  4 for fp32 parameters; G and W share the parameter dtype in every optimizer here);
* ``state_bytes``: M, V, N and the basis P (fp32 = 4 in lowrank_fused unless
  ``faithful_dtypes``). The projection R is fp32 (4 B) always (``lowrank_fused.ops.project``).

With the defaults, ``m, n, r = 4096, 11008, 128`` reproduces the section 10.1 table
(``shared/spec_checks/bytes2.py``; MiB): K1 437/93, K2 97/32, K3 1039/179, GaLore 1574/305,
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
    """``(A, S, C)`` element counts: full matrix, low-rank tensors, basis (section 10.1)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    A = m * n
    S, C = (r * n, m * r) if side == "left" else (m * r, r * n)
    return A, S, C


def _cast(elements: int, src_bytes: int) -> int:
    """Bytes of an eager ``.float()``: read src, write fp32; free when already fp32."""
    return 0 if src_bytes == 4 else elements * (src_bytes + 4)


def project_bytes(m, n, r, *, g_bytes=2, state_bytes=4, side="left") -> Bytes:
    """K1 ``R = P^T @ G`` (section 10.1, row K1).

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
    """K2 low-rank moment update ``(R, M, V) -> (M, V, N)`` (section 10.1, row K2).

    fused: read R, M, V; write M, V, N = ``(4 + 5s)S`` (24S in the example; 20S when N is
    consumed in K3's prologue, not modelled here). eager: GaLore's 7 kernels (adamw.py
    L118-L129; temporaries in the state dtype s, R fp32):
    ``M.mul_`` 2s, ``M.add_(R)`` 2s+4, ``V.mul_`` 2s, ``V.addcmul_(R, R)`` 2s+8,
    ``V.sqrt()`` 2s, ``.add_(eps)`` 2s, ``M / denom`` 3s: ``(15s + 12)S`` (72S in the example).
    """
    _, S, _ = sizes(m, n, r, side)
    s = state_bytes
    return Bytes((R_BYTES + 5 * s) * S, (15 * s + 12) * S)


def backproject_update_bytes(m, n, r, *, w_bytes=2, state_bytes=4, side="left") -> Bytes:
    """K3 ``W <- (W - b*P@N)(1-c)`` (section 10.1, row K3).

    fused: GEMM epilogue reads and writes W once, reads P and N: ``2wA + sC + sS``
    (4A + 4C + 4S in the example). eager: the GEMM writes an fp32 U (4A, reading sC + sS),
    ``U * scale`` (8A), ``W.add_(U)`` (read W and U, write W: (2w + 4)A), weight decay
    ``W.add_(W, alpha=-c)`` (2wA): ``(16 + 4w)A + sC + sS`` (24A + 4C + 4S in the example).
    """
    A, S, C = sizes(m, n, r, side)
    small = state_bytes * (C + S)
    return Bytes(2 * w_bytes * A + small, (16 + 4 * w_bytes) * A + small)


def galore_step_bytes(m, n, r, *, param_bytes=2, state_bytes=4, side="left") -> Bytes:
    """One GaLore-AdamW step between refreshes, K1 + K2 + K3 (section 10.1, whole-step table:
    6A + 24S + 8C + 8S = 305 MiB fused, 1574 MiB eager in the example). The SVD refresh every
    ``update_proj_gap`` steps is not counted."""
    return (project_bytes(m, n, r, g_bytes=param_bytes, state_bytes=state_bytes, side=side)
            + adam_moments_bytes(m, n, r, state_bytes=state_bytes, side=side)
            + backproject_update_bytes(m, n, r, w_bytes=param_bytes, state_bytes=state_bytes,
                                       side=side))


def adamw_bytes(m, n, *, param_bytes=2, state_bytes=4) -> Bytes:
    """Dense (full-rank) AdamW step on an m x n matrix (section 10.1, whole-step table: 22A =
    946 MiB in the example).

    fused: read G, read and write W, M, V = ``(g + 2w + 4s)A`` (22A with bf16 G/W and fp32
    states; 28A all fp32; 14A for torch's AdamW on bf16 parameters, whose states are bf16).
    eager (not in section 10; counted here from torch's single-tensor AdamW with weight decay:
    ``W.mul_`` 2w, ``M.lerp_(G)`` 2s+g, ``V.mul_`` 2s, ``V.addcmul_(G, G)`` 2s+2g,
    ``(V.sqrt() / c).add_(eps)`` 6s, ``W.addcdiv_(M, denom)`` 2w+2s):
    ``(4w + 3g + 14s)A`` (70A with bf16 G/W and fp32 states).
    """
    A = m * n
    p, s = param_bytes, state_bytes
    return Bytes((3 * p + 4 * s) * A, (7 * p + 14 * s) * A)


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
