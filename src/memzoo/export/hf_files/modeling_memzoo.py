"""A memzoo language model for Hugging Face ``transformers`` (``AutoModelForCausalLM``, ``generate()``).

Self-contained: this file is copied verbatim into every ``memzoo export`` folder with its two siblings ``norms.py``
and ``product_key_router.py`` (memzoo's own norms and product-key router, plain torch), and imports only ``torch``,
``transformers`` and those, so an exported model runs where memzoo is not installed. It re-implements, in plain
PyTorch, the forward pass of memzoo's decoder and of each block family, with the same parameter names, so the exported
``model.safetensors`` loads as it is and the logits equal memzoo's own:

    embed → [x + attn(norm(x)), then x + ffn(norm(x))] × L → norm → head

- attention: causal multi-head (or grouped-query) self-attention, rotary embeddings ("rotate half" layout, optional
  ``linear`` / ``llama3`` frequency scaling), optional q/k/v and output biases, a KV cache through
  ``transformers``' Cache API (``DynamicCache``), optional padding masks;
- ffn blocks: ``dense`` (SwiGLU), ``moe`` (top-k routed SwiGLU experts), ``product_key_memory`` (PKM / Memory+:
  product-key top-k, softmax weights, one weighted read of a value table), ``peer`` (product-key retrieval of
  single-neuron experts), ``beside`` (two of these summed: a memory block retrofitted beside a pretrained FFN);
- pools: value tables shared by several layers (stored once, under ``pools.<name>``).

The sparse reads use ``F.embedding_bag`` (weighted sums of rows) and ``F.embedding`` (gathered rows), which are
differentiable but not memzoo's fused kernels: fine for inference and light fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_memzoo import POOL_TABLES, MemzooConfig
from .norms import HeadNorm, RMSNorm
from .product_key_router import ProductKeyRouter

#: transformers 5.x renamed the KV cache argument and output field from ``past_key_values`` to ``cache``; this file
#: takes either argument and fills the field this transformers has (tested with 5.17 and 5.24).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ---------------------------------------------------------------------------------------------- shared pieces
@dataclass(frozen=True)
class BlockContext:
    """What a block may read besides the hidden states: ``token_ids (B, T)`` and their ``positions (B, T)``."""

    token_ids: torch.Tensor
    positions: torch.Tensor


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None, device: torch.device) -> torch.Tensor:
    """``ω_i = base^(-2i/head_dim)`` (float64), scaled: ``linear`` divides every ω by ``factor``; ``llama3`` divides
    those of wavelength ``2π/ω`` above ``L/low_freq_factor`` by ``factor`` (``L``: original_max_position_embeddings),
    keeps those below ``L/high_freq_factor``, and interpolates between with ``s = (L/λ − low) / (high − low)``."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind != "llama3":
        raise ValueError(f"memzoo: rope_scaling type {kind!r} is not implemented (default, linear, llama3)")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation of dimension pair ``(i, i + head_dim/2)`` at position ``p``: angle ``p · ω_i`` (:func:`rope_inv_freq`).

    ``positions (B, T)`` int → ``cos, sin (B, T, 1, head_dim/2)`` float32 (angles computed in float64).
    """
    inv_freq = rope_inv_freq(head_dim, base, scaling, positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float()[:, :, None], angles.sin().float()[:, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x (B, T, H, head_dim)`` (computed in float32, returned in ``x.dtype``)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def weighted_rows(table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[..., :] = Σ_j weights[..., j] · table[indices[..., j]]``; ``(N, D), (..., K), (..., K) → (..., D)``."""
    flat = F.embedding_bag(
        indices.reshape(-1, indices.shape[-1]), table, per_sample_weights=weights.reshape(-1, weights.shape[-1]),
        mode="sum",
    )
    return flat.view(*indices.shape[:-1], table.shape[-1])


def row_dots(table: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = table[indices[..., j]] · x[...]``; ``(N, D), (..., K), (..., D) → (..., K)``."""
    return torch.einsum("...kd,...d->...k", F.embedding(indices, table), x)


class MemoryPool(nn.Module):
    """``n_keys²``-row tables read by product keys: ``values`` (kind ``memory``) or ``down``/``up`` (``experts``)."""

    def __init__(self, kind: str, n_keys: int, value_dim: int):
        super().__init__()
        self.kind, self.n_keys, self.value_dim = kind, n_keys, value_dim
        for table in POOL_TABLES[kind]:
            self.register_parameter(table, nn.Parameter(torch.empty(n_keys**2, value_dim)))


# ---------------------------------------------------------------------------------------------- FFN blocks
class DenseMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) ⊙ up(x))``; ``x, y: (..., dim)``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=bias)
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(
        self, x: torch.Tensor, pools: nn.ModuleDict | None = None, ctx: BlockContext | None = None
    ) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts: ``y = Σ_{e ∈ topk(p)} w_e · expert_e(x)``, ``p = softmax(router(x))``.

    ``w_e = p_e``, renormalised over the chosen ``top_k`` when ``renormalize``. Every routed token is processed.
    """

    def __init__(self, dim: int, n_experts: int, top_k: int, hidden: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(DenseMLP(dim, hidden) for _ in range(n_experts))

    def forward(
        self, x: torch.Tensor, pools: nn.ModuleDict | None = None, ctx: BlockContext | None = None
    ) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (N, dim)
        probs = self.router(tokens).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, top_k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_ids, slot = torch.nonzero(chosen == e, as_tuple=True)
            if token_ids.numel():
                contribution = expert(tokens[token_ids]) * weights[token_ids, slot, None].to(tokens.dtype)
                out.index_add_(0, token_ids, contribution)
        return out.view(x.shape)


class ProductKeyMemory(nn.Module):
    """PKM / Memory+ memory layer: the product-key router gives rows ``I`` and weights ``w`` per head;
    ``y = Σ_h Σ_j w_hj · V[I_hj]``. Output: ``y`` or ``W_o y`` (PKM), or ``W_2 (y ⊙ silu(W_1 x))`` (Memory+)."""

    def __init__(self, dim: int, spec: dict):
        super().__init__()
        self.pool_name = spec.get("pool")
        bias, n_keys, value_dim = spec["bias"], spec["n_keys"], spec["value_dim"]
        if self.pool_name is None:
            self.private_pool = MemoryPool("memory", n_keys, value_dim)
        self.router = router_from_spec(dim, n_keys, spec, bias=bias)
        self.gate_proj = nn.Linear(dim, value_dim, bias=bias) if spec["gate"] == "silu" else None
        self.out_proj = nn.Linear(value_dim, dim, bias=bias) if spec["output_proj"] else None

    def forward(self, x: torch.Tensor, pools: nn.ModuleDict, ctx: BlockContext | None = None) -> torch.Tensor:
        values = (self.private_pool if self.pool_name is None else pools[self.pool_name]).values
        indices, weights = self.router(x)  # (..., H, knn)
        y = weighted_rows(values, indices.flatten(-2), weights.to(values.dtype).flatten(-2)).to(x.dtype)
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x))
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y


PEER_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class PEER(nn.Module):
    """Single-neuron experts retrieved by product keys: ``y = Σ_h Σ_{i ∈ topk_h} g_hi · act(u_i · x) · v_i``, with
    ``u_i, v_i`` rows of the pool's ``down``/``up`` tables and ``g_h`` the router's weights of head ``h``."""

    def __init__(self, dim: int, spec: dict):
        super().__init__()
        self.pool_name = spec.get("pool")
        self.activation = PEER_ACTIVATIONS[spec["activation"]]
        if self.pool_name is None:
            self.private_pool = MemoryPool("experts", spec["n_keys"], dim)
        self.router = router_from_spec(dim, spec["n_keys"], spec, bias=False)

    def forward(self, x: torch.Tensor, pools: nn.ModuleDict, ctx: BlockContext | None = None) -> torch.Tensor:
        pool = self.private_pool if self.pool_name is None else pools[self.pool_name]
        indices, weights = self.router(x)
        indices, weights = indices.flatten(-2), weights.flatten(-2)  # (..., heads·knn)
        x_t = x.to(pool.down.dtype)
        gated = weights.to(x_t.dtype) * self.activation(row_dots(pool.down, indices, x_t))
        return weighted_rows(pool.up, indices, gated).to(x.dtype)


def router_from_spec(dim: int, n_keys: int, spec: dict, bias: bool) -> ProductKeyRouter:
    """The product-key router of a ``product_key_memory`` or ``peer`` block entry."""
    return ProductKeyRouter(
        dim, n_keys, spec["heads"], spec["knn"], spec["k_dim"], per_head_keys=spec["per_head_keys"],
        query_norm=spec["query_norm"], qk_norm=spec["qk_norm"], score=spec["score"], bias=bias,
    )


class Beside(nn.Module):
    """``base(x) + add(x)`` (``init: gate``: ``base(x) + scale · add(x)``): a block added beside another."""

    def __init__(self, dim: int, spec: dict):
        super().__init__()
        self.base = build_block(dim, spec["base"])
        self.add = build_block(dim, spec["add"])
        self.scale = nn.Parameter(torch.zeros(())) if spec["init"] == "gate" else None

    def forward(
        self, x: torch.Tensor, pools: nn.ModuleDict | None = None, ctx: BlockContext | None = None
    ) -> torch.Tensor:
        added = self.add(x, pools, ctx)
        if self.scale is not None:
            added = self.scale.to(added.dtype) * added
        return self.base(x, pools, ctx) + added


def build_block(dim: int, spec: dict) -> nn.Module:
    """The FFN-slot module for one ``config.blocks`` entry."""
    family = spec["block"]
    if family == "dense":
        return DenseMLP(dim, spec["hidden"], spec["bias"])
    if family == "moe":
        return MoE(dim, spec["n_experts"], spec["top_k"], spec["hidden"], spec["renormalize"])
    if family == "product_key_memory":
        return ProductKeyMemory(dim, spec)
    if family == "peer":
        return PEER(dim, spec)
    if family == "beside":
        return Beside(dim, spec)
    raise ValueError(f"memzoo: unknown block family {family!r}")


# ---------------------------------------------------------------------------------------------- the decoder
class Attention(nn.Module):
    """Causal self-attention with rotary embeddings; keys/values of earlier steps come from the Cache.

    Grouped-query: ``n_kv_heads`` key/value heads, query head ``h`` reads head ``h // (n_heads / n_kv_heads)``;
    ``qkv`` rows are ``[q (n_heads·hd); k (n_kv_heads·hd); v (n_kv_heads·hd)]``."""

    def __init__(self, dim: int, n_heads: int, layer_index: int, n_kv_heads: int | None = None,
                 qkv_bias: bool = False, proj_bias: bool = False):
        super().__init__()
        self.n_heads, self.head_dim, self.layer_index = n_heads, dim // n_heads, layer_index
        self.n_kv_heads = n_kv_heads or n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        B, T, dim = x.shape
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([dim, kv, kv], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv_heads, self.head_dim), v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or H_kv, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_index)  # (B, H_kv, past + T, hd)
        if self.n_kv_heads != self.n_heads:
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = mask is None and T > 1  # no mask: a fresh sequence (T > 1) or one new token
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, dim))


class DecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``+ ffn(norm(x))``."""

    def __init__(self, config: MemzooConfig, index: int):
        super().__init__()
        dim = config.hidden_size
        self.attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.attn = Attention(dim, config.num_attention_heads, index, getattr(config, "num_key_value_heads", None),
                              getattr(config, "attention_qkv_bias", False), getattr(config, "attention_out_bias", False))
        self.ffn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.ffn = build_block(dim, config.blocks[index])

    def forward(self, x, cos, sin, mask, cache, pools, ctx):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x), pools, ctx)


def attention_mask_for(
    attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask ``(B, 1, T, past + T)`` (True: may attend), or ``None`` for plain causal attention.

    Query ``i`` (position ``past + i``) sees keys ``0 .. past + i`` that are not padding (``attention_mask == 0``);
    it always sees itself, so a padding query's row is never empty.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or length == 1):
        return None
    query_pos = past + torch.arange(length, device=device)
    key_pos = torch.arange(past + length, device=device)
    visible = key_pos[None, :] <= query_pos[:, None]  # (T, S)
    if not padded:
        return visible
    keep = attention_mask[:, None, : past + length].bool()  # (B, 1, S)
    return ((visible[None] & keep) | (key_pos[None, None, :] == query_pos[None, :, None]))[:, None]


class MemzooPreTrainedModel(PreTrainedModel):
    config_class = MemzooConfig
    _no_split_modules: ClassVar[list[str]] = ["DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """A fresh model: linear and embedding weights ~ N(0, initializer_range), tables ~ N(0, value_dim^-1/2),
        sub-keys ~ N(0, (k_dim/2)^-1/2), norms at identity. Loaded weights replace all of it."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, MemoryPool):
            for table in POOL_TABLES[module.kind]:
                getattr(module, table).normal_(0.0, module.value_dim**-0.5)
        elif isinstance(module, ProductKeyRouter):
            module.sub_keys.normal_(0.0, (module.k_dim // 2) ** -0.5)
        elif isinstance(module, (RMSNorm, HeadNorm, nn.BatchNorm1d)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)


class MemzooForCausalLM(MemzooPreTrainedModel, GenerationMixin):
    """memzoo's decoder as a causal LM: ``input_ids (B, T) → logits (B, T, vocab_size)`` (float32)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"head.weight": "embed.weight"}

    def __init__(self, config: MemzooConfig):
        super().__init__(config)
        dim = config.hidden_size
        self.pools = nn.ModuleDict(
            {name: MemoryPool(spec["kind"], spec["n_keys"], spec["value_dim"]) for name, spec in config.pools.items()}
        )
        self.embed = nn.Embedding(config.vocab_size, dim)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(dim, config.rms_norm_eps)
        self.head = nn.Linear(dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.head = value

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
            logits_to_keep: compute logits for only the last ``n`` positions (0: all).
            past_key_values: the ``cache``, under its name in earlier transformers 5.x releases.
        """
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        B, T = input_ids.shape
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"memzoo: sequence reaches position {past + T} but the model was built for "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_cos_sin(position_ids, head_dim, self.config.rope_theta,
                                  getattr(self.config, "rotary_scaling", None))
        mask = attention_mask_for(attention_mask, past, T, input_ids.device)

        ctx = BlockContext(input_ids, position_ids)  # what token-indexed blocks read (memzoo.blocks.base)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, self.pools, ctx)
        x = self.norm(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.head(x).float()

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
