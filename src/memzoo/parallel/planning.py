"""Per-rank memory and per-step communication of a model trained on W ranks, M of them sharing each memory pool.

:func:`plan_parallel` answers "what fits on how many GPUs" from a model built on the ``meta`` device (no weights
are allocated; ``memzoo summary --config X --world-size W [--memory-parallel M]`` runs it on a YAML config through
:func:`memzoo.accounting.plan_config`). The
layout it assumes:

- ranks form a ``(W / M) × M`` mesh: ``D = W / M`` data-parallel replicas of an ``M``-way memory-parallel group;
- dense weights (everything outside pools) are replicated on every rank, with gradients and optimizer states
  (``dense_optimizer_states`` tensors of each weight's size: 2 for Adam/AdamW);
- each pool's tables are split along ``value_dim`` over the ``M`` ranks of a group (each holds all rows ×
  ``value_dim / M``), with their gradients and optimizer states (``M = 1``: replicated);
- gradients of a pool are reduced over the ``D`` replicas: a sparse-update pool exchanges the rows a step touched
  (:mod:`memzoo.training.sparse_grad_sync`), a dense-update pool is all-reduced densely. Both costs are listed.

Units: bytes per rank; ``element_bytes`` per parameter, gradient and optimizer value (4: fp32), 8 per row index
and per int64 step counter. Rows touched per step and rank: ``U = min(rows, tokens · reads)``, ``tokens`` the
tokens a rank reads per optimizer step (micro-batch × accumulation), ``reads`` the rows one token reads in that pool
summed over the layers sharing it (heads × knn each): an upper bound (duplicates count once in the real exchange).
A sparse gradient holds, after the exchange, at most ``min(rows, D · U)`` rows. Activations are not counted.

Sparse optimizer state per pool and rank: ``lazy_adam`` two moments of the (sharded) tables plus one int64 step per
row; ``rowwise_adagrad`` one accumulator per row (value-sharded ranks each keep all rows').
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from memzoo.blocks.pool import MemoryPool, find_pools
from memzoo.parallel.memory_parallel import check_pool_widths
from memzoo.training.sparse_grad_sync import (
    INDEX_BYTES,
    dense_all_reduce_bytes_per_rank,
    exchange_bytes_per_rank,
)

__all__ = ["PoolPlan", "ParallelPlan", "plan_parallel", "rows_read_per_token"]

SPARSE_OPTIMIZER_STATES = ("lazy_adam", "rowwise_adagrad")


@dataclass(frozen=True)
class PoolPlan:
    """One pool on one rank."""

    name: str
    update: str  # "sparse" | "dense"
    rows: int
    value_dim: int
    tables: int
    value_dim_per_rank: int  # value_dim / M
    rows_touched_per_step: int  # U on one rank (upper bound)
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    row_exchange_bytes: int  # sent per rank and step by the row-sparse exchange
    dense_all_reduce_bytes: int  # sent per rank and step by a ring all-reduce of the dense table gradients

    @property
    def communication_bytes(self) -> int:
        """What this pool's update mode sends per rank and step."""
        return self.row_exchange_bytes if self.update == "sparse" else self.dense_all_reduce_bytes


@dataclass(frozen=True)
class ParallelPlan:
    """Per-rank bytes of a model on ``world_size`` ranks with ``memory_parallel``-way pools."""

    world_size: int
    memory_parallel: int
    tokens_per_rank_step: int
    element_bytes: int
    dense_parameters: int
    dense_parameter_bytes: int
    dense_gradient_bytes: int
    dense_optimizer_bytes: int
    dense_all_reduce_bytes: int
    pools: list[PoolPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.memory_parallel

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer states per rank."""
        pools = sum(p.parameter_bytes + p.gradient_bytes + p.optimizer_bytes for p in self.pools)
        return self.dense_parameter_bytes + self.dense_gradient_bytes + self.dense_optimizer_bytes + pools

    @property
    def communication_bytes(self) -> int:
        """Gradient bytes each rank sends per optimizer step (dense all-reduce + each pool's own mode)."""
        return self.dense_all_reduce_bytes + sum(p.communication_bytes for p in self.pools)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_parallel"] = self.data_parallel
        out["total_bytes"] = self.total_bytes
        out["communication_bytes"] = self.communication_bytes
        for pool, plan in zip(out["pools"], self.pools, strict=True):
            pool["communication_bytes"] = plan.communication_bytes
        return out

    def table(self) -> str:
        """A fixed-width table: one row for the dense weights, one per pool, the total; bytes in GiB."""
        header = ("part", "layout", "rows/step", "params", "grads", "optim", "comm/step", "row exchange",
                  "dense all-reduce")
        m = self.memory_parallel
        body = [("dense weights", "replicated", "-", _gib(self.dense_parameter_bytes), _gib(self.dense_gradient_bytes),
                 _gib(self.dense_optimizer_bytes), _gib(self.dense_all_reduce_bytes), "-",
                 _gib(self.dense_all_reduce_bytes))]
        for p in self.pools:
            layout = f"{p.update}, " + (f"value_dim/{m} = {p.value_dim_per_rank}" if m > 1 else "replicated")
            body.append((p.name, layout, f"{p.rows_touched_per_step:,}", _gib(p.parameter_bytes), _gib(p.gradient_bytes), _gib(p.optimizer_bytes),
                         _gib(p.communication_bytes), _gib(p.row_exchange_bytes), _gib(p.dense_all_reduce_bytes)))
        total = ("total per rank", "", "", _gib(self.dense_parameter_bytes + sum(p.parameter_bytes for p in self.pools)),
                 _gib(self.dense_gradient_bytes + sum(p.gradient_bytes for p in self.pools)),
                 _gib(self.dense_optimizer_bytes + sum(p.optimizer_bytes for p in self.pools)),
                 _gib(self.communication_bytes), "", "")
        widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            left = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
            return "  ".join(left + [f"{c:>{w}}" for c, w in zip(line[2:], widths[2:], strict=True)]).rstrip()

        rule = "-" * len(fmt(header))
        lines = [
            f"{self.world_size} ranks = {self.data_parallel} data-parallel x {m} memory-parallel; "
            f"{self.tokens_per_rank_step:,} tokens per rank and optimizer step; GiB per rank "
            f"({self.element_bytes} bytes per value)",
            fmt(header), rule, *map(fmt, body), rule, fmt(total),
            f"params + grads + optimizer states per rank: {_gib(self.total_bytes)} GiB (activations not counted)",
            "rows/step: rows of a pool one rank's step touches at most; comm/step: gradient bytes a rank sends per "
            "optimizer step (ring collectives); a sparse pool uses the row exchange, a dense one the all-reduce",
            *self.notes,
        ]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.3f}"


def rows_read_per_token(block: nn.Module) -> int:
    """Rows of its pool one token's forward reads in a memory (``heads · knn``) or PEER (``heads · k``) block."""
    per_head = getattr(block, "knn", None) or getattr(block, "k", None)
    heads = getattr(block, "heads", None)
    if not isinstance(per_head, int) or not isinstance(heads, int):
        raise TypeError(
            f"{type(block).__name__} reads a pool but has no integer heads and knn (or k) attributes; the planner "
            f"needs them to bound the rows a step touches"
        )
    return heads * per_head


def _pool_readers(model: nn.Module, pool: MemoryPool) -> int:
    """Rows of ``pool`` one token reads, summed over the blocks reading it."""
    reads = 0
    for module in model.modules():
        if module is not pool and getattr(module, "pool", None) is pool:
            reads += rows_read_per_token(module)
    return reads


def plan_parallel(
    model: nn.Module,
    world_size: int,
    memory_parallel: int = 1,
    tokens_per_rank_step: int = 2048,
    dense_optimizer_states: int = 2,
    sparse_optimizer: str = "lazy_adam",
    element_bytes: int = 4,
) -> ParallelPlan:
    """Per-rank bytes and per-step communication of ``model`` (see the module docstring for the layout and units).

    Args:
        model: a ``Transformer`` or a module holding one (``LanguageModel``); weights may be on ``meta``.
        world_size: ranks ``W``.
        memory_parallel: ranks ``M`` sharing each pool (tables split along ``value_dim``); must divide ``W`` and
            every pool's ``value_dim``.
        tokens_per_rank_step: tokens a rank reads per optimizer step.
        dense_optimizer_states: optimizer tensors per dense weight (and dense-update pool table): AdamW 2, SGD
            with momentum 1.
        sparse_optimizer: the row-wise optimizer of sparse pools, ``lazy_adam`` | ``rowwise_adagrad``.
        element_bytes: bytes per parameter / gradient / optimizer value.
    """
    for name, value in (("world_size", world_size), ("memory_parallel", memory_parallel),
                        ("tokens_per_rank_step", tokens_per_rank_step), ("element_bytes", element_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if world_size % memory_parallel:
        raise ValueError(
            f"memory_parallel={memory_parallel} does not divide world_size={world_size}: ranks form a "
            f"(world_size / memory_parallel) x memory_parallel mesh; pick a divisor of {world_size}"
        )
    if sparse_optimizer not in SPARSE_OPTIMIZER_STATES:
        raise ValueError(f"sparse_optimizer must be one of {list(SPARSE_OPTIMIZER_STATES)}, got {sparse_optimizer!r}")
    if isinstance(dense_optimizer_states, bool) or not isinstance(dense_optimizer_states, int) or dense_optimizer_states < 0:
        raise ValueError(f"dense_optimizer_states must be an int >= 0, got {dense_optimizer_states!r}")
    pools = find_pools(model)
    dp, b = world_size // memory_parallel, element_bytes
    pool_tables = {id(t) for pool in pools.values() for t in pool.tables().values()}
    dense = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in pool_tables)
    plans = []
    check_pool_widths(pools, memory_parallel, world_size)
    for name, pool in pools.items():
        tables, rows, width = len(pool.tables()), pool.num_rows, pool.value_dim // memory_parallel
        touched = min(rows, tokens_per_rank_step * _pool_readers(model, pool))
        shard = tables * rows * width * b
        if pool.sparse:
            gradient = tables * min(rows, dp * touched) * (width * b + INDEX_BYTES)
            if sparse_optimizer == "lazy_adam":
                optimizer = tables * (2 * rows * width * b + rows * INDEX_BYTES)
            else:
                optimizer = tables * rows * b
        else:
            gradient, optimizer = shard, dense_optimizer_states * shard
        plans.append(PoolPlan(
            name=name, update=pool.update, rows=rows, value_dim=pool.value_dim, tables=tables,
            value_dim_per_rank=width, rows_touched_per_step=touched, parameter_bytes=shard, gradient_bytes=gradient,
            optimizer_bytes=optimizer,
            row_exchange_bytes=tables * exchange_bytes_per_rank(touched, width, dp, b),
            dense_all_reduce_bytes=tables * dense_all_reduce_bytes_per_rank(rows, width, dp, b),
        ))
    return ParallelPlan(
        world_size=world_size, memory_parallel=memory_parallel, tokens_per_rank_step=tokens_per_rank_step,
        element_bytes=b, dense_parameters=dense, dense_parameter_bytes=dense * b, dense_gradient_bytes=dense * b,
        dense_optimizer_bytes=dense_optimizer_states * dense * b,
        dense_all_reduce_bytes=2 * (dp - 1) * dense * b // dp, pools=plans,
    )
