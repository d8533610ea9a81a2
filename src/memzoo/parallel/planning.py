"""Per-rank memory and per-step communication of a model trained on W ranks, as memzoo's strategies lay it out.

:func:`plan_parallel` answers "what fits on how many GPUs" from a model built on the ``meta`` device (no weights
are allocated; ``memzoo summary --config X --world-size W [--memory-parallel M]`` runs it on a YAML config through
:func:`memzoo.config_accounting.plan_config`). It plans one of the two strategies that train memzoo models on many ranks,
counting what each really does:

``ddp`` (``trainer.strategy: ddp``, ``M = 1``; :class:`memzoo.parallel.SparseDDPStrategy`):

- dense weights (everything outside pools) and their gradients and optimizer states (``dense_optimizer_states``
  tensors of each weight's size: 2 for AdamW) are replicated on every rank; DDP all-reduces their gradients once
  per optimizer step;
- pools are replicated; a dense-update pool is all-reduced with the rest, a sparse-update pool exchanges the rows
  a step touched (:mod:`memzoo.parallel.sparse_grad_sync`); both costs are listed.

``memory_parallel`` (:class:`~memzoo.parallel.strategy.MemoryParallelStrategy`, any ``M``; the layout is the one
:func:`memzoo.parallel.memory_parallel.memory_parallel_layout` describes and ``apply_memory_parallel`` applies):

- ranks form a ``(W / M) × M`` mesh: ``D = W / M`` data-parallel replicas of an ``M``-way memory-parallel group;
- dense weights are FSDP2-sharded over all ``W`` ranks (dim 0, ``torch.chunk`` split: rank 0 holds the largest
  shard, whose bytes are listed), with their gradients and optimizer states; per micro-batch each layer's weights
  are all-gathered twice (forward, backward) and the root's once, and all gradients are reduce-scattered;
- each pool's tables are split along ``value_dim`` over the ``M`` ranks of a group (each holds all rows ×
  ``value_dim / M``) with their gradients and optimizer states; once per optimizer step the table-shard gradient
  (accumulated over reads and micro-batches) is reduced over the ``D`` replicas
  (:func:`memzoo.parallel.memory_parallel.reduce_table_gradients`): a dense-update pool's by an all-reduce, a
  sparse-update pool's by exchanging the rows its group's step touched (``min(rows, M·U)``, ``D/M`` wide; plus,
  with ``rowwise_adagrad`` and ``M > 1``, an all-reduce of their row sums within the group); each read sends its
  indices, weights and outputs within the group (:func:`memzoo.parallel.memory_parallel.read_bytes_per_step`);
- pools the strategy cannot run (PEER's expert pools) are refused with the strategy's own message
  (:func:`memzoo.parallel.memory_parallel.check_memory_parallel`).

Units: bytes per rank; ``element_bytes`` per parameter, gradient and optimizer value (4: fp32), 8 per row index
and per int64 step counter; communication: bytes a rank sends per optimizer step (ring collectives). Rows touched
per step and rank: ``U = min(rows, tokens · reads)``, ``tokens`` the tokens a rank reads per optimizer step
(micro-batch × accumulation), ``reads`` the rows one token reads in that pool summed over the layers sharing it
(heads × knn each): an upper bound (duplicates count once in the real exchange). A sparse gradient holds, after the
exchange, at most ``min(rows, D · U)`` rows. Activations are not counted.

Sparse optimizer state per pool and rank: ``lazy_adam`` two moments of the tables plus one int64 step per row;
``rowwise_adagrad`` one accumulator per row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

from memzoo.blocks.pool import MemoryPool, find_pools
from memzoo.parallel.memory_parallel import (
    check_memory_parallel,
    fsdp_units,
    memory_parallel_layout,
    read_bytes_per_step,
)
from memzoo.parallel.sparse_grad_sync import (
    INDEX_BYTES,
    dense_all_reduce_bytes_per_rank,
    exchange_bytes_per_rank,
)

__all__ = ["STRATEGIES", "PoolPlan", "ParallelPlan", "plan_parallel", "rows_read_per_token"]

SPARSE_OPTIMIZER_STATES = ("lazy_adam", "rowwise_adagrad")
#: The strategies :func:`plan_parallel` lays a model out as (module docstring).
STRATEGIES = ("ddp", "memory_parallel")


@dataclass(frozen=True)
class PoolPlan:
    """One pool on one rank."""

    name: str
    update: str  # "sparse" | "dense"
    layout: str  # e.g. "sparse, replicated" or "dense, value_dim/64 = 64"
    rows: int
    value_dim: int
    tables: int
    value_dim_per_rank: int  # value_dim / M
    rows_touched_per_step: int  # U on one rank (upper bound)
    parameter_elements: int  # table elements this rank holds
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    row_exchange_bytes: int  # sparse pools: sent per rank and step by the row-sparse exchange
    dense_all_reduce_bytes: int  # sent per rank and step by ring all-reduces of the dense table gradient
    lookup_bytes: int  # memory_parallel: the lookups' all-gathers and all-to-alls within the group, per step
    communication_bytes: int  # what the strategy really sends for this pool per rank and step


@dataclass(frozen=True)
class ParallelPlan:
    """Per-rank bytes of a model on ``world_size`` ranks laid out by ``strategy`` with ``memory_parallel``-way pools."""

    strategy: str
    world_size: int
    memory_parallel: int
    tokens_per_rank_step: int
    micro_batches: int
    element_bytes: int
    dense_layout: str
    dense_parameters: int
    dense_parameter_elements: int  # on rank 0 (the largest shard)
    dense_parameter_bytes: int
    dense_gradient_bytes: int
    dense_optimizer_bytes: int
    dense_all_reduce_bytes: int  # ddp
    dense_gather_scatter_bytes: int  # memory_parallel: FSDP2's all-gathers + reduce-scatters
    pools: list[PoolPlan]
    rank_parameter_elements: list[int]  # parameter elements each rank holds, rank 0 first
    notes: list[str] = field(default_factory=list)

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.memory_parallel

    @property
    def dense_communication_bytes(self) -> int:
        return self.dense_all_reduce_bytes + self.dense_gather_scatter_bytes

    @property
    def total_bytes(self) -> int:
        """Parameters + gradients + optimizer states per rank."""
        pools = sum(p.parameter_bytes + p.gradient_bytes + p.optimizer_bytes for p in self.pools)
        return self.dense_parameter_bytes + self.dense_gradient_bytes + self.dense_optimizer_bytes + pools

    @property
    def communication_bytes(self) -> int:
        """Bytes each rank sends per optimizer step (dense weights' collectives + each pool's own)."""
        return self.dense_communication_bytes + sum(p.communication_bytes for p in self.pools)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_parallel"] = self.data_parallel
        out["total_bytes"] = self.total_bytes
        out["communication_bytes"] = self.communication_bytes
        out["dense_communication_bytes"] = self.dense_communication_bytes
        return out

    def table(self) -> str:
        """A fixed-width table: one row for the dense weights, one per pool, the total; bytes in GiB."""
        header = ("part", "layout", "rows/step", "params", "grads", "optim", "comm/step", "row exchange",
                  "all-reduce", "gather/scatter")
        body = [("dense weights", self.dense_layout, "-", _gib(self.dense_parameter_bytes),
                 _gib(self.dense_gradient_bytes), _gib(self.dense_optimizer_bytes),
                 _gib(self.dense_communication_bytes), "-", _gib(self.dense_all_reduce_bytes),
                 _gib(self.dense_gather_scatter_bytes))]
        for p in self.pools:
            exchange = _gib(p.row_exchange_bytes) if p.update == "sparse" else "-"
            body.append((p.name, p.layout, f"{p.rows_touched_per_step:,}", _gib(p.parameter_bytes),
                         _gib(p.gradient_bytes), _gib(p.optimizer_bytes), _gib(p.communication_bytes), exchange,
                         _gib(p.dense_all_reduce_bytes), _gib(p.lookup_bytes)))
        total = ("total per rank", "", "", _gib(self.dense_parameter_bytes + sum(p.parameter_bytes for p in self.pools)),
                 _gib(self.dense_gradient_bytes + sum(p.gradient_bytes for p in self.pools)),
                 _gib(self.dense_optimizer_bytes + sum(p.optimizer_bytes for p in self.pools)),
                 _gib(self.communication_bytes), "", "", "")
        widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            left = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
            return "  ".join(left + [f"{c:>{w}}" for c, w in zip(line[2:], widths[2:], strict=True)]).rstrip()

        rule = "-" * len(fmt(header))
        if self.strategy == "ddp":
            title = f"{self.world_size} ranks, ddp strategy (every rank holds the whole model)"
            explain = ("comm/step: bytes a rank sends per optimizer step (ring collectives); DDP all-reduces dense "
                       "weights and dense-update pools once per step, a sparse pool exchanges the rows it touched "
                       "(row exchange) instead of the all-reduce beside it")
        else:
            title = (f"{self.world_size} ranks = {self.data_parallel} data-parallel x {self.memory_parallel} "
                     f"memory-parallel, MemoryParallelStrategy")
            explain = ("comm/step: bytes a rank sends per optimizer step (ring collectives); dense weights: FSDP2 "
                       "all-gathers (twice per layer and micro-batch) and reduce-scatters; pools: the table-shard "
                       "gradient reduced over the data-parallel replicas once per step (all-reduce; a sparse pool "
                       "exchanges its touched rows instead: row exchange), and "
                       "the lookups' all-gathers and all-to-alls within the group (gather/scatter)")
        lines = [
            f"{title}; {self.tokens_per_rank_step:,} tokens per rank and optimizer step in {self.micro_batches} "
            f"micro-batch(es); GiB per rank ({self.element_bytes} bytes per value)",
            fmt(header), rule, *map(fmt, body), rule, fmt(total),
            f"params + grads + optimizer states per rank: {_gib(self.total_bytes)} GiB (activations not counted)",
            "rows/step: rows of a pool one rank's step touches at most; " + explain,
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


def _pool_readers(model: nn.Module, pool: MemoryPool) -> list[int]:
    """Rows of ``pool`` one token reads in each block reading it."""
    return [rows_read_per_token(m) for m in model.modules() if m is not pool and getattr(m, "pool", None) is pool]


def _transformer(model: nn.Module) -> nn.Module:
    """The decoder of ``model`` (a ``LanguageModel`` holds it as ``.model``): what the strategy parallelizes."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "layers") else model


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def plan_parallel(
    model: nn.Module,
    world_size: int,
    memory_parallel: int = 1,
    tokens_per_rank_step: int = 2048,
    dense_optimizer_states: int = 2,
    sparse_optimizer: str = "lazy_adam",
    element_bytes: int = 4,
    strategy: str | None = None,
    micro_batches: int = 1,
) -> ParallelPlan:
    """Per-rank bytes and per-step communication of ``model`` (see the module docstring for the layouts and units).

    Args:
        model: a ``Transformer`` or a module holding one (``LanguageModel``); weights may be on ``meta``.
        world_size: ranks ``W``.
        memory_parallel: ranks ``M`` sharing each pool (tables split along ``value_dim``); must divide ``W`` and
            every pool's ``value_dim``.
        tokens_per_rank_step: tokens a rank reads per optimizer step (all micro-batches).
        dense_optimizer_states: optimizer tensors per dense weight (and dense-update pool table): AdamW 2, SGD
            with momentum 1.
        sparse_optimizer: the row-wise optimizer of sparse pools, ``lazy_adam`` | ``rowwise_adagrad``.
        element_bytes: bytes per parameter / gradient / optimizer value.
        strategy: ``"ddp"`` | ``"memory_parallel"``; ``None``: ``memory_parallel`` when ``M > 1``, else ``ddp``.
        micro_batches: micro-batches per optimizer step (gradient accumulation); FSDP2 and the sharded reads
            communicate once per micro-batch.
    """
    for name, value in (("world_size", world_size), ("memory_parallel", memory_parallel),
                        ("tokens_per_rank_step", tokens_per_rank_step), ("element_bytes", element_bytes),
                        ("micro_batches", micro_batches)):
        _positive_int(name, value)
    if world_size % memory_parallel:
        raise ValueError(
            f"memory_parallel={memory_parallel} does not divide world_size={world_size}: ranks form a "
            f"(world_size / memory_parallel) x memory_parallel mesh; pick a divisor of {world_size}"
        )
    if sparse_optimizer not in SPARSE_OPTIMIZER_STATES:
        raise ValueError(f"sparse_optimizer must be one of {list(SPARSE_OPTIMIZER_STATES)}, got {sparse_optimizer!r}")
    if isinstance(dense_optimizer_states, bool) or not isinstance(dense_optimizer_states, int) or dense_optimizer_states < 0:
        raise ValueError(f"dense_optimizer_states must be an int >= 0, got {dense_optimizer_states!r}")
    strategy = strategy or ("memory_parallel" if memory_parallel > 1 else "ddp")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "ddp" and memory_parallel != 1:
        raise ValueError(
            f"the ddp strategy replicates every pool; memory_parallel={memory_parallel} needs MemoryParallelStrategy "
            f"(strategy='memory_parallel')"
        )
    model = _transformer(model)
    args = dict(world_size=world_size, memory_parallel=memory_parallel, tokens_per_rank_step=tokens_per_rank_step,
                micro_batches=micro_batches, element_bytes=element_bytes)
    if strategy == "ddp":
        return _plan_ddp(model, dense_optimizer_states, sparse_optimizer, **args)
    return _plan_memory_parallel(model, dense_optimizer_states, sparse_optimizer, **args)


def _plan_ddp(model, dense_optimizer_states, sparse_optimizer, *, world_size, memory_parallel, tokens_per_rank_step,
              micro_batches, element_bytes) -> ParallelPlan:
    """Everything replicated; DDP all-reduces dense gradients once per step, sparse pools exchange rows."""
    pools = find_pools(model)
    w, b = world_size, element_bytes
    pool_tables = {id(t) for pool in pools.values() for t in pool.tables().values()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in pool_tables)
    plans = []
    for name, pool in pools.items():
        tables, rows, width = len(pool.tables()), pool.num_rows, pool.value_dim
        touched = min(rows, tokens_per_rank_step * sum(_pool_readers(model, pool)))
        shard = tables * rows * width * b
        if pool.sparse:
            gradient = tables * min(rows, w * touched) * (width * b + INDEX_BYTES)
            if sparse_optimizer == "lazy_adam":
                optimizer = tables * (2 * rows * width * b + rows * INDEX_BYTES)
            else:
                optimizer = tables * rows * b
        else:
            gradient, optimizer = shard, dense_optimizer_states * shard
        exchange = tables * exchange_bytes_per_rank(touched, width, w, b)
        all_reduce = tables * dense_all_reduce_bytes_per_rank(rows, width, w, b)
        plans.append(PoolPlan(
            name=name, update=pool.update, layout=f"{pool.update}, replicated", rows=rows, value_dim=pool.value_dim,
            tables=tables, value_dim_per_rank=width, rows_touched_per_step=touched,
            parameter_elements=tables * rows * width, parameter_bytes=shard, gradient_bytes=gradient,
            optimizer_bytes=optimizer, row_exchange_bytes=exchange, dense_all_reduce_bytes=all_reduce,
            lookup_bytes=0, communication_bytes=exchange if pool.sparse else all_reduce,
        ))
    elements = dense + sum(p.parameter_elements for p in plans)
    return ParallelPlan(
        strategy="ddp", world_size=w, memory_parallel=1, tokens_per_rank_step=tokens_per_rank_step,
        micro_batches=micro_batches, element_bytes=b, dense_layout="replicated", dense_parameters=dense,
        dense_parameter_elements=dense, dense_parameter_bytes=dense * b, dense_gradient_bytes=dense * b,
        dense_optimizer_bytes=dense_optimizer_states * dense * b,
        dense_all_reduce_bytes=2 * (w - 1) * dense * b // w, dense_gather_scatter_bytes=0, pools=plans,
        rank_parameter_elements=[elements] * w,
    )


def _plan_memory_parallel(model, dense_optimizer_states, sparse_optimizer, *, world_size, memory_parallel,
                          tokens_per_rank_step, micro_batches, element_bytes) -> ParallelPlan:
    """MemoryParallelStrategy's layout (:func:`~memzoo.parallel.memory_parallel.memory_parallel_layout`)."""
    w, m, b = world_size, memory_parallel, element_bytes
    dp = w // m
    pools = find_pools(model)
    check_memory_parallel(model, m, w)  # the strategy's own refusals (PEER pools), word for word
    placed = memory_parallel_layout(model)
    dense_params = [p for p in placed if p.unit is not None]
    dense = sum(p.local_numel(0, 1, 1) for p in dense_params)
    on_rank0 = sum(p.local_numel(0, w, m) for p in dense_params)
    root = len(fsdp_units(model)) - 1
    gather_scatter = 0
    if w > 1:
        for unit in {p.unit for p in dense_params}:
            padded = sum(p.padded_numel(w) for p in dense_params if p.unit == unit)
            gathers = 1 if unit == root else 2  # FSDP2 keeps the root's weights gathered from forward to backward
            gather_scatter += micro_batches * (gathers + 1) * (w - 1) * padded * b
    plans = []
    for name, pool in pools.items():
        tables, rows, width = len(pool.tables()), pool.num_rows, pool.value_dim // m
        readers = _pool_readers(model, pool)
        touched = min(rows, tokens_per_rank_step * sum(readers))
        shard = tables * rows * width * b
        all_reduce = tables * dense_all_reduce_bytes_per_rank(rows, width, dp, b)  # once per step
        lookups = sum(read_bytes_per_step(tokens_per_rank_step, k, pool.value_dim, m, b) for k in readers)
        layout = f"{pool.update}, value_dim/{m} = {width}" if m > 1 else f"{pool.update}, whole table"
        gradient, optimizer, exchange = shard, dense_optimizer_states * shard, 0
        if pool.sparse:  # the shard's rows read by the group, exchanged over the replicas
            group_rows = min(rows, m * touched)
            gradient = tables * min(rows, w * touched) * (width * b + INDEX_BYTES)
            exchange = tables * exchange_bytes_per_rank(group_rows, width, dp, b)
            if sparse_optimizer == "lazy_adam":
                optimizer = tables * (2 * rows * width * b + rows * INDEX_BYTES)
            else:  # one accumulator per row, whole on every rank; row sums all-reduced within the group
                optimizer = tables * rows * b
                exchange += tables * 2 * (m - 1) * min(rows, w * touched) * b // m
        plans.append(PoolPlan(
            name=name, update=pool.update, layout=layout, rows=rows, value_dim=pool.value_dim, tables=tables,
            value_dim_per_rank=width, rows_touched_per_step=touched, parameter_elements=tables * rows * width,
            parameter_bytes=shard, gradient_bytes=gradient, optimizer_bytes=optimizer,
            row_exchange_bytes=exchange, dense_all_reduce_bytes=all_reduce, lookup_bytes=lookups,
            communication_bytes=(exchange if pool.sparse else all_reduce) + lookups,
        ))
    ranks = [sum(p.local_numel(r, w, m) for p in placed) for r in range(w)]
    return ParallelPlan(
        strategy="memory_parallel", world_size=w, memory_parallel=m, tokens_per_rank_step=tokens_per_rank_step,
        micro_batches=micro_batches, element_bytes=b, dense_layout=f"FSDP2 over {w} ranks",
        dense_parameters=dense, dense_parameter_elements=on_rank0, dense_parameter_bytes=on_rank0 * b,
        dense_gradient_bytes=on_rank0 * b, dense_optimizer_bytes=dense_optimizer_states * on_rank0 * b,
        dense_all_reduce_bytes=0, dense_gather_scatter_bytes=gather_scatter, pools=plans,
        rank_parameter_elements=ranks,
    )
