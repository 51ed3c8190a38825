from lowrank_fused.optim.galore_adamw import GaLoreAdamW

__all__ = ["GaLoreAdamW"]
