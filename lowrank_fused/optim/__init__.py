"""Every optimizer: one class per method, each running every backend its ops have."""
from lowrank_fused.optim._base import (CaptureFailedWarning, IgnoredGroupKeyWarning,
                                       LowRankNotEnabledWarning)
from lowrank_fused.optim.adafactor import Adafactor
from lowrank_fused.optim.adamem import AdaMeM
from lowrank_fused.optim.adamw import AdamW, HFAdamW
from lowrank_fused.optim.adapm import AdaPM, AdaPMMini
from lowrank_fused.optim.adaptive_adamw import (AdaptiveAdamW, GaLoreKFACAdamW, GHAAdamW,
                                                RSAdamW)
from lowrank_fused.optim.adarankgrad import AdaRankGrad
from lowrank_fused.optim.galore_adamw import GaLoreAdamW
from lowrank_fused.optim.ldadam import LDAdamW

__all__ = ["Adafactor", "AdaMeM", "AdamW", "HFAdamW", "AdaPM", "AdaPMMini", "AdaptiveAdamW",
           "GaLoreKFACAdamW", "GHAAdamW", "RSAdamW", "AdaRankGrad", "GaLoreAdamW", "LDAdamW",
           "CaptureFailedWarning", "IgnoredGroupKeyWarning", "LowRankNotEnabledWarning"]
