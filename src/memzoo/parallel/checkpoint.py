"""Sharded checkpoints of memory-parallel runs: a folder written by ``torch.distributed.checkpoint`` (DCP).

Layout (Lightning's distributed checkpoint format, as ``ModelParallelStrategy`` writes it)::

    step=100.ckpt/              a folder, named like a .ckpt file
      .metadata                 DCP's index: every tensor's global shape, dtype, and which shard holds which chunk
      __0_0.distcp ...          one file per rank: its shards of the weights ("state_dict.*") and optimizer states
      meta.pt                   everything else of the Lightning checkpoint (step, loops, schedulers, hparams)

Every tensor is stored with its GLOBAL shape (a value table as ``(N, D)`` whatever the number of shards), so a
folder loads at any world size and memory-parallel size: DCP reads the chunks each rank's new shard overlaps.

- :func:`check_sharded_checkpoint`: the folder is complete (index, metadata, every shard file present and long
  enough) -- raises :class:`ShardedCheckpointError` naming the missing or short file.
- :func:`check_reshardable`: every tensor of the model has the same global shape in the checkpoint (else names it).
- :func:`read_sharded_weights`: the full weights and hyperparameters in ONE process (no process group), for
  ``memzoo export``.

A folder is data, never code: its index is read through an allowlist and every item weights-only
(:mod:`memzoo.parallel.checkpoint_metadata`), ``meta.pt`` with ``torch.load(weights_only=True)`` (:func:`read_meta`).

Writes are atomic: :class:`~memzoo.parallel.strategy.MemoryParallelStrategy` writes the folder under a temporary
name and renames it into place after every rank has finished (see ``memzoo.atomic.staging_directory``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from memzoo.safe_load import RefusedPickleError, load_data


class ShardedCheckpointError(ValueError):
    """A sharded checkpoint folder that is incomplete, unreadable, or cannot be loaded into this model."""


#: Lightning's name for the non-tensor part of a distributed checkpoint (``lightning.fabric.utilities.load``).
META_FILE = "meta.pt"
#: DCP's index file.
INDEX_FILE = ".metadata"
#: Prefix of the model weights in a Lightning distributed checkpoint (the optimizer's are ``optimizer_<i>.``).
WEIGHTS_PREFIX = "state_dict."


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a folder (a sharded checkpoint) rather than a ``.ckpt`` file."""
    return Path(path).is_dir()


def sharded_meta_file(path: str | Path) -> Path:
    """The file of a sharded checkpoint folder that holds its ``hyper_parameters`` (a plain ``torch.save`` dict)."""
    return Path(path) / META_FILE


def read_index(path: str | Path):
    """DCP's ``Metadata`` of the folder ``path``, read through the allowlist of
    :func:`~memzoo.parallel.checkpoint_metadata.read_checkpoint_metadata` (a crafted index is refused before any of
    it runs)."""
    from memzoo.parallel.checkpoint_metadata import UntrustedMetadataError, read_checkpoint_metadata

    path = Path(path)
    try:
        return read_checkpoint_metadata(path)
    except UntrustedMetadataError as err:
        raise ShardedCheckpointError(str(err)) from err
    except Exception as err:  # unpickling errors come in many types
        raise ShardedCheckpointError(
            f"sharded checkpoint {str(path)!r}: its index {str(path / INDEX_FILE)!r} cannot be read ({err}); the "
            f"save did not finish -- resume from an earlier checkpoint"
        ) from err


def check_sharded_checkpoint(path: str | Path) -> Path:
    """Verifies the folder ``path`` holds a complete sharded checkpoint; returns it as a ``Path``.

    Raises :class:`ShardedCheckpointError` naming the file that is missing or shorter than the index says.
    """
    path = Path(path)
    if not path.exists():
        raise ShardedCheckpointError(f"checkpoint {str(path)!r} does not exist; check --ckpt_path (or use 'last')")
    if not path.is_dir():
        raise ShardedCheckpointError(f"{str(path)!r} is a file, not a sharded checkpoint folder")
    for name in (INDEX_FILE, META_FILE):
        if not (path / name).is_file():
            raise ShardedCheckpointError(
                f"sharded checkpoint {str(path)!r} is incomplete: {str(path / name)!r} is missing; resume from "
                f"another checkpoint (a save that was interrupted leaves no folder under the final name)"
            )
    index = read_index(path)
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise ShardedCheckpointError(
                f"sharded checkpoint {str(path)!r} is incomplete: shard {str(shard)!r} is missing (the index lists "
                f"{len(needed)} shard files); copy the whole folder, or resume from another checkpoint"
            )
        size = shard.stat().st_size
        if size < length:
            raise ShardedCheckpointError(
                f"sharded checkpoint {str(path)!r}: shard {str(shard)!r} is truncated ({size} bytes, the index needs "
                f"{length}); resume from another checkpoint"
            )
    return path


def check_strategy_reads_sharded(path: str | Path, strategy: Any) -> None:
    """Raises :class:`ShardedCheckpointError` unless ``strategy`` (a Trainer's ``strategy`` argument: a name, an object,
    or a ``class_path`` config) is the :class:`~memzoo.parallel.strategy.MemoryParallelStrategy` that reads the
    sharded checkpoint ``path``."""
    name = getattr(strategy, "class_path", None) or (strategy.get("class_path") if isinstance(strategy, dict) else None)
    name = name or (strategy if isinstance(strategy, str) else type(strategy).__name__)
    if "MemoryParallelStrategy" not in str(name):
        raise ShardedCheckpointError(
            f"checkpoint {str(path)!r} is a sharded (memory-parallel) checkpoint folder, which strategy {name!r} "
            f"cannot read; resume it with --trainer.strategy memzoo.parallel.strategy.MemoryParallelStrategy "
            f"(memory_parallel: 1 in one process), or export it: memzoo export --ckpt {path} --out DIR"
        )


def check_reshardable(path: str | Path, expected: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
    """Raises :class:`ShardedCheckpointError` unless every ``expected`` weight (``name -> (global shape, dtype)``, names
    without the ``state_dict.`` prefix) is in the checkpoint with that global shape. Resharding changes how a
    tensor is split, never its global shape: a mismatch is a different architecture."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = read_index(path).state_dict_metadata
    for name, (shape, _) in expected.items():
        entry = saved.get(WEIGHTS_PREFIX + name)
        if entry is None:
            raise ShardedCheckpointError(
                f"sharded checkpoint {str(path)!r} has no weight {name!r}; it was saved from a different model "
                f"(compare the model config of the run that wrote it)"
            )
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(shape):
            found = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else type(entry).__name__
            raise ShardedCheckpointError(
                f"sharded checkpoint {str(path)!r} cannot be resharded into this model: weight {name!r} has global "
                f"shape {found} there but {tuple(shape)} here; resharding changes the number of shards, not the "
                f"architecture -- resume with the model config the checkpoint was written with"
            )


def read_sharded_weights(path: str | Path) -> dict[str, Any]:
    """``{"state_dict": {name: full tensor}, "hyper_parameters": ..., **meta}`` of a sharded checkpoint, read in
    this process alone (no process group), like a Lightning ``.ckpt`` loaded with ``torch.load``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from memzoo.parallel.checkpoint_metadata import UntrustedMetadataError, load_sharded_state

    path = check_sharded_checkpoint(path)
    weights = {
        name[len(WEIGHTS_PREFIX):]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for name, entry in read_index(path).state_dict_metadata.items()
        if name.startswith(WEIGHTS_PREFIX) and isinstance(entry, TensorStorageMetadata)
    }
    state = {"state_dict": weights}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        try:
            load_sharded_state(state, path, no_dist=True)
        except UntrustedMetadataError as err:
            raise ShardedCheckpointError(str(err)) from err
    return {**read_meta(path), "state_dict": state["state_dict"]}


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.pt`` dict of the sharded checkpoint folder ``path`` (step, loops, hyperparameters), loaded with
    ``weights_only=True``; raises :class:`ShardedCheckpointError` naming the file when it cannot be read or holds
    anything but plain data."""
    file = Path(path) / META_FILE
    try:
        meta = load_data(file, f"{str(file)!r} of sharded checkpoint {str(path)!r}")
    except RefusedPickleError as err:
        raise ShardedCheckpointError(str(err)) from err
    except Exception as err:
        raise ShardedCheckpointError(f"sharded checkpoint {str(path)!r}: {str(file)!r} cannot be read: {err}") from err
    if not isinstance(meta, dict):
        raise ShardedCheckpointError(f"sharded checkpoint {str(path)!r}: {str(file)!r} holds a {type(meta).__name__}, not a dict")
    return meta
