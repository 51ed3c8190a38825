"""Hugging Face ``transformers`` integration: an optimizer for ``Trainer`` from the same
``optim_target_modules`` patterns HF's built-in GaLore support takes.

    from lowrank_fused.hf import create_optimizer
    opt = create_optimizer(model, "galore", optim_target_modules=["attn", "mlp"], rank=128,
                           update_proj_gap=200, scale=0.25, lr=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizers=(opt, None))       # Trainer builds the LR schedule on opt

(or ``optimizers=(opt, transformers.get_cosine_schedule_with_warmup(opt, ...))``). Keep
``args.max_grad_norm`` as you like: clipping happens before ``opt.step()``. ``transformers``
is optional: this module imports nothing from it.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

import torch.nn as nn

from lowrank_fused.routing import DENSE_METHODS, make_optimizer


def hf_target_module_names(model: nn.Module, optim_target_modules: Union[str, Sequence[str]]):
    """Names of the ``nn.Linear`` modules that HF's ``optim_target_modules`` selects
    (``transformers.trainer_utils.check_target_module_exists`` semantics): a string is a regex
    that must match the whole module name; a list matches a name equal to an entry, containing
    an entry, or fully matching an entry as a regex."""
    if isinstance(optim_target_modules, str):
        pattern = re.compile(optim_target_modules)
        match = lambda name: pattern.fullmatch(name) is not None   # noqa: E731
    elif isinstance(optim_target_modules, (list, tuple)) and optim_target_modules and all(
            isinstance(t, str) and t for t in optim_target_modules):
        targets = list(optim_target_modules)

        def match(name):
            return (name in targets or any(t in name for t in targets)
                    or any(re.fullmatch(t, name) for t in targets))
    else:
        raise ValueError("optim_target_modules must be a regex string or a non-empty list of "
                         f"non-empty strings, got {optim_target_modules!r}")
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name and match(name)]


def create_optimizer(model: nn.Module, method: str, *, optim_target_modules=None, **kwargs):
    """A lowrank_fused optimizer for ``Trainer(optimizers=(opt, scheduler))``.

    ``optim_target_modules`` (HF semantics, see ``hf_target_module_names``) selects the
    projected Linear layers; None keeps the method's default routing
    (``lowrank_fused.routing.param_groups``). Every other keyword goes to ``make_optimizer``
    (rank, lr, weight_decay, update_proj_gap, backend, nonfinite, ...)."""
    if optim_target_modules is None or method in DENSE_METHODS:
        if optim_target_modules is not None:
            raise ValueError(f"optim_target_modules has no meaning for method={method!r}")
        return make_optimizer(model, method, **kwargs)
    names = hf_target_module_names(model, optim_target_modules)
    if not names:
        raise ValueError(f"optim_target_modules={optim_target_modules!r} selects no nn.Linear "
                         f"module of {type(model).__name__}")
    exact = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    return make_optimizer(model, method, target_modules=exact, **kwargs)
