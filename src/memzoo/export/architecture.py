"""A memzoo :class:`~memzoo.model.transformer.Transformer`'s architecture as plain data (an export's
``config.json``), and back to ``Transformer`` arguments.

The config is read by two programs: ``modeling_memzoo.py`` (Hugging Face, without memzoo) and
:func:`memzoo.load_pretrained`. So each layer's block is written out in full, from the built module rather than
from the training YAML (whose defaults are memzoo's): ``{"block": family, **constructor arguments}``, with
``"pool": name`` for a layer that reads a shared pool. Training-only knobs (dropout, auxiliary-loss weights, pool
learning rates and update modes) are not part of the architecture and are not exported.

A block family is exportable when it has a describer here and a re-implementation in ``modeling_memzoo.py``;
others (a user's block, a subclass of a memzoo block) raise :class:`~memzoo.export.errors.ExportError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from memzoo.blocks.composition import Beside
from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.moe import MoE
from memzoo.blocks.peer import PEER
from memzoo.blocks.pool import MemoryPool
from memzoo.export.errors import ExportError, PretrainedFormatError
from memzoo.model.transformer import Transformer

MODEL_TYPE = "memzoo"
ARCHITECTURE = "MemzooForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_memzoo.MemzooConfig",
    "AutoModelForCausalLM": "modeling_memzoo.MemzooForCausalLM",
}


def _dense(block: DenseMLP) -> dict[str, Any]:
    return {"hidden": block.hidden, "bias": block.gate.bias is not None}


def _moe(block: MoE) -> dict[str, Any]:
    return {"n_experts": block.n_experts, "top_k": block.top_k, "hidden": block.hidden,
            "renormalize": block.renormalize}


def _product_key_memory(block: ProductKeyMemory) -> dict[str, Any]:
    return {
        "heads": block.heads, "knn": block.knn, "k_dim": block.k_dim, "query_norm": block.query_norm_kind,
        "qk_norm": block.qk_norm, "gate": block.gate, "output_proj": block.out_proj is not None,
        "bias": block.query.bias is not None, "n_keys": block.n_keys, "value_dim": block.value_dim,
    }


def _peer(block: PEER) -> dict[str, Any]:
    return {
        "heads": block.heads, "k": block.k, "k_dim": block.k_dim, "per_head_keys": block.per_head_keys,
        "score": block.score, "query_norm": block.query_norm_kind, "activation": block.activation,
        "n_keys": block.n_keys,
    }


#: Exportable block classes (exact types): their family name in config.json and their describer.
EXPORTABLE_BLOCKS: dict[type[nn.Module], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    DenseMLP: ("dense", _dense),
    MoE: ("moe", _moe),
    ProductKeyMemory: ("product_key_memory", _product_key_memory),
    PEER: ("peer", _peer),
}


def describe_block(index: int, block: nn.Module, shared_pools: dict[int, str]) -> dict[str, Any]:
    """``{"block": family, **hyperparameters}`` of layer ``index``'s FFN block (``"pool"`` if it reads a shared one).

    ``shared_pools`` maps ``id(pool)`` to its name in the model's ``pools``. A ``beside`` block is described with
    its two children: ``{"block": "beside", "init": ..., "base": {...}, "add": {...}}``.
    """
    if type(block) is Beside:
        return {"block": "beside", "init": block.init, "base": describe_block(index, block.base, shared_pools),
                "add": describe_block(index, block.add, shared_pools)}
    entry = EXPORTABLE_BLOCKS.get(type(block))
    if entry is None:
        cls = type(block)
        registered = cls.__dict__.get("block_name")  # its own registration, not an exportable parent's
        known = ", ".join(family for family, _ in EXPORTABLE_BLOCKS.values())
        raise ExportError(
            f"layer {index}'s block {cls.__module__}.{cls.__qualname__}"
            + (f" (registered as {registered!r})" if registered else "")
            + f" cannot be exported: the Hugging Face modeling code re-implements only memzoo's own blocks ({known}). "
            f"Export a model built from those blocks, or use the Lightning checkpoint with memzoo itself."
        )
    family, describe = entry
    spec = {"block": family, **describe(block)}
    pool = getattr(block, "pool", None)
    if isinstance(pool, MemoryPool) and id(pool) in shared_pools:
        spec["pool"] = shared_pools[id(pool)]
    return spec


def architecture_config(model: Transformer) -> dict[str, Any]:
    """The architecture fields of ``config.json`` for ``model`` (Hugging Face names where one exists)."""
    attention = model.layers[0].attn
    shared_pools = {id(pool): name for name, pool in model.pools.items()}
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": dict(AUTO_MAP),
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": attention.n_heads,
        "max_position_embeddings": model.max_seq_len,
        "num_key_value_heads": attention.n_kv_heads,
        "attention_qkv_bias": attention.qkv.bias is not None,
        "attention_out_bias": attention.proj.bias is not None,
        "rope_theta": float(attention.rope.base),
        "rotary_scaling": attention.rope.scaling,
        "rms_norm_eps": model.norm.eps,
        "tie_word_embeddings": model.head.weight is model.embed.weight,
        "initializer_range": model.init_std,
        "blocks": [describe_block(i, layer.ffn, shared_pools) for i, layer in enumerate(model.layers)],
        "pools": {
            name: {"kind": pool.kind, "n_keys": pool.n_keys, "value_dim": pool.value_dim}
            for name, pool in model.pools.items()
        },
    }


def transformer_arguments(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """``Transformer(**arguments)`` rebuilding the architecture in ``config`` (read from ``source``)."""
    try:
        blocks = config["blocks"]
        if not isinstance(blocks, list) or len(blocks) != config["num_hidden_layers"]:
            raise PretrainedFormatError(
                f"{source}: blocks must list one entry per layer (num_hidden_layers={config['num_hidden_layers']})"
            )
        return {
            "vocab_size": config["vocab_size"],
            "dim": config["hidden_size"],
            "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "layers": {i: dict(spec) for i, spec in enumerate(blocks)},
            "pools": {name: dict(spec) for name, spec in config.get("pools", {}).items()},
            "max_seq_len": config["max_position_embeddings"],
            "rope_base": config["rope_theta"],
            "tie_embeddings": config["tie_word_embeddings"],
            "norm_eps": config["rms_norm_eps"],
            "init_std": config.get("initializer_range", 0.02),
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "qkv_bias": bool(config.get("attention_qkv_bias", False)),
            "proj_bias": bool(config.get("attention_out_bias", False)),
            "rope_scaling": config.get("rotary_scaling"),
        }
    except KeyError as err:
        raise PretrainedFormatError(f"{source} lacks the field {err.args[0]!r}; export the model again") from None
