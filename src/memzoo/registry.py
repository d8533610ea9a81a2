"""The block registry under its public import path; it lives in :mod:`memzoo.blocks.registry`."""

from memzoo.blocks.registry import (
    _REGISTRY,
    ENTRY_POINT_GROUP,
    BlockConfigError,
    BlockEntry,
    Hyperparameter,
    UnknownBlockError,
    block_entry,
    block_hyperparameters,
    create_block,
    get_block,
    list_blocks,
    load_plugins,
    record_hyperparameters,
    register_block,
    register_preset,
)

__all__ = [
    "ENTRY_POINT_GROUP", "_REGISTRY", "BlockConfigError", "BlockEntry", "Hyperparameter", "UnknownBlockError",
    "block_entry", "block_hyperparameters", "create_block", "get_block", "list_blocks", "load_plugins",
    "record_hyperparameters", "register_block", "register_preset",
]
