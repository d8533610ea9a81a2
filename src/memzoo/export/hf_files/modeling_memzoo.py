"""A memzoo language model for Hugging Face ``transformers`` (``AutoModelForCausalLM``, ``generate()``).

This adapter is copied verbatim into every ``memzoo export`` folder, beside memzoo's own model source (the
``memzoo_*.py`` files, generated from memzoo by :mod:`memzoo.export.shipped_code`): the model that runs is memzoo's
:class:`Transformer`, built from ``config.architecture``, with memzoo's parameter names, so ``model.safetensors``
loads as it is and the logits equal memzoo's. The folder imports only ``torch``, ``transformers`` and its own files,
so it runs where memzoo is not installed.

What the adapter adds: the ``PreTrainedModel`` interface, a ``transformers`` KV cache (``DynamicCache``) that
memzoo's attention writes through, rotary positions and padding masks for left-padded batches, ``labels`` → loss.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_memzoo import MemzooConfig
from .memzoo_blocks import Block  # noqa: F401  (importing the blocks package registers memzoo's blocks and presets)
from .memzoo_blocks_registry import BlockConfigError
from .memzoo_model_config import ModelConfig
from .memzoo_model_rope import RotaryEmbedding
from .memzoo_model_transformer import Transformer

#: transformers 5.x renamed the KV cache argument and output field from ``past_key_values`` to ``cache``; this file
#: takes either argument and fills the field this transformers has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CacheLayer:
    """Layer ``index`` of a ``transformers`` Cache, in the cache contract of memzoo's attention
    (``memzoo.model.attention.LayerKVCache``: ``length`` and ``append``)."""

    def __init__(self, cache: Cache, index: int):
        self.cache, self.index = cache, index

    @property
    def block_state(self) -> dict:
        """The decode state of the layer's block, kept on the Cache object beside its keys and values."""
        states = self.cache.__dict__.setdefault("memzoo_block_states", {})
        return states.setdefault(self.index, {})

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.index)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, self.index)


class MemzooPreTrainedModel(PreTrainedModel):
    config_class = MemzooConfig
    _no_split_modules: ClassVar[list[str]] = ["TransformerLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fills the rotary tables (buffers not stored in the weights, left unfilled when transformers builds the
        model on the meta device). Parameters keep memzoo's own init (done when the Transformer is built);
        loaded weights replace them."""
        if isinstance(module, RotaryEmbedding):
            module.reset_tables()


class MemzooForCausalLM(MemzooPreTrainedModel, GenerationMixin):
    """memzoo's decoder as a causal LM: ``input_ids (B, T) → logits (B, T, vocab_size)`` (float32).

    Its children are the Transformer's (``embed``, ``layers``, ``norm``, ``head``, ``pools``, ``dropout``), so the
    parameter names are memzoo's; the Transformer itself is kept outside the module tree (``self.decoder``).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"head.weight": "embed.weight"}

    def __init__(self, config: MemzooConfig):
        super().__init__(config)
        if config.architecture is None:
            raise ValueError("memzoo: config.json has no `architecture`; export the model again with memzoo")
        try:
            architecture = ModelConfig.from_dict(config.architecture, source="config.json: architecture")
            # the attention kernel is this machine's choice (xformers on CUDA when it runs, else SDPA)
            decoder = Transformer(architecture.replace(attention_backend="auto"))
        except (BlockConfigError, ValueError, TypeError) as err:
            raise ValueError(f"memzoo: config.json does not describe a buildable model: {err}") from err
        self.__dict__["decoder"] = decoder  # not a child: its modules are registered below, under their own names
        for name, child in decoder.named_children():
            self.add_module(name, child)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = self.decoder.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = self.decoder.head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of ``input_ids (B, T)`` continuing the ``cache`` (if any).

        Args:
            attention_mask: ``(B, past + T)``, 1 for tokens, 0 for padding (left padding for batched prompts).
            position_ids: ``(B, T)`` rotary positions; default: from ``attention_mask`` (padding skipped), else
                ``past .. past + T - 1``.
            cache: a ``transformers`` Cache holding earlier keys/values; a new ``DynamicCache`` when ``use_cache``.
            labels: ``(B, T)`` next-token targets (shifted inside; -100 ignored) for the returned ``loss``.
            logits_to_keep: return logits for only the last ``n`` positions (0: all).
            past_key_values: the ``cache``, under its name in earlier transformers 5.x releases.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        T = input_ids.shape[1]
        padded = attention_mask is not None and not bool(attention_mask[:, : past + T].all())
        if position_ids is None and padded:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
        caches = [CacheLayer(cache, i) for i in range(len(self.layers))] if cache is not None else None
        logits = self.decoder(input_ids, caches, attention_mask=attention_mask if padded else None,
                              positions=position_ids)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
