"""Named presets: a paper's block is a name with the paper's settings (``{block: memory_plus, pool: shared}``).

Each preset is a registered block (``memzoo blocks`` lists them with their settings) whose settings a config may
override one by one. ``dense``, ``moe``, ``peer`` and ``engram`` are their blocks' own names, whose defaults are their
papers' settings (``engram``: one Engram layer as in DeepSeek's demo, 2- and 3-grams, 8 heads of 64 values per
order, tables from 5 × vocab_size rows, kernel 4, dilation 3; a config adds it beside a layer's FFN with
``{block: beside, base: {block: dense}, add: {block: engram, layer_id: i}}``); product-key memory has two:

- ``pkm``: Lample et al. 2019, "Large Memory Layers with Product Keys": 4 heads with their own sub-keys, the top 32
  rows each, softmax weights, ``out = y`` (``W_o y`` when ``value_dim != dim``). The paper normalises queries with
  BatchNorm, which is not causal in training; the preset uses LayerNorm over each head's query (``query_norm:
  batchnorm`` reproduces the paper).
- ``memory_plus``: Berges et al. 2024, "Memory Layers at Scale" (Memory+): 4 heads, top 32 each, qk-norm scores
  (no query norm besides), and the SiLU-gated output ``W_2 (y ⊙ silu(W_1 x))``; the paper's layers share one value
  table, so a config names a pool: ``{block: memory_plus, pool: shared}`` with ``pools: {shared: {n_keys: ...,
  value_dim: ...}}``. Without ``pool:`` it needs ``n_keys`` and builds a private table.
"""

from __future__ import annotations

from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.registry import register_preset

#: The names this module registers.
PRESET_NAMES = ("pkm", "memory_plus")

_MEMORY = ProductKeyMemory.block_name  # "product_key_memory" (importing the class registers it)

#: The every-block test's smallest product-key memory: 2 heads, 2 rows each, 4² rows of width 8.
_SMALLEST_MEMORY = {"heads": 2, "knn": 2, "k_dim": 8}

register_preset(
    "pkm",
    _MEMORY,
    {"heads": 4, "knn": 32, "query_norm": "layernorm", "qk_norm": False, "gate": "none"},
    paper="Lample et al. 2019, 'Large Memory Layers with Product Keys' (arXiv 1907.05242); LayerNorm queries in "
    "place of the paper's BatchNorm (causal)",
    smallest={**_SMALLEST_MEMORY, "n_keys": 4},
)

register_preset(
    "memory_plus",
    _MEMORY,
    {"heads": 4, "knn": 32, "query_norm": "none", "qk_norm": True, "gate": "silu"},
    paper="Berges et al. 2024, 'Memory Layers at Scale' (arXiv 2412.09764): qk-norm, SiLU gate, one value table "
    "shared by the memory layers (pool: <name>)",
    smallest={**_SMALLEST_MEMORY, "pool": "shared"},
    smallest_pools={"shared": {"n_keys": 4, "value_dim": 8}},
)
