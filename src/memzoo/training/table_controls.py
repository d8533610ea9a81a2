"""Controls that tell what a model's memory tables store (the capacity study's ``--controls``).

:class:`TableControl` is a Lightning callback acting on every :class:`~memzoo.blocks.pool.MemoryPool` of the model
(pools shared by several layers count once; each pool's ``tables()``: ``values``, or PEER's / UltraMemV2's ``down``
and ``up``, all ``(num_rows, width)``):

- ``tie_rows``: every table's rows set to their mean at the start of training and again after every optimizer step,
  so the table holds one row's worth of values (a table of one row read by every address: the nearest equivalent of
  Engram's ``table: single_row`` for a product-key pool, whose router needs ``n_keys²`` rows to choose from).
- ``shuffle_rows``: before the last validation (``global_step >= max_steps``) the rows of every table are permuted
  (one seeded permutation per pool, the same for all of its tables, so a PEER expert keeps its down and up rows
  together): the trained values, read at the wrong addresses. Training itself is untouched.

Freezing a table at init needs no callback: ``freeze: ["pools.*"]`` (:mod:`memzoo.training.freezing`).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.callbacks import Callback

from memzoo.blocks.pool import MemoryPool

ControlMode = Literal["tie_rows", "shuffle_rows"]
MODES = ("tie_rows", "shuffle_rows")


def memory_pools(module: torch.nn.Module) -> list[MemoryPool]:
    """The distinct memory pools of ``module`` (``modules()`` yields a shared pool once)."""
    return [m for m in module.modules() if isinstance(m, MemoryPool)]


@torch.no_grad()
def tie_rows(pools: list[MemoryPool]) -> None:
    """Sets every row of every table to the table's mean row (in place)."""
    for pool in pools:
        for table in pool.tables().values():
            table.copy_(table.mean(0, keepdim=True).expand_as(table))


@torch.no_grad()
def shuffle_rows(pools: list[MemoryPool], seed: int = 0) -> list[torch.Tensor]:
    """Permutes the rows of every table (in place), one permutation per pool; returns the permutations."""
    generator = torch.Generator().manual_seed(seed)
    perms = []
    for pool in pools:
        tables = list(pool.tables().values())
        perm = torch.randperm(tables[0].shape[0], generator=generator)
        for table in tables:
            table.copy_(table[perm.to(table.device)])
        perms.append(perm)
    return perms


class TableControl(Callback):
    """``mode``: ``tie_rows`` | ``shuffle_rows`` (module docstring); ``seed``: of the shuffle's permutation.

    Raises ``ValueError`` at fit start for a model without memory pools (nothing to control)."""

    def __init__(self, mode: ControlMode, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"TableControl mode must be one of {MODES}, got {mode!r}")
        self.mode, self.seed, self.shuffled = mode, seed, False

    def _pools(self, pl_module) -> list[MemoryPool]:
        pools = memory_pools(pl_module)
        if not pools:
            raise ValueError(f"TableControl({self.mode!r}): the model has no memory pool (no table to control)")
        return pools

    def on_fit_start(self, trainer, pl_module) -> None:
        pools = self._pools(pl_module)
        if self.mode == "tie_rows":
            tie_rows(pools)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode == "tie_rows":
            tie_rows(self._pools(pl_module))

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.mode == "shuffle_rows" and not self.shuffled and trainer.max_steps > 0 \
                and trainer.global_step >= trainer.max_steps:
            shuffle_rows(self._pools(pl_module), self.seed)
            self.shuffled = True
