"""``memzoo_manifest.json``: what an export folder is, which memzoo wrote it, and checksums of its weights.

    {"format": "memzoo-hf-export", "format_version": 1, "memzoo_version": "0.1.0",
     "tokenizer": "byte" | "tokenizer.json",
     "files": {"model.safetensors": {"sha256": "...", "bytes": 123}, ...}}

``files`` lists every weight file (and the shard index, when there is one). Loading checks the format and its
version first, then each listed file's size and SHA-256, so a truncated, corrupted or swapped file is named before
any weights are read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from memzoo.export.errors import PretrainedFormatError

MANIFEST_FILE = "memzoo_manifest.json"
FORMAT_NAME = "memzoo-hf-export"
#: Version of the folder layout this memzoo writes; it reads exactly the versions in SUPPORTED_FORMAT_VERSIONS.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk_bytes`` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path, files: list[str], tokenizer: str, memzoo_version: str) -> dict[str, Any]:
    """The manifest of ``folder``, with size and SHA-256 of each of ``files`` (names relative to ``folder``)."""
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "memzoo_version": memzoo_version,
        "tokenizer": tokenizer,
        "files": {
            name: {"sha256": sha256_of(folder / name), "bytes": (folder / name).stat().st_size} for name in files
        },
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of export ``folder``; raises :class:`PretrainedFormatError` if it is missing, unreadable, of
    another format, or of a format version this memzoo does not read."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PretrainedFormatError(
            f"{path} not found: {folder} is not a memzoo export folder (write one with `memzoo export --ckpt ... "
            f"--out {folder}`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedFormatError(f"{path} is not valid JSON ({err}); the export is damaged, export it again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PretrainedFormatError(f"{path} does not describe a {FORMAT_NAME!r} folder")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newer = isinstance(version, int) and version > max(SUPPORTED_FORMAT_VERSIONS)
        raise PretrainedFormatError(
            f"{path}: format_version {version!r} is not one this memzoo reads ({list(SUPPORTED_FORMAT_VERSIONS)}); "
            + ("the folder was written by a newer memzoo: upgrade memzoo" if newer else "export the model again")
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise PretrainedFormatError(f"{path} lists no weight files; export the model again")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Checks every file the manifest lists: present, of the recorded size, with the recorded SHA-256."""
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise PretrainedFormatError(f"weight file {path} is missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise PretrainedFormatError(
                f"weight file {path} has {size} bytes, but {expected['bytes']} were written: it is truncated or "
                f"was replaced; copy or export the model again"
            )
        if sha256_of(path) != expected["sha256"]:
            raise PretrainedFormatError(
                f"weight file {path} fails its SHA-256 check ({MANIFEST_FILE}): it is corrupted or was modified; "
                f"copy or export the model again"
            )
