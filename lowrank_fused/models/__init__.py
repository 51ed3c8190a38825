"""Small models used by the training driver (``lowrank_fused.train``)."""
from lowrank_fused.models.llama import LLAMA_CONFIGS, LlamaConfig, LlamaForCausalLM, llama_config

__all__ = ["LLAMA_CONFIGS", "LlamaConfig", "LlamaForCausalLM", "llama_config"]
