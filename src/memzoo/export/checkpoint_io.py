"""``AtomicCheckpointIO``: Lightning checkpoints that are never half-written.

Lightning's ``TorchCheckpointIO`` writes into the final file, so a crash (killed job, full disk) during a save can
leave a truncated ``last.ckpt`` where a good one stood. This plugin writes each checkpoint under a temporary name
in the same folder, fsyncs it, and ``os.replace``s it onto the final name: readers see the old file or the new
one, never a partial one. Remote paths (``s3://...``) are left to Lightning's own fsspec transaction.

Use: ``Trainer(plugins=[AtomicCheckpointIO()])``, or in YAML
``trainer: {plugins: [{class_path: memzoo.export.checkpoint_io.AtomicCheckpointIO}]}``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from memzoo.atomic import atomic_file
from memzoo.safe_load import RefusedPickleError, refusal_message


def _storage_as_saved(storage, location):  # Lightning's default map_location
    return storage


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (temporary file, fsync, ``os.replace``) and whose loads read
    data only (``weights_only=True`` always; a pickle naming anything else raises
    :class:`~memzoo.safe_load.RefusedPickleError` before it runs)."""

    def load_checkpoint(self, path: _PATH, map_location: Any = _storage_as_saved, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise RefusedPickleError(
                "weights_only=False is refused: memzoo checkpoints are plain data and load with weights_only=True; "
                "leave weights_only unset (or True)"
            )
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise RefusedPickleError(refusal_message(f"checkpoint {str(path)!r}", err)) from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # raises for storage_options, as Lightning's
            return
        local = str(path).removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        with atomic_file(local) as handle:
            torch.save(checkpoint, handle)
