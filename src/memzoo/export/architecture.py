"""A memzoo :class:`~memzoo.model.transformer.Transformer`'s architecture in an export's ``config.json``, and back.

``config.json`` holds, besides Hugging Face's usual names (``hidden_size``, ``num_hidden_layers``, ...):

- ``architecture``: the :class:`~memzoo.model.config.ModelConfig` as plain data, from which
  :func:`memzoo.load_pretrained` rebuilds the model (``ModelConfig.from_dict``: the same config, every field);
- ``blocks``: each layer's block fully resolved, ``{"block": family, **hyperparameters}`` as the registry recorded
  them when the block was built (``block.hparams``; a preset such as ``memory_plus`` is written as its family with
  every setting), with ``"pool": name`` for a layer reading a shared pool. ``product_key_memory`` entries also carry
  ``bias: false`` and ``output_proj`` (whether ``W_o``/``W_2`` exists), as exports before memzoo shipped its own
  model code read them; :func:`rebuild` checks that memzoo still resolves the architecture to the same blocks;
- ``pools``: each shared pool's ``kind``, ``n_keys`` (or ``num_rows``) and ``value_dim``.

A block family is exportable when its code ships in the export, i.e. it is one of memzoo's own blocks
(:data:`EXPORTABLE_BLOCKS`, in :mod:`memzoo.export.shipped_code`'s modules); others (a user's block, a subclass of
a memzoo block, whose code lives outside memzoo) raise :class:`~memzoo.export.errors.ExportError`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from memzoo.blocks.base import Block
from memzoo.blocks.composition import Beside
from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.engram import Engram
from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.moe import MoE
from memzoo.blocks.mole import LookupExperts
from memzoo.blocks.peer import PEER
from memzoo.blocks.stem import TokenEmbeddingFFN
from memzoo.blocks.ultramem import UltraMem, UltraMemV2
from memzoo.export.errors import ExportError, PretrainedFormatError
from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.transformer import Transformer

MODEL_TYPE = "memzoo"
ARCHITECTURE = "MemzooForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_memzoo.MemzooConfig",
    "AutoModelForCausalLM": "modeling_memzoo.MemzooForCausalLM",
}

#: Block classes (exact types) whose code an export ships, by their family name.
EXPORTABLE_BLOCKS: dict[type[nn.Module], str] = {
    DenseMLP: "dense",
    MoE: "moe",
    ProductKeyMemory: "product_key_memory",
    PEER: "peer",
    TokenEmbeddingFFN: "token_embedding_ffn",
    LookupExperts: "lookup_experts",
    UltraMem: "ultramem",
    UltraMemV2: "ultramem_v2",
    Engram: "engram",
}


def describe_block(index: int, block: nn.Module) -> dict[str, Any]:
    """``{"block": family, **resolved hyperparameters}`` of layer ``index``'s FFN block; a ``beside`` block as
    ``{"block": "beside", "init": ..., "base": {...}, "add": {...}}`` with both children described."""
    if type(block) is Beside:
        return {"block": "beside", "init": block.init, "base": describe_block(index, block.base),
                "add": describe_block(index, block.add)}
    family = EXPORTABLE_BLOCKS.get(type(block))
    spec = block.hparams if isinstance(block, Block) else None
    if family is None or spec is None:
        cls = type(block)
        registered = cls.__dict__.get("block_name")  # its own registration, not an exportable parent's
        known = ", ".join(EXPORTABLE_BLOCKS.values())
        raise ExportError(
            f"layer {index}'s block {cls.__module__}.{cls.__qualname__}"
            + (f" (registered as {registered!r})" if registered else "")
            + f" cannot be exported: an export ships the code of memzoo's own blocks only ({known}). "
            f"Export a model built from those blocks, or use the Lightning checkpoint with memzoo itself."
        )
    if family == "product_key_memory":
        spec = {**spec, "bias": False, "output_proj": block.out_proj is not None}
    return {**spec, "block": family}


def architecture_config(model: Transformer) -> dict[str, Any]:
    """The architecture fields of ``config.json`` for ``model`` (Hugging Face names where one exists)."""
    config = model.config
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": dict(AUTO_MAP),
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "max_position_embeddings": config.max_seq_len,
        "num_key_value_heads": config.n_kv_heads or config.n_heads,
        "attention_qkv_bias": config.qkv_bias,
        "attention_out_bias": config.proj_bias,
        "rope_theta": float(config.rope_base),
        "rotary_scaling": config.rope_scaling,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "blocks": [describe_block(i, layer.ffn) for i, layer in enumerate(model.layers)],
        "pools": {
            name: {"kind": pool.kind, "value_dim": pool.value_dim,
                   **({"n_keys": pool.n_keys} if pool.product_keyed else {"num_rows": pool.num_rows})}
            for name, pool in model.pools.items()
        },
        "architecture": config.to_dict(),
    }


def model_config(config: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` stored in an export's ``config`` (read from ``source``).

    Exports that predate the ``architecture`` field are rebuilt from their resolved ``blocks``.
    """
    try:
        if "architecture" in config:
            return ModelConfig.from_dict(config["architecture"], source=f"{source}: architecture")
        blocks = config["blocks"]
        if not isinstance(blocks, list) or len(blocks) != config["num_hidden_layers"]:
            raise PretrainedFormatError(
                f"{source}: blocks must list one entry per layer (num_hidden_layers={config['num_hidden_layers']})"
            )
        return ModelConfig(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            layers={i: dict(spec) for i, spec in enumerate(blocks)},
            pools={name: dict(spec) for name, spec in config.get("pools", {}).items()},
            max_seq_len=config["max_position_embeddings"],
            rope_base=config["rope_theta"],
            tie_embeddings=config["tie_word_embeddings"],
            norm_eps=config["rms_norm_eps"],
            init_std=config.get("initializer_range", 0.02),
        )
    except KeyError as err:
        raise PretrainedFormatError(f"{source} lacks the field {err.args[0]!r}; export the model again") from None
    except ModelConfigError as err:
        raise PretrainedFormatError(f"{source} does not describe a buildable model: {err}") from err


def rebuild(config: dict[str, Any], source: str = "config.json") -> Transformer:
    """The :class:`Transformer` that ``config`` describes (weights freshly initialised; build under
    ``torch.device("meta")`` to allocate nothing), checked to resolve to the same blocks as the stored ``blocks``."""
    try:
        model = Transformer(model_config(config, source))
    except (ModelConfigError, TypeError, ValueError) as err:
        if isinstance(err, PretrainedFormatError):
            raise
        raise PretrainedFormatError(f"{source} does not describe a buildable model: {err}") from err
    stored = config.get("blocks")
    if stored is not None:
        for index, layer in enumerate(model.layers):
            built = describe_block(index, layer.ffn)
            differ = {k for k in set(built) | set(stored[index]) if built.get(k) != stored[index].get(k)}
            if differ:
                raise PretrainedFormatError(
                    f"{source}: layer {index} was exported as {stored[index]} but this memzoo builds {built} "
                    f"(fields {sorted(differ)} differ); load it with the memzoo version that exported it "
                    f"({config.get('memzoo_version', 'unknown')})"
                )
    return model
