"""Reading a Lightning ``.ckpt`` of a :class:`~memzoo.training.module.LanguageModel` back into a Transformer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memzoo.export.checkpoint_check import check_checkpoint_file
from memzoo.export.errors import ExportError
from memzoo.loading import RUN_CONFIG, checkpoint_decoder_weights, recorded_tokenizer  # noqa: F401
from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.retrofit import InitFromError
from memzoo.model.transformer import Transformer
from memzoo.parallel.checkpoint import is_sharded_checkpoint, read_sharded_weights
from memzoo.safe_load import RefusedPickleError, load_data


@dataclass
class CheckpointContents:
    """The model of a checkpoint with the hyperparameters it was trained with."""

    model: Transformer
    hyperparameters: dict[str, Any]
    tokenizer: str | None  # the tokenizer spec the training data used, when the checkpoint's run records it


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Loads ``path`` (weights only, on the CPU), rebuilds the Transformer from its saved hyperparameters and loads
    its weights strictly; a model trained with ``lora`` gets its adapters merged into the base weights. Raises
    :class:`ExportError` (or ``CheckpointError``) naming the file on any mismatch.

    ``path`` is a ``.ckpt`` file or the folder of a sharded (memory-parallel) checkpoint, whose shards are joined
    into full tensors here (:func:`memzoo.parallel.checkpoint.read_sharded_weights`, no process group needed).
    """
    if is_sharded_checkpoint(path):
        path = Path(path)
        checkpoint = read_sharded_weights(path)
    else:
        path = check_checkpoint_file(path)
        try:
            checkpoint = load_data(path, f"checkpoint {str(path)!r}")
        except RefusedPickleError as err:
            raise ExportError(str(err)) from err
        except Exception as err:  # unpickling errors come in many types
            raise ExportError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ExportError(
            f"checkpoint {path} is not a memzoo Lightning checkpoint (it needs 'state_dict' and 'hyper_parameters'; "
            f"write one with `memzoo fit` or Trainer.save_checkpoint of a memzoo LanguageModel)"
        )
    hyperparameters = dict(checkpoint["hyper_parameters"])
    if not isinstance(hyperparameters.get("architecture"), dict):
        raise ExportError(
            f"checkpoint {path} has no 'architecture' in its hyper_parameters (a LanguageModel stores its "
            f"ModelConfig there); was it written by another program or an older memzoo?"
        )
    try:  # the attention kernel is a runtime choice: xformers may not exist here
        config = ModelConfig.from_dict(hyperparameters["architecture"]).replace(attention_backend="auto")
        model = Transformer(config)
    except (ModelConfigError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"checkpoint {path}: its architecture does not build a model: {err}") from err
    try:  # the one reader of checkpoint weights (memzoo.loading): LoRA adapters merged into the base linears
        weights = checkpoint_decoder_weights(checkpoint, where=f"checkpoint {path}")
    except InitFromError as err:
        raise ExportError(str(err)) from err
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ExportError(
            f"checkpoint {path}: its weights do not fit the architecture in its hyper_parameters: {err}"
        ) from err
    model.eval()
    return CheckpointContents(model, hyperparameters, recorded_tokenizer(path, checkpoint))
