"""Early, clear checks of checkpoint files given on the command line (``--ckpt_path``): the file is a complete
checkpoint, its model has the configured architecture, and ``last`` names the newest ``last.ckpt`` of the experiment."""

from __future__ import annotations

import dataclasses
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or not a PyTorch checkpoint."""


def check_checkpoint_file(path: str | Path) -> Path:
    """Verifies ``path`` is a complete PyTorch zip checkpoint (every member's CRC is read) before training starts.

    Raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist (a run's checkpoints are in "
            f"runs/<experiment>/version_<n>/checkpoints/; `memzoo fit --ckpt_path last` finds the newest)"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint (not a zip archive: truncated or corrupted?); "
            f"resume from another file, e.g. checkpoints/last.ckpt of the run"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: {err}") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: member {bad!r} fails its checksum")
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointError(f"checkpoint {str(path)!r} is a zip archive but not a PyTorch checkpoint")
    return path


# Hyperparameters that decide the model's parameters and its function; a checkpoint resumed, validated or used for
# predictions under a config must agree on all of them. Training settings (dropout, init_std, attention backend,
# optimizer, schedule, generation) may change between runs and are not compared.
ARCHITECTURE_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "block", "block_args", "layers", "pools", "max_seq_len",
    "rope_base", "tie_embeddings", "norm_eps",
)
# keys of a pool spec that are training or placement settings, not architecture (a checkpoint trained with its tables
# on the accelerator is served with them in host memory, and the reverse)
_POOL_TRAINING_KEYS = ("lr", "weight_decay", "init_std", "table_device")
# block settings that place a token-indexed block's private table, not architecture
_BLOCK_PLACEMENT_KEYS = ("table_device",)


def _plain(value: Any) -> Any:
    """Comparable plain data: mappings with str keys, lists for tuples, dataclasses as dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def architecture_of(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture fields of a ``LanguageModel``'s hyperparameters (flat, or nested under ``architecture``) as
    plain data; absent fields are left out, empty ``block_args``/``layers``/``pools`` read as ``{}``."""
    source = _plain(hparams.get("architecture", hparams))
    arch = {key: source[key] for key in ARCHITECTURE_FIELDS if key in source}
    for key in ("block_args", "layers", "pools"):
        if key in arch and arch[key] is None:
            arch[key] = {}
    for key in ("block_args",):
        if isinstance(arch.get(key), dict):
            arch[key] = {k: v for k, v in arch[key].items() if k not in _BLOCK_PLACEMENT_KEYS}
    if isinstance(arch.get("layers"), dict):
        arch["layers"] = {
            index: {k: v for k, v in spec.items() if k not in _BLOCK_PLACEMENT_KEYS} if isinstance(spec, dict) else spec
            for index, spec in arch["layers"].items()
        }
    if isinstance(arch.get("pools"), dict):
        arch["pools"] = {
            name: {k: v for k, v in spec.items() if k not in _POOL_TRAINING_KEYS} if isinstance(spec, dict) else spec
            for name, spec in arch["pools"].items()
        }
    return arch


def architecture_differences(saved: Mapping[str, Any], configured: Mapping[str, Any]) -> list[str]:
    """``"field: checkpoint X, config Y"`` for every architecture field on which the hyperparameters a checkpoint
    saved and those of the configured model differ (a field only one side has is not compared)."""
    ours, theirs = architecture_of(saved), architecture_of(configured)
    return [
        f"{key}: checkpoint {ours[key]!r}, config {theirs[key]!r}"
        for key in ARCHITECTURE_FIELDS
        if key in ours and key in theirs and ours[key] != theirs[key]
    ]


def check_same_architecture(path: str | Path, configured: Mapping[str, Any],
                            state_dict: Mapping[str, Any] | None = None) -> None:
    """Raises :class:`CheckpointError` naming the differing fields if checkpoint ``path`` holds a model whose
    architecture differs from the configured model's hyperparameters ``configured``; with ``state_dict`` (the built
    module's), also when the checkpoint's tensors differ from it in names or shapes: the same hyperparameters build
    another block once a block's default changed (e.g. the ``memory_plus`` preset's gate)."""
    from memzoo.safe_load import RefusedPickleError, load_data

    try:
        checkpoint = load_data(path, f"checkpoint {str(path)!r}", mmap=True)
    except RefusedPickleError as err:
        raise CheckpointError(str(err)) from err
    saved = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not saved:
        return
    differences = architecture_differences(saved, configured)
    if differences:
        run_config = Path(path).resolve().parent.parent / "config.yaml"
        hint = f"use the checkpoint's own config ({run_config})" if run_config.is_file() else "use the config it was trained with"
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a different model than the config: " + "; ".join(differences)
            + f". Give a checkpoint of this architecture, or {hint}"
        )
    stored = checkpoint.get("state_dict") if state_dict is not None else None
    if isinstance(stored, Mapping):
        _check_same_tensors(path, stored, state_dict)


def _check_same_tensors(path: str | Path, stored: Mapping[str, Any], built: Mapping[str, Any]) -> None:
    from memzoo.blocks.presets import CHANGED_DEFAULTS

    extra = [key for key in stored if key not in built]
    missing = [key for key in built if key not in stored]
    shapes = [f"{key}: {tuple(stored[key].shape)} vs {tuple(built[key].shape)}" for key in stored
              if key in built and hasattr(stored[key], "shape") and tuple(stored[key].shape) != tuple(built[key].shape)]
    if not (extra or missing or shapes):
        return
    found = "; ".join(part for part in (
        f"tensors only in the checkpoint {extra[:6]}" if extra else "",
        f"tensors only in the configured model {missing[:6]}" if missing else "",
        f"shapes differ {shapes[:6]}" if shapes else "") if part)
    raise CheckpointError(
        f"checkpoint {str(path)!r} was trained with the configured settings, but they build a different model now: "
        f"{found}. A block's default has changed since ({CHANGED_DEFAULTS}); pin the setting in the config's layer "
        f"spec"
    )


def find_last_checkpoint(runs_dir: str | Path, experiment: str) -> Path:
    """The newest (by modification time) ``<runs_dir>/<experiment>/version_*/checkpoints/last.ckpt``; raises
    :class:`CheckpointError` if the experiment has none."""
    pattern = Path(runs_dir) / experiment / "version_*" / "checkpoints" / "last.ckpt"
    candidates = [p for p in Path(runs_dir).glob(f"{experiment}/version_*/checkpoints/last.ckpt") if p.is_file()]
    if not candidates:
        raise CheckpointError(
            f"--ckpt_path last: no earlier run of experiment {experiment!r} has a checkpoint (looked for {pattern}); "
            f"start without --ckpt_path, or give a checkpoint file (or --experiment NAME of the run to resume)"
        )
    return max(candidates, key=lambda p: (p.stat().st_mtime, p.parent.parent.name))
