"""The public ops the optimizers call.

Each op checks its arguments, brings a right-projected problem into the canonical left form
(docs/conventions.md: a right projection of G is the left projection of G^T with
P := Q^T; only views are taken, no copies), and calls the implementation that
``lowrank_fused.dispatch`` picks for the backend. Outputs are written into caller-provided
tensors, so callers (and tests, which poison them) control allocation.
"""
from __future__ import annotations

import math

import torch

from lowrank_fused.dispatch import implementation

SIDES = ("left", "right")
# GEMM operand precisions (docs/precision.md); every mode accumulates in fp32
PRECISIONS = ("ieee", "tf32", "bf16", "tf32x3")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_side(side):
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


def _check_precision(precision):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_side_output(name, t, shape, device, where="G"):
    """A side-output tensor: a float32 torch.Tensor of ``shape`` on ``device`` (that of
    ``where``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    _check_shape(name, t, shape)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {where} is on {device}; all tensors "
                         f"must be on one device")


def _same_device(**tensors):
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{k}: {v}" for k, v in devs.items()))
    return next(iter(devs.values()))


def _check_skip(skip, device):
    """``skip``: None, or a 0-dim torch.bool tensor on ``device`` (the op's tensors'; None
    for an op with no tensors: any device). Never read on the host: the backends load it on
    the device (docs/conventions.md, "Skipping a step on the device")."""
    if skip is None:
        return
    if not isinstance(skip, torch.Tensor):
        raise TypeError(f"skip must be None or a 0-dim torch.bool tensor, got "
                        f"{type(skip).__name__}")
    if skip.dtype != torch.bool:
        raise TypeError(f"skip must be a 0-dim torch.bool tensor, got dtype {skip.dtype}")
    if skip.dim() != 0:
        raise ValueError(f"skip must be a 0-dim torch.bool tensor, got shape "
                         f"{tuple(skip.shape)}")
    if device is not None and skip.device != device:
        raise ValueError(f"skip is on {skip.device} but the op's tensors are on {device}")


def checked_skip(skip, device, last):
    """``skip`` checked as ``_check_skip`` does, unless it is ``last`` (the flag a bound
    call checked before: a step engine passes the same flag every step). Returns the flag
    for the caller to keep as its ``last``."""
    if skip is None or skip is last:
        return last
    _check_skip(skip, device)
    return skip


def _check_finite(name, x):
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")


def low_rank_shape(shape, rank, side):
    """Shape of the projected gradient: (rank, n) on the left, (m, rank) on the right."""
    m, n = shape
    return (rank, n) if side == "left" else (m, rank)


def basis_shape(shape, rank, side):
    """Shape of the stored basis: P (m, rank) on the left, Q (rank, n) on the right."""
    m, n = shape
    return (m, rank) if side == "left" else (rank, n)


def project(G, P, R=None, *, side="left", precision="ieee", backend="auto", sumsq=None,
            r_sumsq=None):
    """K1: ``R = P^T @ G`` (left, P is m x r) or ``R = G @ Q^T`` (right, Q is r x n).

    G is read in its storage dtype; R is fp32 and returned (allocated when not given). With
    ``sumsq`` (fp32), the same pass over G also writes the squared norms along the projected
    dimension: ``colsum(G^2)`` (n) on the left, ``rowsum(G^2)`` (m) on the right. With
    ``r_sumsq`` (fp32, shape (1,)), also ``||R||_F^2``, the sum of squares of the fp32 R
    (the fused kernel takes it from the output tiles it writes, not from a second read of R).
    """
    _check_side(side)
    _check_precision(precision)
    _check_float("G", G)
    _check_float("P", P)
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D, got shape {tuple(G.shape)}")
    m, n = G.shape
    if P.dim() != 2 or (side == "left" and P.shape[0] != m) or (side == "right" and P.shape[1] != n):
        want = f"({m}, r)" if side == "left" else f"(r, {n})"
        raise ValueError(f"P must have shape {want} for side={side!r} and G of shape "
                         f"{(m, n)}, got {tuple(P.shape)}")
    rank = P.shape[1] if side == "left" else P.shape[0]
    out_shape = low_rank_shape((m, n), rank, side)
    if R is None:
        R = torch.empty(out_shape, device=G.device, dtype=torch.float32)
    elif R.dtype != torch.float32:
        raise TypeError(f"R must be float32, got {R.dtype}")
    _check_shape("R", R, out_shape)
    device = _same_device(G=G, P=P, R=R)
    kw = dict(precision=precision)
    if sumsq is not None:
        _check_side_output("sumsq", sumsq, (n,) if side == "left" else (m,), device)
        kw["col_sumsq"] = sumsq
    if r_sumsq is not None:
        _check_side_output("r_sumsq", r_sumsq, (1,), device)
        kw["r_sumsq"] = r_sumsq
    impl = implementation("project", backend, device)
    if side == "left":
        impl(G, P, R, **kw)
    else:
        impl(G.t(), P.t(), R.t(), **kw)
    return R


def adam_moments(R, M, V, N, *, beta1, beta2, eps, step, eps_mode="hf", sumsq=None,
                 backend="auto", skip=None):
    """K2: low-rank Adam moments in place, and the normalised step N.

    ``eps_mode="hf"`` (GaLore, HF AdamW): ``N = M/(sqrt(V)+eps)``, bias correction left to the
    step size; ``eps_mode="torch"``: ``N = (M/bc1)/(sqrt(V/bc2)+eps)`` (docs/conventions.md).
    ``sumsq`` (optional, a 1-element float32 tensor) receives ``sum(N^2)`` of the stored N,
    computed by the fused kernels in the same pass (the limiter's norm,
    docs/methods/adaptive_adamw.md).

    ``skip`` (optional, a 0-dim torch.bool tensor on the tensors' device, e.g.
    ``nonfinite_flag(...)``): when it holds True, M, V, N and ``sumsq`` are left
    bit-identical. The flag is read on the device only, never on the host.
    """
    for name, t in (("R", R), ("M", M), ("V", V), ("N", N)):
        _check_float(name, t)
        _check_shape(name, t, R.shape)
    c1, c2 = _eps_mode_divisors(eps_mode, beta1, beta2, step)
    kw = {}
    if sumsq is not None:
        if not isinstance(sumsq, torch.Tensor) or sumsq.dtype != torch.float32 \
                or sumsq.numel() != 1:
            raise TypeError("sumsq must be a 1-element float32 tensor, got "
                            + (f"{sumsq.dtype} with {sumsq.numel()} elements"
                               if isinstance(sumsq, torch.Tensor) else type(sumsq).__name__))
        kw["sumsq"] = sumsq
    device = _same_device(R=R, M=M, V=V, N=N, **kw)
    if skip is not None:
        _check_skip(skip, device)
        kw["skip"] = skip
    impl = implementation("adam_moments", backend, device)
    impl(R, M, V, N, beta1=float(beta1), beta2=float(beta2), eps=float(eps), c1=c1, c2=c2, **kw)
    return N


def backproject_update(W, P, N, *, side="left", coef, pre_scale=1.0, post_decay=0.0,
                       precision="ieee", backend="auto", skip=None):
    """K3, in place on W: ``W = W*pre_scale; W -= coef * back(N); W -= post_decay*W``.

    ``back(N)`` is ``P @ N`` on the left and ``N @ Q`` on the right; the product is never
    materialised by the fused backends (it lives in the GEMM epilogue).

    ``skip`` (optional, a 0-dim torch.bool tensor on W's device): when it holds True, W is
    left bit-identical. The flag is read on the device only, never on the host.
    """
    _check_side(side)
    _check_precision(precision)
    for name, t in (("W", W), ("P", P), ("N", N)):
        _check_float(name, t)
    for name, x in (("coef", coef), ("pre_scale", pre_scale), ("post_decay", post_decay)):
        _check_finite(name, float(x))
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D, got shape {tuple(W.shape)}")
    m, n = W.shape
    rank = P.shape[1] if side == "left" else P.shape[0]
    _check_shape("P", P, basis_shape((m, n), rank, side))
    _check_shape("N", N, low_rank_shape((m, n), rank, side))
    device = _same_device(W=W, P=P, N=N)
    impl = implementation("backproject_update", backend, device)
    kw = dict(coef=float(coef), pre_scale=float(pre_scale), post_decay=float(post_decay),
              precision=precision)
    if skip is not None:
        _check_skip(skip, device)
        kw["skip"] = skip
    if side == "left":
        impl(W, P, N, **kw)
    else:
        impl(W.t(), P.t(), N.t(), **kw)
    return W


def adamw_step(W, G, M, V, *, lr, beta1, beta2, eps, step, weight_decay=0.0,
               eps_mode="torch", wd_mode="pre", bias_correction=True, backend="auto", skip=None):
    """Dense AdamW step in place on W, M, V.

    ``eps_mode="torch", wd_mode="pre"`` is torch.optim.AdamW; ``eps_mode="hf", wd_mode="post"``
    is HF AdamW as used by GaLore for its non-projected parameters (docs/methods/adamw.md).

    ``skip`` (optional, a 0-dim torch.bool tensor on W's device, e.g. ``nonfinite_flag([G])``):
    when it holds True, W, M and V are left bit-identical. The flag is read on the device
    only, never on the host.
    """
    for name, t in (("W", W), ("G", G), ("M", M), ("V", V)):
        _check_float(name, t)
        _check_shape(name, t, W.shape)
    c1, c2 = _eps_mode_divisors(eps_mode, beta1, beta2, step)
    if eps_mode == "torch":
        step_size = float(lr)
    else:
        step_size = hf_step_size(lr, beta1, beta2, step, bias_correction)
    pre_scale, post_decay = decay_coefficients(lr, weight_decay, wd_mode)
    device = _same_device(W=W, G=G, M=M, V=V)
    kw = {}
    if skip is not None:
        _check_skip(skip, device)
        kw["skip"] = skip
    impl = implementation("adamw_step", backend, device)
    impl(W, G, M, V, lr=step_size, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
         c1=c1, c2=c2, pre_scale=pre_scale, post_decay=post_decay, **kw)
    return W


# ---------------------------------------------------------------------------------------------
# scalar helpers shared by the optimizers (kept here so the reference and fused paths agree)

def bias_corrections(beta1, beta2, step):
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return 1.0 - beta1 ** step, 1.0 - beta2 ** step


def hf_step_size(lr, beta1, beta2, step, bias_correction=True):
    """E-hf step size ``lr*sqrt(bc2)/bc1`` (GaLore ``adamw.py#L122-L126``)."""
    if not bias_correction:
        return float(lr)
    bc1, bc2 = bias_corrections(beta1, beta2, step)
    return float(lr) * math.sqrt(bc2) / bc1


def decay_coefficients(lr, weight_decay, wd_mode):
    """(pre_scale, post_decay) for WD-pre (``W*(1-lr*wd)`` first) or WD-post (``W -= lr*wd*W``
    after the update), docs/conventions.md."""
    if wd_mode == "pre":
        return 1.0 - float(lr) * float(weight_decay), 0.0
    if wd_mode == "post":
        return 1.0, float(lr) * float(weight_decay)
    raise ValueError(f"wd_mode must be 'pre' or 'post', got {wd_mode!r}")


def _eps_mode_divisors(eps_mode, beta1, beta2, step):
    if eps_mode == "hf":
        return 1.0, 1.0
    if eps_mode == "torch":
        return bias_corrections(beta1, beta2, step)
    raise ValueError(f"eps_mode must be 'hf' or 'torch', got {eps_mode!r}")


def nonfinite_flag(tensors):
    """A 0-dim bool tensor on the tensors' device: True when any of ``tensors`` holds a NaN or
    an Inf. One multi-tensor max-abs reduction per dtype (``torch._foreach_norm`` with
    ``ord=inf``, which propagates NaN) and no host synchronisation: the caller reads the flag
    once. Empty tensors are skipped; an empty list gives False."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=torch.bool)
    by_dtype = {}
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"nonfinite_flag takes floating tensors, got {t.dtype}")
        by_dtype.setdefault(t.dtype, []).append(t)
    if tensors[0].device.type == "cpu":
        from lowrank_fused import _ext_ops  # CPU: the compiled pass over the exponent bits

        flag = _ext_ops.nonfinite_flag_cpu(tensors)  # None without the extension
        if flag is not None:
            return flag
    maxima = [m.float() for group in by_dtype.values()
              for m in torch._foreach_norm(group, ord=math.inf)]
    return ~torch.isfinite(torch.stack(maxima)).all()
