"""Data-parallel training of memzoo models on Lightning's ``DDPStrategy`` (``trainer.strategy: ddp``), every pool mode.

DDP reduces dense gradients in buckets; it cannot reduce the row-sparse gradients of ``update: sparse`` pools
(``Cannot access storage of SparseTensorImpl``) and a dense all-reduce of them would move the whole table. So:

1. :func:`prepare_data_parallel` (called from ``LanguageModel.setup``, before Lightning wraps the module in DDP)
   checks that the strategy can run every pool's update mode, and lists the sparse pools' tables in DDP's
   ``_ddp_params_and_buffers_to_ignore``: DDP neither buckets nor broadcasts them. Dense-update pools stay in DDP's
   buckets like any weight.
2. :meth:`RowSparseSync.broadcast_tables` (``on_fit_start``, after a checkpoint is restored) copies rank 0's
   sparse tables to every rank, as DDP does for the parameters it manages.
3. :meth:`RowSparseSync.all_reduce_` (``on_before_optimizer_step``: once per optimizer step, after the last
   micro-batch of gradient accumulation, before gradient clipping) replaces each sparse table's gradient by the mean
   over ranks, exchanging only touched rows (:mod:`memzoo.parallel.sparse_grad_sync`). Gradient clipping
   (``clip_dense_grad_norm_``) leaves row-sparse gradients to their row-wise optimizer, so its result does not
   depend on when the rows were exchanged.

With every rank's gradients the global mean, the row-wise optimizer steps identical rows identically on every rank,
so weights and optimizer states stay equal across ranks, and rank 0's checkpoint is the run's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from memzoo.blocks.pool import find_pools
from memzoo.parallel.sparse_grad_sync import ExchangeStats, all_reduce_row_sparse_

__all__ = ["RowSparseSync", "prepare_data_parallel", "sparse_tables"]


def sparse_tables(module: nn.Module) -> dict[str, nn.Parameter]:
    """The tables of every ``update: sparse`` pool under ``module``, by parameter name (as in
    ``module.named_parameters()``), in a fixed order."""
    tables = {id(t) for pool in find_pools(module).values() if pool.sparse for t in pool.tables().values()}
    return {name: p for name, p in module.named_parameters() if id(p) in tables}


def _strategy_kind(strategy: object) -> str:
    """``"ddp"``, ``"single"``, ``"flat"`` (FSDP, DeepSpeed: parameters flattened into sharded buffers) or the
    class name of another strategy."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    if isinstance(strategy, DDPStrategy):
        return "ddp"
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    if isinstance(strategy, FSDPStrategy) or type(strategy).__name__ == "DeepSpeedStrategy":
        return "flat"
    return type(strategy).__name__


def check_strategy(module: nn.Module, strategy: object) -> None:
    """Raises before training if ``strategy`` cannot run the update mode of one of the module's pools.

    Sparse-update pools need row-sparse ``.grad`` tensors on whole tables: single-device and DDP strategies keep
    them; strategies that flatten parameters into sharded buffers (FSDP, DeepSpeed) cannot.
    """
    if _strategy_kind(strategy) != "flat":
        return
    sparse = sorted(name for name, pool in find_pools(module).items() if pool.sparse)
    if sparse:
        raise ValueError(
            f"strategy {type(strategy).__name__} cannot train pools with update: sparse ({', '.join(sparse)}): it "
            f"flattens parameters into sharded buffers, which cannot hold row-sparse gradients. Use "
            f"--trainer.strategy ddp, or set update: dense on these pools."
        )


def prepare_data_parallel(module: nn.Module, strategy: object) -> RowSparseSync | None:
    """Checks ``strategy`` (:func:`check_strategy`) and, under DDP, keeps sparse tables out of DDP's buckets.

    Returns the :class:`RowSparseSync` of the sparse tables under DDP with more than one process (``None``
    otherwise: nothing to exchange). Call before the strategy wraps the module (``LightningModule.setup``)."""
    check_strategy(module, strategy)
    if _strategy_kind(strategy) != "ddp":
        return None
    _find_unused_parameters_for_moe(module, strategy)
    tables = sparse_tables(module)
    if tables:
        from torch.nn.parallel import DistributedDataParallel

        ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(tables)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
    if getattr(strategy, "world_size", 1) <= 1 or not tables:
        return None
    return RowSparseSync(list(tables.values()))


def _find_unused_parameters_for_moe(module: nn.Module, strategy: object) -> None:
    """A MoE's experts that no token of a rank's batch chose get no gradient there (an optimizer skips them, as
    in one process); DDP must then look for unused parameters, which ``ddp`` does not by default. Turns it on
    (and says so) when the module has a MoE block."""
    from memzoo.blocks.moe import MoE

    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if kwargs is None or kwargs.get("find_unused_parameters") or not any(isinstance(m, MoE) for m in module.modules()):
        return
    from lightning.pytorch.utilities import rank_zero_info

    kwargs["find_unused_parameters"] = True
    rank_zero_info(
        "memzoo: the model has MoE blocks, whose unchosen experts get no gradient; DDP runs with "
        "find_unused_parameters=True (as --trainer.strategy ddp_find_unused_parameters_true would)"
    )


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
