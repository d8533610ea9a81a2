"""The memzoo-checkpoint parts of ``init_from`` (a LanguageModel's YAML): reading a ``.ckpt`` file safely
(:func:`read_checkpoint`) and the architecture a model built from it has (:func:`checkpoint_architecture`: the
checkpoint's plus this config's retrofits, as for a Hugging Face folder).

Every source kind (``.ckpt``, sharded folder, Hugging Face folder, hub id, GGUF) is opened by
:func:`memzoo.loading.open_source`, which uses these; loading weights into a model is
:func:`memzoo.model.retrofit.load_initial_weights`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.retrofit import InitFromError, load_initial_weights
from memzoo.safe_load import RefusedPickleError, load_data

__all__ = ["InitFromError", "checkpoint_architecture", "load_initial_weights", "read_checkpoint"]

# architecture fields the config keeps over the source's: retrofits, the context used, and run-time settings
CONFIG_FIELDS = ("max_seq_len", "attention_backend", "dropout", "init_std")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The LanguageModel ``.ckpt`` at ``path`` (``weights_only=True``, memory-mapped); raises
    :class:`InitFromError` for a missing, unreadable or non-memzoo file."""
    path = Path(path)
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
