"""The decoder: its architecture config, attention (RoPE; SDPA or xformers), and the transformer that hosts the
FFN-slot blocks."""

from memzoo.model.attention import CausalSelfAttention, check_attention_backend
from memzoo.model.config import LayerSpec, ModelConfig, ModelConfigError
from memzoo.model.transformer import Transformer

__all__ = ["CausalSelfAttention", "LayerSpec", "ModelConfig", "ModelConfigError", "Transformer",
           "check_attention_backend"]
