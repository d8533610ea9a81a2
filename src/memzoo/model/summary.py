"""Parameter counts of a block or model: total (distinct tensors) and *active* (read per token).

*Active* parameters are those a single token's forward pass reads: all of a dense block, but only the rows a memory
or expert layer retrieves. A block reports its own count through ``Block.active_parameters()`` (the base class counts
all of its parameters as active). Shared pools are counted once in the total (they belong to the model).
The per-layer table built from these counts is :func:`memzoo.accounting.summarize` (``memzoo summary``).
"""

from __future__ import annotations

import torch.nn as nn

from memzoo.blocks.base import Block


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters registered under ``module`` (tied or shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def active_parameters(block: Block) -> int:
    """Parameters one token reads in ``block`` (see module docstring)."""
    return int(block.active_parameters())
