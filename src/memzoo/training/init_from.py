"""Reading what ``init_from:`` (a LanguageModel's YAML) names when it is a memzoo ``.ckpt``: its decoder weights, the
architecture it was built from, and the tokenizer its data module read.

The model built from such a checkpoint is the checkpoint's architecture plus this config's retrofits, as for a
Hugging Face folder (:func:`checkpoint_architecture`). Loading the weights into it is
:func:`memzoo.model.retrofit.load_initial_weights`; Hugging Face Llama-family folders are read by
:mod:`memzoo.model.hf_llama`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.retrofit import InitFromError, load_initial_weights
from memzoo.safe_load import RefusedPickleError, load_data

__all__ = [
    "InitFromError",
    "checkpoint_architecture",
    "checkpoint_tokenizer",
    "load_initial_weights",
    "read_checkpoint",
    "read_checkpoint_weights",
    "read_weights",
]

# architecture fields the config keeps over the source's: retrofits, the context used, and run-time settings
CONFIG_FIELDS = ("max_seq_len", "attention_backend", "dropout", "init_std")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The LanguageModel ``.ckpt`` at ``path`` (``weights_only=True``, memory-mapped); raises
    :class:`InitFromError` for a missing, unreadable or non-memzoo file."""
    path = Path(path)
    if path.is_dir():
        raise InitFromError(
            f"init_from: {str(path)!r} is a folder but not a Hugging Face Llama / Qwen2 / Mistral folder (its "
            f"config.json names another architecture, or it has none); give such a folder or a memzoo .ckpt"
        )
    if not path.is_file():
        raise InitFromError(f"init_from: {str(path)!r} does not exist; give a memzoo fit checkpoint (.ckpt) or a "
                            f"Hugging Face Llama / Qwen2 / Mistral folder")
    try:
        checkpoint = load_data(path, f"init_from: {str(path)!r}", mmap=True)
    except RefusedPickleError as err:
        raise InitFromError(str(err)) from err
    except Exception as err:  # truncated zip, not a checkpoint, ...: many error types
        raise InitFromError(f"init_from: {str(path)!r} cannot be read as a checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InitFromError(f"init_from: {str(path)!r} has no 'state_dict'; give a memzoo fit checkpoint (.ckpt)")
    return checkpoint


def read_checkpoint_weights(path: str | Path, checkpoint: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The decoder's state dict stored in a LanguageModel ``.ckpt`` (keys without the ``model.`` prefix)."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    weights = {key[len("model."):]: value for key, value in checkpoint["state_dict"].items()
               if key.startswith("model.")}
    if not weights:
        raise InitFromError(f"init_from: {str(path)!r} holds no decoder weights (no 'model.*' keys)")
    return weights


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Source weights for ``init_from``: a ``.ckpt`` file."""
    return read_checkpoint_weights(path)


def saved_architecture(path: str | Path, checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The architecture dict a LanguageModel checkpoint recorded (``None``: a checkpoint without one)."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("architecture")
    if saved is None:
        return None
    if not isinstance(saved, Mapping):
        raise InitFromError(f"init_from: {str(path)!r} records an architecture that is not a mapping: {saved!r}")
    return dict(saved)


def checkpoint_architecture(saved: Mapping[str, Any], requested: Mapping[str, Any],
                            source: str = "init_from") -> dict[str, Any]:
    """The architecture a LanguageModel builds for ``init_from: X.ckpt``: the checkpoint's (``saved``), with this
    config's (``requested``) ``layers`` (merged per layer over the checkpoint's; indices resolve against the
    checkpoint's depth), ``pools`` (added to the checkpoint's) and :data:`CONFIG_FIELDS`.

    A ``beside`` layer whose ``base`` names the block the checkpoint has at that layer (``base: dense``) takes that
    block's hyperparameters (its width), so ``{block: beside, base: dense, add: {...}}`` keeps the trained FFN.
    The requested ``vocab_size`` (the data tokenizer's, linked by the CLI) must fit the checkpoint's."""
    try:
        base_config = ModelConfig.from_dict(saved, source=f"{source} architecture")
        specs = base_config.layer_specs()
    except ModelConfigError as err:
        raise InitFromError(f"{source}: its recorded architecture cannot be built ({err})") from err
    out = base_config.to_dict()
    if requested.get("vocab_size", 0) > out["vocab_size"]:
        raise InitFromError(
            f"{source}: the data tokenizer has {requested['vocab_size']} ids but the checkpoint's model only "
            f"{out['vocab_size']}; read the data with the checkpoint's tokenizer (data.init_args.tokenizer)"
        )
    probe = ModelConfig(n_layers=out["n_layers"], layers=dict(requested.get("layers") or {}))
    layers = dict(out["layers"])
    for index, spec in probe.resolved_layers().items():
        spec = dict(spec or {})
        if spec.get("block") == "beside":
            base = spec.get("base", "dense")
            base = {"block": base} if isinstance(base, str) else dict(base)
            trained = specs[index]
            if base.get("block") == trained.block:
                base = {**trained.args, **base}
            spec["base"] = base
        layers[index] = spec
    out["layers"] = layers
    out["pools"] = {**out["pools"], **dict(requested.get("pools") or {})}
    for key in CONFIG_FIELDS:
        if key in requested:
            out[key] = requested[key]
    return out


def checkpoint_tokenizer(path: str | Path) -> str | None:
    """The tokenizer (``"byte"`` or a ``tokenizer.json`` path) the data module of the run that wrote the ``.ckpt``
    at ``path`` read (``None``: not recorded)."""
    data = read_checkpoint(path).get("datamodule_hyper_parameters") or {}
    tokenizer = data.get("tokenizer") if isinstance(data, Mapping) else None
    return tokenizer if isinstance(tokenizer, str) else None
