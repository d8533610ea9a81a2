"""Data-parallel exchange of row-sparse table gradients: every rank ends with the mean of all ranks' gradients.

A memory pool with ``update: sparse`` has a row-sparse COO gradient ``(N, D)`` holding the ``U`` rows a rank's
batch read. DDP cannot reduce it (it needs dense storage, and NCCL has no sparse all-reduce), and a dense all-reduce
of the table gradient would move O(N·D) per step for O(U·D) of content. :func:`all_reduce_row_sparse_` instead
gathers each rank's coalesced rows: per table, one ``all_gather`` of the row indices and one of the row values
(both padded to the largest ``U`` over ranks, so the collectives have one shape on every rank, as NCCL needs), then
every rank concatenates the ranks' rows in rank order, sums duplicate rows (``coalesce``: the rows come out sorted)
and divides by the world size. Every rank runs the same arithmetic on the same gathered tensors, so the tables stay
bitwise equal across ranks. Only dense collectives are used (gloo and NCCL alike).

Cost per table and step, for ``W`` ranks, ``U_max`` the most rows any rank touched, ``b`` bytes per element: each
rank contributes ``U_max · (8 + D·b)`` bytes and receives ``(W − 1)`` such contributions (a ring all-gather sends
``(W − 1) · U_max · (8 + D·b)`` bytes per rank), against ``2 · (W − 1) / W · N · D · b`` for a ring all-reduce of the
dense gradient. :func:`exchange_bytes_per_rank` and :func:`dense_all_reduce_bytes_per_rank` give both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "ExchangeStats",
    "all_reduce_row_sparse_",
    "dense_all_reduce_bytes_per_rank",
    "exchange_bytes_per_rank",
    "reduce_row_sparse",
]

INDEX_BYTES = 8  # int64 row index


@dataclass
class ExchangeStats:
    """What one :func:`all_reduce_row_sparse_` call moved: ``rows_local`` (rows this rank touched, per table),
    ``rows_max`` (the padded row count of each table's all-gather), and ``bytes_sent`` (bytes this rank sends in a
    ring all-gather of every table plus the row counts)."""

    rows_local: list[int]
    rows_max: list[int]
    bytes_sent: int


def exchange_bytes_per_rank(rows_max: int, value_dim: int, world_size: int, element_bytes: int = 4) -> int:
    """Bytes one rank sends to exchange a table's touched rows by ring all-gather: ``(W − 1) · U_max · (8 + D·b)``."""
    return (world_size - 1) * rows_max * (INDEX_BYTES + value_dim * element_bytes)


def dense_all_reduce_bytes_per_rank(num_rows: int, value_dim: int, world_size: int, element_bytes: int = 4) -> int:
    """Bytes one rank sends in a ring all-reduce of a dense ``(N, D)`` gradient: ``2 · (W − 1) / W · N · D · b``."""
    return 2 * (world_size - 1) * num_rows * value_dim * element_bytes // world_size


def _local_rows(table: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (U,) int64, values (U, D))`` of ``grad``, the gradient of ``table``: a sparse COO gradient
    coalesced, none when absent."""
    if grad is None:
        return (torch.empty(0, dtype=torch.int64, device=table.device),
                table.new_empty(0, table.shape[1]))
    if not grad.is_sparse:
        raise ValueError(
            f"all_reduce_row_sparse_: a table of shape {tuple(table.shape)} has a dense gradient; dense-update "
            f"pools are reduced by DDP's buckets, only update: sparse tables belong here"
        )
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def _pad_rows(rows: torch.Tensor, values: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows (U,)``, ``values (U, D)`` extended to ``length`` rows (the padding is never read: receivers slice
    each rank's real count), without a copy when ``U == length``."""
    if rows.numel() == length:
        return rows.contiguous(), values.contiguous()
    padded_rows = rows.new_empty(length)
    padded_values = values.new_empty(length, values.shape[1])
    padded_rows[: rows.numel()] = rows
    padded_values[: rows.numel()] = values
    return padded_rows, padded_values


def all_reduce_row_sparse_(tables: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> ExchangeStats:
    """Replaces each table's row-sparse ``.grad`` by the mean over the ranks of ``group``, coalesced.

    Args:
        tables: ``(N, D)`` parameters, in the same order on every rank (a collective runs per table). A table
            without a gradient on a rank (its batch read no row) contributes no rows; after the call every table
            that any rank touched has a gradient on every rank.
        group: the data-parallel process group (default: the world).

    Returns:
        :class:`ExchangeStats` of the call. Time O(W · U_max · D) per table; no O(N · D) tensor is made.
    """
    grads, stats = reduce_row_sparse(tables, [table.grad for table in tables], group)
    for table, grad in zip(tables, grads, strict=True):
        if grad is not None:
            table.grad = grad
    return stats


def reduce_row_sparse(
    tables: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    group: dist.ProcessGroup | None = None,
    *,
    average: bool = True,
) -> tuple[list[torch.Tensor | None], ExchangeStats]:
    """The exchange of :func:`all_reduce_row_sparse_` on plain tensors: ``grads[i]`` (row-sparse COO or ``None``)
    of the ``(N, D)`` tensor ``tables[i]`` (its shape, dtype and device), summed over the ranks of ``group`` and,
    with ``average``, divided by their number. Returns the coalesced results (``None`` where no rank had rows) and
    the :class:`ExchangeStats`. Memory parallelism passes each rank's local column shard and its gradient with
    ``average=False`` (the shard's gradient is pre-scaled)."""
    world = dist.get_world_size(group)
    local = [_local_rows(table, grad) for table, grad in zip(tables, grads, strict=True)]
    counts = torch.tensor([rows.numel() for rows, _ in local], dtype=torch.int64)
    device = tables[0].device if tables else torch.device("cpu")
    counts = counts.to(device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts, group=group)
    per_rank = torch.stack(all_counts).cpu()  # (W, tables)
    bytes_sent = (world - 1) * counts.numel() * INDEX_BYTES
    rows_max = []
    reduced: list[torch.Tensor | None] = []
    for t, (table, (rows, values)) in enumerate(zip(tables, local, strict=True)):
        sizes = per_rank[:, t].tolist()
        u_max = max(sizes)
        rows_max.append(u_max)
        if u_max == 0:
            reduced.append(None)
            continue
        bytes_sent += exchange_bytes_per_rank(u_max, table.shape[1], world, values.element_size())
        padded_rows, padded_values = _pad_rows(rows, values, u_max)
        gathered_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        gathered_values = [torch.empty_like(padded_values) for _ in range(world)]
        dist.all_gather(gathered_rows, padded_rows, group=group)
        dist.all_gather(gathered_values, padded_values, group=group)
        all_rows = torch.cat([r[:n] for r, n in zip(gathered_rows, sizes, strict=True)])
        all_values = torch.cat([v[:n] for v, n in zip(gathered_values, sizes, strict=True)])
        summed = torch.sparse_coo_tensor(all_rows.unsqueeze(0), all_values, table.shape, check_invariants=False)
        summed = summed.coalesce()
        # the mean, rebuilt from the coalesced parts (dividing the sparse tensor itself is an order slower on CPU)
        values = summed.values().div_(world) if average else summed.values()
        reduced.append(torch.sparse_coo_tensor(summed.indices(), values, table.shape, is_coalesced=True,
                                               check_invariants=False))
    return reduced, ExchangeStats([rows.numel() for rows, _ in local], rows_max, bytes_sent)
