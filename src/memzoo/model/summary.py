"""Parameter summary of a :class:`~memzoo.model.transformer.Transformer`: total and active parameters per layer.

*Active* parameters are those a single token's forward pass reads: all of a dense block, but only the rows a memory
or expert layer retrieves. A block reports its own count through ``active_parameters() -> int``; a block without
that method counts as fully active. Shared pools are counted once in the total (they belong to the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters registered under ``module`` (tied or shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def active_parameters(block: nn.Module) -> int:
    """Parameters one token reads in ``block`` (see module docstring)."""
    if hasattr(block, "active_parameters"):
        return int(block.active_parameters())
    return count_parameters(block)


@dataclass(frozen=True)
class ParameterRow:
    """One line of the summary."""

    name: str
    kind: str
    total: int
    active: int


def parameter_summary(model: nn.Module) -> list[ParameterRow]:
    """Rows for the embedding, each layer (attention + its FFN-slot block), each pool, the head, and a total."""
    rows = [ParameterRow("embed", "embedding", model.embed.weight.numel(), model.dim)]
    for i, (layer, spec) in enumerate(zip(model.layers, model.layer_specs)):
        attn = count_parameters(layer.attn) + count_parameters(layer.attn_norm) + count_parameters(layer.ffn_norm)
        rows.append(ParameterRow(f"layers.{i}.attn", "attention", attn, attn))
        kind = spec.block + (f" (pool {spec.pool})" if spec.pool else "")
        rows.append(ParameterRow(f"layers.{i}.ffn", kind, count_parameters(layer.ffn), active_parameters(layer.ffn)))
    for name, pool in model.pools.items():
        # the rows a token reads from a shared pool are counted in the active count of the layers reading it
        rows.append(ParameterRow(f"pools.{name}", f"pool ({pool.kind}, {pool.update})", count_parameters(pool), 0))
    head_total = 0 if model.head.weight is model.embed.weight else model.head.weight.numel()
    rows.append(ParameterRow("norm+head", "head" + (" (tied)" if head_total == 0 else ""),
                             head_total + model.norm.weight.numel(), model.head.weight.numel() + model.dim))
    rows.append(ParameterRow("total", "", count_parameters(model), sum(r.active for r in rows)))
    return rows


def format_parameter_summary(rows: list[ParameterRow]) -> str:
    """A fixed-width table of :func:`parameter_summary` rows."""
    width = max(len(r.name) for r in rows)
    kind_w = max(len(r.kind) for r in rows)
    lines = [f"{'name':<{width}}  {'block':<{kind_w}}  {'params':>12}  {'active/token':>12}"]
    lines += [f"{r.name:<{width}}  {r.kind:<{kind_w}}  {r.total:>12,}  {r.active:>12,}" for r in rows]
    return "\n".join(lines)
