"""``ModelConfig``: the architecture of a memzoo decoder as one dataclass of plain data.

The :class:`~memzoo.model.transformer.Transformer` takes it, :class:`~memzoo.training.module.LanguageModel` holds it
(YAML ``model.init_args.architecture``), checkpoints store it as a plain dict, and ``memzoo export`` writes it into
``config.json``, from which :func:`memzoo.load_pretrained` reads it back.

Per-layer blocks: ``block``/``block_args`` give every layer's FFN-slot block; ``layers`` overrides single layers
(``{index: {block: name, **hyperparameters}}``, negative indices count from the end). Indices are resolved against
``n_layers`` when the layers are built (:meth:`ModelConfig.resolved`), so a config whose depth is set later (``init_from``
a model of another depth) resolves ``-1`` against the depth actually built. An override without ``block``
changes hyperparameters of the default block (merged over ``block_args``); one naming another block starts from that
block's defaults. ``pool: name`` in an entry makes that layer read the named pool of ``pools``. ``add_at: j`` in
an entry of layer ``i < j`` (UltraMem's skip-layer placement): the block reads layer ``i``'s normed input, and its
output is added to the residual stream after layer ``j`` (after ``j``'s own FFN-slot output).

Attention memory (Extended Mind / Memorizing Transformers, :mod:`memzoo.model.attention_memory`) is chosen per layer
too: ``attention_memory: {layers: all | [i, ...], topk: 8, mode: joint | gated, similarity_threshold: null,
distance: 0, sink_positions: 0, documents: 0, min_document_score: null}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from memzoo.model.attention_memory import AttentionMemoryConfig, AttentionMemoryError


class ModelConfigError(ValueError):
    """A model configuration that cannot be built (names the bad key and the fix)."""


@dataclass(frozen=True)
class LayerSpec:
    """The FFN-slot block of one layer: its registered name, hyperparameters and (optional) pool name."""

    block: str
    args: dict[str, Any]
    pool: str | None
    add_at: int | None = None  # the block's output joins the residual after this later layer (skip-layer)


@dataclass
class ModelConfig:
    """Architecture of a decoder-only LM (see the module docstring for ``block``/``block_args``/``layers``).

    Args:
        vocab_size: number of token ids (the ``memzoo`` CLI links it from the data module).
        dim: model width.
        n_layers: number of layers.
        n_heads: attention heads (must divide ``dim``; head size even, for rotary embeddings).
        block: default FFN-slot block of every layer (a registered name or a dotted class path).
        block_args: hyperparameters of the default block.
        layers: per-layer overrides ``{index: {block: name, **hyperparameters}}``.
        pools: named pools ``{name: MemoryPool kwargs}`` (``n_keys``, ``value_dim``, ``kind``, ``update``, ``lr``,
            ``weight_decay``, ``init_std``, ``num_rows``, ``table_device``), each owned once by the model and shared by the layers naming it.
        max_seq_len: longest sequence (rotary tables, KV cache).
        rope_base: rotary base frequency.
        tie_embeddings: share the token embedding and LM head weights.
        attention_backend: ``auto`` | ``sdpa`` | ``xformers``.
        dropout: attention dropout and embedding dropout.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal weight init.
        n_kv_heads: key/value heads (grouped-query attention, dividing ``n_heads``; ``None``: ``n_heads``).
        qkv_bias, proj_bias: biases on the attention's q/k/v and output projections (Qwen2: q/k/v only).
        rope_scaling: rotary frequency scaling, ``{rope_type: linear | llama3, ...}`` (Hugging Face form; see
            :func:`memzoo.model.rope.rope_inv_freq`), ``None``: none.
        attention_memory: layers whose attention also reads an external bank of keys/values, and how
            (:class:`~memzoo.model.attention_memory.AttentionMemoryConfig`); ``None``: no layer does.
    """

    vocab_size: int = 258
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    block: str = "dense"
    block_args: dict[str, Any] = field(default_factory=dict)
    layers: dict[int, dict[str, Any]] = field(default_factory=dict)
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    attention_backend: str = "auto"
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    n_kv_heads: int | None = None
    qkv_bias: bool = False
    proj_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    attention_memory: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelConfigError(f"model {key} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ModelConfigError(
                f"model dim={self.dim} is not divisible by n_heads={self.n_heads}; choose n_heads among "
                f"{[h for h in range(1, min(self.dim, 64) + 1) if self.dim % h == 0]}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ModelConfigError(
                f"head size dim/n_heads = {self.dim // self.n_heads} must be even for rotary embeddings"
            )
        for key in ("block_args", "layers", "pools"):
            value = getattr(self, key)
            if value is None:
                setattr(self, key, {})
            elif not isinstance(value, Mapping):
                raise ModelConfigError(f"model {key} must be a mapping, got {value!r}")
        layers: dict[int, Any] = {}
        for raw, override in self.layers.items():  # keys as given (negative ones resolve against the built depth)
            index = _layer_key(raw, self.n_layers)
            if index in layers:
                raise ModelConfigError(f"layers: keys name layer {index} twice; give each layer once")
            layers[index] = override
        self.layers = layers
        if self.attention_memory is not None:
            try:
                memory = AttentionMemoryConfig.from_dict(self.attention_memory, self.n_layers)
            except AttentionMemoryError as err:
                raise ModelConfigError(str(err)) from None
            self.attention_memory = memory.to_dict()

    def resolved_layers(self) -> dict[int, Any]:
        """``layers`` with every index in ``0 .. n_layers - 1`` (negative keys counted from the end); raises
        :class:`ModelConfigError` for an index out of range or a layer named twice."""
        layers: dict[int, Any] = {}
        for raw, override in self.layers.items():
            index = _layer_index(raw, self.n_layers)
            if index in layers:
                raise ModelConfigError(
                    f"layers: keys {raw!r} and {index} name the same layer; give each layer once"
                )
            layers[index] = override
        return layers

    def resolved(self) -> ModelConfig:
        """This config with ``layers`` keyed by non-negative indices (:meth:`resolved_layers`)."""
        return self.replace(layers=self.resolved_layers())

    def memory_config(self) -> AttentionMemoryConfig | None:
        """The checked ``attention_memory`` settings (``None``: no layer has attention memory)."""
        if self.attention_memory is None:
            return None
        return AttentionMemoryConfig.from_dict(self.attention_memory, self.n_layers)

    # ----------------------------------------------------------------------------------------- conversions
    def to_dict(self, resolve_layers: bool = True) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings): what checkpoints and ``config.json`` store. Layer indices
        are resolved against ``n_layers`` (``resolve_layers=False``: as given, negative ones included)."""
        data = _plain(dataclasses.asdict(self))
        if resolve_layers:
            data["layers"] = _plain(self.resolved_layers())
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "architecture") -> ModelConfig:
        """The config in ``data`` (as :meth:`to_dict` writes it); unknown keys raise, naming ``source``."""
        if isinstance(data, ModelConfig):
            return data
        if not isinstance(data, Mapping):
            raise ModelConfigError(f"{source} must be a mapping of architecture fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelConfigError(f"{source}: unknown architecture field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (checked like a new config)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------- layers
    def layer_specs(self) -> list[LayerSpec]:
        """One :class:`LayerSpec` per layer: the default block merged with the per-layer overrides."""
        block_args = dict(self.block_args)
        if "add_at" in block_args:
            raise ModelConfigError(
                "block_args: add_at is a per-layer setting (the later layer a block's output joins); set it in "
                "layers: {i: {add_at: j}}"
            )
        default_pool = layer_pool_name("block_args", block_args)
        specs = [LayerSpec(self.block, dict(block_args), default_pool) for _ in range(self.n_layers)]
        for index, override in self.resolved_layers().items():
            if override is None:
                override = {}
            if not isinstance(override, Mapping):
                raise ModelConfigError(f"layers.{index} must be a mapping like {{block: dense}}, got {override!r}")
            override = dict(override)
            name = override.pop("block", self.block)
            add_at = _add_at(index, override.pop("add_at", None), self.n_layers)
            args = {**block_args, **override} if name == self.block else override
            specs[index] = LayerSpec(name, args, layer_pool_name(f"layers.{index}", args), add_at)
        return specs


def _add_at(index: int, add_at: Any, n_layers: int) -> int | None:
    """A layer's ``add_at``: ``None`` (its block's output joins the residual in the layer itself) or a later
    layer ``index < j < n_layers`` (negative ``j`` counts from the end)."""
    if add_at is None:
        return None
    if isinstance(add_at, bool) or not isinstance(add_at, int):
        raise ModelConfigError(f"layers.{index}.add_at must be a layer index, got {add_at!r}")
    resolved = add_at + n_layers if add_at < 0 else add_at
    if not index < resolved < n_layers:
        raise ModelConfigError(
            f"layers.{index}.add_at={add_at} must name a later layer ({index + 1} .. {n_layers - 1}); drop it to add "
            f"the block's output in layer {index} itself"
        )
    return None if resolved == index else resolved


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


def _layer_key(raw: Any, n_layers: int) -> int:
    """A ``layers`` key as an int (not yet resolved against the depth)."""
    try:
        if isinstance(raw, bool):
            raise TypeError(raw)
        return int(raw)
    except (TypeError, ValueError):
        raise ModelConfigError(f"layers: key {raw!r} is not a layer index (0 .. {n_layers - 1})") from None


def _layer_index(raw: Any, n_layers: int) -> int:
    """A ``layers`` key as an index in ``0 .. n_layers - 1`` (negative keys count from the end)."""
    try:
        index = int(raw)
    except (TypeError, ValueError):
        raise ModelConfigError(f"layers: key {raw!r} is not a layer index (0 .. {n_layers - 1})") from None
    if not -n_layers <= index < n_layers:
        raise ModelConfigError(
            f"layers: index {index} is out of range for n_layers={n_layers} (use 0 .. {n_layers - 1}, or "
            f"negative indices counting from the end)"
        )
    return index % n_layers


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
