"""The CPU kernels behind :mod:`memzoo.ops.sparse_gather`, in vectorised PyTorch: ``weighted_gather``'s forward
always; the others for dtypes the C++ kernels of :mod:`memzoo.ops.cpu_read` do not take (bf16, fp16) or when those
cannot be built.

All kernels take a flat batch of ``B`` bags of ``K`` row indices into a table ``values (N, D)``:

- :func:`weighted_gather`  ``out[b] = Σ_j w[b,j] · values[idx[b,j]]``                       ``(B, D)``
- :func:`gather_dot`       ``out[b,j] = values[idx[b,j]] · x[b]``                           ``(B, K)``
- :func:`weighted_scatter`  ``G[r] = Σ_{(b,j): idx[b,j]=r} w[b,j] · src[b]``                 ``(N, D)``
  (the adjoint of ``weighted_gather`` w.r.t. ``values``), and its row-sparse form :func:`weighted_scatter_rows`
  ``(rows (U,), sums (U, D))`` over the ``U`` distinct rows used.

They are PyTorch's fused embedding-bag kernels put to work: ``weighted_gather`` is ``F.embedding_bag`` with
``per_sample_weights``, and ``gather_dot`` / ``weighted_scatter`` are the two halves of *its* backward
(``aten::_embedding_bag_per_sample_weights_backward`` computes ``dot(grad[bag(i)], values[idx[i]])`` for every
position ``i``; ``aten::_embedding_bag_dense_backward`` scatters ``w[i] · grad[bag(i)]`` into the table rows).
``weighted_scatter_rows`` sorts the ``B·K`` positions by row and sums each row's run with one more
``embedding_bag`` call (one bag per distinct row). None of them builds the ``(B, K, D)`` gathered tensor; all
accumulate in fp32 for bf16/fp16 tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``values (N, D)``, ``indices (B, K)`` int64, ``weights (B, K)`` → ``out (B, D)``, ``values.dtype``.

    One pass over the ``B·K`` indexed rows (reads ``B·K·D`` elements, writes ``B·D``); no temporary.
    """
    if indices.shape[1] == 0:  # embedding_bag rejects empty bags given as a 2-D input
        return values.new_zeros(indices.shape[0], values.shape[1])
    return F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")


def gather_dot(values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values (N, D)``, ``indices (B, K)`` int64, ``x (B, D)`` → ``out (B, K)``, ``values.dtype``.

    One fused pass over the ``B·K`` indexed rows, a dot product each; no temporary beyond the bag bookkeeping.
    """
    n_bags, n_per_bag = indices.shape
    if n_bags * n_per_bag == 0:
        return values.new_zeros(n_bags, n_per_bag)
    offsets, bag_of_position = _bags(n_bags, n_per_bag, indices.device)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x, values, indices.reshape(-1), offsets, bag_of_position, _MODE_SUM
    )
    return out.view(n_bags, n_per_bag)


def weighted_scatter_rows(
    src: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``src (B, D)``, ``indices (B, K)`` int64, ``weights (B, K)`` → ``rows (U,)`` int64 ascending, ``sums (U, D)``.

    Sorts the ``B·K`` positions ``b·K + j`` by their row, then ``embedding_bag`` with one bag per distinct row
    sums ``w[b,j] · src[b]`` over that row's run of positions: duplicates are reduced in one place, in a fixed
    order (deterministic), and the result is already a coalesced row-sparse gradient.
    """
    n_per_bag = indices.shape[1]
    sorted_rows, positions = torch.sort(indices.reshape(-1), stable=True)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    if rows.numel() == 0:
        return rows, src.new_zeros(0, src.shape[1])
    sums = F.embedding_bag(
        torch.div(positions, n_per_bag, rounding_mode="floor"),  # the bag b of each position
        src,
        counts.cumsum(0) - counts,  # where each row's run starts
        mode="sum",
        per_sample_weights=weights.reshape(-1)[positions],
    )
    return rows, sums


def weighted_scatter(
    src: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_rows: int
) -> torch.Tensor:
    """``src (B, D)``, ``indices (B, K)`` int64, ``weights (B, K)`` → ``(num_rows, D)``, zero in rows not indexed.

    The only large allocation is the result; duplicates are summed row by row after a sort of the indices.
    """
    n_bags, n_per_bag = indices.shape
    if n_bags * n_per_bag == 0:
        return src.new_zeros(num_rows, src.shape[1])
    _, bag_of_position = _bags(n_bags, n_per_bag, indices.device)
    bag_size = torch.full((n_bags,), n_per_bag, dtype=torch.int64, device=indices.device)
    no_max_indices = torch.empty(0, dtype=torch.int64, device=indices.device)  # only mode="max" uses them
    return torch.ops.aten._embedding_bag_dense_backward(
        src,
        indices.reshape(-1),
        bag_of_position,
        bag_size,
        no_max_indices,
        num_rows,
        False,
        _MODE_SUM,
        weights.reshape(-1),
    )


#: ``mode`` argument of the aten embedding-bag kernels for ``mode="sum"``.
_MODE_SUM = 0


def _bags(n_bags: int, n_per_bag: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag bookkeeping of the aten kernels for ``B`` bags of ``K``: ``offsets (B,)``, ``bag_of_position (B·K,)``."""
    offsets = torch.arange(0, n_bags * n_per_bag, n_per_bag, dtype=torch.int64, device=device)
    bag_of_position = torch.arange(n_bags, dtype=torch.int64, device=device).repeat_interleave(n_per_bag)
    return offsets, bag_of_position
