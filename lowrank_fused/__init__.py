"""lowrank_fused: fused kernels for memory-efficient low-rank optimizers.

Importing this package never imports Triton, never loads the compiled extension and never
touches a GPU; backends load on first use (see ``lowrank_fused.dispatch``).
"""
from lowrank_fused.dispatch import BackendUnavailable, resolve_backend
from lowrank_fused.optim.galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW", "BackendUnavailable", "resolve_backend"]
__version__ = "0.1.0"
