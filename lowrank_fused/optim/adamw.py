"""AdamW, the dense baseline every low-rank method is measured against (docs/methods/adamw.md).

Two variants, one class:

* ``hf=False`` (default), torch semantics (``torch.optim.AdamW``): E-torch epsilon
  ``N = (m/bc1)/(sqrt(v/bc2)+eps)`` and WD-pre ``W <- W*(1-lr*lam)`` before the update;
  defaults lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2.
* ``hf=True`` (or the class ``HFAdamW``), HF / galore_torch semantics, what GaLore gives its
  non-projected parameters: E-hf epsilon ``N = m/(sqrt(v)+eps)`` with step size
  ``lr*sqrt(bc2)/bc1`` (``bias_correction``), and WD-post ``W <- W - lr*lam*W`` after the update;
  defaults eps 1e-6, weight_decay 0.0.

Each parameter's update is ``ops.adamw_step``, so every backend that implements that op
(reference, triton, cpu, cuda) runs this class. Within ``step()`` the updates of all
parameters are one ``ops_multi.adamw_step_multi`` call (the "foreach" path: one CUDA launch on
the ``cuda`` backend, which ``auto`` picks for it on a GPU, one OpenMP loop on ``cpu``; per-group
lr, betas, eps and weight decay ride along), except on ``backend="triton"`` (no multi-tensor op)
and in per-layer mode, which step each parameter alone (``LowRankOptimizer``).
"""
from __future__ import annotations

from lowrank_fused.optim._base import LowRankOptimizer, check_betas, check_number
from lowrank_fused.optim._engine import DenseRoute

_TORCH_DEFAULTS = dict(eps=1e-8, weight_decay=1e-2)
_HF_DEFAULTS = dict(eps=1e-6, weight_decay=0.0)


class AdamW(LowRankOptimizer):
    """Dense AdamW.

    Args:
        params: parameters or param groups (groups may override lr, betas, eps, weight_decay,
            bias_correction).
        lr: learning rate (default 1e-3).
        betas: (beta1, beta2), each in [0, 1) (default (0.9, 0.999)).
        eps: epsilon; None means the variant's default: 1e-8 (torch) or 1e-6 (hf).
        weight_decay: decoupled weight decay lam; None means 1e-2 (torch) or 0.0 (hf).
        hf: False for torch.optim.AdamW semantics (E-torch, WD-pre), True for HF/galore_torch
            AdamW (E-hf, WD-post).
        bias_correction: hf only: bias-correct the step size (default True). torch AdamW always
            corrects, so ``bias_correction=False`` with ``hf=False`` is rejected.
        backend, nonfinite, faithful_dtypes: the options every method shares
            (``LowRankOptimizer``, docs/conventions.md); ``faithful_dtypes`` keeps exp_avg /
            exp_avg_sq in the parameter dtype (as torch and HF do) instead of fp32.

    State per parameter: ``step`` (int), ``exp_avg`` and ``exp_avg_sq`` (shape of the parameter).
    """

    # no basis and no GEMM
    OPTIONS = frozenset({"backend", "nonfinite", "faithful_dtypes"})

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=None, weight_decay=None,
                 bias_correction=True, *, hf=False, **options):
        variant = _HF_DEFAULTS if hf else _TORCH_DEFAULTS
        eps = variant["eps"] if eps is None else eps
        weight_decay = variant["weight_decay"] if weight_decay is None else weight_decay
        check_number("lr", lr, low=0.0)
        betas = check_betas(betas)
        check_number("eps", eps, low=0.0)
        check_number("weight_decay", weight_decay, low=0.0)
        if not isinstance(hf, bool):
            raise ValueError(f"hf must be a bool, got {hf!r}")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"bias_correction must be a bool, got {bias_correction!r}")
        if not hf and not bias_correction:
            raise ValueError("bias_correction=False is only defined for hf=True (torch AdamW always "
                             "corrects the bias)")
        self.hf = hf
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction)
        super().__init__(params, defaults, **options)

    def _check_group(self, group):
        check_number("lr", group["lr"], low=0.0)
        group["betas"] = check_betas(group["betas"])
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"bias_correction must be a bool, got {group['bias_correction']!r}")
        if not self.hf and not group["bias_correction"]:
            raise ValueError("bias_correction=False is only defined for hf=True")

    SUPPORTS_SHARDED = True      # elementwise: each FSDP2 rank updates its own shard

    def _check_sharding(self, group):
        pass                     # any placement: the update is elementwise

    def _ops_needed(self, group, p):
        return ("adamw_step",)

    DEVICE_SKIP = True      # the dense multi-tensor step takes the on-device skip flag
    CAPTURABLE = True       # a steady step is bound calls only (docs/engine.md)

    def _route(self, p, group):
        return DenseRoute("hf" if self.hf else "torch", "post" if self.hf else "pre",
                          group["bias_correction"])

    def _step_param(self, p, group, backend, precision):
        self._dense_adamw_step(p, group, backend, eps_mode="hf" if self.hf else "torch",
                               wd_mode="post" if self.hf else "pre",
                               bias_correction=group["bias_correction"])


class HFAdamW(AdamW):
    """HF / galore_torch AdamW: ``AdamW(hf=True)`` with its defaults (lr 1e-3, betas
    (0.9, 0.999), eps 1e-6, weight_decay 0.0, bias_correction True)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 bias_correction=True, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, hf=True, **options)
