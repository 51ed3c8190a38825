"""Adafactor, the HF ``transformers`` version vendored in GaLore (docs/methods/adafactor.md).

Parameters with ndim >= 2 keep factored second-moment statistics: ``exp_avg_sq_row`` of shape
``shape[:-1]`` and ``exp_avg_sq_col`` of shape ``shape[:-2] + shape[-1:]`` (a tensor with more
than two dimensions is a batch of ``shape[-2] x shape[-1]`` matrices, as in the HF code);
other parameters keep a full ``exp_avg_sq``. ``beta1`` adds ``exp_avg``, an EMA of the
already clipped and scaled update. There is no bias correction: the ``1 - t^decay_rate``
schedule makes step 1 exact. All states are fp32 (the HF code casts the gradient to fp32).

The step math is the ``adafactor_step`` op (``lowrank_fused/reference/adafactor_step.py``),
looked up in the dispatch table for the optimizer's backend; the scalars that depend only on
the step counter (relative step size, ``beta2t``) are computed here.
"""
from __future__ import annotations

import math

import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.optim._base import LowRankOptimizer, check_number


def relative_step_size(step: int, lr, relative_step: bool, warmup_init: bool) -> float:
    """rho_t (docs/methods/adafactor.md, ``adafactor.py#L133-L137``):
    ``min(1e-6*t if warmup_init else 1e-2, 1/sqrt(t))`` with ``relative_step``, else ``lr``."""
    if relative_step:
        min_step = 1e-6 * step if warmup_init else 1e-2
        return min(min_step, 1.0 / math.sqrt(step))
    return float(lr)


def beta2_at(step: int, decay_rate: float) -> float:
    """``1 - t^decay_rate`` (``b2t`` in docs/methods/adafactor.md): 0 at t = 1."""
    return 1.0 - math.pow(step, decay_rate)


class Adafactor(LowRankOptimizer):
    """Adafactor (Shazeer & Stern 2018) as HF transformers / galore_torch implement it.

    Args (all may be overridden per param group; defaults are the HF class defaults):
        lr: external learning rate; must be None when ``relative_step`` (the step size is then
            ``min(1e-2, 1/sqrt(t))``, or ``min(1e-6*t, 1/sqrt(t))`` with ``warmup_init``), and
            a number >= 0 otherwise.
        eps: (eps1, eps2): eps1 (1e-30) is added to squared gradients, eps2 (1e-3) floors the
            parameter RMS in ``scale_parameter``.
        clip_threshold: d > 0 (1.0): the update is divided by ``max(1, RMS(U)/d)``.
        decay_rate: tau <= 0 (-0.8): second-moment decay ``beta2_t = 1 - t^tau``.
        beta1: None (no momentum, default) or a momentum coefficient in [0, 1).
        weight_decay: lam >= 0 (0.0), applied as ``W <- W - lam*a_t*W`` before the update.
        scale_parameter: multiply the step size by ``max(eps2, RMS(W))`` (True).
        relative_step: time-dependent step size instead of ``lr`` (True).
        warmup_init: linear warm-up of the relative step size (False; needs relative_step).
        backend: ``"auto" | "reference" | ...``: the backend of the ``adafactor_step`` op
            (``triton``: ``kernels/adafactor_step.py``, three passes over G with the row and
            column statistics, the update RMS and RMS(W) reduced on the device, no m x n
            temporary and no host read; ``auto`` picks it on CUDA).

    State per parameter: ``step`` (int); ``exp_avg_sq_row`` and ``exp_avg_sq_col`` (ndim >= 2)
    or ``exp_avg_sq`` (ndim < 2); ``exp_avg`` when beta1 is not None. The HF code also keeps
    ``RMS``, the parameter RMS recomputed at every step; it is not state and is not stored.
    """

    PARAM_DTYPES = LowRankOptimizer.PARAM_DTYPES + (torch.float64,)   # HF Adafactor runs fp64

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
                 warmup_init=False, *, backend="auto", nonfinite="raise"):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init)
        self._check_group(defaults)
        super().__init__(params, defaults, backend=backend, nonfinite=nonfinite)

    # -- validation -----------------------------------------------------------------------
    def _check_group(self, group):
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag} must be a bool, got {group[flag]!r}")
        if group["relative_step"]:
            if group["lr"] is not None:
                raise ValueError("lr must be None when relative_step=True (the step size is "
                                 f"relative); got lr={group['lr']!r}. Pass relative_step=False "
                                 "to use an external learning rate")
        else:
            if group["lr"] is None:
                raise ValueError("lr must be given when relative_step=False")
            check_number("lr", group["lr"], low=0.0)
            if group["warmup_init"]:
                raise ValueError("warmup_init=True requires relative_step=True")
        eps = group["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
        check_number("eps[0]", eps[0], low=0.0)
        check_number("eps[1]", eps[1], low=0.0)
        d = check_number("clip_threshold", group["clip_threshold"], low=0.0)
        if d == 0.0:
            raise ValueError("clip_threshold must be > 0, got 0")
        check_number("decay_rate", group["decay_rate"], high=0.0)
        if group["beta1"] is not None:
            check_number("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _ops_needed(self, group, p):
        return ("adafactor_step",)

    # -- the step -------------------------------------------------------------------------
    @staticmethod
    def _views(p):
        """(W, G, write_back) in the op's canonical shape: (B, m, n) for ndim >= 2, flat for
        ndim < 2. ``write_back`` copies W into p when p could not be viewed."""
        shape = p.shape
        if p.dim() >= 2:
            canon = (math.prod(shape[:-2]), shape[-2], shape[-1])
        else:
            canon = (p.numel(),)
        G = p.grad.reshape(canon)
        try:
            return p.view(canon), G, lambda W: None
        except RuntimeError:
            W = p.reshape(canon).clone()
            return W, G, lambda W: p.copy_(W.view(shape))

    def _step_param(self, p, group, backend, precision):
        state = self.state[p]
        factored = p.dim() >= 2
        use_momentum = group["beta1"] is not None
        if "step" not in state:
            state["step"] = 0
            f32 = dict(dtype=torch.float32, device=p.device)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **f32)
                state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **f32)
            else:
                state["exp_avg_sq"] = torch.zeros(p.shape, **f32)
        if use_momentum and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        t = state["step"] + 1
        W, G, write_back = self._views(p)
        if factored:
            B, m, n = W.shape
            row = state["exp_avg_sq_row"].view(B, m)
            col = state["exp_avg_sq_col"].view(B, n)
            V = None
        else:
            row = col = None
            V = state["exp_avg_sq"].view(W.shape)
        exp_avg = state["exp_avg"].view(W.shape) if use_momentum else None
        eps1, eps2 = group["eps"]
        impl = implementation("adafactor_step", backend, p.device)
        impl(W, G, row, col, V, exp_avg,
             rho=relative_step_size(t, group["lr"], group["relative_step"], group["warmup_init"]),
             beta2t=beta2_at(t, float(group["decay_rate"])), eps1=float(eps1), eps2=float(eps2),
             clip_threshold=float(group["clip_threshold"]),
             scale_parameter=group["scale_parameter"],
             beta1=float(group["beta1"]) if use_momentum else None,
             weight_decay=float(group["weight_decay"]))
        write_back(W)
        state["step"] = t
