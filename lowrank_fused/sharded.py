"""Row-sharded matrices: the collectives a low-rank method needs under FSDP2.

FSDP2 (``fully_shard``) splits every parameter on dim 0 over a 1-D device mesh: rank i holds
rows ``[start_i, stop_i)`` of a matrix W (m x n) and of its gradient G, with torch.chunk's
sizes (unequal when ``m % world != 0``; a rank may hold no rows). An optimizer sees DTensor
parameters; its states for a sharded parameter are plain tensors on each rank.

A method's math touches the sharded dimension in few places, and each has a collective that
moves only what the math needs (never the gradient, never an n x n matrix except where
``exact_svd`` is allowed, see ``gram_is_small``):

* a basis over the rows (``side="left"``, P is m x r) is row-sharded like W: each rank keeps
  its own rows of P. The projection ``P^T G`` is a sum over rows: a local (r x n) product and
  one all-reduce (``project``). The back-projection ``P N`` is local.
* a basis over the columns (``side="right"``, Q is r x n) is replicated: ``G Q^T`` and
  ``N Q`` are local.
* a refresh runs the one-process algorithm with its products split over the shards
  (``Operand``): a product ending over the columns is a local product plus an all-reduce of
  an (n x k) matrix; a thin (m x k) matrix over the rows is gathered (k x m numbers) where a
  QR or a sign convention needs all of it, so the QRs, seeds and sign choices are those of the
  one-process run, and the result equals it up to the rounding of the all-reduced sums.
* statistics over the rows (column sums of G^2, norms) are local partial sums plus an
  all-reduce of an n-vector or a scalar (``Rows.sum_``, ``Rows.sum_sq``).

Every collective is counted (``traffic``): bytes all-reduced or gathered in this process.
docs/distributed.md lists what each method communicates per step and per refresh.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from lowrank_fused import subspace

_TRAFFIC = {"bytes": 0, "calls": 0}
_ROWS: dict = {}          # id(parameter) -> Rows, dropped with the parameter

__all__ = ["Rows", "rows_of", "Operand", "project", "randomized_svd",
           "exact_svd", "gram_is_small", "randomized_bytes", "basis", "traffic",
           "reset_traffic", "ShardedRefreshWarning", "warn_randomized_refresh"]


class ShardedRefreshWarning(UserWarning):
    """A sharded refresh runs another projector than the one-process run would (the exact
    SVD of a row-sharded matrix would all-reduce a matrix larger than its gradient)."""


def traffic() -> dict:
    """``{"bytes": ..., "calls": ...}`` all-reduced or gathered by this process so far (the
    bytes this rank sends into each collective)."""
    return dict(_TRAFFIC)


def reset_traffic():
    _TRAFFIC["bytes"] = 0
    _TRAFFIC["calls"] = 0


def _count(t: torch.Tensor):
    _TRAFFIC["bytes"] += t.numel() * t.element_size()
    _TRAFFIC["calls"] += 1


def _dist():
    import torch.distributed as dist

    return dist


class Rows:
    """How the rows of one sharded matrix are split: the mesh's process group, this rank's
    index, the rows per rank (``counts``), this rank's ``[start, stop)`` and the global ``m``.
    A ``Rows`` of one process (``group=None, counts=(m,)``) makes every collective a no-op,
    which is how the one-process code paths can be written with the same calls."""

    __slots__ = ("group", "world", "rank", "counts", "start", "stop", "m", "device",
                 "__weakref__")

    def __init__(self, group, counts, rank, device="cpu"):
        self.group = group
        self.device = torch.device(device)    # where the collectives' own flags live
        self.counts = tuple(int(c) for c in counts)
        self.world = len(self.counts)
        self.rank = int(rank)
        self.start = sum(self.counts[:self.rank])
        self.stop = self.start + self.counts[self.rank]
        self.m = sum(self.counts)

    def __repr__(self):
        return f"Rows(rank={self.rank}, rows=[{self.start}, {self.stop}) of {self.m})"

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.world > 1

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM in place over the mesh; returns ``t``."""
        if self.distributed:
            _count(t)
            _dist().all_reduce(t, op=_dist().ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce MAX in place over the mesh; returns ``t``."""
        if self.distributed:
            _count(t)
            _dist().all_reduce(t, op=_dist().ReduceOp.MAX, group=self.group)
        return t

    def gather(self, X: torch.Tensor) -> torch.Tensor:
        """The whole (m, ...) tensor from every rank's (m_i, ...) rows, in row order (for thin
        matrices: a basis, a sketch product; never a gradient)."""
        if X.shape[0] != self.counts[self.rank]:
            raise ValueError(f"gather: expected this rank's {self.counts[self.rank]} rows, got "
                             f"shape {tuple(X.shape)}")
        if not self.distributed:
            return X
        width = max(self.counts)
        buf = X.new_zeros((width,) + tuple(X.shape[1:]))
        buf[:X.shape[0]] = X
        outs = [torch.empty_like(buf) for _ in range(self.world)]
        _count(buf)
        _dist().all_gather(outs, buf, group=self.group)
        return torch.cat([o[:c] for o, c in zip(outs, self.counts)])

    def local(self, X: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole (m, ...) tensor (a view)."""
        if X.shape[0] != self.m:
            raise ValueError(f"local: expected {self.m} rows, got shape {tuple(X.shape)}")
        return X[self.start:self.stop]

    def sum_sq(self, X: torch.Tensor) -> torch.Tensor:
        """Sum of squares of a row-sharded tensor over all ranks: 0-dim fp32 (fp64 partial
        sums, all-reduced)."""
        s = X.double().square().sum().reshape(1)
        return self.sum_(s).float().reshape(())

    def any_(self, flag) -> bool:
        """True on every rank when ``flag`` (a bool or a 0-dim tensor) is true on some rank."""
        t = torch.tensor([1.0 if bool(flag) else 0.0], device=self.device)
        return bool(self.max_(t)[0] > 0)


def single_rows(m: int) -> Rows:
    """The ``Rows`` of a matrix held whole by one process."""
    return Rows(None, (m,), 0)


def _chunk_counts(m: int, world: int):
    """Rows per rank of a dim-0 ``Shard`` (torch.chunk: ceil(m / world) rows per chunk)."""
    size = -(-m // world) if m else 0
    return [max(0, min(size, m - i * size)) for i in range(world)]


def rows_of(p):
    """The ``Rows`` of a DTensor parameter sharded on dim 0 over a 1-D mesh (cached per
    parameter), None for a plain tensor."""
    from lowrank_fused.optim._base import is_sharded

    if not is_sharded(p):
        return None
    rows = _ROWS.get(id(p))
    if rows is None:
        mesh = p.device_mesh
        group = mesh.get_group()
        world = mesh.size()
        rank = mesh.get_local_rank()
        counts = _chunk_counts(p.shape[0], world)
        if p.to_local().shape[0] != counts[rank]:
            raise ValueError(f"unexpected dim-0 shard: rank {rank} holds "
                             f"{p.to_local().shape[0]} of {p.shape[0]} rows, expected "
                             f"{counts[rank]} (torch.chunk's split)")
        rows = _ROWS[id(p)] = Rows(group, counts, rank, p.device)
        weakref.finalize(p, _ROWS.pop, id(p), None)
    return rows


class Operand:
    """``A = G`` (``side="left"``: a basis over G's rows) or ``A = G^T`` (``"right"``) of a
    row-sharded gradient, with the products a range finder needs. Thin matrices are held as
    the one-process code holds them, restricted to this rank where their rows run over the
    sharded dimension: over A's rows when ``row_sharded`` (left), over A's columns otherwise.

    ``mm(X)``: ``A @ X`` (X over A's columns, result over A's rows); ``tmm(Y)``: ``A^T @ Y``.
    A product that sums over the sharded dimension is all-reduced. ``orth_*`` and
    ``cholesky_qr2*`` apply ``lowrank_fused.subspace``'s QRs to the whole thin matrix
    (gathered where sharded) and return this rank's rows, so seeds and signs match the
    one-process run."""

    def __init__(self, G: torch.Tensor, side: str, rows: Rows):
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        self.rows = rows
        self.side = side
        self.row_sharded = side == "left"
        A = subspace._operand(G)
        self._A = A if side == "left" else A.t()
        m, n = rows.m, G.shape[1]
        self.shape = (m, n) if side == "left" else (n, m)

    def _mm(self, A, X):
        return subspace._gemm(A.unsqueeze(0), X.unsqueeze(0))[0] if A.is_cuda else A @ X

    def mm(self, X: torch.Tensor) -> torch.Tensor:
        out = self._mm(self._A, X)
        return out if self.row_sharded else self.rows.sum_(out.contiguous())

    def tmm(self, Y: torch.Tensor) -> torch.Tensor:
        out = self._mm(self._A.t(), Y)
        return self.rows.sum_(out.contiguous()) if self.row_sharded else out

    def _apply(self, sharded: bool, fn, Y, *rest):
        full = self.rows.gather(Y) if sharded else Y
        out = fn(full.unsqueeze(0))
        if isinstance(out, tuple):
            Q = out[0][0]
            return (self.rows.local(Q) if sharded else Q,) + tuple(o[0] for o in out[1:])
        Q = out[0]
        return self.rows.local(Q) if sharded else Q

    def full_rows(self, Y):
        return self.rows.gather(Y) if self.row_sharded else Y

    def local_rows(self, Y):
        return self.rows.local(Y) if self.row_sharded else Y

    def full_cols(self, Z):
        return Z if self.row_sharded else self.rows.gather(Z)

    def local_cols(self, Z):
        return Z if self.row_sharded else self.rows.local(Z)

    def orth_fast(self, Y):
        """``subspace._orth_fast`` of a thin matrix over A's rows."""
        return self._apply(self.row_sharded, subspace._orth_fast, Y)

    def orth_fast_cols(self, Z):
        """``subspace._orth_fast`` of a thin matrix over A's columns."""
        return self._apply(not self.row_sharded, subspace._orth_fast, Z)

    def cholesky_qr2(self, Y, **kw):
        """``subspace.cholesky_qr2`` of a thin matrix over A's rows (R and flags replicated)."""
        return self._apply(self.row_sharded, lambda F: subspace.cholesky_qr2(F, **kw), Y)

    def sign_canon(self, U):
        """Flip each column of a thin matrix over A's rows so its largest-magnitude entry
        (over all ranks) is positive."""
        full = self.full_rows(U)
        return U * subspace._sign_canon_cols(full.unsqueeze(0))[0]


def _finite_everywhere(rows: Rows, X: torch.Tensor) -> bool:
    ok = subspace._all_finite(X)
    return not rows.any_(not ok) if rows.distributed else ok


def project(G, B, side, rows, *, precision="ieee", backend="auto", R=None):
    """K1 on a shard: left ``P^T G`` (a local (r x n) partial product, all-reduced: every rank
    holds the whole R); right ``G Q^T`` (this rank's rows of R, local). ``rows=None`` (a
    whole matrix): ``ops.project`` itself."""
    from lowrank_fused import ops

    R = ops.project(G, B, R, side=side, precision=precision, backend=backend)
    if side == "left" and rows is not None:
        rows.sum_(R)
    return R


def randomized_svd(G, rank, side, rows: Rows, *, oversample=8, power_iters=2, seed=0,
                   sign_canon=True, check_finite=True, label=None):
    """``subspace.randomized_svd`` of the whole matrix (``A = G`` for ``side="left"``,
    ``A = G^T`` for ``"right"``) over its row shards, step for step: the same seeded sketch,
    power iterations, QRs (``cholesky_qr2`` seeds) and Rayleigh-Ritz; the products that sum
    over the sharded rows are all-reduced (n x k), the thin matrices over the rows gathered
    for their QRs (m x k). Returns ``(B, S)``: the side's basis as the one-process method
    stores it, restricted to this rank (left: this rank's (m_i, r) rows of U; right: the
    whole (r, n)), and the top-``rank`` singular values (r,), fp32, the same on every rank."""
    op = Operand(G, side, rows)
    mA, nA = op.shape
    r = int(rank)
    if not 1 <= r <= min(mA, nA):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(mA, nA)}], got {rank}")
    k = min(r + max(int(oversample), 0), min(mA, nA))
    Om = subspace.gaussian_sketch(1, nA, k, seed=seed, device=G.device)[0]
    Y = op.mm(op.local_cols(Om))
    if check_finite and not _finite_everywhere(rows, Y):
        raise FloatingPointError(
            f"gradient{' of ' + label if label else ''} has non-finite entries; cannot compute "
            "its SVD for the subspace refresh")
    stage = [0]

    def qr(Y, **kw):
        stage[0] += 1
        return op.cholesky_qr2(Y, fill_seed=(int(seed) + subspace._GOLDEN * stage[0])
                               & subspace._MASK64, **kw)

    Z = None
    for _ in range(int(power_iters)):
        Z = op.orth_fast_cols(op.tmm(op.orth_fast(Y)))
        Y = op.mm(Z)
    if Z is None:
        Q = qr(Y)
        Ct = op.tmm(Q).double()                 # (nA, k) over A's columns: C = Ct^T
        CC = Ct.t() @ Ct
        if not op.row_sharded:
            rows.sum_(CC)
    else:
        Q, R = qr(Y, return_r=True)
        Ct = None
        C = R.double()
        CC = C @ C.t()
    w, Wv = torch.linalg.eigh(CC)
    w, Wv = w.flip(-1)[..., :r], Wv.flip(-1)[..., :r]
    S = w.clamp_min(0).sqrt().float()
    U = Q @ Wv.float()
    if sign_canon:
        U = op.sign_canon(U)
    if side == "left":
        return U.contiguous(), S
    return U.t().contiguous(), S


# how large exact_svd's fp64 n x n Gram may be, as a multiple of what it is compared with
# (``gram_is_small``); a setting of this process, read at every sharded refresh
EXACT_GRAM_RATIO = 1.0


def randomized_bytes(shape, rank, oversample=8, power_iters=2) -> int:
    """About what ``randomized_svd`` of a row-sharded (m x n) matrix communicates: each of its
    ``power_iters + 1`` passes moves an (m x k) and an (n x k) fp32 matrix, k = rank +
    oversample (at most min(m, n))."""
    m, n = shape
    k = min(int(rank) + max(int(oversample), 0), m, n)
    return 4 * k * (m + n) * (int(power_iters) + 1)


def gram_is_small(shape, rank=None, oversample=8, power_iters=2) -> bool:
    """Whether the exact SVD of a row-sharded (m x n) matrix is cheap to communicate: its fp64
    n x n Gram (all-reduced by ``exact_svd``) takes at most ``EXACT_GRAM_RATIO`` times the
    larger of the fp32 gradient's bytes and (given the ``rank``) what the randomized refresh
    it would replace moves (``randomized_bytes``). By default: ``n <= m / 2``, or a rank high
    enough that the range finder's thin matrices outweigh the Gram."""
    m, n = shape
    budget = 4 * m * n
    if rank is not None:
        budget = max(budget, randomized_bytes(shape, rank, oversample, power_iters))
    return 8 * n * n <= EXACT_GRAM_RATIO * budget


def exact_svd(G, rank, side, rows: Rows, *, sign_canon=True, label=None):
    """The exact top-``rank`` singular triplets' basis of a row-sharded G through the fp64
    n x n Gram ``sum_i G_i^T G_i`` (one all-reduce of n x n): its top eigenvectors are the
    right singular vectors V. A left basis (over the sharded rows) is ``G V`` normalised by a
    QR of the gathered thin (m x r) product (the columns of ``G V`` are orthogonal with norms
    S; the QR also completes a rank-deficient gradient like the one-process fallback).
    Returns ``(B, S)`` like ``randomized_svd``; equals ``torch.linalg.svd`` with the sign
    convention up to rounding."""
    A = G.double()
    n = A.shape[1]
    r = int(rank)
    if not 1 <= r <= min(rows.m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(rows.m, n)}], got {rank}")
    if not _finite_everywhere(rows, A):
        raise FloatingPointError(
            f"gradient{' of ' + label if label else ''} has non-finite entries; cannot compute "
            "its SVD for the subspace refresh")
    C = rows.sum_(A.t() @ A)
    w, V = torch.linalg.eigh(C)
    w, V = w.flip(-1)[:r], V.flip(-1)[:, :r]
    S = w.clamp_min(0).sqrt().float()
    if side == "right":
        if sign_canon:
            V = V * subspace._sign_canon_cols(V.unsqueeze(0))[0]
        return V.float().t().contiguous(), S
    Y = rows.gather((A @ V).float())
    U = subspace.cholesky_qr2(Y)
    if sign_canon:
        U = U * subspace._sign_canon_cols(U.unsqueeze(0))[0]
    return rows.local(U).contiguous(), S


def warn_randomized_refresh(owner, label, shape, oversample, power_iters):
    """One ``ShardedRefreshWarning`` per optimizer ``owner``: with ``projector="svd"`` the
    sharded matrix ``label`` (whole ``shape``) refreshes by the randomized range finder,
    because its exact SVD's n x n Gram would be larger than its gradient."""
    if owner.__dict__.get("_warned_sharded_refresh"):
        return
    owner._warned_sharded_refresh = True
    m, n = shape
    warnings.warn(
        f"{type(owner).__name__}: {label or 'a sharded parameter'} is sharded over its {m} "
        f"rows; its exact SVD would all-reduce a {n} x {n} matrix, more than the gradient, so "
        "its refreshes (and those of every such parameter) use the randomized range finder "
        f"(projector='randomized', proj_oversample={oversample}, proj_power_iters="
        f"{power_iters}; exact when the rank + proj_oversample reaches min(m, n); "
        "docs/distributed.md)", ShardedRefreshWarning, stacklevel=4)


def basis(G, rank, side, rows: Rows, *, projector="svd", sign_canon=True, oversample=8,
          power_iters=2, seed=0, label=None, warn_owner=None):
    """The refresh of a row-sharded gradient: ``projector="svd"`` runs ``exact_svd`` where
    ``gram_is_small`` (the n x n Gram is no larger than the gradient or than the randomized
    refresh it replaces) and otherwise the
    randomized range finder (``randomized_svd`` with ``oversample`` / ``power_iters`` /
    ``seed``), with one ``ShardedRefreshWarning`` per ``warn_owner`` (the optimizer) naming the
    parameter; ``"randomized"`` always runs ``randomized_svd``. Returns the basis (fp32)."""
    if projector not in ("svd", "randomized"):
        raise ValueError(f"projector must be 'svd' or 'randomized', got {projector!r}")
    shape = (rows.m, G.shape[1])
    if projector == "svd":
        if gram_is_small(shape, rank, oversample, power_iters):
            return exact_svd(G, rank, side, rows, sign_canon=sign_canon, label=label)[0]
        if warn_owner is not None:
            warn_randomized_refresh(warn_owner, label, shape, oversample, power_iters)
    return randomized_svd(G, rank, side, rows, oversample=oversample, power_iters=power_iters,
                          seed=seed, sign_canon=sign_canon, label=label)[0]
