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
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
import torch.nn as nn

from memzoo.ops import weighted_gather

UpdateMode = Literal["dense", "sparse"]
PoolKind = Literal["memory", "experts"]

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
        for name in POOL_TABLES[kind]:
            self.register_parameter(name, nn.Parameter(torch.empty(self.num_rows, value_dim)))
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

    # ----------------------------------------------------------------------------------------- reads
    def read(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_j weights[..., j] · values[indices[..., j]]``, ``(..., K) -> (..., value_dim)`` (kind ``memory``).

        Through the installed sharded read when the pool is memory-parallel (see :meth:`shard_reads`).
        """
        if self.sharded_read is not None:
            return self.sharded_read(self.values, indices, weights)
        return weighted_gather(self.values, indices, weights, sparse_grad=self.sparse)

    def shard_reads(self, read: ShardedRead | None) -> None:
        """Installs ``read(values, indices, weights) -> (..., value_dim)`` for a sharded ``values`` (``None``:
        plain reads). Called by :func:`memzoo.parallel.memory_parallel.apply_memory_parallel`."""
        self.__dict__["sharded_read"] = read

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
        )


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

