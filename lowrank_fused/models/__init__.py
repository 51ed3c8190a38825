"""Small models used by the training driver (``lowrank_fused.train``)."""
from lowrank_fused.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
