"""Checkpoint export for downstream use: Hugging Face folders, loading them back, atomic checkpoint writes.

- :func:`export_checkpoint` / :func:`export_model`: a Lightning checkpoint or a Transformer → a Hugging Face folder
  (``memzoo export``), loadable with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``;
- :func:`memzoo.load_pretrained` / :func:`memzoo.load_tokenizer` (in :mod:`memzoo.pretrained`): the folder → memzoo's
  own Transformer and tokenizer;
- :class:`~memzoo.export.checkpoint_io.AtomicCheckpointIO`: a Lightning plugin whose checkpoint saves are atomic.

Submodules are imported on use, so ``import memzoo.export`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_checkpoint": "memzoo.export.hf",
    "export_model": "memzoo.export.hf",
    "ExportError": "memzoo.export.errors",
    "PretrainedFormatError": "memzoo.export.errors",
    "AtomicCheckpointIO": "memzoo.export.checkpoint_io",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memzoo.export' has no attribute {name!r}")
