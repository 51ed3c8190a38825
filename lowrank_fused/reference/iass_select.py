"""IASS rank selection on one sketch basis, eager reference (docs/methods/adarankgrad.md,
``IASS`` and its ``ritz`` option)."""
from __future__ import annotations

import torch

from lowrank_fused.dispatch import register

IASS_MODES = ("prefix", "ritz")


def smallest_sufficient_rank(c, target: float, r_hi: int) -> int:
    """Binary search: the smallest ``r`` in ``[1, r_hi]`` with ``c[r-1] >= target``, where
    ``c`` (a sequence) is non-decreasing; ``r_hi`` when no prefix is sufficient."""
    if r_hi < 1:
        raise ValueError(f"r_hi must be >= 1, got {r_hi}")
    if c[r_hi - 1] < target:
        return r_hi
    lo, hi = 1, r_hi                  # invariant: c[hi-1] >= target
    while lo < hi:
        mid = (lo + hi) // 2
        if c[mid - 1] >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def check_energy(E: float) -> None:
    """Raise FloatingPointError when the gradient energy ``E = ||G||^2`` is not finite."""
    if E != E or E in (float("inf"), float("-inf")):
        raise FloatingPointError("gradient has non-finite entries (or its squared norm "
                                 "overflows fp32); cannot select a subspace")


def given_energy(E) -> float:
    """``E`` passed in by the caller (a 1-element tensor or a number) as a Python float."""
    if isinstance(E, torch.Tensor):
        if E.numel() != 1:
            raise ValueError(f"E must be a 1-element tensor or a number, got a tensor of "
                             f"shape {tuple(E.shape)}")
        return float(E.float().reshape(()))
    if isinstance(E, bool) or not isinstance(E, (int, float)):
        raise TypeError(f"E must be a 1-element tensor or a number, got {type(E).__name__}")
    return float(E)


def prefix_energies(Qb: torch.Tensor, B: torch.Tensor, mode: str,
                    sign_canon: bool) -> torch.Tensor:
    """The energies ``e_i`` (k, fp32) whose cumulative sums IASS compares with ``eta_th*E``:
    the squared row norms of B (``prefix``), or the squared singular values of B after
    rotating Qb in place to ``Qb @ U_B`` (``ritz``). Small-matrix work (k x n, m x k)."""
    if mode == "ritz":
        U, s, _ = torch.linalg.svd(B.float(), full_matrices=False)
        rotated = Qb.float() @ U
        if sign_canon:
            idx = rotated.abs().argmax(dim=0, keepdim=True)
            rotated = rotated * torch.where(rotated.gather(0, idx) < 0, -1.0, 1.0)
        Qb.copy_(rotated)
        return s.square()
    return B.float().square().sum(dim=1)


@register("iass_select", "reference")
def iass_select_ref(G: torch.Tensor, Qb: torch.Tensor, B: torch.Tensor, *, eta_th: float,
                    r_max: int, mode: str = "prefix", sign_canon: bool = True,
                    E=None) -> int:
    """Left form: G (m x n, storage dtype), the sketch basis Qb (m x k, fp32, orthonormal)
    and its projection ``B = Qb^T @ G`` (k x n, fp32). Returns the selected rank

        r = min{ r in [1, min(r_max, k)] : c_r >= eta_th * E },   E = ||G||^2,

    or ``min(r_max, k)`` when no prefix is sufficient, or **0 when E == 0** (a zero gradient:
    the caller keeps its subspace, docs/methods/adarankgrad.md).

    ``mode="prefix"``: ``c_r = sum_{i<=r} ||B[i, :]||^2 = ||Qb[:, :r]^T G||^2``; Qb is left
    unchanged. ``mode="ritz"``: ``B = U_B S_B V_B^T``; Qb is rotated in place to
    ``Qb @ U_B`` (with ``sign_canon``, each column's largest-magnitude entry made positive)
    and ``c_r = sum_{i<=r} s_B[i]^2``, the best rank-r energy within range(Qb).
    The basis the caller keeps is ``Qb[:, :r]``. Math in fp32. ``E`` (optional, a 1-element
    tensor or a number): ``||G||^2`` already computed, e.g. as ``sum(colsum(G^2))`` from the
    projection's side output (the pass that made B), so G is not read again; computed from G
    when absent. Raises FloatingPointError when E is not finite (Qb untouched).
    """
    if mode not in IASS_MODES:
        raise ValueError(f"mode must be one of {IASS_MODES}, got {mode!r}")
    E = float(G.float().square().sum()) if E is None else given_energy(E)
    check_energy(E)
    if E == 0.0:
        return 0
    e = prefix_energies(Qb, B, mode, sign_canon)
    c = torch.cumsum(e, dim=0).tolist()
    return smallest_sufficient_rank(c, float(eta_th) * E, min(int(r_max), Qb.shape[1]))
