"""Reading a sharded checkpoint folder as data: DCP's ``.metadata`` through an allowlist, byte items weights-only.

``torch.distributed.checkpoint`` (DCP) reads a folder's ``.metadata`` with plain ``pickle.load`` and every
non-tensor item of its shards (optimizer ``param_groups``: learning rates, betas, names) with
``torch.load(weights_only=False)``: a crafted folder would run code on load. memzoo never hands a folder to DCP's
own reader; every load goes through :func:`load_sharded_state`, whose

- :class:`RestrictedFileSystemReader` reads ``.metadata`` with :func:`read_checkpoint_metadata` (the classes of
  :data:`ALLOWED_GLOBALS` only, plus every ``torch`` dtype) and checks that each shard it names is a file of the
  folder itself;
- :class:`WeightsOnlyLoadPlanner` reads byte items with ``torch.load(weights_only=True)``.

Tensors of the shard files are read by DCP with ``torch.load(weights_only=True)`` already. A refusal raises
:class:`UntrustedMetadataError`, one line naming the file and the refused object; nothing of the file has run.
"""

from __future__ import annotations

import enum
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = [
    "ALLOWED_GLOBALS",
    "RestrictedFileSystemReader",
    "UntrustedMetadataError",
    "WeightsOnlyLoadPlanner",
    "load_sharded_state",
    "read_checkpoint_metadata",
]

#: DCP's index file in a checkpoint folder.
METADATA_FILE = ".metadata"

#: ``(module, name)`` of every global a ``.metadata`` written by memzoo's checkpoints names (found by unpickling
#: the index of a real ``MemoryParallelStrategy`` checkpoint with a recording ``find_class``); torch dtypes
#: (``torch.float32``, ``torch.bfloat16``, ...) are allowed besides, as any of them may appear.
ALLOWED_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),  # an Enum of tensor memory formats
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # which file, offset and length hold an item
    ("torch.serialization", "_get_layout"),  # torch.strided etc. from its name
    ("torch", "Size"),
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: the folder the checkpoint was saved to
})


class UntrustedMetadataError(pickle.UnpicklingError):
    """A ``.metadata`` that names a global outside the allowlist, or is not a DCP index of this folder."""


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):  # how some Python versions pickle an Enum member
            return enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedMetadataError(f"it names {module}.{name}, which is not checkpoint metadata")


def enum_member(cls: Any, name: Any) -> enum.Enum:
    """``getattr(cls, name)`` as an unpickled ``.metadata`` may ask for it (Python 3.11.0–3.11.4 pickle an Enum member
    as ``getattr(EnumClass, "NAME")``), allowed only for a member of an Enum class the allowlist let in: never an
    attribute of anything else."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise UntrustedMetadataError(
        f"it asks for the attribute {name!r} of {cls!r}; only members of allowlisted Enum classes may be named"
    )


def read_checkpoint_metadata(path: str | Path) -> Metadata:
    """DCP's ``Metadata`` of the checkpoint folder ``path``, unpickled through the allowlist (module docstring).

    Raises :class:`UntrustedMetadataError` (one line naming the file) when the pickle names anything else, is not
    a ``Metadata``, or names shard files outside the folder; ``OSError`` and other unpickling errors (a truncated
    file) propagate for the caller to word.
    """
    file = Path(path) / METADATA_FILE
    with open(file, "rb") as handle:
        try:
            metadata = _MetadataUnpickler(handle).load()
        except UntrustedMetadataError as err:
            raise UntrustedMetadataError(
                f"checkpoint index {str(file)!r} is refused: {err}; memzoo reads checkpoints as data only -- use a "
                f"folder written by memzoo, never one from an untrusted source"
            ) from None
    if not isinstance(metadata, Metadata):
        raise UntrustedMetadataError(
            f"checkpoint index {str(file)!r} holds a {type(metadata).__name__}, not torch.distributed.checkpoint "
            f"Metadata"
        )
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise UntrustedMetadataError(
                f"checkpoint index {str(file)!r} names the shard {name!r}, which is not a file of the folder itself"
            )
    return metadata


class RestrictedFileSystemReader(FileSystemReader):
    """DCP's ``FileSystemReader`` whose ``.metadata`` is read by :func:`read_checkpoint_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise UntrustedMetadataError("per-rank checkpoint indexes are not read by memzoo")
        metadata = read_checkpoint_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's ``DefaultLoadPlanner`` whose non-tensor items are read with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            from memzoo.safe_load import refusal_message

            raise UntrustedMetadataError(refusal_message(f"checkpoint item {read_item.dest_index.fqn!r}", err)) from err
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_sharded_state(state: dict[str, Any], path: str | Path, no_dist: bool = False) -> None:
    """``torch.distributed.checkpoint.load(state, ...)`` of folder ``path`` as data only (module docstring): fills
    ``state`` in place. ``no_dist``: this process alone, without a process group.

    DCP reports a failure on any rank as a ``CheckpointException`` (a ``BaseException``); the first failure is
    raised here in its place, an :class:`UntrustedMetadataError` first, so callers see the one-line reason."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(
            state, storage_reader=RestrictedFileSystemReader(str(path)), planner=WeightsOnlyLoadPlanner(),
            no_dist=no_dist,
        )
    except CheckpointException as err:
        failures = [failure[0] for failure in err.failures.values()]
        refused = [failure for failure in failures if isinstance(failure, UntrustedMetadataError)]
        raise (refused or failures)[0] from err
