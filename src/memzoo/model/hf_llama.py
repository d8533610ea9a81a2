"""Hugging Face Llama-architecture folders (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``) as
memzoo decoders: their ``config.json`` as :class:`~memzoo.model.transformer.Transformer` arguments and their
weights under memzoo's names.

The architectures map one to one onto memzoo's decoder: pre-norm RMSNorm layers, rotary attention ("rotate half"
layout, as Hugging Face stores these weights) with grouped-query heads, a SwiGLU MLP (memzoo's ``dense`` block:
``gate``/``up``/``down``), a final norm and a tied or untied LM head. Differences handled here: q/k/v biases
(Qwen2; Llama's ``attention_bias`` also biases ``o_proj``), ``mlp_bias``, RoPE theta and the ``linear`` / ``llama3``
frequency scalings (config ``rope_scaling`` + ``rope_theta``, or ``rope_parameters``), RMSNorm eps. Anything memzoo
would compute differently is refused with :class:`HFImportError` naming it: other architectures, sliding-window
attention, mixture-of-experts layers, activations other than SiLU, a ``head_dim`` other than
``hidden_size / num_attention_heads``, other RoPE scalings.

Weights: ``q_proj``, ``k_proj``, ``v_proj`` are stacked into memzoo's one ``qkv`` (rows ``[q; k; v]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from memzoo.model.retrofit import InitFromError, load_initial_weights
from memzoo.model.rope import rope_scaling_type
from memzoo.model.transformer import Transformer

#: Architectures :func:`transformer_arguments_from_hf` reads, and how their attention projections are biased.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class HFImportError(ValueError):
    """A Hugging Face folder memzoo cannot import exactly (names the file, field or feature, and the fix)."""


def is_hf_llama_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` names a supported architecture."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(name in SUPPORTED_ARCHITECTURES for name in architectures)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise HFImportError(f"{folder} has no {CONFIG_FILE}; give a Hugging Face model folder (save_pretrained)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFImportError(f"{config_path} cannot be read as JSON ({err})") from err


def _rope(config: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling or None)`` from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` +
    ``rope_scaling``."""
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = dict(params)
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else None
    if scaling is not None:
        scaling.pop("rope_theta", None)
        try:
            kind = rope_scaling_type(scaling)
        except ValueError as err:
            raise HFImportError(f"{source}: {err}") from None
        scaling = None if kind == "default" else scaling
    return float(theta), scaling


def transformer_arguments_from_hf(config: Mapping[str, Any], source: str = CONFIG_FILE) -> dict[str, Any]:
    """``Transformer(**arguments)`` with the architecture of a Hugging Face Llama-family ``config`` (module
    docstring); every layer's FFN is ``dense`` (SwiGLU, ``hidden = intermediate_size``)."""
    architectures = config.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise HFImportError(
            f"{source}: architecture {architectures or config.get('model_type')!r} is not supported; memzoo imports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        n_layers, vocab_size = int(config["num_hidden_layers"]), int(config["vocab_size"])
        hidden = int(config["intermediate_size"])
    except KeyError as err:
        raise HFImportError(f"{source} lacks the field {err.args[0]!r}") from None
    if config.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (memzoo's MLP is SwiGLU)")
    if config.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        raise HFImportError(
            f"{source}: head_dim={config.get('head_dim')} differs from hidden_size/num_attention_heads = "
            f"{dim}/{n_heads}; memzoo's attention needs head_dim = hidden_size / num_attention_heads"
        )
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(key):
            raise HFImportError(f"{source}: mixture-of-experts layers ({key}={config[key]}) are not supported")
    max_positions = int(config.get("max_position_embeddings", 2048))
    window = config.get("sliding_window")
    uses_window = config.get("use_sliding_window", arch == "MistralForCausalLM")
    if (uses_window and window is not None and int(window) < max_positions) or any(
        kind != "full_attention" for kind in (config.get("layer_types") or [])
    ):
        raise HFImportError(
            f"{source}: sliding-window attention (sliding_window={window}, layer_types="
            f"{config.get('layer_types')}) is not supported; memzoo attends to the whole context"
        )
    theta, scaling = _rope(config, source)
    attention_bias = bool(config.get("attention_bias", False))
    return {
        "vocab_size": vocab_size,
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": int(config.get("num_key_value_heads") or n_heads),
        "block": "dense",
        "block_args": {"hidden": hidden, "bias": bool(config.get("mlp_bias", False))},
        "max_seq_len": max_positions,
        "rope_base": theta,
        "rope_scaling": scaling,
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "qkv_bias": arch == "Qwen2ForCausalLM" or attention_bias,
        "proj_bias": attention_bias,
    }


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder's ``model.safetensors`` (or its shards, via ``model.safetensors.index.json``)."""
    from safetensors.torch import load_file

    folder = Path(path)
    index = folder / WEIGHTS_INDEX
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise HFImportError(f"{index} names weight files that are missing: {missing}")
    else:
        other = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {other}: convert them to safetensors)" if other else ""
        raise HFImportError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{hint}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(str(file)))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise HFImportError(f"{file} cannot be read as safetensors ({err})") from err
    return weights


_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "self_attn.o_proj.bias": "attn.proj.bias",
    "mlp.gate_proj.weight": "ffn.gate.weight",
    "mlp.up_proj.weight": "ffn.up.weight",
    "mlp.down_proj.weight": "ffn.down.weight",
    "mlp.gate_proj.bias": "ffn.gate.bias",
    "mlp.up_proj.bias": "ffn.up.bias",
    "mlp.down_proj.bias": "ffn.down.bias",
}


def convert_hf_weights(hf: Mapping[str, torch.Tensor], n_layers: int, source: str = "weights") -> dict[str, torch.Tensor]:
    """Hugging Face Llama-family tensor names → memzoo's (q/k/v stacked into ``qkv``). Unknown names raise."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        if name in hf:
            used.add(name)
            return hf[name]
        return None

    for name, target in (("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight"),
                         ("lm_head.weight", "head.weight")):
        tensor = take(name)
        if tensor is not None:
            out[target] = tensor
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        for name, target in _LAYER_NAMES.items():
            tensor = take(prefix + name)
            if tensor is not None:
                out[f"layers.{i}.{target}"] = tensor
        for kind in ("weight", "bias"):
            parts = [take(f"{prefix}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if all(p is not None for p in parts):
                out[f"layers.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            elif any(p is not None for p in parts):
                raise HFImportError(f"{source}: layer {i} has only some of q/k/v_proj.{kind}")
    unused = sorted(k for k in hf if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise HFImportError(f"{source}: tensors {unused[:6]} have no place in memzoo's decoder (unsupported layer kind?)")
    return out


def retrofit_arguments(
    arguments: Mapping[str, Any],
    layers: Mapping[int, Mapping[str, Any]] | None = None,
    pools: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """An imported architecture plus retrofits: per-layer overrides ``layers`` and new ``pools``.

    A ``beside`` layer whose ``base`` is ``dense`` without ``hidden`` gets the imported MLP's width and bias, so
    ``{block: beside, base: dense, add: {...}}`` keeps the pretrained FFN as its base.
    """
    out = dict(arguments)
    merged = {}
    for index, spec in (layers or {}).items():
        spec = dict(spec or {})
        if spec.get("block") == "beside":
            base = spec.get("base", "dense")
            base = {"block": base} if isinstance(base, str) else dict(base)
            if base.get("block") == "dense":
                base = {**out["block_args"], **base}
            spec["base"] = base
        merged[index] = spec
    out["layers"] = merged
    out["pools"] = dict(pools or {})
    return out


def load_hf_model(
    path: str | Path,
    *,
    max_seq_len: int | None = None,
    layers: Mapping[int, Mapping[str, Any]] | None = None,
    pools: Mapping[str, Mapping[str, Any]] | None = None,
    attention_backend: str = "auto",
) -> Transformer:
    """A :class:`~memzoo.model.transformer.Transformer` holding a Hugging Face Llama-family folder's weights, with
    optional retrofits (``layers``, ``pools``: see :func:`retrofit_arguments`; new parts keep their init).

    ``max_seq_len`` (default: the config's ``max_position_embeddings``) sizes the rotary tables and KV caches;
    positions are exact, so a shorter one changes no logit.
    """
    folder = Path(path)
    source = str(folder / CONFIG_FILE)
    arguments = retrofit_arguments(transformer_arguments_from_hf(read_hf_config(folder), source), layers, pools)
    if max_seq_len is not None:
        arguments["max_seq_len"] = max_seq_len
    model = Transformer(**arguments, attention_backend=attention_backend)
    load_converted(model, convert_hf_weights(read_hf_weights(folder), model.n_layers, str(folder)), str(folder))
    return model


def load_converted(model: Transformer, weights: dict[str, torch.Tensor], source: str) -> None:
    """Loads converted weights into ``model``, retrofits included (:func:`memzoo.model.retrofit.load_initial_weights`)."""
    tied = model.head.weight is model.embed.weight
    if not tied and "head.weight" not in weights:
        raise HFImportError(f"{source}: untied embeddings (tie_word_embeddings false) but no lm_head.weight")
    if tied:
        weights = {k: v for k, v in weights.items() if k != "head.weight"}
    target = model.state_dict()
    weights = {k: v.to(target[k].dtype) if k in target else v for k, v in weights.items()}
    try:
        load_initial_weights(model, weights, where=source)
    except InitFromError as err:
        raise HFImportError(str(err)) from None


def imported_architecture(path: str | Path, requested: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture a LanguageModel builds for ``init_from: <HF folder>``: the folder's, with the requested
    ``layers``/``pools`` retrofits and ``max_seq_len``. The requested ``vocab_size`` (the data tokenizer's, linked by
    the CLI) must fit the folder's."""
    folder = Path(path)
    imported = transformer_arguments_from_hf(read_hf_config(folder), str(folder / CONFIG_FILE))
    if requested.get("vocab_size", 0) > imported["vocab_size"]:
        raise HFImportError(
            f"{folder}: the data tokenizer has {requested['vocab_size']} ids but the model only "
            f"{imported['vocab_size']}; use the folder's tokenizer (data tokenizer: {folder})"
        )
    out = retrofit_arguments(imported, requested.get("layers"), requested.get("pools"))
    out["max_seq_len"] = requested.get("max_seq_len", out["max_seq_len"])
    return out


def load_hf_weights(model: Transformer, path: str | Path) -> None:
    """Loads a Hugging Face folder's weights into ``model`` (built from :func:`imported_architecture`)."""
    load_converted(model, convert_hf_weights(read_hf_weights(path), model.n_layers, str(path)), str(path))
