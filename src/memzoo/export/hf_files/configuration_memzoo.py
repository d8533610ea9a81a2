"""Configuration of an exported memzoo language model (``model_type: memzoo``).

Self-contained: this file is copied verbatim next to the weights of a ``memzoo export`` folder and imports only
``transformers``. It pairs with ``modeling_memzoo.py`` (the same folder), which builds memzoo's own model from
``architecture``.

Besides the usual decoder sizes, the config lists the FFN-slot block of every layer and the memory pools::

    blocks: [{"block": "dense", "hidden": 704, "bias": false},
             {"block": "product_key_memory", "pool": "shared", "heads": 4, "knn": 32, ...}, ...]
    pools:  {"shared": {"kind": "memory", "n_keys": 512, "value_dim": 256}}

Each block entry holds every hyperparameter its forward needs, fully resolved (no defaults to look up); a layer
with ``"pool": name`` reads the named pool, one without reads a private table of ``n_keys²`` rows.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

#: Block families an export holds, with the hyperparameters each ``blocks`` entry must give.
BLOCK_FIELDS: dict[str, tuple[str, ...]] = {
    "dense": ("hidden", "bias"),
    "moe": ("n_experts", "top_k", "hidden", "renormalize"),
    "product_key_memory": ("heads", "knn", "k_dim", "query_norm", "qk_norm", "score", "per_head_keys", "gate",
                           "output_proj", "bias"),
    "peer": ("heads", "knn", "k_dim", "per_head_keys", "score", "query_norm", "qk_norm", "activation"),
    "ultramem": ("value_expand", "heads", "knn", "k_dim", "rank", "cores"),
    "ultramem_v2": ("value_expand", "heads", "knn", "k_dim", "rank", "cores", "activation", "ffn_fraction"),
    "beside": ("base", "add", "init"),
    "token_embedding_ffn": ("vocab_size", "hidden"),
    "lookup_experts": ("vocab_size", "n_experts", "hidden", "expert_hidden", "mode"),
    "engram": ("vocab_size", "max_ngram", "ngram_dim", "heads", "kernel_size", "dilation", "layer_id", "seed",
               "table"),
}
#: Tables of each pool kind, all ``(n_keys², value_dim)``.
POOL_TABLES: dict[str, tuple[str, ...]] = {"memory": ("values",), "experts": ("down", "up")}


class MemzooConfig(PretrainedConfig):
    """Sizes of the decoder, the block of each layer (``blocks``, one entry per layer) and the pools (``pools``).

    Args:
        vocab_size: number of token ids.
        hidden_size: model width.
        num_hidden_layers: number of layers (``len(blocks)``).
        num_attention_heads: attention heads (divides ``hidden_size``; head size even, for rotary embeddings).
        max_position_embeddings: longest sequence the model was built for.
        rope_theta: rotary base frequency.
        rms_norm_eps: epsilon of the RMSNorms around each layer and before the head.
        blocks: the FFN-slot block of each layer, ``{"block": family, **hyperparameters}``.
        pools: memory pools shared by layers, ``{name: {"kind": "memory"|"experts", "n_keys", "value_dim"}}``.
        tie_word_embeddings: the LM head reuses the token embedding matrix.
        initializer_range: std of the normal init of a freshly built (not loaded) model.
        architecture: memzoo's ``ModelConfig`` of the model as plain data, from which ``modeling_memzoo.py`` and
            ``memzoo.load_pretrained`` build the model.
        num_key_value_heads: key/value heads (grouped-query attention; default ``num_attention_heads``).
        attention_qkv_bias, attention_out_bias: biases on the q/k/v and output projections of attention.
        rotary_scaling: rotary frequency scaling, ``{"rope_type": "linear" | "llama3", ...}`` or ``None`` (not
            named ``rope_scaling``, which transformers reinterprets).
    """

    model_type = "memzoo"

    def __init__(
        self,
        vocab_size: int = 258,
        hidden_size: int = 256,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 4,
        max_position_embeddings: int = 1024,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        blocks: list[dict[str, Any]] | None = None,
        pools: dict[str, dict[str, Any]] | None = None,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        architecture: dict[str, Any] | None = None,
        num_key_value_heads: int | None = None,
        attention_qkv_bias: bool = False,
        attention_out_bias: bool = False,
        rotary_scaling: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.blocks = [dict(b) for b in blocks] if blocks is not None else [
            {"block": "dense", "hidden": _swiglu_hidden(hidden_size), "bias": False}
            for _ in range(num_hidden_layers)
        ]
        self.pools = {name: dict(spec) for name, spec in (pools or {}).items()}
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.architecture = dict(architecture) if architecture is not None else None
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.attention_qkv_bias = attention_qkv_bias
        self.attention_out_bias = attention_out_bias
        self.rotary_scaling = dict(rotary_scaling) if rotary_scaling else None
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self) -> None:
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"memzoo config: hidden_size={self.hidden_size} must split into num_attention_heads="
                f"{self.num_attention_heads} heads of even size"
            )
        if len(self.blocks) != self.num_hidden_layers:
            raise ValueError(
                f"memzoo config: blocks lists {len(self.blocks)} layers but num_hidden_layers={self.num_hidden_layers}"
            )
        for name, spec in self.pools.items():
            if spec.get("kind") not in POOL_TABLES or "value_dim" not in spec or (
                    ("n_keys" in spec) == ("num_rows" in spec)):
                raise ValueError(
                    f"memzoo config: pool {name!r} must give kind (one of {sorted(POOL_TABLES)}), n_keys or "
                    f"num_rows, and value_dim; got {spec}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"memzoo config: num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads}"
            )
        scaling = self.rotary_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "linear", "llama3"):
            raise ValueError(f"memzoo config: rotary_scaling {scaling} is not one of default, linear, llama3")
        specs = list(enumerate(self.blocks))
        for index, spec in list(specs):
            if spec.get("block") == "beside":
                specs += [(index, spec.get("base") or {}), (index, spec.get("add") or {})]
        for index, spec in specs:
            family = spec.get("block")
            if family not in BLOCK_FIELDS:
                raise ValueError(
                    f"memzoo config: layer {index} has block {family!r}; an export holds the blocks "
                    f"{sorted(BLOCK_FIELDS)}"
                )
            missing = [key for key in BLOCK_FIELDS[family] if key not in spec]
            if family in ("product_key_memory", "peer", "ultramem", "ultramem_v2") and "pool" not in spec and (
                    "n_keys" not in spec):
                missing.append("pool or n_keys")
            if missing:
                raise ValueError(f"memzoo config: layer {index} ({family}) lacks {missing}")
            pool = spec.get("pool")
            if pool is not None and pool not in self.pools:
                raise ValueError(f"memzoo config: layer {index} reads pool {pool!r}, which pools does not define")


def _swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """8/3·dim rounded up to a multiple of 64: the default width of a dense SwiGLU block."""
    return multiple_of * ((int(8 * dim / 3) + multiple_of - 1) // multiple_of)
