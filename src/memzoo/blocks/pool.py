"""Memory pools: the large value tables that memory layers (and PEER expert layers) read sparsely.

"Memory Layers at Scale" shares one value table across all memory layers of a model (Memory+): each layer has its
own query projection and product keys, but every layer indexes the same ``(n_keys², value_dim)`` table. A
:class:`MemoryPool` is that table. The model owns its pools (``Transformer.pools``) and hands each block the pool it
names, so a shared table is one ``Parameter``, stored once in ``state_dict``, with one optimizer state, and the
gradients of all layers that read it add up in it.

A block holds its pool through a :class:`PoolRef`, which is *not* a registered submodule: the pool's parameters
belong to the model's ``pools`` ModuleDict only. A block built on its own (no shared pool) owns a private pool
as an ordinary submodule instead. :func:`find_pools` lists every distinct pool of a model, shared or private.

Usage tracking: a block reports each lookup with ``pool.observe(indices, weights)``. That is a no-op unless an
observer (anything with ``update(indices, weights)``, e.g. :class:`memzoo.training.metrics.MemoryUsage`) is
attached with ``pool.track_usage(observer)``; the trainer attaches one per pool for validation and detaches it
(``pool.track_usage(None)``) afterwards. The observer is held as a plain attribute, never as a submodule, so it
is not part of the model's ``state_dict``, ``parameters()`` or ``modules()``.

Reads: a memory layer reads its pool with ``pool.read(indices, weights)`` (``weighted_gather`` of ``values``).
Memory parallelism (:mod:`memzoo.parallel.memory_parallel`, applied to a built model from outside) replaces the
``values`` table by a column shard and installs a sharded read with ``pool.shard_reads(read)``; like the usage
observer, the read is a plain attribute, not a submodule.

Host tables (``table_device: "host"``, kind ``memory``). The tables stay in host memory when the model moves
(``.to(device)``, ``.cuda()``, Lightning's strategy moving the model): :meth:`MemoryPool._apply` lets dtype casts
through (``.half()``, ``.to(torch.bfloat16)``) and leaves device moves out, for the tables and their gradients, so
``state_dict``, ``load_state_dict`` and checkpoints are those of any pool. A read stages only the rows it uses on the
compute device (host gather into a pinned buffer, non-blocking copy) and sums there; backward returns the table's
gradient on the host, row-sparse with ``update: sparse`` (then the row-wise optimizers of
:mod:`memzoo.training.optim`, e.g. LazyAdam, update the table in host memory) or dense (``N·D`` on the host per
backward: use ``sparse`` for large tables). See :mod:`memzoo.ops.host_read`. Only the rows a step reads must fit the
accelerator, so a table larger than its memory trains and serves.

Reading ahead. A block whose rows follow from the token ids (``table_indices(ctx)``) overrides
:meth:`~memzoo.blocks.base.Block.prefetch` to call ``pool.prefetch(indices)``; the Transformer calls every block's
``prefetch`` before it runs the layers (after :meth:`discard_staged` drops what a previous forward left), and the
block's ``pool.read(indices, weights)`` consumes the staged rows: the same tensor matches at once, equal values
after a comparison (a device sync on CUDA), anything else is read synchronously (``prefetch_stats`` counts
``staged``, ``synchronous`` and ``dropped`` reads). On CUDA staging runs on a worker thread and a side stream, so
later layers' rows move while earlier layers compute; on CPU it is done at once. The staged rows of every layer are
on the device together until their layers run; with activation checkpointing a layer's recomputation in backward
reads its rows again, synchronously. Prefetch and host reads run outside ``torch.compile`` graphs (a graph
break), and work with the KV cache (``ctx.state`` is handed to ``prefetch`` as the layer will see it) and in the
Hugging Face export, which ships this code.

Supported: one process on one device (Lightning's ``SingleDeviceStrategy``), eager or compiled, inference and
training, checkpoints and resume (the optimizer state of host tables is moved back to the host at the start of
training, :func:`memzoo.training.optim.keep_host_state_on_host`). Refused by name: DDP (it needs every parameter on
the accelerator), FSDP and DeepSpeed, memory parallelism (:meth:`shard_reads`), and host pools of kind
``experts``. The table itself is pageable memory; only the staging buffers are pinned.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn as nn

from memzoo.ops import weighted_gather
from memzoo.ops.host_read import StagedRows, host_weighted_gather, stage_rows

UpdateMode = Literal["dense", "sparse"]
PoolKind = Literal["memory", "experts"]
TableDevice = Literal["accelerator", "host"]
TABLE_DEVICES = ("accelerator", "host")

#: Staged reads a host pool keeps at most (oldest dropped first): a forward stages one per layer reading the pool.
MAX_STAGED = 64

#: Tables each pool kind holds, all of shape (num_rows, value_dim).
POOL_TABLES: dict[str, tuple[str, ...]] = {
    # product-key memory: one value vector per slot
    "memory": ("values",),
    # PEER: expert i is the single neuron  x -> act(down_i · x) · up_i
    "experts": ("down", "up"),
}


class UsageObserver(Protocol):
    """What :meth:`MemoryPool.track_usage` accepts: a sink for the lookups of a pool."""

    def update(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """``indices (..., K)`` int64 rows in ``[0, num_rows)`` and their ``weights (..., K)``."""


class ShardedRead(Protocol):
    """What :meth:`MemoryPool.shard_reads` accepts: the read of a sharded ``values`` table."""

    def __call__(self, values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``values`` the pool's (sharded) table, ``indices, weights (..., K)`` -> ``(..., value_dim)``."""


class MemoryPool(nn.Module):
    """A set of equally long tables read sparsely, shared by any number of layers.

    A product-key pool has ``n_keys²`` rows addressed by two halves of ``n_keys`` sub-keys each; a token-indexed
    table (n-gram hashes, per-token embeddings: rows known from the token ids) gives its ``num_rows`` directly.

    Args:
        n_keys: sub-keys per product-key half; the pool has ``num_rows = n_keys ** 2`` rows. ``None`` with
            ``num_rows`` for a table not addressed by product keys.
        value_dim: width of each row.
        num_rows: the number of rows of a table not addressed by product keys (exclusive with ``n_keys``).
        kind: ``"memory"`` (one ``values`` table) or ``"experts"`` (PEER's ``down`` and ``up`` tables).
        update: ``"dense"``: ordinary gradients for any optimizer; ``"sparse"``: row-sparse gradients and a
            row-wise optimizer, so a step costs O(rows used) instead of O(num_rows).
        lr: learning rate of this pool's tables (``None``: the optimizer's). The paper uses 1e-3 for values.
        lr_scale: multiplier on that learning rate (UltraMem trains its values at 4× the model's lr: ``lr: null,
            lr_scale: 4``); the optimizer group gets ``lr_scale · (lr or the optimizer's lr)``.
        weight_decay: weight decay of this pool's tables.
        init_std: std of the normal init (``None``: ``value_dim ** -0.5``, as in Lample et al. 2019).
        table_device: ``"accelerator"``: the tables move with the model; ``"host"``: they stay in host memory when
            the model moves to an accelerator, and reads copy only the rows used (module docstring, "Host tables").
            Kind ``memory`` only.
    """

    def __init__(
        self,
        n_keys: int | None,
        value_dim: int,
        kind: PoolKind = "memory",
        update: UpdateMode = "dense",
        lr: float | None = 1e-3,
        weight_decay: float = 0.0,
        init_std: float | None = None,
        *,
        num_rows: int | None = None,
        table_device: TableDevice = "accelerator",
        lr_scale: float = 1.0,
    ):
        super().__init__()
        if (n_keys is None) == (num_rows is None):
            raise ValueError(
                f"pool: give exactly one of n_keys (a product-key table of n_keys² rows) or num_rows (a table "
                f"indexed directly), got n_keys={n_keys!r}, num_rows={num_rows!r}"
            )
        if n_keys is not None and (isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 1):
            raise ValueError(f"pool n_keys must be a positive int, got {n_keys!r}")
        if num_rows is not None and (isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1):
            raise ValueError(f"pool num_rows must be a positive int, got {num_rows!r}")
        if not isinstance(value_dim, int) or value_dim < 1:
            raise ValueError(f"pool value_dim must be a positive int, got {value_dim!r}")
        if kind not in POOL_TABLES:
            raise ValueError(f"pool kind must be one of {sorted(POOL_TABLES)}, got {kind!r}")
        if update not in ("dense", "sparse"):
            raise ValueError(f"pool update must be 'dense' or 'sparse', got {update!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"pool lr must be positive or null, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"pool weight_decay must be >= 0, got {weight_decay!r}")
        if table_device not in TABLE_DEVICES:
            raise ValueError(
                f"pool table_device must be 'accelerator' (the tables move with the model) or 'host' (they stay in "
                f"host memory), got {table_device!r}"
            )
        if table_device == "host" and kind != "memory":
            raise ValueError(
                f"pool table_device: host needs kind: memory (tables read with pool.read); a pool of kind {kind!r} "
                f"is read by its layer directly, on the accelerator: use table_device: accelerator"
            )
        if isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float)) or not lr_scale > 0:
            raise ValueError(f"pool lr_scale must be a positive number (1: the lr as is), got {lr_scale!r}")
        self.n_keys = n_keys
        self._num_rows = n_keys**2 if n_keys is not None else num_rows
        self.value_dim = value_dim
        self.kind = kind
        self.update = update
        self.lr = lr
        self.lr_scale = float(lr_scale)
        self.weight_decay = weight_decay
        self.init_std = init_std if init_std is not None else value_dim**-0.5
        self.table_device = table_device
        self.__dict__["_staged"] = []  # StagedRows of prefetched reads (host pools), oldest first
        self.__dict__["prefetch_stats"] = {"staged": 0, "synchronous": 0, "dropped": 0}
        # a host table is made in host memory even under a default-device context (the meta device aside)
        device = "cpu" if table_device == "host" and torch.empty(0).device.type != "meta" else None
        for name in POOL_TABLES[kind]:
            self.register_parameter(name, nn.Parameter(torch.empty(self.num_rows, value_dim, device=device)))
        self.track_usage(None)
        self.shard_reads(None)
        self.reset_parameters()

    @property
    def num_rows(self) -> int:
        """Rows of each table: ``n_keys²`` for a product-key pool, else the ``num_rows`` given."""
        return self._num_rows

    @property
    def product_keyed(self) -> bool:
        """Whether rows are addressed by product keys (``n_keys`` given), as memory and PEER layers need."""
        return self.n_keys is not None

    @property
    def sparse(self) -> bool:
        """Whether reads of this pool produce row-sparse gradients (``update == "sparse"``)."""
        return self.update == "sparse"

    def tables(self) -> dict[str, nn.Parameter]:
        """The pool's tables by name, each ``(num_rows, value_dim)``."""
        return {name: getattr(self, name) for name in POOL_TABLES[self.kind]}

    def reset_parameters(self) -> None:
        for table in self.tables().values():
            nn.init.normal_(table, mean=0.0, std=self.init_std)

    @property
    def on_host(self) -> bool:
        """Whether the tables stay in host memory (``table_device == "host"``, module docstring)."""
        return self.table_device == "host"

    # ----------------------------------------------------------------------------------------- reads
    def read(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_j weights[..., j] · values[indices[..., j]]``, ``(..., K) -> (..., value_dim)`` (kind ``memory``),
        on ``weights.device``.

        Through the installed sharded read when the pool is memory-parallel (see :meth:`shard_reads`). A host pool
        uses the rows :meth:`prefetch` staged for these indices (the same tensor, or equal values), else it
        gathers them now (:func:`memzoo.ops.host_read.host_weighted_gather`).
        """
        if self.sharded_read is not None:
            return self.sharded_read(self.values, indices, weights)
        if self.on_host:
            staged = self._take_staged(indices)
            return host_weighted_gather(self.values, indices, weights, sparse_grad=self.sparse, staged=staged)
        return weighted_gather(self.values, indices, weights, sparse_grad=self.sparse)

    @torch.compiler.disable
    def prefetch(self, indices: torch.Tensor) -> None:
        """Starts moving the rows ``indices (..., K)`` (int64, on the compute device) of a host pool to the device
        where they live, for a later :meth:`read` of the same indices; a no-op for an accelerator pool.

        On CUDA this returns at once (worker thread and side stream, see :mod:`memzoo.ops.host_read`); elsewhere the
        rows are gathered now. Keeps at most :data:`MAX_STAGED` staged reads (the oldest are dropped).
        """
        if not self.on_host:
            return
        staged = self._staged
        staged.append(stage_rows(self.values, indices, indices.device, asynchronous=True))
        while len(staged) > MAX_STAGED:
            staged.pop(0)
            self.prefetch_stats["dropped"] += 1

    @torch.compiler.disable
    def discard_staged(self) -> None:
        """Drops the staged reads no :meth:`read` consumed (the model calls it before prefetching a new batch)."""
        self.prefetch_stats["dropped"] += len(self._staged)
        self._staged.clear()

    @torch.compiler.disable
    def _take_staged(self, indices: torch.Tensor) -> StagedRows | None:
        """The staged read for ``indices``: the same tensor, else equal values (a device sync on CUDA); ``None``
        (and counted as a synchronous read) when none matches or the table changed since staging."""
        match = next((entry for entry in self._staged if entry.indices is indices), None)
        if match is None:
            match = next(
                (entry for entry in self._staged
                 if entry.indices.shape == indices.shape and entry.indices.device == indices.device
                 and torch.equal(entry.indices, indices)),
                None,
            )
        if match is not None:
            self._staged.remove(match)
            if match.version == self.values._version:
                self.prefetch_stats["staged"] += 1
                return match
            self.prefetch_stats["dropped"] += 1
        self.prefetch_stats["synchronous"] += 1
        return None

    def shard_reads(self, read: ShardedRead | None) -> None:
        """Installs ``read(values, indices, weights) -> (..., value_dim)`` for a sharded ``values`` (``None``:
        plain reads). Called by :func:`memzoo.parallel.memory_parallel.apply_memory_parallel`."""
        if read is not None and self.on_host:
            raise ValueError("a pool with table_device: host cannot be memory-parallel (its table is not sharded)")
        self.__dict__["sharded_read"] = read

    # ----------------------------------------------------------------------------------------- placement
    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ``.half()``, ``to_empty``, ...). A host pool takes
        dtype changes and stays in host memory: where ``fn`` would move a table (or its gradient) to another
        device, the table is only cast to the dtype ``fn`` gives (a meta table becomes an empty host one)."""
        if not self.on_host:
            return super()._apply(fn, recurse)
        return super()._apply(_on_host(fn), recurse)

    # ----------------------------------------------------------------------------------------- usage tracking
    def track_usage(self, observer: UsageObserver | None) -> None:
        """Starts reporting this pool's lookups to ``observer`` (``None`` stops). See the module docstring."""
        if observer is not None and not callable(getattr(observer, "update", None)):
            raise TypeError(
                f"track_usage needs an object with update(indices, weights) (e.g. MemoryUsage), "
                f"got {type(observer).__name__}"
            )
        # Stored in __dict__ directly: nn.Module.__setattr__ would register a Metric (an nn.Module) as a submodule.
        self.__dict__["usage_observer"] = observer

    def observe(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        """Reports one lookup, ``indices (..., K)`` int64 and ``weights (..., K)``; a no-op unless tracking.

        Called by blocks after every read. The values are detached; the observer runs outside ``torch.compile``
        graphs (a compiled model recompiles once when an observer is attached, with a graph break here).
        """
        if self.usage_observer is not None:
            _report_usage(self.usage_observer, indices.detach(), weights.detach())

    def extra_repr(self) -> str:
        layout = f" (n_keys={self.n_keys}²)" if self.product_keyed else ""
        return (
            f"kind={self.kind}, rows={self.num_rows}{layout}, value_dim={self.value_dim}, "
            f"update={self.update}, lr={self.lr}, lr_scale={self.lr_scale}, weight_decay={self.weight_decay}"
            + (", table_device=host" if self.on_host else "")
        )


def _on_host(fn):
    """``fn`` (a tensor conversion of ``nn.Module._apply``) with device moves away from the host left out."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        probe = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))  # what fn does to such a tensor
        if probe.device == tensor.device or probe.device.type in ("cpu", "meta"):
            return fn(tensor)
        if tensor.device.type == "meta":
            return torch.empty_like(tensor, device="cpu", dtype=probe.dtype)
        return tensor.to(device="cpu", dtype=probe.dtype)

    return convert


@torch.compiler.disable
def _report_usage(observer: UsageObserver, indices: torch.Tensor, weights: torch.Tensor) -> None:
    observer.update(indices, weights)


def find_pools(module: nn.Module) -> dict[str, MemoryPool]:
    """Every distinct :class:`MemoryPool` registered under ``module``, by its first module path.

    Shared pools appear once (under ``pools.<name>`` in a Transformer; blocks only hold a :class:`PoolRef`),
    private pools under their block's path (``layers.3.ffn.private_pool``).
    """
    found: dict[str, MemoryPool] = {}
    seen: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, MemoryPool) and id(sub) not in seen:
            seen.add(id(sub))
            found[name] = sub
    return found


class PoolRef:
    """A non-owning handle from a block to a pool the model owns (keeps the pool out of the block's state_dict)."""

    __slots__ = ("pool",)

    def __init__(self, pool: MemoryPool):
        self.pool = pool

    def __repr__(self) -> str:
        return f"PoolRef({self.pool.extra_repr()})"


class ReadsPool:
    """Mixin of blocks that read a :class:`MemoryPool`: ``self.pool`` is the table, shared or private.

    :meth:`attach_pool` stores a private pool as the submodule ``private_pool`` (its tables are the block's
    parameters) and a shared one behind a :class:`PoolRef` (its tables are the model's).
    """

    def attach_pool(self, pool: MemoryPool, owned: bool) -> None:
        if owned:
            self.private_pool = pool
        else:
            self._pool_ref = PoolRef(pool)

    @property
    def owns_pool(self) -> bool:
        """Whether the pool is this block's private table (else the model shares it)."""
        return "private_pool" in self._modules

    @property
    def pool(self) -> MemoryPool:
        """The pool this block reads."""
        return self.private_pool if self.owns_pool else self._pool_ref.pool


class ReadsTokenTable(ReadsPool):
    """Mixin of blocks whose private table's rows follow from the token ids alone (hashed n-grams, per-token
    embeddings, lookup experts). Such a block defines ``table_indices(ctx) -> (B, T, K)`` int64 (the rows each
    position reads; with a KV cache they may also depend on ``ctx.state``, which they must not change) and reads
    ``self.pool.read(self.rows_for(ctx), weights)``. With ``table_device: host`` the model's prefetch pass
    (:meth:`prefetch`) stages those rows before the layer runs, and :meth:`rows_for` hands the forward's read the
    very tensor that was staged (no comparison, no device sync)."""

    def table_indices(self, ctx) -> torch.Tensor:  # pragma: no cover - each block defines it
        raise NotImplementedError(f"{type(self).__name__} must define table_indices(ctx)")

    def read_indices(self, ctx) -> torch.Tensor:
        """The indices the block's ``pool.read`` takes (default :meth:`table_indices`; a block reading one row per
        bag returns ``table_indices(ctx).unsqueeze(-1)``)."""
        return self.table_indices(ctx)

    def rows_for(self, ctx) -> torch.Tensor:
        """:meth:`read_indices` of ``ctx``: the tensor :meth:`prefetch` staged for this ``ctx`` (taken once, by the
        forward that follows it), else computed now."""
        staged = self.__dict__.pop("_staged_rows", None)
        if staged is not None and staged[0] is ctx.token_ids and staged[1] is ctx.state:
            return staged[2]
        return self.read_indices(ctx)

    def prefetch(self, ctx) -> None:
        """Stages this forward's rows of a host table (a no-op on the accelerator, or with no table)."""
        if self.owns_pool and self.pool.on_host:
            rows = self.read_indices(ctx)
            self.__dict__["_staged_rows"] = (ctx.token_ids, ctx.state, rows)
            self.pool.prefetch(rows)


def resolve_pool(
    block_name: str,
    pool: MemoryPool | str | None,
    *,
    kind: PoolKind,
    n_keys: int | None,
    value_dim: int | None,
    default_value_dim: int,
    **own_pool_kwargs,
) -> tuple[MemoryPool, bool]:
    """The pool a block reads, and whether the block owns it.

    A shared pool (a :class:`MemoryPool` passed in by the model) is checked against the block's own
    ``n_keys``/``value_dim`` if the block gives them; without a shared pool the block gets a private one built
    from ``n_keys`` (required) and ``value_dim`` (default ``default_value_dim``).
    """
    if isinstance(pool, str):
        raise ValueError(
            f"{block_name}: pool {pool!r} is a name; names are resolved by the model's `pools:` config. "
            f"Build the block inside a Transformer with pools={{{pool!r}: {{...}}}}, or pass a MemoryPool."
        )
    if pool is not None:
        if not isinstance(pool, MemoryPool):
            raise TypeError(f"{block_name}: pool must be a MemoryPool, got {type(pool).__name__}")
        if pool.kind != kind:
            raise ValueError(f"{block_name}: needs a pool of kind {kind!r}, but its pool has kind {pool.kind!r}")
        if not pool.product_keyed:
            raise ValueError(
                f"{block_name}: reads its pool by product keys, but the pool was built with num_rows={pool.num_rows} "
                f"and no n_keys; give the pool n_keys (num_rows = n_keys²)"
            )
        if n_keys is not None and n_keys != pool.n_keys:
            raise ValueError(
                f"{block_name}: n_keys={n_keys} differs from its shared pool's n_keys={pool.n_keys}; "
                f"drop n_keys from the layer (the pool defines it) or make them equal"
            )
        if value_dim is not None and value_dim != pool.value_dim:
            raise ValueError(
                f"{block_name}: value_dim={value_dim} differs from its shared pool's value_dim="
                f"{pool.value_dim}; layers sharing a pool read rows of the pool's width"
            )
        return pool, False
    if n_keys is None:
        raise ValueError(f"{block_name}: give either a shared `pool` or `n_keys` for a private table")
    return MemoryPool(n_keys, value_dim or default_value_dim, kind=kind, **own_pool_kwargs), True

