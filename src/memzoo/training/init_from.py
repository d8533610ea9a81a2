"""Reading the weights ``init_from:`` (a LanguageModel's YAML) names: a memzoo ``.ckpt``.

Loading them into a model with retrofits is :func:`memzoo.model.retrofit.load_initial_weights`; Hugging Face
Llama-family folders are read by :mod:`memzoo.model.hf_llama`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memzoo.model.retrofit import InitFromError, load_initial_weights
from memzoo.safe_load import RefusedPickleError, load_data

__all__ = ["InitFromError", "load_initial_weights", "read_checkpoint_weights", "read_weights"]


def read_checkpoint_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The decoder's state dict stored in a LanguageModel ``.ckpt`` (keys without the ``model.`` prefix)."""
    path = Path(path)
    if not path.is_file():
        raise InitFromError(f"init_from: {str(path)!r} does not exist; give a memzoo fit checkpoint (.ckpt) or a "
                            f"Hugging Face Llama / Qwen2 / Mistral folder")
    try:
        checkpoint = load_data(path, f"init_from: {str(path)!r}")
    except RefusedPickleError as err:
        raise InitFromError(str(err)) from err
    except Exception as err:  # truncated zip, not a checkpoint, ...: many error types
        raise InitFromError(f"init_from: {str(path)!r} cannot be read as a checkpoint ({err})") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise InitFromError(f"init_from: {str(path)!r} has no 'state_dict'; give a memzoo fit checkpoint (.ckpt)")
    weights = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    if not weights:
        raise InitFromError(f"init_from: {str(path)!r} holds no decoder weights (no 'model.*' keys)")
    return weights


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Source weights for ``init_from``: a ``.ckpt`` file."""
    path = Path(path)
    if path.is_dir():
        raise InitFromError(
            f"init_from: {str(path)!r} is a folder but not a Hugging Face Llama / Qwen2 / Mistral folder (its "
            f"config.json names another architecture, or it has none); give such a folder or a memzoo .ckpt"
        )
    return read_checkpoint_weights(path)
