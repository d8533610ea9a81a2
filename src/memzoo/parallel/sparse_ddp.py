"""``SparseDDPStrategy``: Lightning's ``DDPStrategy`` plus the row exchange of row-sparse table gradients.

DDP reduces dense gradients in buckets; it cannot reduce the row-sparse gradients of ``update: sparse`` pools
(``Cannot access storage of SparseTensorImpl``), and a dense all-reduce of them would move the whole table. So
this strategy, on top of ``DDPStrategy``:

1. before wrapping the model (:meth:`SparseDDPStrategy.configure_ddp`) leaves every sparse pool's table out of DDP
   (:func:`~memzoo.parallel.torch_private.ignore_in_ddp`: DDP neither buckets nor broadcasts it) and copies rank
   0's tables to every rank (after a checkpoint was restored), as DDP does for the weights it manages; dense-update
   pools stay in DDP's buckets like any weight;
2. once per optimizer step (:meth:`SparseDDPStrategy.optimizer_step`: right after the backward of the last
   micro-batch of gradient accumulation, before the ``on_before_optimizer_step`` hooks and gradient clipping)
   replaces each sparse table's gradient by the mean over ranks, exchanging only the touched rows
   (:mod:`memzoo.parallel.sparse_grad_sync`). Clipping (``clip_dense_grad_norm_``) leaves row-sparse gradients to
   their row-wise optimizer;
3. turns on DDP's ``find_unused_parameters`` for models with MoE blocks (experts no token chose get no gradient, as
   in one process), unless ``find_unused_parameters`` was given.

With every rank's gradients the global mean, the row-wise optimizer steps identical rows identically on every rank,
so weights and optimizer states stay equal across ranks, and rank 0's checkpoint is the run's. Without sparse pools
the strategy is ``DDPStrategy`` (plus 3.). The ``memzoo`` CLI runs ``--trainer.strategy ddp`` with it; a plain
``DDPStrategy`` given a model with sparse pools is refused before training (:func:`check_strategy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from memzoo.blocks.pool import find_pools
from memzoo.parallel.sparse_grad_sync import ExchangeStats, all_reduce_row_sparse_
from memzoo.parallel.torch_private import ddp_wrapper_kwargs, ignore_in_ddp

__all__ = ["RowSparseSync", "SparseDDPStrategy", "check_strategy", "sparse_ddp_for", "sparse_tables"]


def sparse_tables(module: nn.Module) -> dict[str, nn.Parameter]:
    """The tables of every ``update: sparse`` pool under ``module``, by parameter name (as in
    ``module.named_parameters()``), in a fixed order."""
    tables = {id(t) for pool in find_pools(module).values() if pool.sparse for t in pool.tables().values()}
    return {name: p for name, p in module.named_parameters() if id(p) in tables}


def _flattens_parameters(strategy: object) -> bool:
    """FSDP and DeepSpeed flatten parameters into sharded buffers (no row-sparse ``.grad`` possible)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy) or type(strategy).__name__ == "DeepSpeedStrategy"


def check_strategy(module: nn.Module, strategy: object) -> None:
    """Raises before training if ``strategy`` cannot run the update mode of one of ``module``'s pools.

    Sparse-update pools need row-sparse ``.grad`` tensors on whole tables and, over several processes, their row
    exchange: a single device and :class:`SparseDDPStrategy` run them; a plain ``DDPStrategy`` would not reduce
    them, and strategies that flatten parameters (FSDP, DeepSpeed) cannot hold them. (``MemoryParallelStrategy``
    checks its own pools.) Pools with ``table_device: host`` need a single device (``SingleDeviceStrategy``).
    """
    pools = find_pools(module)
    host = sorted(name for name, pool in pools.items() if pool.on_host)
    if host and not isinstance(strategy, SingleDeviceStrategy):
        raise ValueError(
            f"strategy {type(strategy).__name__} cannot train pools with table_device: host ({', '.join(host)}): host "
            f"tables train on a single device (Lightning's SingleDeviceStrategy, e.g. --trainer.devices 1); DDP "
            f"would need every parameter on the accelerator, and FSDP, DeepSpeed and memory parallelism shard tables "
            f"on it. Train on one device, or set table_device: accelerator on these pools."
        )
    sparse = sorted(name for name, pool in pools.items() if pool.sparse)
    if not sparse or isinstance(strategy, SparseDDPStrategy):
        return
    if _flattens_parameters(strategy):
        raise ValueError(
            f"strategy {type(strategy).__name__} cannot train pools with update: sparse ({', '.join(sparse)}): it "
            f"flattens parameters into sharded buffers, which cannot hold row-sparse gradients. Use "
            f"--trainer.strategy ddp, memzoo.parallel.strategy.MemoryParallelStrategy (FSDP2 for the dense weights, "
            f"sharded sparse pools), or set update: dense on these pools."
        )
    if isinstance(strategy, DDPStrategy):
        raise ValueError(
            f"strategy {type(strategy).__name__} cannot train pools with update: sparse ({', '.join(sparse)}): DDP "
            f"does not reduce row-sparse gradients. Use memzoo.parallel.SparseDDPStrategy (what the memzoo CLI runs "
            f"for --trainer.strategy ddp), or set update: dense on these pools."
        )


def _has_moe(module: nn.Module) -> bool:
    from memzoo.blocks.moe import MoE

    return any(isinstance(m, MoE) for m in module.modules())


class SparseDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that exchanges the touched rows of ``update: sparse`` pool tables (module docstring).

    Args:
        find_unused_parameters: DDP's option; ``None`` (default): on for models with MoE blocks, off otherwise.
        *args, **kwargs: as ``DDPStrategy`` (``process_group_backend``, ``timeout``, ``start_method``, ...).

    ``row_sparse_sync``: the :class:`RowSparseSync` of a fit with sparse tables on more than one process (its
    ``last_stats`` says what the latest exchange moved), else ``None``.
    """

    def __init__(self, *args: Any, find_unused_parameters: bool | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.find_unused_parameters = find_unused_parameters
        self.row_sparse_sync: RowSparseSync | None = None

    def configure_ddp(self) -> None:
        """Leaves sparse tables out of DDP, sets ``find_unused_parameters``, wraps the model (``DDPStrategy``), then
        copies rank 0's sparse tables to every rank."""
        from lightning.pytorch.utilities import rank_zero_info

        module = self.model  # the LightningModule, not yet wrapped
        tables = sparse_tables(module)
        ignore_in_ddp(module, tables)
        find_unused = self.find_unused_parameters
        if find_unused is None and _has_moe(module):
            find_unused = True
            rank_zero_info(
                "memzoo: the model has MoE blocks, whose unchosen experts get no gradient; DDP runs with "
                "find_unused_parameters=True (SparseDDPStrategy(find_unused_parameters=False) turns it off)"
            )
        if find_unused is not None:
            ddp_wrapper_kwargs(self)["find_unused_parameters"] = find_unused
        super().configure_ddp()
        self.row_sparse_sync = RowSparseSync(list(tables.values())) if tables and self.world_size > 1 else None
        if self.row_sparse_sync is not None:
            self.row_sparse_sync.broadcast_tables()

    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """The optimizer step, with the sparse tables' gradients averaged over ranks right after the backward."""
        sync = self.row_sparse_sync
        if sync is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)

        def closure_then_exchange() -> Any:
            result = closure()
            sync.all_reduce_()
            return result

        return super().optimizer_step(optimizer, closure_then_exchange, model, **kwargs)

    def teardown(self) -> None:
        self.row_sparse_sync = None
        super().teardown()


def sparse_ddp_for(name: object) -> SparseDDPStrategy | None:
    """The :class:`SparseDDPStrategy` that stands in for Lightning's DDP strategy name ``name`` (``"ddp"``,
    ``"ddp_spawn"``, ``"ddp_find_unused_parameters_true"``, ...) with the same settings; ``None`` for any other
    value. The ``memzoo`` CLI runs DDP through it, so a sparse pool never meets a plain DDP."""
    from lightning.pytorch.strategies import StrategyRegistry

    if not isinstance(name, str) or name not in StrategyRegistry:
        return None
    entry = StrategyRegistry[name]
    if entry["strategy"] is not DDPStrategy:
        return None
    return SparseDDPStrategy(**entry["init_params"])


class RowSparseSync:
    """The sparse tables of a data-parallel model and their exchange (see the module docstring).

    ``last_stats``: the :class:`~memzoo.parallel.sparse_grad_sync.ExchangeStats` of the latest exchange."""

    def __init__(self, tables: Sequence[nn.Parameter], group: dist.ProcessGroup | None = None):
        self.tables = list(tables)
        self.group = group
        self.last_stats: ExchangeStats | None = None

    @torch.no_grad()
    def broadcast_tables(self) -> None:
        """Copies rank 0's tables to every rank (once, before training: DDP does not broadcast ignored ones)."""
        for table in self.tables:
            dist.broadcast(table.data, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                           group=self.group)

    def all_reduce_(self) -> ExchangeStats:
        """Every table's row-sparse gradient becomes the mean over ranks (call once per optimizer step)."""
        self.last_stats = all_reduce_row_sparse_(self.tables, self.group)
        return self.last_stats
