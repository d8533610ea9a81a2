"""Blocks that fill a transformer layer's FFN slot. Importing this package registers memzoo's own blocks."""

from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.pool import MemoryPool, PoolRef

__all__ = ["DenseMLP", "MemoryPool", "PoolRef"]
