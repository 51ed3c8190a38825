"""Which parameters GaLore projects: param groups as galore_torch's ``torchrun_main`` builds them.

GaLore projects only the weights of ``nn.Linear`` modules whose name matches a target; every
other trainable parameter (biases, norms, embeddings, ``lm_head``) goes to a plain group that
the optimizer updates with ordinary AdamW.
"""
from __future__ import annotations

import re
from typing import Iterable, List, Sequence, Union

import torch.nn as nn

TargetSpec = Union[str, Sequence[str]]


def _is_output_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def _matcher(target_modules: TargetSpec):
    """``name -> bool`` for a target spec: ``"all-linear"``, a regex (``re.search``), or a
    list/tuple of substrings (any of them contained in the module name)."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return lambda name: not _is_output_head(name)
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {e}") from None
        return lambda name: pattern.search(name) is not None
    if isinstance(target_modules, Iterable):
        keys = list(target_modules)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(
                f"target_modules must be 'all-linear', a regex string, or a non-empty list of "
                f"non-empty substrings; got {target_modules!r}")
        return lambda name: any(k in name for k in keys)
    raise TypeError(f"target_modules must be a str or a sequence of str, got {type(target_modules)}")


def galore_target_names(model: nn.Module, target_modules: TargetSpec = ("attn", "mlp")) -> List[str]:
    """Names of the ``nn.Linear`` modules whose weights GaLore would project."""
    match = _matcher(target_modules)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name and match(name) and m.weight.requires_grad]


def galore_param_groups(model: nn.Module, *, target_modules: TargetSpec = ("attn", "mlp"),
                        rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                        proj_type: str = "std", **extra) -> List[dict]:
    """``[{"params": targeted Linear weights, "rank", "update_proj_gap", "scale", "proj_type",
    **extra}, {"params": every other trainable parameter}]``; empty groups are dropped.

    ``target_modules``: a list/tuple of substrings (a Linear is targeted when its module name
    contains any of them, as galore_torch), a regex string searched in the module name, or
    ``"all-linear"`` (every Linear except the output head ``lm_head``). Parameters with
    ``requires_grad=False`` are left out of both groups. A parameter shared by several modules
    appears once. Raises ``ValueError`` when ``target_modules`` matches no trainable Linear.
    """
    if int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if int(update_proj_gap) != update_proj_gap or update_proj_gap < 1:
        raise ValueError(f"update_proj_gap must be a positive integer, got {update_proj_gap!r}")
    names = set(galore_target_names(model, target_modules))
    galore_params, seen = [], set()
    for name, module in model.named_modules():
        if name in names and id(module.weight) not in seen:
            seen.add(id(module.weight))
            galore_params.append(module.weight)
    if not galore_params:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matches no trainable nn.Linear module "
            f"(the model's Linear modules: {shown or 'none'})")
    regular = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            regular.append(p)
    groups = [{"params": galore_params, "rank": int(rank), "update_proj_gap": int(update_proj_gap),
               "scale": scale, "proj_type": proj_type, **extra},
              {"params": regular}]
    return [g for g in groups if g["params"]]
