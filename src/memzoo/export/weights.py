"""Weights of an export: safetensors files, one or several shards with a Hugging Face index.

The tensors are the model's ``state_dict`` under memzoo's own names (``layers.3.ffn.sub_keys``,
``pools.shared.values``), so memzoo and the exported Hugging Face model (memzoo's own modules) load them without renaming. A shared pool appears
once (layers hold only a reference to it); a tied LM head is not stored (``head.weight`` is ``embed.weight``).

One file ``model.safetensors`` up to ``max_shard_bytes``; beyond, ``model-0000i-of-0000n.safetensors`` shards
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memzoo.export.errors import ExportError, PretrainedFormatError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in ``"500MB"``, ``"2GiB"``, ``"1.5GB"`` or ``1000`` (decimal units KB/MB/GB, binary KiB/MiB/GiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ExportError(f"shard size {text!r} is not a size like 500MB, 2GB or 1GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise ExportError(f"shard size {text!r} must be positive")
    return value


def export_tensors(state_dict: dict[str, torch.Tensor], dtype: torch.dtype, tied_head: bool) -> dict[str, torch.Tensor]:
    """The tensors to store: floating ones cast to ``dtype`` (integer buffers kept), contiguous, on the CPU; without
    ``head.weight`` when it is tied to ``embed.weight``."""
    out = {}
    for name, tensor in state_dict.items():
        if tied_head and name == "head.weight":
            continue
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous()
    return out


def save_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """Writes ``tensors`` into ``folder`` (sharded past ``max_shard_bytes``); returns the names of the files written
    (weight files, then the index if any). A tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], folder / SINGLE_FILE, metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, folder / name, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an export folder (the shards named by its index, or the single file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PretrainedFormatError(f"shard index {index} is unreadable ({err}); export the model again") from err
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise PretrainedFormatError(f"no weights in {folder}: neither {SINGLE_FILE} nor {INDEX_FILE} exists")
    return [single]


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an export folder, on the CPU; a file safetensors cannot parse raises naming the file."""
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise PretrainedFormatError(
                f"weight file {path} cannot be read ({err}): it is truncated or corrupted; copy or export the model "
                f"again"
            ) from err
    return tensors
