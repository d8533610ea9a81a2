"""The decoder-only transformer: embed → [attention + FFN-slot block] × L → norm → LM head.

Each layer's FFN slot holds any registered block or preset (``dense``, ``moe``, ``peer``, ``pkm``, ``memory_plus``,
or a user's :class:`~memzoo.blocks.base.Block`), chosen per layer: ``block``/``block_args`` give the default,
``layers`` overrides single layers. Memory pools are owned here (``self.pools``) and handed to the blocks that name
them, so several layers can read one table. Every block gets a :class:`~memzoo.blocks.base.BlockContext` (the token
ids and their absolute positions, also when decoding with a KV cache). A model with host tables (pools with
``table_device: host``) first calls every block's :meth:`~memzoo.blocks.base.Block.prefetch` with its layer's
context, then runs the layers, so token-indexed blocks move their rows while earlier layers compute.

Initialisation (GPT-2 / nanoGPT scheme): embeddings and every linear weight ~ N(0, init_std); the residual output
projections (attention ``proj`` and a block's output projection) ~ N(0, init_std / sqrt(2·n_layers)); norms at 1.
Blocks take part through ``Block.init_weights(std, residual_std)`` (the base class keeps a block's own init). Pools
initialise themselves (see :class:`memzoo.blocks.pool.MemoryPool`).
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.pool import MemoryPool, find_pools
from memzoo.blocks.registry import BlockConfigError, create_block
from memzoo.model.attention import CausalSelfAttention, LayerKVCache, padding_attention_mask
from memzoo.model.attention_memory import AttentionMemory
from memzoo.model.config import LayerSpec, ModelConfig, ModelConfigError
from memzoo.nn.norms import RMSNorm

__all__ = ["LayerSpec", "ModelConfig", "ModelConfigError", "Transformer", "TransformerLayer"]


class TransformerLayer(nn.Module):
    """Pre-norm residual layer: ``x + attn(norm(x))``, then ``+ ffn(norm(x), ctx)``; ``x: (B, T, dim)``.

    With ``add_at`` (skip-layer placement, see :mod:`memzoo.model.config`), the FFN-slot output is not added here:
    ``forward`` returns ``(x, ffn_out)`` and the model adds ``ffn_out`` after layer ``add_at``. ``incoming``: the
    deferred outputs of earlier layers that join the residual after this layer.
    """

    def __init__(self, dim: int, attention: CausalSelfAttention, ffn: Block, norm_eps: float,
                 add_at: int | None = None):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = attention
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = ffn
        self.add_at = add_at

    def forward(
        self,
        x: torch.Tensor,
        ctx: BlockContext,
        cache: LayerKVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        incoming: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.attn_norm(x), cache, positions, mask)
        if cache is not None:
            ctx = ctx.with_state(cache.block_state)
        out = self.ffn(self.ffn_norm(x), ctx)
        if self.add_at is not None:
            return (x if incoming is None else x + incoming), out
        x = x + out
        return x if incoming is None else x + incoming


class Transformer(nn.Module):
    """Decoder-only LM built from a :class:`ModelConfig`. ``forward(input_ids (B, T)) -> logits (B, T, vocab_size)``
    (float32 logits).

    ``Transformer(config)``, or ``Transformer(**fields)`` / ``Transformer(config, **changes)`` with
    :class:`ModelConfig` fields as keywords. ``self.config`` is the architecture it was built from.
    """

    def __init__(self, config: ModelConfig | Mapping[str, Any] | None = None, **fields: Any):
        super().__init__()
        if config is None:
            config = ModelConfig(**fields)
        else:
            config = ModelConfig.from_dict(config)
            if fields:
                config = config.replace(**fields)
        config = config.resolved()  # layer indices against this depth (raises for one out of range)
        self.config = config
        self.vocab_size = config.vocab_size
        self.dim = config.dim
        self.n_layers = config.n_layers
        self.max_seq_len = config.max_seq_len
        self.init_std = config.init_std
        self.pools = nn.ModuleDict({name: self._build_pool(name, spec) for name, spec in config.pools.items()})
        self.layer_specs = config.layer_specs()
        memory = config.memory_config()
        head_dim, n_kv_heads = config.dim // config.n_heads, config.n_kv_heads or config.n_heads

        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                config.dim,
                CausalSelfAttention(
                    config.dim, config.n_heads, config.max_seq_len, config.rope_base, config.dropout,
                    config.attention_backend, config.n_kv_heads, config.qkv_bias, config.proj_bias,
                    config.rope_scaling,
                    AttentionMemory(i, config.n_heads, n_kv_heads, head_dim, memory)
                    if memory is not None and i in memory.layers else None,
                ),
                self._build_block(i, spec),
                config.norm_eps,
                spec.add_at,
            )
            for i, spec in enumerate(self.layer_specs)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self._check_pools_used()
        self.reset_parameters()
        # pools whose tables stay in host memory: their rows are prefetched before the layers run (see forward)
        self.__dict__["host_pools"] = tuple(pool for pool in find_pools(self).values() if pool.on_host)

    # ----------------------------------------------------------------------------------------- construction
    @staticmethod
    def _build_pool(name: str, spec: Mapping[str, Any]) -> MemoryPool:
        if not isinstance(spec, Mapping):
            raise ModelConfigError(f"pools.{name} must be a mapping like {{n_keys: 256, value_dim: 256}}")
        allowed = [p for p in inspect.signature(MemoryPool.__init__).parameters if p != "self"]
        unknown = [k for k in spec if k not in allowed]
        if unknown:
            hints = [k + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, allowed, 1)) else "")
                     for k in unknown]
            raise ModelConfigError(f"pools.{name}: unknown key(s) {', '.join(hints)}; a pool accepts {allowed}")
        try:
            return MemoryPool(**({"n_keys": None, **spec} if "num_rows" in spec else spec))  # a directly indexed table
        except (TypeError, ValueError) as err:
            raise ModelConfigError(f"pools.{name}: {err}") from err

    def _build_block(self, index: int, spec: LayerSpec) -> Block:
        args = dict(spec.args)
        if spec.pool is not None:
            args["pool"] = spec.pool  # a nested block's pool (beside's children) is the layer's one pool
        try:
            return create_block(spec.block, dim=self.dim, pools=self.pools, vocab_size=self.vocab_size,
                                embedding=self.embed, **args)
        except (BlockConfigError, KeyError) as err:
            raise ModelConfigError(f"layers.{index}: {err}") from err

    def _check_pools_used(self) -> None:
        used = {spec.pool for spec in self.layer_specs}
        unused = sorted(set(self.pools) - used)
        if unused:
            raise ModelConfigError(
                f"pool(s) {unused} are defined but no layer reads them; name them in a layer "
                f"(layers: {{i: {{block: memory_plus, pool: {unused[0]}}}}}) or remove them"
            )

    def reset_parameters(self) -> None:
        """Applies the init scheme in the module docstring."""
        std, residual_std = self.init_std, self.init_std / math.sqrt(2 * self.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        if self.head.weight is not self.embed.weight:
            nn.init.normal_(self.head.weight, std=std)
        for layer in self.layers:
            nn.init.normal_(layer.attn.qkv.weight, std=std)
            nn.init.normal_(layer.attn.proj.weight, std=residual_std)
            for linear in (layer.attn.qkv, layer.attn.proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            layer.ffn.init_weights(std, residual_std)

    # ----------------------------------------------------------------------------------------- running
    def forward(
        self,
        input_ids: torch.Tensor,
        caches: list[LayerKVCache] | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids (B, T)`` int64 → logits ``(B, T, vocab_size)``; with ``caches`` (one per layer, see
        :class:`~memzoo.model.attention.LayerKVCache`), continues a decode after ``caches[0].length`` positions.

        For batches of left-padded prompts: ``attention_mask (B, start + T)`` (1: token, 0: padding; padding keys
        are never attended) and ``positions (B, T)``, the rotary positions (and :class:`BlockContext` positions)
        of the tokens, default ``start .. start + T - 1``.
        """
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        start = caches[0].length if caches else 0
        ctx = BlockContext.for_tokens(input_ids, start) if positions is None else BlockContext(input_ids, positions)
        mask = padding_attention_mask(attention_mask, start, input_ids.shape[1]) if attention_mask is not None else None
        x = self.dropout(self.embed(input_ids))
        if self.host_pools:
            self._prefetch(ctx, caches)
        deferred: dict[int, torch.Tensor] = {}  # skip-layer outputs by the layer after which they join
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, caches[i] if caches is not None else None, positions, mask, deferred.pop(i, None))
            if layer.add_at is not None:
                x, out = x
                deferred[layer.add_at] = out if layer.add_at not in deferred else deferred[layer.add_at] + out
        return self.head(self.norm(x)).float()

    def bind_tokenizer(self, tokenizer) -> None:
        """Hands the data tokenizer to every layer's block (:meth:`memzoo.blocks.base.Block.bind_tokenizer`)."""
        for layer in self.layers:
            layer.ffn.bind_tokenizer(tokenizer)

    @torch.compiler.disable
    def _prefetch(self, ctx: BlockContext, caches: list[LayerKVCache] | None) -> None:
        """Drops staged reads of a previous forward, then asks every layer's block to prefetch (with its decode
        state, as the layer's forward will see it)."""
        for pool in self.host_pools:
            pool.discard_staged()
        for i, layer in enumerate(self.layers):
            layer.ffn.prefetch(ctx.with_state(caches[i].block_state) if caches is not None else ctx)

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses (already weighted) from the last forward, ``{"layers.i.<name>": scalar}``.

        Blocks contribute through ``Block.aux_losses()``, e.g. MoE load balancing.
        """
        return {f"layers.{i}.{name}": value for i, layer in enumerate(self.layers)
                for name, value in layer.ffn.aux_losses().items()}

    def attach_memory(self, bank, topk: int | None = None, similarity_threshold: float | None = None,
                      check_weights: bool = True, index: str | None = None, distance: int | None = None,
                      sink_positions: int | None = None, documents: int | None = None,
                      min_document_score: float | None = None) -> None:
        """Attention over ``bank`` (a :class:`~memzoo.model.memory_bank.MemoryBank` built by this model) in the
        bank's layers. A model without ``attention_memory`` gets the Extended Mind (``joint``) option in those layers
        (no new parameters); one with it must list the bank's layers. ``topk`` / ``similarity_threshold`` override
        the settings, as do ``index`` (``exact`` | ``faiss_ivf``) and ``distance`` (memories sit ``distance`` positions
        before the context), ``sink_positions`` (the first positions, whose queries read no memory) and
        ``documents`` / ``min_document_score`` (each query retrieves only from the bank documents that best match the
        sequence so far; see :mod:`memzoo.model.attention_memory`). ``check_weights``: compare the bank's probe keys
        with this model's. Raises :class:`~memzoo.model.memory_bank.MemoryBankError` if the bank does not fit."""
        from memzoo.model.memory_bank import attach_memory

        attach_memory(self, bank, topk, similarity_threshold, check_weights, index, distance, sink_positions,
                      documents, min_document_score)

    def choose_memory_documents(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """With ``attention_memory.documents``: chooses each row's documents once from the prompt ``input_ids (B, P)``
        (one plain forward; :mod:`memzoo.model.memory_documents`, "per prompt") and makes every memory layer read only
        those, at every position, until :meth:`release_memory_documents`. Returns the choice ``(B, n_docs)`` bool, or
        ``None`` (no bank attached, or ``documents: 0``). Generation calls this itself."""
        from memzoo.model.memory_documents import best_documents, prompt_document_scores

        self.release_memory_documents()
        scores = prompt_document_scores(self, input_ids)
        if scores is None:
            return None
        memories = [layer.attn.memory for layer in self.layers
                    if layer.attn.memory is not None and layer.attn.memory.active]
        chosen = best_documents(scores, memories[0].documents, memories[0].min_document_score)
        for memory in memories:
            memory.prompt_documents = chosen
        return chosen

    def release_memory_documents(self) -> None:
        """Back to choosing memory documents per position (see :meth:`choose_memory_documents`)."""
        for layer in self.layers:
            if layer.attn.memory is not None:
                layer.attn.memory.prompt_documents = None

    def detach_memory(self) -> None:
        """Back to plain attention (see :func:`memzoo.model.memory_bank.detach_memory`)."""
        from memzoo.model.memory_bank import detach_memory

        detach_memory(self)

    def new_caches(self, batch_size: int, max_len: int) -> list[LayerKVCache]:
        """Empty KV caches for :meth:`forward` to decode up to ``max_len`` positions."""
        if max_len > self.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={self.max_seq_len}")
        p = self.embed.weight
        return [layer.attn.new_cache(batch_size, max_len, p.device, p.dtype) for layer in self.layers]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continues ``input_ids (B, P)``: greedy when ``temperature == 0``, else samples ``softmax(logits / T)``
        restricted to the ``top_k`` most likely tokens. Returns ``(B, P + n)`` with ``n <= max_new_tokens`` (all
        rows stop once every row has produced ``eos_id``; finished rows are padded with ``eos_id``). The loop is
        :func:`memzoo.model.decoding.decode_steps` (KV cache unless ``use_cache=False``)."""
        from memzoo.model.decoding import decode_steps

        steps = decode_steps(self, input_ids, max_new_tokens, temperature, top_k, eos_id, generator, use_cache)
        return torch.cat([input_ids, *(token[:, None] for token in steps)], dim=1)
