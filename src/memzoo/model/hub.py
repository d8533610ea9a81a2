"""Naming a pretrained model: a local path, or a Hugging Face hub repository id (``org/name``, ``org/name@revision``).

:func:`resolve_model_source` turns a hub id into the local folder of its snapshot (``huggingface_hub``'s cache:
``config.json``, tokenizer files and ``*.safetensors`` only). It downloads where the hub is reachable and reads the
cache otherwise (``HF_HUB_OFFLINE=1``), so a run that fetched a model once starts again without network. Local
paths that exist always win over hub ids of the same spelling. ``package:NAME`` names the ``.gguf`` file installed
Python distribution NAME ships (:func:`memzoo.model.gguf.package_gguf`).

Nothing is cached here: each call asks the hub (or its cache) again, so a build resolves a name once and passes the
path along (:func:`memzoo.loading.open_source`).
"""

from __future__ import annotations

import re
from pathlib import Path

from memzoo.model.retrofit import InitFromError
from memzoo.nn.constants import PACKAGE_PREFIX

#: what a hub snapshot needs for memzoo: the config, the safetensors weights (single file or shards + index) and
#: every tokenizer file format transformers reads
SNAPSHOT_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub repository id (``org/name`` or ``org/name@revision``) and not of a
    memzoo checkpoint file."""
    return bool(_REPO_ID.match(name)) and not name.endswith((".ckpt", ".pt", ".pth"))


def resolve_model_source(name: str | Path, where: str = "init_from") -> Path:
    """The local path of the model ``name`` names: ``name`` itself when it exists (or does not look like a hub id:
    the caller reports the missing path), else the snapshot folder of hub repository ``name``.

    Raises :class:`InitFromError` naming ``name`` and the fix when the snapshot can be neither downloaded nor found
    in the cache (``where`` prefixes the message, e.g. the YAML key)."""
    path = Path(name)
    text = str(name)
    if text.startswith(PACKAGE_PREFIX) and not path.exists():  # a .gguf file an installed Python package ships
        from memzoo.model.gguf import GGUFImportError, package_gguf

        try:
            return package_gguf(text[len(PACKAGE_PREFIX):])
        except GGUFImportError as err:
            raise InitFromError(f"{where}: {err}") from None
    if path.exists() or not looks_like_hub_id(text):
        return path
    repo_id, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - transformers depends on huggingface_hub
        raise InitFromError(f"{where}: {text!r} is not a local path, and reading it from the Hugging Face hub needs "
                            f"`pip install huggingface_hub`") from err
    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=list(SNAPSHOT_PATTERNS))
    except Exception as err:  # offline + not cached, unknown repo, gated repo, network: many error types
        raise InitFromError(
            f"{where}: {text!r} is not a local path, and the Hugging Face hub snapshot of {repo_id!r} could not be "
            f"fetched or found in the cache ({type(err).__name__}: {_first_line(err)}). Where the hub is reachable, "
            f"run `huggingface-cli download {repo_id} --local-dir DIR` (or unset HF_HUB_OFFLINE) and give DIR instead"
        ) from err
    return Path(folder)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


__all__ = ["SNAPSHOT_PATTERNS", "looks_like_hub_id", "resolve_model_source"]
