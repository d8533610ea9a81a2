"""Named presets: a paper's block is a name with the paper's settings (``{block: memory_plus, pool: shared}``).

Each preset is a registered block (``memzoo blocks`` lists them with their settings) whose settings a config may
override one by one. ``dense``, ``moe``, ``peer``, ``ultramem``, ``ultramem_v2`` and ``engram`` are their blocks' own
names, whose defaults are their papers' settings (:mod:`memzoo.blocks.ultramem`; ``engram``: one Engram layer as in
DeepSeek's demo, 2- and 3-grams, 8 heads of 64 values per order, tables from 5 × vocab_size rows, kernel 4, dilation
3; a config adds it beside a layer's FFN with ``{block: beside, base: {block: dense}, add: {block: engram, layer_id:
i}}``); ``stem`` and ``mole`` name the token-indexed blocks below; product-key memory has two:

- ``pkm``: Lample et al. 2019, "Large Memory Layers with Product Keys": 4 heads with their own sub-keys, the top 32
  rows each, softmax weights, ``out = y`` (``W_o y`` when ``value_dim != dim``). The paper normalises queries with
  BatchNorm, which is not causal in training; the preset uses LayerNorm over each head's query (``query_norm:
  batchnorm`` reproduces the paper).
- ``memory_plus``: Berges et al. 2024, "Memory Layers at Scale" (Memory+): 4 heads, top 32 each, qk-norm scores
  (no query norm besides); the paper's layers share one value table, so a config names a pool: ``{block:
  memory_plus, pool: shared}`` with ``pools: {shared: {n_keys: ..., value_dim: ...}}``. Without ``pool:`` it needs
  ``n_keys`` and builds a private table. Output: the paper's SiLU-gated ``W_2 (y ⊙ silu(W_1 x))`` (``gate: silu``,
  the default), or with ``gate: none`` ``out = y`` (``W_o y`` when ``value_dim != dim``). The gate stays because
  dropping it does not beat the paper in both of memzoo's measures, each on two seeds. Text (the iso-FLOP study's shakespeare
  workload, 1,000 steps): ungated wins, validation loss 1.682 / 1.669 against 1.770 / 1.782
  (study-memoryplus-no-gate.md, study-memoryplus-gated.md). Knowledge capacity at the regime that measures it
  (docs/results/capacity-cpu-x4000.md: width 16, people-1000, every fact seen 4,000 times, where dense at its best
  rate has flattened at 65.6% of the corpus): gated stores 38,008 / 36,908 bits (1.44x dense's, under a cap of 1.52x
  the corpus sets), ungated 26,273 / 35,485 (1.19x). With 1,000
  exposures the order was the reverse (capacity-cpu.md, each at its best of three rates: ungated 29,376 against
  19,125 bits): a value row's gradient reaches it through ``W_2`` and the gate ``silu(W_1 x) ≈ W_1 x / 2``, both
  initialised small (std 0.02), so the gated table starts memorising late (a quarter into that run it holds
  3,221 / 1,274 bits against the ungated 7,844 / 9,785), then passes the ungated one once training is long enough.
  At width 8 (people-1000, capacity-cpu-hour-people-1000-x4000.md, one seed) it does not: both flatten, the gated
  layer at half the ungated one's bits, so which is ahead depends on the width. The other settings (heads, knn,
  qk-norm; and the pool's value rate, init and size) stay the paper's for the same rule: in the ablations where
  width-8 dense has flattened (docs/results/README.md, people-300) a 4x lower value rate stores +14% / +15% / -20%
  (three seeds) and loses on text in both seeds tried; one head over a 4x pool +34% / +11% / -4%, its text analogue
  behind in both; one head of 8 rows +2% / +7% (two seeds) but far behind in one seed at width 32; and a 4x pool,
  ahead in all three seeds (+30% / +21% / +3%), costs 1.20x the FLOPs: a size, not an equal-FLOP default.

Token-indexed blocks (their tables are read by token id; the model hands them its ``vocab_size``):

- ``stem``: STEM (arXiv 2601.10639), ``token_embedding_ffn``: ``W_down(silu(W_gate x) ⊙ U[token])`` with a per-layer
  table ``U (vocab_size, hidden)`` in place of the up-projection; hidden as the dense SwiGLU FFN's, the table
  trained by the model's optimizer (``lr: null``, weight decay 0.1) from a Xavier-normal init, as the authors do.
- ``mole``: Mixture of Lookup Experts (Jie et al. 2025, arXiv 2503.15798), ``lookup_experts``: a dense GELU FFN
  plus 4 GELU experts (all 4·dim wide) of the RMS-normalised token embedding, softmax-weighted by a router of the
  hidden state; ``reparameterize`` turns the experts into a per-token lookup table for inference.
"""

from __future__ import annotations

from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.mole import LookupExperts
from memzoo.blocks.registry import register_preset
from memzoo.blocks.stem import TokenEmbeddingFFN

#: The names this module registers.
PRESET_NAMES = ("pkm", "memory_plus", "stem", "mole")
#: Preset defaults that changed after layers were trained with the old ones, and the setting that rebuilds those
#: layers (quoted by the loaders when a checkpoint's recorded settings build a different block today).
CHANGED_DEFAULTS = ("memory_plus builds the paper's SiLU gate unless its spec says gate: none: a layer trained "
                    "without the gate needs gate: none")

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
    paper="Berges et al. 2024, 'Memory Layers at Scale' (arXiv 2412.09764): qk-norm, the SiLU gate, one value table "
    "shared by the memory layers (pool: <name>); gate: none trains faster on text and stores less at capacity, see "
    "memzoo.blocks.presets",
    smallest={**_SMALLEST_MEMORY, "pool": "shared"},
    smallest_pools={"shared": {"n_keys": 4, "value_dim": 8}},
)

register_preset(
    "stem",
    TokenEmbeddingFFN.block_name,  # "token_embedding_ffn"
    {"hidden": None, "update": "dense", "lr": None, "weight_decay": 0.1, "init_std": None},
    paper="STEM (arXiv 2601.10639; Infini-AI-Lab/STEM lingua/stem.py): the up-projection of a SwiGLU FFN replaced by "
    "a per-layer token-indexed table, trained with the model's AdamW, Xavier-normal init",
    smallest={"hidden": 16},
)

register_preset(
    "mole",
    LookupExperts.block_name,  # "lookup_experts"
    {"n_experts": 4, "hidden": None, "expert_hidden": None, "mode": "experts"},
    paper="Jie et al. 2025, 'Mixture of Lookup Experts' (ICML 2025, arXiv 2503.15798; JieShibo/MoLE "
    "modeling_mole.py): MoLE-4E, GELU FFN and experts of width 4·dim, experts of the normalised embedding",
    smallest={"n_experts": 2, "hidden": 16, "expert_hidden": 8},
)
