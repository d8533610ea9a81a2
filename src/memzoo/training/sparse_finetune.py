"""Sparse memory finetuning (Lin et al., "Continual Learning via Sparse Memory Finetuning", 2025, arXiv 2510.15103).

Each step updates only the ``top_t`` memory slots (value rows) the batch read that rank highest against background
statistics (TF-IDF or KL, see :mod:`memzoo.training.slot_stats`); every other parameter is frozen. In YAML, as a
trainer callback::

    trainer:
      callbacks:
        - class_path: memzoo.training.sparse_finetune.SparseMemoryFinetuning
          init_args: {stats: background.pt, top_t: 500, rank: tfidf, optimizer: sgd, lr: 1.0}

Mechanics, per optimizer step: a :class:`~memzoo.training.slot_stats.SlotCounter` on each finetuned pool counts the
batch's lookups (all micro-batches of the step); before the optimizer runs, each table's gradient is replaced by a
row-sparse one holding only the selected rows; a row-wise optimizer (:class:`~memzoo.training.rowwise_optim.RowwiseSGD` or
:class:`~memzoo.training.rowwise_optim.LazyAdam`, both touching only the rows in the gradient) updates them. Rows outside
the selection, their optimizer state and every frozen parameter stay bit-identical. The callback owns the optimizer:
:class:`~memzoo.training.module.LanguageModel` asks a callback with ``build_optimizer`` for it (its LR schedule
still applies).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn as nn
from torch.optim import Optimizer

from memzoo.blocks.pool import MemoryPool, find_pools
from memzoo.training.optim import LazyAdam, RowwiseSGD
from memzoo.training.slot_stats import (
    RANKINGS,
    PoolSlotStats,
    Ranking,
    SlotCounter,
    SlotStats,
    SlotStatsError,
    check_top_t,
    slot_scores,
    top_slots,
)

OPTIMIZERS = ("sgd", "adam")


class SparseMemoryFinetuning(L.Callback):
    """Finetunes only the top-``top_t`` slots per step of the model's memory pools (module docstring).

    Args:
        stats: background slot statistics (a file ``memzoo slot-stats`` wrote).
        top_t: slots updated per pool and step (``<=`` the pool's rows).
        rank: ``tfidf`` | ``kl``: how the batch's slots are ranked against the background.
        idf_power: ``tfidf`` scores ``tf · idf^idf_power``; 1 is plain TF-IDF, larger values prefer slots the
            background rarely reads over slots the batch reads often (less forgetting, slower learning; see
            :mod:`memzoo.training.slot_stats`).
        optimizer: ``sgd`` (row-wise SGD) | ``adam`` (row-wise AdamW, per-row steps).
        lr: learning rate of the value rows.
        weight_decay: decoupled weight decay, applied to selected rows only.
        pools: pool names to finetune (``pools.<name>`` as in the model, e.g. ``pools.shared``); ``None``: all.
        count_loss_positions_only: rank by the lookups at positions the loss covers (``labels != -100``) only,
            instead of every position of the batch.
    """

    def __init__(
        self,
        stats: str,
        top_t: int = 500,
        rank: Ranking = "tfidf",
        idf_power: float = 1.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 1e-2,
        weight_decay: float = 0.0,
        pools: list[str] | None = None,
        count_loss_positions_only: bool = False,
    ):
        if rank not in RANKINGS:
            raise SlotStatsError(f"rank must be one of {RANKINGS}, got {rank!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}")
        if not idf_power > 0:
            raise SlotStatsError(f"idf_power must be > 0, got {idf_power!r}")
        if rank != "tfidf" and idf_power != 1.0:
            raise SlotStatsError(f"idf_power applies to rank: tfidf only, got rank {rank!r} with idf_power {idf_power}")
        if isinstance(top_t, bool) or not isinstance(top_t, int) or top_t < 1:
            raise SlotStatsError(f"top_t must be a positive int, got {top_t!r}")
        self.stats_path = stats
        self.top_t, self.rank, self.idf_power, self.optimizer_name = top_t, rank, float(idf_power), optimizer
        self.lr, self.weight_decay, self.pool_names = lr, weight_decay, pools
        self.count_loss_positions_only = count_loss_positions_only
        self.pools: dict[str, MemoryPool] = {}
        self.background: dict[str, PoolSlotStats] = {}
        self.counters: dict[str, SlotCounter] = {}
        self.n_docs = 0
        self.selected: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------- set-up
    def prepare(self, model: nn.Module) -> None:
        """Loads and checks the statistics, freezes every parameter but the finetuned pools' tables and switches
        those pools to row-sparse gradients. ``model``: the decoder (a Transformer)."""
        found = find_pools(model)
        if not found:
            raise SlotStatsError("sparse memory finetuning needs a model with memory pools; this one has none")
        names = self.pool_names if self.pool_names is not None else list(found)
        unknown = [n for n in names if n not in found]
        if unknown:
            raise SlotStatsError(f"pools {unknown} are not in the model; its pools are {sorted(found)}")
        stats = SlotStats.load(self.stats_path)
        self.n_docs = stats.n_docs
        self.pools = {name: found[name] for name in names}
        for name, pool in self.pools.items():
            self.background[name] = stats.for_pool(name, pool.num_rows)
            check_top_t(self.top_t, name, pool.num_rows)
        for param in model.parameters():
            param.requires_grad_(False)
        for name, pool in self.pools.items():
            pool.update = "sparse"
            for table in pool.tables().values():
                table.requires_grad_(True)
            self.counters[name] = SlotCounter(pool.num_rows, device=next(iter(pool.tables().values())).device,
                                              track_docs=False)

    def build_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        """The row-wise optimizer over the finetuned pools' tables (call after :meth:`prepare`)."""
        if not self.pools:
            raise RuntimeError("SparseMemoryFinetuning.build_optimizer: call prepare(model) first")
        groups = [{"params": list(pool.tables().values()), "name": name} for name, pool in self.pools.items()]
        if self.optimizer_name == "sgd":
            return RowwiseSGD(groups, lr=self.lr, weight_decay=self.weight_decay)
        return LazyAdam(groups, lr=self.lr, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------------------------------- per step
    def attach(self, labels: torch.Tensor | None = None) -> None:
        """Starts counting the finetuned pools' lookups (before a forward); with ``count_loss_positions_only``,
        ``labels (B, T)`` mark the counted positions (``!= -100``)."""
        for name, pool in self.pools.items():
            counter = self.counters[name]
            counter.position_mask = None
            if self.count_loss_positions_only:
                if labels is None:
                    raise ValueError("count_loss_positions_only needs the batch's labels in attach(labels)")
                counter.position_mask = labels != -100
            pool.track_usage(counter)

    def detach(self) -> None:
        for pool in self.pools.values():
            pool.track_usage(None)

    @torch.no_grad()
    def select_and_mask(self) -> dict[str, torch.Tensor]:
        """Ranks the slots read since the last call, keeps the top ``top_t`` per pool and restricts every table's
        gradient to those rows (a row-sparse gradient). Returns ``{pool: selected slots (ascending)}``."""
        self.selected = {}
        for name, pool in self.pools.items():
            counter = self.counters[name]
            tf = counter.counts
            top = top_slots(tf, slot_scores(tf, self.background[name], self.n_docs, self.rank, self.idf_power), self.top_t)
            self.selected[name] = top
            for table in pool.tables().values():
                if table.grad is not None:
                    table.grad = _restrict_rows(table.grad, top)
            counter.reset()
        return self.selected

    # ------------------------------------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.prepare(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.attach(batch.get("labels") if isinstance(batch, dict) else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        selected = self.select_and_mask()
        for name, rows in selected.items():
            pl_module.log(f"train/smf/{name}/slots_updated", float(rows.numel()))


def _restrict_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``grad`` (dense or row-sparse, ``(N, D)``) restricted to ``rows`` (ascending, distinct), as a row-sparse
    coalesced gradient."""
    rows = rows.to(grad.device)
    if grad.is_sparse:
        grad = grad.coalesce()
        have = grad.indices()[0]
        keep = torch.isin(have, rows)
        indices, values = have[keep], grad.values()[keep]
    else:
        indices, values = rows, grad.index_select(0, rows)
    return torch.sparse_coo_tensor(indices.unsqueeze(0), values, grad.shape, is_coalesced=True, check_invariants=False)
