"""Eager-PyTorch reference of every op: the oracle for parity tests.

Each module holds one op's ``<op>_ref`` with the same canonical (left-form) signature as its
fused twins, and registers it in the dispatch table under backend ``"reference"``. Importing
this package imports every module in it, so the table knows every op.
"""
import importlib as _importlib
import pkgutil as _pkgutil

for _mod in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_mod.name}")

from lowrank_fused.reference.adam_moments import adam_moments_ref  # noqa: E402
from lowrank_fused.reference.adamw_step import adamw_step_ref  # noqa: E402
from lowrank_fused.reference.backproject_update import backproject_update_ref  # noqa: E402
from lowrank_fused.reference.moment_transport import moment_transport_ref  # noqa: E402
from lowrank_fused.reference.project import project_ref  # noqa: E402

__all__ = ["project_ref", "adam_moments_ref", "backproject_update_ref", "adamw_step_ref",
           "moment_transport_ref"]
