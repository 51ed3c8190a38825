"""lowrank_fused: fused kernels for memory-efficient low-rank optimizers.

Importing this package never imports Triton, never loads the compiled extension and never
touches a GPU; backends load on first use (see ``lowrank_fused.dispatch``).
"""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


class _SourceTreeKernels(_abc.MetaPathFinder):
    """Maps ``lowrank_fused.kernels`` to the top-level ``kernels/`` folder of a source checkout,
    as setup.py's ``package_dir`` does for installs, so ``python -m ...`` run from the repository
    root (which puts the source package first on sys.path) still finds the kernels. Lazy: it
    only answers when the subpackage is imported."""

    def __init__(self, folder):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != "lowrank_fused.kernels":
            return None
        return _util.spec_from_file_location(name, _os.path.join(self.folder, "__init__.py"),
                                             submodule_search_locations=[self.folder])


_here = _os.path.dirname(_os.path.abspath(__file__))
_src_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
if (not _os.path.isdir(_os.path.join(_here, "kernels"))
        and _os.path.isfile(_os.path.join(_src_kernels, "__init__.py"))
        and not any(isinstance(f, _SourceTreeKernels) for f in _sys.meta_path)):
    _sys.meta_path.insert(0, _SourceTreeKernels(_src_kernels))

from lowrank_fused.dispatch import BackendUnavailable, resolve_backend  # noqa: E402
from lowrank_fused.optim import (  # noqa: E402
    AdaMeM, AdaPM, AdaPMMini, Adafactor, AdamW, AdaptiveAdamW, AdaRankGrad, GaLoreAdamW,
    GaLoreKFACAdamW, GHAAdamW, HFAdamW, LDAdamW, RSAdamW)
from lowrank_fused.routing import make_optimizer, param_groups  # noqa: E402

__all__ = ["GaLoreAdamW", "AdaptiveAdamW", "RSAdamW", "GHAAdamW", "GaLoreKFACAdamW",
           "AdaRankGrad", "LDAdamW", "AdaMeM", "AdaPM", "AdaPMMini", "AdamW", "HFAdamW",
           "Adafactor", "param_groups", "make_optimizer", "BackendUnavailable",
           "resolve_backend"]
__version__ = "0.1.0"
