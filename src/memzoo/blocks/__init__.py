"""Blocks that fill a transformer layer's FFN slot. Importing this package registers memzoo's own blocks and
presets; the contract every block follows is :class:`~memzoo.blocks.base.Block`."""

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.composition import Beside
from memzoo.blocks.dense import DenseMLP
from memzoo.blocks.engram import Engram
from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.moe import MoE
from memzoo.blocks.mole import LookupExperts
from memzoo.blocks.peer import PEER
from memzoo.blocks.pool import MemoryPool, PoolRef
from memzoo.blocks.presets import PRESET_NAMES  # noqa: F401  (importing presets registers them)
from memzoo.blocks.stem import TokenEmbeddingFFN
from memzoo.blocks.ultramem import UltraMem, UltraMemV2

__all__ = [
    "Beside", "Block", "BlockContext", "DenseMLP", "Engram", "LookupExperts", "MemoryPool", "MoE", "PEER", "PoolRef",
    "ProductKeyMemory", "TokenEmbeddingFFN", "UltraMem", "UltraMemV2",
]
