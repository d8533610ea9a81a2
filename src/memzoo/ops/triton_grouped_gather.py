"""The CUDA kernels behind :mod:`memzoo.ops.grouped_weighted_gather` (UltraMem's grouped multi-core read), in Triton:
the interface of its C++ kernels in :mod:`memzoo.ops.cpu_read`, for ``values (N, D)``, ``B`` bags of ``K`` positions
with a row ``idx``, a group ``g`` in ``[0, S)`` and ``M`` chunk weights ``w`` (chunk ``c``: columns ``c·D/M`` to
``(c+1)·D/M``).

- :func:`grouped_gather`: one program per (bag, group, block of ``D``); it walks the bag's positions ``BLOCK_K`` at a
  time, masking those of other groups (their rows are not loaded), scales each row's columns by their chunk's weight
  and accumulates in fp32 (fp64 for fp64 tables). Each indexed row is read once in all.
- :func:`gather_dot`: the weights' gradient, ``out[b, k, c]`` = chunk ``c`` of ``values[idx[b,k]] · x[b, g[b,k]]``;
  one program per (bag, block of ``K``), chunk by chunk.
- :func:`scatter` (the table gradient): sort-and-segment as :mod:`memzoo.ops.triton_gather`'s: the positions sorted by
  row, each distinct row summed once over its run, ``Σ w[p, chunk] · src[bag(p), g(p)]``; row-sparse (one program per
  distinct row, one host sync to size the output) or dense (one program per position, no host sync; only a run's
  first position writes).

Triton is imported when this module is: only when a CUDA tensor reaches the op (or a test imports it with
``TRITON_INTERPRET=1``, under which the kernels run on CPU tensors).
"""

from __future__ import annotations

import torch

try:  # optional: in a try so that import checkers (Hugging Face's remote-code loader) see it as optional
    import triton
    import triton.language as tl
except ImportError as err:  # callers import this module only where Triton is usable
    raise ImportError(f"memzoo.ops.triton_grouped_gather needs Triton: {err}") from err

from memzoo.ops.triton_gather import (
    DOT_BLOCK_D,
    DOT_BLOCK_K,
    DOT_WARPS,
    GATHER_BLOCK_D,
    GATHER_BLOCK_K,
    GATHER_WARPS,
    SEGMENT_BLOCK_D,
    SEGMENT_BLOCK_P,
    SEGMENT_WARPS,
    _accumulator,
    _run_at,
    _run_ends,
    _segments,
)

__all__ = ["gather_dot", "grouped_gather", "scatter"]


@triton.jit
def _grouped_gather_kernel(
    values_ptr, indices_ptr, groups_ptr, weights_ptr, out_ptr, K, S, D, WIDTH, M,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    bag_group = tl.program_id(0).to(tl.int64)  # out row b·S + s
    bag, group = bag_group // S, bag_group % S
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    chunk = d // WIDTH
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        position = bag * K + k0 + tl.arange(0, BLOCK_K)
        member = (k0 + tl.arange(0, BLOCK_K) < K)
        member = member & (tl.load(groups_ptr + position, mask=member, other=-1) == group)
        tile_mask = member[:, None] & d_mask[None, :]
        rows = tl.load(indices_ptr + position, mask=member, other=0)
        w = tl.load(weights_ptr + position[:, None] * M + chunk[None, :], mask=tile_mask, other=0.0)
        tile = tl.load(values_ptr + rows[:, None] * D + d[None, :], mask=tile_mask, other=0.0)
        acc += tl.sum(tile.to(ACC) * w.to(ACC), axis=0)
    tl.store(out_ptr + bag_group * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _grouped_dot_kernel(
    values_ptr, indices_ptr, groups_ptr, x_ptr, out_ptr, K, S, D, WIDTH, M,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    bag = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = j < K
    position = bag * K + j
    rows = tl.load(indices_ptr + position, mask=j_mask, other=0)
    sources = bag * S + tl.load(groups_ptr + position, mask=j_mask, other=0)  # x's row of each position
    for c in range(0, M):
        acc = tl.zeros((BLOCK_K,), dtype=ACC)
        for d0 in range(0, WIDTH, BLOCK_D):
            column = d0 + tl.arange(0, BLOCK_D)
            tile_mask = j_mask[:, None] & (column < WIDTH)[None, :]
            column = c * WIDTH + column
            x = tl.load(x_ptr + sources[:, None] * D + column[None, :], mask=tile_mask, other=0.0)
            tile = tl.load(values_ptr + rows[:, None] * D + column[None, :], mask=tile_mask, other=0.0)
            acc += tl.sum(tile.to(ACC) * x.to(ACC), axis=1)
        tl.store(out_ptr + position * M + c, acc.to(out_ptr.dtype.element_ty), mask=j_mask)


@triton.jit
def _grouped_run_sum(src_ptr, weights_ptr, groups_ptr, order_ptr, start, end, d, d_mask, chunk, K, S, D, M,
                     BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """``Σ w[position, chunk] · src[bag·S + group[position], d]`` over the sorted positions ``order[start:end]``, in
    ``ACC``: the gradient of one table row, block ``d`` of its columns."""
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        tile_mask = p_mask[:, None] & d_mask[None, :]
        position = tl.load(order_ptr + p, mask=p_mask, other=0)  # flat index b·K + j
        source = (position // K) * S + tl.load(groups_ptr + position, mask=p_mask, other=0)
        w = tl.load(weights_ptr + position[:, None] * M + chunk[None, :], mask=tile_mask, other=0.0)
        tile = tl.load(src_ptr + source[:, None] * D + d[None, :], mask=tile_mask, other=0.0)
        acc += tl.sum(tile.to(ACC) * w.to(ACC), axis=0)
    return acc


@triton.jit
def _grouped_segment_sum_kernel(
    src_ptr, weights_ptr, groups_ptr, order_ptr, seg_start_ptr, out_ptr, K, S, D, WIDTH, M,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """Segment ``s`` = sorted positions ``[seg_start[s], seg_start[s+1])``, all of one table row; writes ``out[s]``."""
    seg = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    acc = _grouped_run_sum(src_ptr, weights_ptr, groups_ptr, order_ptr, start, end, d, d_mask, d // WIDTH, K, S, D, M,
                           BLOCK_P, BLOCK_D, ACC)
    tl.store(out_ptr + seg * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _grouped_run_sum_kernel(
    src_ptr, weights_ptr, groups_ptr, order_ptr, sorted_rows_ptr, run_end_ptr, out_ptr, K, S, D, WIDTH, M,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    """One program per sorted position ``p``; the first position of each run of equal rows sums the run
    ``[p, run_end[p])`` and writes its row of the dense output; every other program stores nothing."""
    p = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    row, end, writes = _run_at(sorted_rows_ptr, run_end_ptr, p, d, d_mask)
    acc = _grouped_run_sum(src_ptr, weights_ptr, groups_ptr, order_ptr, p, end, d, d_mask, d // WIDTH, K, S, D, M,
                           BLOCK_P, BLOCK_D, ACC)
    tl.store(out_ptr + row * D + d, acc.to(out_ptr.dtype.element_ty), mask=writes)


def grouped_gather(values: torch.Tensor, indices: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor,
                   n_groups: int) -> torch.Tensor:
    """``values (N, D)``, ``indices, groups (B, K)`` int64, ``weights (B, K, M)`` → ``(B, n_groups, D)``; contiguous
    inputs, one floating dtype (as :func:`memzoo.ops.cpu_read.grouped_gather`)."""
    (n_bags, n_per_bag), chunks, dim = indices.shape, weights.shape[2], values.shape[1]
    out = values.new_empty(n_bags, n_groups, dim)
    if out.numel() == 0 or n_per_bag == 0:
        return out.zero_()
    block_d = min(GATHER_BLOCK_D, triton.next_power_of_2(dim))
    block_k = min(GATHER_BLOCK_K, triton.next_power_of_2(n_per_bag))
    _grouped_gather_kernel[(n_bags * n_groups, triton.cdiv(dim, block_d))](
        values, indices, groups, weights, out, n_per_bag, n_groups, dim, dim // chunks, chunks,
        BLOCK_K=block_k, BLOCK_D=block_d, ACC=_accumulator(values.dtype), num_warps=GATHER_WARPS,
    )
    return out


def gather_dot(values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, groups: torch.Tensor,
               chunks: int) -> torch.Tensor:
    """``values (N, D)``, ``indices, groups (B, K)`` int64, ``x (B, S, D)`` → ``(B, K, chunks)``: chunk ``c``'s dot of
    ``values[idx[b,k]]`` with ``x[b, groups[b,k]]``; contiguous inputs."""
    (n_bags, n_per_bag), dim = indices.shape, values.shape[1]
    out = values.new_empty(n_bags, n_per_bag, chunks)
    if out.numel() == 0 or dim == 0:
        return out.zero_()
    width = dim // chunks
    block_d = min(DOT_BLOCK_D, triton.next_power_of_2(width))
    block_k = min(DOT_BLOCK_K, triton.next_power_of_2(n_per_bag))
    _grouped_dot_kernel[(n_bags, triton.cdiv(n_per_bag, block_k))](
        values, indices, groups, x, out, n_per_bag, x.shape[1], dim, width, chunks,
        BLOCK_K=block_k, BLOCK_D=block_d, ACC=_accumulator(values.dtype), num_warps=DOT_WARPS,
    )
    return out


def scatter(src: torch.Tensor, indices: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor, num_rows: int,
            dense: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The table gradient ``G[r] = Σ_{idx[b,k]=r} w[b,k,chunk] · src[b, groups[b,k]]`` for ``src (B, S, D)``,
    ``indices, groups (B, K)``, ``weights (B, K, M)``: ``(None, G (num_rows, D))`` with ``dense`` (zero in rows not
    indexed), else the ``U`` distinct rows ascending ``rows (U,)`` and ``G (U, D)``; contiguous inputs."""
    n_per_bag, dim = indices.shape[1], src.shape[-1]
    shape = (n_per_bag, src.shape[1], dim, dim // weights.shape[2], weights.shape[2])  # K, S, D, width, M
    block_d = min(SEGMENT_BLOCK_D, triton.next_power_of_2(max(dim, 1)))
    meta = dict(BLOCK_P=SEGMENT_BLOCK_P, BLOCK_D=block_d, ACC=_accumulator(src.dtype), num_warps=SEGMENT_WARPS)
    if dense:
        out = src.new_zeros(num_rows, dim)
        flat = indices.reshape(-1)
        if flat.numel() and dim:
            sorted_rows, order = torch.sort(flat, stable=True)
            _grouped_run_sum_kernel[(flat.numel(), triton.cdiv(dim, block_d))](
                src, weights, groups, order, sorted_rows, _run_ends(sorted_rows), out, *shape, **meta)
        return None, out
    rows, seg_start, order = _segments(indices)
    sums = src.new_empty(rows.numel(), dim)
    if rows.numel() and dim:
        _grouped_segment_sum_kernel[(rows.numel(), triton.cdiv(dim, block_d))](
            src, weights, groups, order, seg_start, sums, *shape, **meta)
    return rows, sums
