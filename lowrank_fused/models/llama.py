"""A small LLaMA-style decoder-only transformer.

Architecture and module names follow Hugging Face's ``LlamaForCausalLM`` so that GaLore's
usual routing by name substrings ("attn", "mlp") behaves as it does on real checkpoints::

    model.embed_tokens
    model.layers.N.input_layernorm
    model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj}
    model.layers.N.post_attention_layernorm
    model.layers.N.mlp.{gate_proj,up_proj,down_proj}
    model.norm
    lm_head                      (untied from embed_tokens)

RMSNorm, rotary position embeddings (rotate-half convention), SwiGLU MLP and causal
attention via ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.
All linear layers are ``nn.Linear(bias=False)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    vocab_size: int = 256            # byte-level tokens
    hidden_size: int = 128
    intermediate_size: int = 344     # ~ 8/3 * hidden_size, as LLaMA
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


# Model sizes of the GaLore paper (Zhao et al. 2024, LLaMA on C4, T5 tokenizer: vocab 32000)
# plus a tiny byte-level CPU default. Keys: hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, vocab_size (the vocab is the data's when it is byte-level).
LLAMA_CONFIGS = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=256),
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, vocab_size=32000),
    "130m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, vocab_size=32000),
    "350m": dict(hidden_size=1024, intermediate_size=2736, num_hidden_layers=24,
                 num_attention_heads=16, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
               num_attention_heads=32, vocab_size=32000),
}


def llama_config(name: str, **overrides) -> "LlamaConfig":
    """``LlamaConfig`` of a named size (``LLAMA_CONFIGS``), with ``overrides`` applied
    (``None`` values are ignored)."""
    key = name.lower()
    if key not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(LLAMA_CONFIGS)}")
    cfg = dict(LLAMA_CONFIGS[key])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return LlamaConfig(**cfg)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class LlamaRotaryEmbedding(nn.Module):
    """cos/sin tables, computed in fp32 and cached per (length, device).

    The tables are deliberately not buffers: ``model.to(torch.bfloat16)`` would round them,
    and the angles of late positions need fp32. They are cast to the activations' dtype
    only when applied.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int, base: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self.max_position_embeddings = max_position_embeddings
        self._cache: dict = {}

    def _tables(self, seq_len: int, device: torch.device):
        key = (max(seq_len, self.max_position_embeddings), str(device))
        if key not in self._cache:
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
            inv_freq = 1.0 / (self.base ** (exps / self.head_dim))
            t = torch.arange(key[0], dtype=torch.float32, device=device)
            emb = torch.outer(t, inv_freq).repeat(1, 2)   # (len, head_dim): [f, f]
            self._cache[key] = (emb.cos(), emb.sin())
        return self._cache[key]

    def forward(self, seq_len: int, dtype: torch.dtype, device: torch.device):
        cos, sin = self._tables(seq_len, device)
        return cos[:seq_len].to(dtype), sin[:seq_len].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    # q, k: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(input_ids.shape[1], x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """``forward(input_ids, labels=None) -> (logits, loss)``; ``labels`` are the next tokens
    already aligned with ``input_ids`` (same shape), loss is mean cross-entropy in fp32."""

    def __init__(self, config: Optional[LlamaConfig] = None):
        super().__init__()
        self.config = config if config is not None else LlamaConfig()
        self.model = LlamaModel(self.config)
        self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
        return logits, loss
