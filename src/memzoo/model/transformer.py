"""The decoder-only transformer: embed → [attention + FFN-slot block] × L → norm → LM head.

Each layer's FFN slot holds any registered block (``dense``, ``moe``, ``peer``, ``product_key_memory``, or a user's),
chosen per layer: ``block``/``block_args`` give the default, ``layers`` overrides single layers. Memory pools are
owned here (``self.pools``) and handed to the blocks that name them, so several layers can read one table.

Initialisation (GPT-2 / nanoGPT scheme): embeddings and every linear weight ~ N(0, init_std); the residual output
projections (attention ``proj`` and a block's output projection) ~ N(0, init_std / sqrt(2·n_layers)); norms at 1.
A block takes part by defining ``init_weights(std, residual_std)``; a block without it keeps its own init. Pools
initialise themselves (see :class:`memzoo.blocks.pool.MemoryPool`).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from memzoo.blocks.pool import MemoryPool
from memzoo.model.attention import CausalSelfAttention, LayerKVCache
from memzoo.model.norms import RMSNorm
from memzoo.registry import BlockConfigError, create_block, get_block


class ModelConfigError(ValueError):
    """A model configuration that cannot be built (names the bad key and the fix)."""


@dataclass(frozen=True)
class LayerSpec:
    """The FFN-slot block of one layer: its registered name, hyperparameters and (optional) pool name."""

    block: str
    args: dict[str, Any]
    pool: str | None


def resolve_layer_specs(
    n_layers: int, block: str, block_args: Mapping[str, Any], layers: Mapping[int, Mapping[str, Any]]
) -> list[LayerSpec]:
    """Merges the default block with per-layer overrides into one :class:`LayerSpec` per layer.

    ``layers`` maps a layer index (negative counts from the end) to ``{block: name, <hyperparameters>}``. An override
    without ``block`` changes hyperparameters of the default block (merged over ``block_args``); one naming another
    block starts from that block's defaults.
    """
    default_pool = layer_pool_name("block_args", block_args)
    specs = [LayerSpec(block, dict(block_args), default_pool) for _ in range(n_layers)]
    for raw_index, override in layers.items():
        try:
            index = int(raw_index)
        except (TypeError, ValueError):
            raise ModelConfigError(f"layers: key {raw_index!r} is not a layer index (0 .. {n_layers - 1})") from None
        if not -n_layers <= index < n_layers:
            raise ModelConfigError(
                f"layers: index {index} is out of range for n_layers={n_layers} (use 0 .. {n_layers - 1}, or "
                f"negative indices counting from the end)"
            )
        if override is None:
            override = {}
        if not isinstance(override, Mapping):
            raise ModelConfigError(f"layers.{raw_index} must be a mapping like {{block: dense}}, got {override!r}")
        override = dict(override)
        name = override.pop("block", block)
        args = {**block_args, **override} if name == block else override
        specs[index % n_layers] = LayerSpec(name, args, layer_pool_name(f"layers.{raw_index}", args))
    return specs


def layer_pool_name(where: str, args: Mapping[str, Any]) -> str | None:
    """The pool a layer reads: its own ``pool:``, or the ``pool:`` of a nested block spec (``beside``'s children,
    ``{block: ..., pool: name}``). One pool per layer."""
    if args.get("pool") is not None:
        return args["pool"]
    nested = {value["pool"] for value in args.values()
              if isinstance(value, Mapping) and "block" in value and isinstance(value.get("pool"), str)}
    if len(nested) > 1:
        raise ModelConfigError(f"{where}: the nested blocks read different pools {sorted(nested)}; one pool per layer")
    return nested.pop() if nested else None


class TransformerLayer(nn.Module):
    """Pre-norm residual layer: ``x + attn(norm(x))``, then ``+ ffn(norm(x))``; ``x: (B, T, dim)``."""

    def __init__(self, dim: int, attention: CausalSelfAttention, ffn: nn.Module, norm_eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = attention
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(input_ids (B, T)) -> logits (B, T, vocab_size)`` (float32 logits).

    Args:
        vocab_size: number of token ids.
        dim: model width.
        n_layers: number of layers.
        n_heads: attention heads (must divide ``dim``).
        block: default FFN-slot block of every layer (a registered name or a dotted class path).
        block_args: hyperparameters of the default block.
        layers: per-layer overrides ``{index: {block: name, **hyperparameters}}``; ``pool: name`` in an entry
            makes that layer read the named pool.
        pools: named pools ``{name: MemoryPool kwargs}`` (``n_keys``, ``value_dim``, ``kind``, ``update``, ``lr``,
            ``weight_decay``, ``init_std``), each owned once by the model.
        max_seq_len: longest sequence (rotary tables, KV cache).
        rope_base: rotary base frequency.
        tie_embeddings: share the token embedding and LM head weights.
        attention_backend: ``auto`` | ``sdpa`` | ``xformers``.
        dropout: attention dropout and embedding dropout.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal weight init.
        n_kv_heads: key/value heads (grouped-query attention; ``None``: ``n_heads``).
        qkv_bias, proj_bias: biases on the attention's q/k/v and output projections (Qwen2: q/k/v only).
        rope_scaling: rotary frequency scaling (``{rope_type: linear | llama3, ...}``, see
            :func:`memzoo.model.rope.rope_inv_freq`).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        block: str = "dense",
        block_args: Mapping[str, Any] | None = None,
        layers: Mapping[int, Mapping[str, Any]] | None = None,
        pools: Mapping[str, Mapping[str, Any]] | None = None,
        max_seq_len: int = 1024,
        rope_base: float = 10000.0,
        tie_embeddings: bool = True,
        attention_backend: str = "auto",
        dropout: float = 0.0,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        n_kv_heads: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        rope_scaling: dict[str, Any] | None = None,
    ):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("dim", dim), ("n_layers", n_layers), ("n_heads", n_heads),
                           ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"model {key} must be a positive integer, got {value!r}")
        if dim % n_heads:
            raise ModelConfigError(
                f"model dim={dim} is not divisible by n_heads={n_heads}; choose n_heads among "
                f"{[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]}"
            )
        if (dim // n_heads) % 2:
            raise ModelConfigError(f"head size dim/n_heads = {dim // n_heads} must be even for rotary embeddings")
        self.vocab_size = vocab_size
        self.dim = dim
        self.n_layers = n_layers
        self.max_seq_len = max_seq_len
        self.init_std = init_std
        self.pools = nn.ModuleDict({name: self._build_pool(name, spec) for name, spec in (pools or {}).items()})
        self.layer_specs = resolve_layer_specs(n_layers, block, dict(block_args or {}), dict(layers or {}))

        self.embed = nn.Embedding(vocab_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(
                dim,
                CausalSelfAttention(dim, n_heads, max_seq_len, rope_base, dropout, attention_backend, n_kv_heads,
                                    qkv_bias, proj_bias, rope_scaling),
                self._build_block(i, spec),
                norm_eps,
            )
            for i, spec in enumerate(self.layer_specs)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._check_pools_used()
        self.reset_parameters()

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
            return MemoryPool(**spec)
        except (TypeError, ValueError) as err:
            raise ModelConfigError(f"pools.{name}: {err}") from err

    def _build_block(self, index: int, spec: LayerSpec) -> nn.Module:
        args = dict(spec.args)
        if spec.pool is not None:
            if spec.pool not in self.pools:
                defined = ", ".join(sorted(self.pools)) or "none"
                raise ModelConfigError(
                    f"layers.{index}: pool {spec.pool!r} is not defined; defined pools: {defined}. "
                    f"Add it under model pools: {{{spec.pool}: {{n_keys: ..., value_dim: ...}}}}"
                )
            if "pool" not in inspect.signature(get_block(spec.block).__init__).parameters:
                raise ModelConfigError(f"layers.{index}: block {spec.block!r} does not read memory pools; drop `pool:`")
            args["pool"] = self.pools[spec.pool]
        try:
            return create_block(spec.block, dim=self.dim, **args)
        except (BlockConfigError, KeyError) as err:
            raise ModelConfigError(f"layers.{index}: {err}") from err

    def _check_pools_used(self) -> None:
        used = {spec.pool for spec in self.layer_specs}
        unused = sorted(set(self.pools) - used)
        if unused:
            raise ModelConfigError(
                f"pool(s) {unused} are defined but no layer reads them; name them in a layer "
                f"(layers: {{i: {{block: product_key_memory, pool: {unused[0]}}}}}) or remove them"
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
            if hasattr(layer.ffn, "init_weights"):
                layer.ffn.init_weights(std, residual_std)

    # ----------------------------------------------------------------------------------------- running
    def forward(self, input_ids: torch.Tensor, caches: list[LayerKVCache] | None = None) -> torch.Tensor:
        """``input_ids (B, T)`` int64 → logits ``(B, T, vocab_size)``; with ``caches``, continues a decode."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        x = self.dropout(self.embed(input_ids))
        for i, layer in enumerate(self.layers):
            x = layer(x, caches[i] if caches is not None else None)
        return self.head(self.norm(x)).float()

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses (already weighted) from the last forward, ``{"layers.i.<name>": scalar}``.

        A block contributes by defining ``aux_losses() -> dict[str, Tensor]``, e.g. MoE load balancing.
        """
        out = {}
        for i, layer in enumerate(self.layers):
            if hasattr(layer.ffn, "aux_losses"):
                for name, value in layer.ffn.aux_losses().items():
                    out[f"layers.{i}.{name}"] = value
        return out

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
        rows stop once every row has produced ``eos_id``; finished rows are padded with ``eos_id``)."""
        from memzoo.model.sampling import sample_next_token

        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        B, P = input_ids.shape
        total = min(P + max_new_tokens, self.max_seq_len)
        caches = self.new_caches(B, total) if use_cache else None
        out = input_ids
        step_input = input_ids
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(total - P):
            logits = self(step_input, caches)[:, -1] if use_cache else self(out)[:, -1]
            nxt = sample_next_token(logits, temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
        return out
