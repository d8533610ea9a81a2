"""Memory parallelism: a pool's value table sharded over the ``memory_parallel`` axis of a DeviceMesh.

Every rank of a world of ``W = dp · M`` processes trains on its own batch (data parallel over all ``W`` ranks); a
memory-parallel group of ``M`` ranks shares one copy of each value table, split along the value dimension: rank
``i`` of the group holds ``values[:, i·D/M : (i+1)·D/M]`` for all ``N`` rows, a ``DTensor`` with placement
``Shard(1)`` on ``mesh["memory_parallel"]``, and (because the optimizer steps that DTensor) 1/M of its optimizer
state. Everything else (attention, projections, keys, embeddings) is sharded by FSDP2 (``fully_shard``) over the
flattened ``data_parallel × memory_parallel`` mesh, with the tables in ``ignored_params``.

One read ``y = Σ_j w[b,j] · values[idx[b,j]]`` of a sharded table (``B`` local bags of ``K`` rows, ``D`` wide):

    1. the group all-gathers everybody's ``indices (B, K)`` and ``weights (B, K)``       -> (M·B, K) each
    2. every rank reads ITS columns for all M·B bags with the same ``weighted_gather``  -> (M·B, D/M)
    3. an all-to-all returns to each rank its bags' columns from every rank             -> (B, M · D/M) = (B, D)

Backward is the adjoint: all-to-all of ``grad_y``, the local ``weighted_gather`` backward (the table gradient of a
rank's columns needs no communication at all inside the group), a reduce-scatter of ``grad_weights`` (each rank
holds a partial dot over its columns). Bags are padded to the group's largest bag count (zero weights), so ranks
may read different numbers of tokens; one small all-gather of the counts precedes each read.

``update: sparse`` pools: the local shard's gradient is row-sparse, a COO tensor ``(N, D/M)`` with ``sparse_dim=1``
holding the rows the group's bags read (padding bags are left out of the read, so they touch no row), and the
pool's row-wise optimizer (``LazyAdam``, ``RowwiseAdagrad``) updates those rows of the local shard. Every rank of a
group reads the same bags, so its shard gradient has the same rows as its peers'. PyTorch's autograd cannot
accumulate a sparse gradient into a ``DTensor`` (``DTensor.from_local`` of a sparse tensor fails in
``aten::view``), so a read differentiates a plain alias of the local shard and a hook adds its gradient to the
table's ``.grad``, a ``DTensor`` wrapping the sparse local tensor (:func:`accumulate_shard_grad`). With
data-parallel replicas the shard's rows are exchanged once per step (:func:`reduce_table_gradients`, through
:func:`memzoo.parallel.sparse_grad_sync.reduce_row_sparse`): ``(dp-1)·U_max·(8 + (D/M)·s)`` bytes per rank and
table instead of the dense shard's all-reduce.

Bytes per rank per read (``s`` bytes per value, 8 per index), with ``M`` ranks in the group:

    forward   all-gather indices + weights   (M-1)·B·K·(8 + s)
              all-to-all of outputs           (M-1)·B·(D/M)·s
    backward  all-to-all of output grads      (M-1)·B·(D/M)·s
              reduce-scatter of weight grads  (M-1)·B·K·s
    table gradient                            0 inside the group; when dp > 1, once per optimizer step over the
                                              data_parallel axis, a dense all-reduce of the N·D/M shard (dense
                                              pools) or an exchange of its touched rows (sparse pools)
                                              (:func:`reduce_table_gradients`: reads and micro-batches accumulate
                                              the local shard gradient first)

Why the value dimension and not row ranges (embedding-table style: rank ``i`` owns rows ``[i·N/M, (i+1)·N/M)``,
each ``(bag, index, weight)`` is routed to its row's owner, owners return partial sums):

- Bytes: row sharding moves about ``(M-1)/M·B·K·(8+s)`` for routing plus ``(M-1)·B·D·s`` of partial outputs
  (every owner returns a full-width partial sum per bag it touched); value sharding returns ``(M-1)·B·D/M·s``, M
  times less on the dominant term (``D = 1024`` ≫ ``K``-scaled terms at the paper's sizes).
- Balance: product-key lookups are skewed (a few rows are hot); with row ranges the owner of hot rows does most of
  the reads. With value columns every rank does exactly ``1/M`` of every read, and every collective has a fixed
  size (no variable-size all-to-all, no capacity factors).
- Reuse: the read is the unchanged ``weighted_gather`` op (Triton on CUDA) on a narrower table.
The price: value sharding needs ``D % M == 0``, and ``N`` rows of scores are never partitioned (the keys are small).

Gradient scale: FSDP2 averages dense gradients over all ``W`` ranks (``(1/W) Σ_r ∂L_r``); a sharded table's local
gradient is the sum over its group's batches, so it is multiplied by ``1/W`` (and summed over ``data_parallel``)
in backward, which makes one step of ``W`` ranks equal one process on the concatenated batch.

Limits (checked before training, :func:`check_memory_parallel`, at every ``memory_parallel`` including 1, since
every pool table becomes a ``DTensor``): pools of kind ``memory``, ``update: dense`` or ``sparse`` (PEER's
two-table read is not sharded); every rank of a group must run the same number of forward passes (collectives),
as data-parallel training does.

The layout (which parameter lives where, in how many elements per rank) is described once, by
:func:`fsdp_units`, :data:`TABLE_SHARD_DIM` and :func:`memory_parallel_layout`: :func:`apply_memory_parallel`
applies it and :mod:`memzoo.parallel.planning` counts bytes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from memzoo.blocks.base import Block
from memzoo.blocks.pool import MemoryPool, find_pools
from memzoo.ops import weighted_gather
from memzoo.parallel.sparse_grad_sync import reduce_row_sparse
from memzoo.parallel.torch_private import (
    all_gather_dim0,
    all_to_all_dim0,
    flatten_mesh,
    local_shard,
    row_sparse_dtensor,
)

#: Names of the two mesh axes: data parallel (replicas of a table shard) and memory parallel (shards of a table).
DATA_PARALLEL, MEMORY_PARALLEL = "data_parallel", "memory_parallel"
#: Name of the flattened (data_parallel, memory_parallel) axis FSDP2 shards the dense parameters over.
ALL_RANKS = "data_memory_parallel"


class MemoryParallelError(ValueError):
    """A memory-parallel setting that cannot run (names the value and the fix)."""


# ----------------------------------------------------------------------------------------------- checks, mesh


def check_pool_widths(pools: dict[str, MemoryPool], memory_parallel: int, world_size: int) -> None:
    """Raises :class:`MemoryParallelError` naming the pool whose ``value_dim`` ``memory_parallel`` does not divide
    (tables are sharded along the value dimension), with the sizes that fit."""
    for name, pool in pools.items():
        if pool.value_dim % memory_parallel:
            divisors = [m for m in range(1, pool.value_dim + 1) if pool.value_dim % m == 0 and world_size % m == 0]
            raise MemoryParallelError(
                f"memory_parallel={memory_parallel} does not divide value_dim={pool.value_dim} of pool {name!r} "
                f"(values are sharded along the value dimension); use memory_parallel in {divisors} or a value_dim "
                f"that is a multiple of {memory_parallel}"
            )


def check_memory_parallel(model: nn.Module, memory_parallel: int, world_size: int) -> None:
    """Raises :class:`MemoryParallelError` unless every pool of ``model`` can be sharded ``memory_parallel`` ways
    in a world of ``world_size`` processes. Runs before any process group exists (cheap, no collectives)."""
    if isinstance(memory_parallel, bool) or not isinstance(memory_parallel, int) or memory_parallel < 1:
        raise MemoryParallelError(f"memory_parallel must be a positive int, got {memory_parallel!r}")
    if world_size % memory_parallel:
        divisors = [m for m in range(1, world_size + 1) if world_size % m == 0]
        raise MemoryParallelError(
            f"memory_parallel={memory_parallel} does not divide the world size {world_size} (devices × nodes); "
            f"use one of {divisors} or run on a multiple of {memory_parallel} devices"
        )
    pools = find_pools(model)
    if memory_parallel > 1 and not pools:
        raise MemoryParallelError(
            f"memory_parallel={memory_parallel} but the model has no memory pool to shard; set memory_parallel: 1 "
            f"(or use the ddp strategy)"
        )
    check_pool_widths(pools, memory_parallel, world_size)
    for path, module in model.named_modules():
        if isinstance(module, Block) and not module.reads_through_pool:
            raise MemoryParallelError(
                f"{path or 'the model'} ({type(module).__name__}) indexes its table directly instead of reading it "
                f"through pool.read, so MemoryParallelStrategy cannot shard it; train it with the ddp strategy "
                f"(--trainer.strategy ddp)"
            )
    for name, pool in pools.items():  # every pool's tables become DTensors, at memory_parallel 1 too
        if pool.on_host:
            raise MemoryParallelError(
                f"pool {name!r} has table_device: host, which MemoryParallelStrategy cannot shard (its tables stay "
                f"in host memory); train it on a single device, or set table_device: accelerator"
            )
        if pool.kind != "memory":
            raise MemoryParallelError(
                f"pool {name!r} has kind {pool.kind!r}; MemoryParallelStrategy shards product-key memory values "
                f"(kind: memory) only, at any memory_parallel. Train expert pools (PEER, UltraMemV2) with the ddp "
                f"strategy (--trainer.strategy ddp)"
            )


def build_mesh(device_type: str, world_size: int, memory_parallel: int) -> DeviceMesh:
    """The ``(data_parallel, memory_parallel)`` mesh of shape ``(world_size // memory_parallel, memory_parallel)``;
    ranks ``[k·M, (k+1)·M)`` form memory-parallel group ``k``. Needs an initialised default process group."""
    if world_size % memory_parallel:
        raise MemoryParallelError(f"memory_parallel={memory_parallel} does not divide the world size {world_size}")
    return init_device_mesh(
        device_type, (world_size // memory_parallel, memory_parallel), mesh_dim_names=(DATA_PARALLEL, MEMORY_PARALLEL)
    )


# ----------------------------------------------------------------------------------------------- the layout

#: The dimension along which a pool table is split over the ``memory_parallel`` axis (``Shard(1)``: value columns).
TABLE_SHARD_DIM = 1


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`apply_memory_parallel` hands to ``fully_shard``, in that order: each of ``model.layers``,
    then ``model`` itself (the root: embeddings, final norm, head, whatever no layer holds). FSDP2 all-gathers a
    layer's weights in forward and again in backward (it frees them after forward); the root's once (FSDP2 keeps the
    root's gathered for backward)."""
    return [*getattr(model, "layers", ()), model]


def fsdp_shard_rows(rows: int, world_size: int, rank: int) -> int:
    """Rows of a ``rows``-row parameter that FSDP2 puts on ``rank`` of ``world_size``: ``torch.chunk``'s split,
    ``ceil(rows / W)`` each, the last ranks fewer or none."""
    chunk = -(-rows // world_size)
    return max(0, min(rows, (rank + 1) * chunk) - rank * chunk)


@dataclass(frozen=True)
class PlacedParameter:
    """One parameter under :class:`~memzoo.parallel.strategy.MemoryParallelStrategy`: a pool table (``unit is
    None``: split along :data:`TABLE_SHARD_DIM` over ``memory_parallel`` ranks) or a weight of FSDP2 unit ``unit``
    (an index into :func:`fsdp_units`: split along dim 0 over all ranks)."""

    name: str
    shape: tuple[int, ...]
    unit: int | None

    def local_numel(self, rank: int, world_size: int, memory_parallel: int) -> int:
        """Elements ``rank`` holds (its local shard)."""
        rows = self.shape[0] if self.shape else 1
        rest = _numel(self.shape[1:])
        if self.unit is None:
            return rows * rest // memory_parallel
        return fsdp_shard_rows(rows, world_size, rank) * rest

    def padded_numel(self, world_size: int) -> int:
        """Elements each rank contributes to an FSDP2 all-gather or reduce-scatter (shards padded to equal size)."""
        rows = self.shape[0] if self.shape else 1
        return -(-rows // world_size) * _numel(self.shape[1:])


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def memory_parallel_layout(model: nn.Module) -> list[PlacedParameter]:
    """Where :func:`apply_memory_parallel` puts every parameter of ``model`` (a Transformer; weights may be on
    ``meta``), by name as in ``model.named_parameters()``: pool tables first, then each FSDP2 unit's weights."""
    tables = {id(t) for pool in find_pools(model).values() for t in pool.tables().values()}
    names = {id(p): name for name, p in model.named_parameters()}
    placed = [PlacedParameter(names[id(p)], tuple(p.shape), None) for p in model.parameters() if id(p) in tables]
    seen = set(tables)
    for index, unit in enumerate(fsdp_units(model)):
        for param in unit.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                placed.append(PlacedParameter(names[id(param)], tuple(param.shape), index))
    return placed


# ----------------------------------------------------------------------------------------------- the sharded read


def sharded_weighted_gather(
    local_values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    group: dist.ProcessGroup,
    sparse_grad: bool = False,
) -> torch.Tensor:
    """``weighted_gather`` of a table whose columns are split over ``group`` (module docstring, steps 1-3).

    Args:
        local_values: this rank's ``(N, D/M)`` columns (rank ``i`` of the group holds block ``i``).
        indices: ``(..., K)`` int64 rows in ``[0, N)`` read by THIS rank's bags.
        weights: ``(..., K)`` in ``local_values.dtype``.
        group: the ``M`` ranks sharing the table; all of them must call this together.
        sparse_grad: the gradient of ``local_values`` is row-sparse (COO, the rows the group's bags read; the
            padding bags read none), as ``weighted_gather(..., sparse_grad=True)``'s.

    Returns:
        ``(..., D)``: the full-width read of this rank's bags. Differentiable in ``local_values`` and ``weights``.
    """
    size = dist.get_world_size(group)
    lead, k = indices.shape[:-1], indices.shape[-1]
    idx = indices.reshape(-1, k).long()
    w = weights.reshape(-1, k)
    n = idx.shape[0]
    counts = all_gather_dim0(torch.tensor([n], device=idx.device), group)
    n_max = int(counts.max())
    if n < n_max:  # pad with zero-weight bags so every rank sends and receives equal blocks
        idx = F.pad(idx, (0, 0, 0, n_max - n))
        w = F.pad(w, (0, 0, 0, n_max - n))
    all_idx = all_gather_dim0(idx, group)  # (M·n_max, K), no gradient
    all_w = all_gather_dim0(w, group, differentiable=True)  # backward: reduce-scatter (sum of partial dots)
    if sparse_grad and int(counts.sum()) < size * n_max:  # read the real bags only: padding touches no row
        real = torch.cat([torch.arange(r * n_max, r * n_max + int(c), device=idx.device)
                          for r, c in enumerate(counts.tolist())])
        read = weighted_gather(local_values, all_idx[real], all_w[real], sparse_grad=True)
        columns = read.new_zeros(size * n_max, local_values.shape[1]).index_copy(0, real, read)
    else:  # (M·n_max, D/M): my columns of every rank's bags
        columns = weighted_gather(local_values, all_idx, all_w, sparse_grad=sparse_grad)
    mine = all_to_all_dim0(columns, group)  # block i: rank i's columns of my bags
    d_local = local_values.shape[1]
    out = mine.view(size, n_max, d_local).permute(1, 0, 2).reshape(n_max, size * d_local)[:n]
    return out.reshape(*lead, size * d_local)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


@dataclass
class ShardedRead:
    """What :meth:`MemoryPool.read` calls for a sharded pool: the groups of the mesh, the gradient scale and the
    pool's update mode.

    The table shard's gradient of a read is this rank's only (times ``grad_scale``); the sum over the
    ``data_group`` replicas happens once per optimizer step (:func:`reduce_table_gradients`). ``sparse``: the
    shard's gradient is row-sparse and reaches the table through :func:`accumulate_shard_grad`."""

    memory_group: dist.ProcessGroup
    data_group: dist.ProcessGroup | None  # None when data_parallel has one rank (nothing to sum)
    grad_scale: float  # 1 / world size
    sparse: bool = False

    def __call__(self, table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.sparse and isinstance(table, DTensor) and table.requires_grad and torch.is_grad_enabled():
            local = _scaled_shard_alias(table, self.grad_scale)
        else:
            local = table.to_local() if isinstance(table, DTensor) else table
            local = _ScaleGrad.apply(local, self.grad_scale)
        return sharded_weighted_gather(local, indices, weights.to(local.dtype), self.memory_group,
                                       sparse_grad=self.sparse)


@torch.compiler.disable
def _scaled_shard_alias(table: DTensor, scale: float) -> torch.Tensor:
    """:func:`shard_alias` with its gradient scaled by ``scale``, kept out of ``torch.compile`` graphs: a compiled
    graph's backward cannot take the row-sparse gradient the read hands back as its incoming gradient."""
    return _ScaleGrad.apply(shard_alias(table), scale)


def shard_alias(table: DTensor) -> torch.Tensor:
    """A plain leaf sharing ``table``'s local shard (storage and values) whose gradient, once autograd has
    accumulated it, is added to ``table.grad`` (:func:`accumulate_shard_grad`) and cleared from the leaf."""
    leaf = local_shard(table).detach().requires_grad_(True)

    def move_to_table(alias: torch.Tensor) -> None:
        grad, alias.grad = alias.grad, None
        accumulate_shard_grad(table, grad)

    leaf.register_post_accumulate_grad_hook(move_to_table)
    return leaf


@torch.no_grad()
def accumulate_shard_grad(table: DTensor, grad: torch.Tensor) -> None:
    """``table.grad += grad`` for a ``DTensor`` table and a gradient ``grad`` of its local shard (sparse COO or
    dense, the local shape): ``table.grad`` becomes (or stays) a ``DTensor`` around the local sum, which is sparse
    when both parts are. Row-sparse parts are concatenated, not coalesced (the optimizer coalesces once)."""
    if table.grad is not None:
        grad = local_shard(table.grad) + grad
    table.grad = row_sparse_dtensor(grad, table) if grad.is_sparse else DTensor.from_local(
        grad, table.device_mesh, table.placements, shape=table.shape, stride=table.stride())


# ----------------------------------------------------------------------------------------------- applying it


def sharded_tables(model: nn.Module) -> list[nn.Parameter]:
    """The memory-parallel (``DTensor`` on the ``memory_parallel`` axis) tables of ``model``'s pools."""
    return [t for pool in find_pools(model).values() for t in pool.tables().values() if isinstance(t, DTensor)]


@torch.no_grad()
def reduce_table_gradients(model: nn.Module) -> int:
    """Sums each sharded table's gradient over its data-parallel replicas (``mesh["data_parallel"]``), in place:
    call once per optimizer step, after the last backward and before clipping and the step (as
    :class:`~memzoo.parallel.strategy.MemoryParallelStrategy` does). Every rank must call it; a table without a
    gradient on a rank contributes zeros (no rows). Dense-update tables are all-reduced; the row-sparse gradients
    of ``update: sparse`` tables exchange their touched rows
    (:func:`~memzoo.parallel.sparse_grad_sync.reduce_row_sparse`, summed). Returns the number of tables reduced
    (0 when there are no replicas)."""
    reduces = 0
    for pool in find_pools(model).values():
        read = pool.sharded_read
        if not isinstance(read, ShardedRead) or read.data_group is None:
            continue
        if read.sparse:
            reduces += _exchange_shard_rows([t for t in pool.tables().values() if isinstance(t, DTensor)],
                                            read.data_group)
            continue
        for table in pool.tables().values():
            if not isinstance(table, DTensor):
                continue
            if table.grad is None:
                table.grad = DTensor.from_local(torch.zeros_like(table.to_local()), table.device_mesh,
                                                table.placements)
            grad = table.grad.to_local() if isinstance(table.grad, DTensor) else table.grad
            dist.all_reduce(grad, group=read.data_group)
            reduces += 1
    return reduces


def _exchange_shard_rows(tables: list[DTensor], group: dist.ProcessGroup) -> int:
    """Each table's row-sparse shard gradient summed over ``group`` by a row exchange; returns ``len(tables)``."""
    grads = [None if t.grad is None else local_shard(t.grad) for t in tables]
    reduced, _ = reduce_row_sparse([local_shard(t) for t in tables], grads, group, average=False)
    for table, grad in zip(tables, reduced, strict=True):
        if grad is not None:
            table.grad = row_sparse_dtensor(grad, table)
    return len(tables)


def apply_memory_parallel(model: nn.Module, mesh: DeviceMesh) -> None:
    """Shards every pool of ``model`` over ``mesh["memory_parallel"]`` and applies FSDP2 to the rest over all ranks
    of ``mesh`` (the tables in ``ignored_params``). In place; a second call on the same model does nothing.

    Every rank must call it with the same model built from the same config. Tables are split from rank 0's copy
    (``distribute_tensor``) and dense parameters broadcast from rank 0 first, so the ranks start identical
    whatever their seeds. ``model`` is the :class:`~memzoo.model.transformer.Transformer` (its ``layers`` are
    sharded one by one, then the root).
    """
    names = mesh.mesh_dim_names or ()
    if names != (DATA_PARALLEL, MEMORY_PARALLEL):
        raise MemoryParallelError(
            f"apply_memory_parallel needs a 2-D mesh named {(DATA_PARALLEL, MEMORY_PARALLEL)}, got {names}; "
            f"build it with memzoo.parallel.memory_parallel.build_mesh"
        )
    if sharded_tables(model):
        return
    if mesh.size() != dist.get_world_size():
        raise MemoryParallelError(
            f"the mesh has {mesh.size()} ranks but the process group {dist.get_world_size()}; build the mesh over all "
            f"processes (memzoo.parallel.memory_parallel.build_mesh)"
        )
    memory_mesh, data_mesh = mesh[MEMORY_PARALLEL], mesh[DATA_PARALLEL]
    check_memory_parallel(model, memory_mesh.size(), mesh.size())
    tables = []
    read = ShardedRead(
        memory_mesh.get_group(), data_mesh.get_group() if data_mesh.size() > 1 else None, 1.0 / mesh.size()
    )
    for pool in find_pools(model).values():
        for name, table in pool.tables().items():
            sharded = nn.Parameter(
                distribute_tensor(table.detach(), memory_mesh, [Shard(TABLE_SHARD_DIM)]),
                requires_grad=table.requires_grad,
            )
            setattr(pool, name, sharded)
            tables.append(sharded)
        pool.shard_reads(replace(read, sparse=pool.sparse))
    from torch.distributed.fsdp import fully_shard

    ignored = set(tables)
    for param in model.parameters():
        if not isinstance(param, DTensor):
            dist.broadcast(param.data, src=0)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    all_ranks = flatten_mesh(mesh, ALL_RANKS) if mesh.size() > 1 else mesh[DATA_PARALLEL]
    for unit in fsdp_units(model):  # the layers, then the root
        fully_shard(unit, mesh=all_ranks, ignored_params=ignored)


def table_bytes_per_rank(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the pool tables this rank holds, plus their optimizer state in ``optimizer`` (if given)."""
    total = 0
    for pool in find_pools(model).values():
        for table in pool.tables().values():
            local = table.to_local() if isinstance(table, DTensor) else table
            total += local.numel() * local.element_size()
            if optimizer is not None:
                for value in optimizer.state.get(table, {}).values():
                    if torch.is_tensor(value) and value.dim() > 0:
                        value = value.to_local() if isinstance(value, DTensor) else value
                        total += value.numel() * value.element_size()
    return total


def read_bytes_per_step(bags: int, knn_total: int, value_dim: int, memory_parallel: int, value_bytes: int = 4) -> int:
    """Bytes one rank sends per sharded read, forward + backward (module docstring), for ``bags`` local bags of
    ``knn_total`` rows (``heads · knn``) of a ``value_dim``-wide table in ``memory_parallel`` shards."""
    m = memory_parallel
    return (m - 1) * bags * (knn_total * (8 + 2 * value_bytes) + 2 * (value_dim // m) * value_bytes)


__all__ = [
    "ALL_RANKS",
    "DATA_PARALLEL",
    "MEMORY_PARALLEL",
    "TABLE_SHARD_DIM",
    "MemoryParallelError",
    "PlacedParameter",
    "ShardedRead",
    "accumulate_shard_grad",
    "apply_memory_parallel",
    "build_mesh",
    "check_memory_parallel",
    "fsdp_shard_rows",
    "fsdp_units",
    "memory_parallel_layout",
    "read_bytes_per_step",
    "reduce_table_gradients",
    "sharded_tables",
    "shard_alias",
    "sharded_weighted_gather",
    "table_bytes_per_rank",
]
