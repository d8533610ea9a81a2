"""Parameter and FLOP accounting of a model: what it stores, what one token reads, what one token costs.

:func:`summarize` gives one row per component (embedding, each layer's attention and FFN-slot block, each shared
pool, the head) with

- ``parameters``: parameters stored (tied or shared tensors counted once, in the row that owns them; a shared pool
  is its own row);
- ``active_parameters``: parameters one token's forward pass reads: all of a dense component, one embedding row,
  only the retrieved rows of a memory or expert table (counted in the layer that reads them, so a shared pool's own
  row shows 0 active), ``top_k`` experts of a MoE;
- ``flops``: forward FLOPs per token;
- ``table_bytes``: bytes one token reads from sparse tables: the value or expert rows it retrieves from pools, its
  rows of token-indexed tables (n-gram, per-token embeddings, lookup experts), the weights of a MoE's routed experts
  (``Block.table_bytes_read_per_token()``). This, not FLOPs, sets the memory traffic of a decode step.

FLOP convention: a multiply-add counts 2 FLOPs; elementwise work (norms, activations, softmax, top-k selection,
residual adds) and the embedding lookup are not counted. Attention at context length ``T`` costs, per token,
``2·dim·3·dim`` (qkv) + ``2·dim·dim`` (output projection) + the score and value products, ``2·dim`` each per key
attended; averaged over the positions of one causal sequence of length ``T`` a token attends ``(T + 1) / 2`` keys,
so these add ``2·2·dim·(T + 1)/2 = 2·dim·(T + 1)``. An FFN-slot block reports its own cost through
``Block.flops_per_token()`` (dense, moe, peer and product-key memory count their own, the latter two including
their product-key lookup); a block that does not (``Block.declares_flops()`` false) gets the base class's
``2 · active_parameters`` and its row is marked estimated. The head
costs ``2·dim·vocab_size``. A training step costs about 3× the forward FLOPs.

A YAML config's summary and per-rank plan: :mod:`memzoo.config_accounting`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from memzoo.blocks.base import Block
from memzoo.model.summary import active_parameters, count_parameters
from memzoo.model.transformer import Transformer


@dataclass(frozen=True)
class Row:
    """One component of the model."""

    name: str  # "embed", "layers.3.attn", "layers.3.ffn", "pools.shared", "head"
    kind: str  # "embedding", "attention", the block name (with its pool), "pool (experts, dense)", "head"
    parameters: int
    active_parameters: int
    flops: int  # forward FLOPs per token
    flops_estimated: bool = False  # True: 2·active_parameters, the block does not count its own FLOPs
    table_bytes: int = 0  # bytes per token read from sparse tables (module docstring)


@dataclass(frozen=True)
class Summary:
    """Accounting rows of a model, their totals, and the context length the attention FLOPs assume."""

    rows: list[Row]
    context_length: int
    notes: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(r.parameters for r in self.rows)

    @property
    def active_parameters(self) -> int:
        return sum(r.active_parameters for r in self.rows)

    @property
    def flops(self) -> int:
        """Forward FLOPs per token of the whole model."""
        return sum(r.flops for r in self.rows)

    @property
    def table_bytes(self) -> int:
        """Bytes per token the whole model reads from sparse tables."""
        return sum(r.table_bytes for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): rows, totals, context length, notes."""
        return {
            "context_length": self.context_length,
            "flop_convention": "forward FLOPs per token, multiply-add = 2, attention averaged over a causal "
            "sequence of context_length tokens",
            "rows": [asdict(r) for r in self.rows],
            "total": {
                "parameters": self.parameters,
                "active_parameters": self.active_parameters,
                "flops": self.flops,
                "table_bytes": self.table_bytes,
            },
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """A fixed-width text table with a total line and the FLOP convention underneath."""
        header = ("name", "block", "params", "active/token", "FLOPs/token", "table bytes/token")
        body = [
            (r.name, r.kind, f"{r.parameters:,}", f"{r.active_parameters:,}",
             f"{r.flops:,}" + ("*" if r.flops_estimated else ""), f"{r.table_bytes:,}")
            for r in self.rows
        ]
        total = ("total", "", f"{self.parameters:,}", f"{self.active_parameters:,}", f"{self.flops:,}",
                 f"{self.table_bytes:,}")
        widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            left = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
            right = [f"{cell:>{w}}" for cell, w in zip(line[2:], widths[2:], strict=True)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(header))
        lines = [fmt(header), rule, *map(fmt, body), rule, fmt(total)]
        lines.append(
            f"FLOPs: forward, per token, multiply-add = 2; attention averaged over a causal sequence of "
            f"{self.context_length} tokens. Training ≈ 3× forward. Table bytes: read per token from pools, "
            f"token-indexed tables and routed experts."
        )
        if any(r.flops_estimated for r in self.rows):
            lines.append("* estimated as 2 × active parameters (the block does not count its own FLOPs)")
        lines.extend(self.notes)
        return "\n".join(lines)


def attention_flops_per_token(dim: int, context_length: int) -> int:
    """Forward FLOPs per token of one causal self-attention layer: projections ``8·dim²`` + scores and values
    ``2·dim·(T + 1)`` (the mean over a causal sequence of ``T`` tokens; see the module docstring)."""
    return 2 * dim * 3 * dim + 2 * dim * dim + 2 * dim * (context_length + 1)


def block_flops_per_token(block: Block) -> tuple[int, bool]:
    """A block's forward FLOPs per token and whether it is an estimate (``2 · active parameters``)."""
    return int(block.flops_per_token()), not block.declares_flops()


def summarize(model: nn.Module, context_length: int | None = None) -> Summary:
    """Accounting rows of a :class:`Transformer` (or a module holding one as ``.model``, e.g. ``LanguageModel``).

    ``context_length`` (default: the model's ``max_seq_len``) sets the attention cost; see the module docstring.
    """
    transformer = find_transformer(model)
    T = transformer.max_seq_len if context_length is None else context_length
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    dim, vocab = transformer.dim, transformer.vocab_size
    rows = [Row("embed", "embedding", transformer.embed.weight.numel(), dim, 0)]
    for i, (layer, spec) in enumerate(zip(transformer.layers, transformer.layer_specs, strict=True)):
        attn_params = sum(count_parameters(m) for m in (layer.attn_norm, layer.attn, layer.ffn_norm))
        rows.append(Row(f"layers.{i}.attn", "attention", attn_params, attn_params, attention_flops_per_token(dim, T)))
        flops, estimated = block_flops_per_token(layer.ffn)
        kind = spec.block + (f" (pool {spec.pool})" if spec.pool else "")
        rows.append(Row(f"layers.{i}.ffn", kind, count_parameters(layer.ffn), active_parameters(layer.ffn), flops,
                        estimated, int(layer.ffn.table_bytes_read_per_token())))
    for name, pool in transformer.pools.items():  # rows read are counted by the layers reading them
        rows.append(Row(f"pools.{name}", f"pool ({pool.kind}, {pool.update})", count_parameters(pool), 0, 0))
    tied = transformer.head.weight is transformer.embed.weight
    head_params = transformer.norm.weight.numel() + (0 if tied else transformer.head.weight.numel())
    rows.append(Row("head", "head (tied)" if tied else "head", head_params, dim + vocab * dim, 2 * dim * vocab))
    notes = []
    stored, listed = count_parameters(transformer), sum(r.parameters for r in rows)
    if stored != listed:  # e.g. two blocks registering one tensor: it appears in both rows
        notes.append(f"note: the rows add up to {listed:,} parameters, the model stores {stored:,}")
    return Summary(rows, T, notes)


def find_transformer(model: nn.Module) -> Transformer:
    if isinstance(model, Transformer):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, Transformer):
        return inner
    raise TypeError(
        f"summarize() needs a memzoo Transformer or a module holding one as `.model` (LanguageModel), "
        f"got {type(model).__name__}"
    )


# ----------------------------------------------------------------------------------------------- from a config
