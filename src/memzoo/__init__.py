"""memzoo: a Lightning model zoo of sparse-memory language-model blocks.

Public API (imported lazily, so ``import memzoo`` and ``memzoo --help`` stay fast)::

    register_block, create_block, list_blocks, get_block, load_plugins   # the block registry
    Block, BlockContext                                                # the block contract
    MemoryPool                                                         # shared value tables
    Transformer                                                        # the decoder
    MemoryBank                                                         # attention memories (Extended Mind)
    LanguageModel                                                      # the LightningModule
    build_model                                                        # a config (YAML, dict) -> LanguageModel
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "register_block": "memzoo.registry",
    "create_block": "memzoo.registry",
    "get_block": "memzoo.registry",
    "list_blocks": "memzoo.registry",
    "load_plugins": "memzoo.registry",
    "Block": "memzoo.blocks.base",
    "BlockContext": "memzoo.blocks.base",
    "MemoryPool": "memzoo.blocks.pool",
    "Transformer": "memzoo.model.transformer",
    "LanguageModel": "memzoo.training.module",
    "MemoryBank": "memzoo.model.memory_bank",
    "build_model": "memzoo.build",
    "load_pretrained": "memzoo.pretrained",
    "load_tokenizer": "memzoo.pretrained",
    "FactsDataModule": "memzoo.data",
    "TextDataModule": "memzoo.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memzoo' has no attribute {name!r}")
