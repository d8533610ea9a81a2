"""The decoder: attention (RoPE; SDPA or xformers), norms, and the transformer that hosts the FFN-slot blocks."""

from memzoo.model.attention import CausalSelfAttention, check_attention_backend
from memzoo.model.norms import RMSNorm
from memzoo.model.transformer import ModelConfigError, Transformer

__all__ = ["CausalSelfAttention", "ModelConfigError", "RMSNorm", "Transformer", "check_attention_backend"]
