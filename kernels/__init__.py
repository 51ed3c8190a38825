"""Triton kernels, installed as ``lowrank_fused.kernels``.

Each module holds one op: a private ``_<op>_kernel`` and a public ``<op>()`` launcher taking
the canonical (left-form) arguments of ``lowrank_fused.ops``. Importing this package registers
the launchers as the ``triton`` backend of the dispatch table. Set ``TRITON_INTERPRET=1``
before importing it to run the kernels on CPU tensors.
"""
from lowrank_fused.dispatch import interpreting, register, register_auto_guard

if interpreting():     # helper calls inside a kernel without re-patching the language
    from ._interpreter import install as _install_interpreter_shortcut

    _install_interpreter_shortcut()

from .adafactor_bc_step import adafactor_bc_factored_step, adafactor_bc_unfactored_step
from .adafactor_step import adafactor_step
from .adam_moments import adam_moments
from .adamem_moments import adamem_moments
from .adamw_step import adamw_step
from .adapm_dense_update import adapm_dense_update
from .adapm_refit import adapm_refit
from .adapm_update import adapm_update
from .backproject_update import backproject_update
from .batched_matmul import batched_matmul
from .gha_update import gha_update
from .iass_select import iass_select
from .grouped_backproject_update import grouped_backproject_update
from .grouped_project import grouped_project
from .grouped_residual_backproject_update import grouped_residual_backproject_update
from .kfac_precondition import kfac_precondition
from .kfac_transport import kfac_transport
from .ldadam_error_feedback import ldadam_error_feedback
from .ldadam_power_iteration import ldadam_power_iteration
from .moment_transport import ldadam_moment_transport, moment_transport, moment_transport_linear
from .norm_growth_limit import norm_growth_limit
from .project import project
from .range_finder import adapm_init_basis, range_finder
from .residual_backproject_update import residual_backproject_update
from .residual_col_stats import residual_col_stats
from .small_cholesky_inverse import MAX_K as _CHOLESKY_MAX_K
from .small_cholesky_inverse import small_cholesky_inverse
from .subspace_drift import subspace_drift

register("project", "triton")(project)
register("adam_moments", "triton")(adam_moments)
register("backproject_update", "triton")(backproject_update)
register("adamw_step", "triton")(adamw_step)
register("ldadam_error_feedback", "triton")(ldadam_error_feedback)
register("residual_backproject_update", "triton")(residual_backproject_update)
register("batched_matmul", "triton")(batched_matmul)
register("adafactor_step", "triton")(adafactor_step)
register("adafactor_bc_factored_step", "triton")(adafactor_bc_factored_step)
register("adafactor_bc_unfactored_step", "triton")(adafactor_bc_unfactored_step)
register("gha_update", "triton")(gha_update)
register("adapm_update", "triton")(adapm_update)
register("adapm_dense_update", "triton")(adapm_dense_update)
register("moment_transport", "triton")(moment_transport)
register("moment_transport_linear", "triton")(moment_transport_linear)
register("ldadam_moment_transport", "triton")(ldadam_moment_transport)
register("grouped_project", "triton")(grouped_project)
register("grouped_backproject_update", "triton")(grouped_backproject_update)
register("grouped_residual_backproject_update", "triton")(grouped_residual_backproject_update)
register("range_finder", "triton")(range_finder)
register("ldadam_power_iteration", "triton")(ldadam_power_iteration)
register("adapm_init_basis", "triton")(adapm_init_basis)
register("adamem_moments", "triton")(adamem_moments)
register("norm_growth_limit", "triton")(norm_growth_limit)
register("iass_select", "triton")(iass_select)
register("residual_col_stats", "triton")(residual_col_stats)
register("adapm_refit", "triton")(adapm_refit)
register("subspace_drift", "triton")(subspace_drift)
register("kfac_precondition", "triton")(kfac_precondition)
register("kfac_transport", "triton")(kfac_transport)
register("small_cholesky_inverse", "triton")(small_cholesky_inverse)


@register_auto_guard("small_cholesky_inverse", "triton")
def _small_cholesky_takes(Gram, Linv, ok, **_):
    """The register-tile kernel holds k <= MAX_K; larger matrices take the reference."""
    return (Gram.dim() == 3 and Gram.shape[-1] <= _CHOLESKY_MAX_K and Gram.is_contiguous()
            and Linv.is_contiguous())

__all__ = ["project", "adam_moments", "backproject_update", "adamw_step",
           "ldadam_error_feedback", "residual_backproject_update", "batched_matmul", "gha_update"]
__all__ += ["adafactor_step", "adafactor_bc_factored_step", "adafactor_bc_unfactored_step"]
__all__ += ["adapm_update", "adapm_dense_update", "range_finder", "adapm_init_basis",
            "ldadam_power_iteration"]
__all__ += ["moment_transport", "moment_transport_linear", "ldadam_moment_transport"]
__all__ += ["adamem_moments", "norm_growth_limit"]
__all__ += ["grouped_project", "grouped_backproject_update",
            "grouped_residual_backproject_update"]
__all__ += ["adapm_refit", "subspace_drift", "kfac_precondition", "kfac_transport"]
__all__ += ["iass_select", "residual_col_stats", "small_cholesky_inverse"]
