"""Which parameters each method projects: param groups as the official training scripts build
them (``galore_param_groups``: GaLore's ``torchrun_main``; ``param_groups``: every method,
docs/conventions.md, "Parameter routing"), and ``make_optimizer``, one call from a model to an
optimizer.

GaLore projects only the weights of ``nn.Linear`` modules whose name matches a target; every
other trainable parameter (biases, norms, embeddings, ``lm_head``) goes to a plain group that
the optimizer updates with ordinary AdamW.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Iterable, List, Sequence, Union

import torch
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
    if int(update_proj_gap) != update_proj_gap or update_proj_gap < 1:
        raise ValueError(f"update_proj_gap must be a positive integer, got {update_proj_gap!r}")
    return param_groups(model, method="galore", target_modules=target_modules, rank=rank,
                        update_proj_gap=int(update_proj_gap), scale=scale, proj_type=proj_type,
                        **extra)


# ---------------------------------------------------------------------------------------------
# Every method (docs/conventions.md, parameter routing): one call from a model to an
# optimizer's groups.

# the GaLore family: low-rank = targeted Linear weights with a ``rank`` key, the rest plain
GALORE_LIKE = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad")
METHODS = GALORE_LIKE + ("ldadam", "adamem", "adapm", "adapm_mini", "adamw", "adafactor")
DENSE_METHODS = ("adamw", "adafactor")
DEFAULT_TARGETS = ("attn", "mlp")

# method -> (module, class); imported on first use, so a method whose module does not exist
# yet costs nothing until it is asked for
OPTIMIZER_CLASSES = {
    "galore": ("lowrank_fused.optim.galore_adamw", "GaLoreAdamW"),
    "adaptive_adamw": ("lowrank_fused.optim.adaptive_adamw", "AdaptiveAdamW"),
    "rsadamw": ("lowrank_fused.optim.adaptive_adamw", "RSAdamW"),
    "gha": ("lowrank_fused.optim.adaptive_adamw", "GHAAdamW"),
    "galore_kfac": ("lowrank_fused.optim.adaptive_adamw", "GaLoreKFACAdamW"),
    "adarankgrad": ("lowrank_fused.optim.adarankgrad", "AdaRankGrad"),
    "ldadam": ("lowrank_fused.optim.ldadam", "LDAdamW"),
    "adamem": ("lowrank_fused.optim.adamem", "AdaMeM"),
    "adapm": ("lowrank_fused.optim.adapm", "AdaPM"),
    "adapm_mini": ("lowrank_fused.optim.adapm", "AdaPMMini"),
    "adamw": ("lowrank_fused.optim.adamw", "AdamW"),
    "adafactor": ("lowrank_fused.optim.adafactor", "Adafactor"),
}


class _DefaultRank(int):
    """The int 128, but recognisable as "rank not given" (AdaPM's groups then keep the
    optimizer's own default, a rank ratio)."""

    def __repr__(self):
        return "128"


DEFAULT_RANK = _DefaultRank(128)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


def _check_rank(rank):
    ok = (isinstance(rank, (int, float)) and not isinstance(rank, bool)
          and float(rank).is_integer() and rank >= 1)
    if not ok:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


def _linear_listing(model: nn.Module) -> str:
    """The model's Linear module names, for error messages (at most 8 shown)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")) or "none"


def _trainable(model: nn.Module, seen: set) -> List:
    """Trainable parameters of ``model`` not in ``seen`` (ids), each once, in model order."""
    out = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_groups(model: nn.Module, *, method: str, target_modules: TargetSpec = None,
                 rank: int = DEFAULT_RANK, **method_kwargs) -> List[dict]:
    """Param groups that route ``model``'s parameters for ``method`` (docs/conventions.md).

    * ``galore``, ``adaptive_adamw``, ``rsadamw``, ``gha``, ``galore_kfac``, ``adarankgrad``:
      ``[{"params": targeted Linear weights, "rank": rank, **method_kwargs},
      {"params": everything else}]``; the targets are the nn.Linear modules whose name
      matches ``target_modules`` (default ``("attn", "mlp")``; same spec as
      ``galore_param_groups``). Hyperparameters not given keep the optimizer class defaults
      (``galore_param_groups`` instead fills in the GaLore README's T=200, scale=0.25).
    * ``ldadam``: the same split, with ``enable_lowrank=True`` on the low-rank group and
      ``enable_lowrank=False`` on the other.
    * ``adamem``: low-rank = every Linear weight except the first and last layers (token
      embedding, output layer), narrowed by ``target_modules`` when given.
    * ``adapm``, ``adapm_mini``: ``lowrank_fused.optim.adapm.adapm_param_groups(model,
      rank=rank, **method_kwargs)``; when ``rank`` is not given, ``rank=None`` is passed, so
      the optimizer's rank ratio (5%) applies. ``target_modules`` must be None (AdaPM routes
      by block role; its ``overrides`` keyword changes a block).
    * ``adamw``, ``adafactor``: one group with every trainable parameter (and
      ``method_kwargs``); ``rank`` is ignored and ``target_modules`` must be None.

    Frozen parameters are left out; a shared parameter appears once; empty groups are
    dropped. Raises ValueError for an unknown ``method`` or when a low-rank method's targets
    match no trainable nn.Linear.
    """
    _check_method(method)
    if method in DENSE_METHODS:
        if target_modules is not None:
            raise ValueError(f"target_modules has no meaning for method={method!r} "
                             "(one dense group holds every parameter)")
        groups = [{"params": _trainable(model, set()), **method_kwargs}]
        return [g for g in groups if g["params"]]
    if method in ("adapm", "adapm_mini"):
        from lowrank_fused.optim.adapm import adapm_param_groups   # lazy: optional module
        if target_modules is not None:
            raise ValueError(f"target_modules has no meaning for method={method!r}: AdaPM "
                             "classifies blocks by role (pass overrides= to change a block)")
        given = None if rank is DEFAULT_RANK else _check_rank(rank)
        return adapm_param_groups(model, rank=given, **method_kwargs)
    rank = _check_rank(rank)
    if method == "adamem":
        return _adamem_groups(model, target_modules, rank, method_kwargs)
    names = set(galore_target_names(
        model, DEFAULT_TARGETS if target_modules is None else target_modules))
    low, seen = [], set()
    for name, module in model.named_modules():
        if name in names and id(module.weight) not in seen:
            seen.add(id(module.weight))
            low.append(module.weight)
    if not low:
        raise ValueError(f"target_modules={target_modules!r} selects no trainable nn.Linear "
                         f"module for method={method!r} (the model's Linear modules: "
                         f"{_linear_listing(model)})")
    low_group = {"params": low, "rank": rank, **method_kwargs}
    rest_group = {"params": _trainable(model, seen)}
    if method == "ldadam":
        low_group["enable_lowrank"] = True
        rest_group["enable_lowrank"] = False
    return [g for g in (low_group, rest_group) if g["params"]]


def _adamem_groups(model, target_modules, rank, method_kwargs):
    """AdaMeM's own routing (``optim.adamem.adamem_param_groups``: every layer but the first
    and last), narrowed to the modules matching ``target_modules`` when given."""
    from lowrank_fused.optim.adamem import adamem_param_groups

    groups = adamem_param_groups(model, rank=rank, **method_kwargs)
    low = next((g for g in groups if "rank" in g), None)
    rest = next((g for g in groups if "rank" not in g), {"params": []})
    if low is not None and target_modules is not None:
        match = _matcher(target_modules)
        owner = {id(m.weight): name for name, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor)}
        keep = [p for p in low["params"] if match(owner.get(id(p), ""))]
        kept = {id(p) for p in keep}
        rest = {**rest, "params": [p for p in low["params"] if id(p) not in kept]
                + rest["params"]}
        low = {**low, "params": keep}
    if low is None or not low["params"]:
        raise ValueError(f"target_modules={target_modules!r} selects no trainable nn.Linear "
                         f"besides the first and last layers for method='adamem' (the model's "
                         f"Linear modules: {_linear_listing(model)})")
    return [g for g in (low, rest) if g["params"]]


def optimizer_class(method: str):
    """The optimizer class of ``method`` (imported on demand). Raises ValueError for an
    unknown method."""
    _check_method(method)
    module_name, class_name = OPTIMIZER_CLASSES[method]
    return getattr(importlib.import_module(module_name), class_name)


def _constructor_keywords(cls) -> set:
    """The constructor's own keywords and the shared options it reads (``OPTIONS``: taken
    through ``**options``, declared once in ``optim._base``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {name for name, prm in inspect.signature(cls.__init__).parameters.items()
             if prm.kind in kinds and name not in ("self", "params")}
    return names | set(getattr(cls, "OPTIONS", ()))


def _named(model: nn.Module, groups: List[dict]) -> List[dict]:
    """The groups with torch's ``param_names`` key, so every message of the optimizer names
    parameters by their module path."""
    names = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    if not all(id(p) in names for g in groups for p in g["params"]):
        return groups
    return [{**g, "param_names": [names[id(p)] for p in g["params"]]} for g in groups]


def make_optimizer(model: nn.Module, method: str, **kwargs):
    """A ready optimizer for ``model``: ``cls(param_groups(model, method=method, ...), ...)``.

    Keyword arguments are split: ``rank`` and ``target_modules`` go to ``param_groups``;
    names the optimizer's constructor accepts (lr, betas, weight_decay, backend, ...) go to
    the constructor; every other name becomes a key of the low-rank group (e.g. GaLore's
    ``update_proj_gap``, ``scale``, ``proj_type``). For ``adamw`` and ``adafactor`` everything
    goes to the constructor, and ``rank`` / ``target_modules`` are rejected.

    Example::

        opt = make_optimizer(model, "galore", rank=128, update_proj_gap=200, scale=0.25,
                             lr=1e-2)
    """
    cls = optimizer_class(method)
    if method in DENSE_METHODS:
        for key in ("rank", "target_modules"):
            if key in kwargs:
                raise ValueError(f"{key} has no meaning for method={method!r}")
        return cls(_named(model, param_groups(model, method=method)), **kwargs)
    routing = {k: kwargs.pop(k) for k in ("rank", "target_modules") if k in kwargs}
    ctor_names = _constructor_keywords(cls)
    ctor = {k: v for k, v in kwargs.items() if k in ctor_names}
    group = {k: v for k, v in kwargs.items() if k not in ctor_names}
    return cls(_named(model, param_groups(model, method=method, **routing, **group)), **ctor)
