"""The CUDA kernel behind :func:`memzoo.ops.product_key_topk`: per-half top-k and the pruned merge, in Triton.

One program per (token, head) row, everything in registers:

1. each half's ``n_keys`` float32 scores are packed into int64 sort keys, ``(order(score) << 32) | (n - 1 - i)``
   (``order`` maps a float's bits to an int32 of the same order, so NaN ranks first, as in ``torch.topk``; equal
   scores rank the lower index first) and sorted descending with ``tl.sort``; the first ``KP`` (``k`` rounded up to
   a power of two) are the half's top-k with their sub-key indices;
2. the ``KP × KP`` sums ``best1[a] + best2[b]`` of rank pairs with ``(a+1)(b+1) <= k`` (the only ones that can be
   in the top-k; the rest are masked) are packed the same way with the pair ``(a, b)`` and sorted; the first ``k``
   are the answer, decoded to scores (the exact float32 sums) and ``i1 · n_keys + i2``.

Slicing a register tensor is done without memory: a sorted ``(M,)`` vector is reshaped to ``(M / KP, KP)`` and
its first row kept by a masked sum. Limits (callers fall back to PyTorch beyond them): float32 half scores,
``n_keys <= MAX_KEYS``, ``k <= MAX_K``.

Triton is imported when this module is, i.e. only when a CUDA tensor reaches the op (or a test imports it with
``TRITON_INTERPRET=1``, under which the same kernel runs on CPU tensors).
"""

from __future__ import annotations

import torch

try:  # optional: in a try so that import checkers (Hugging Face's remote-code loader) see it as optional
    import triton
    import triton.language as tl
except ImportError as err:  # callers import this module only where Triton is usable
    raise ImportError(f"memzoo.ops.triton_topk needs Triton: {err}") from err

#: Largest ``n_keys`` (one half's row is sorted in registers) and ``k`` (``k²`` candidate sums) the kernel takes.
MAX_KEYS, MAX_K = 4096, 64


@triton.jit
def _order_key(x):
    """float32 → int32 with the same order (NaN above +inf)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _order_value(key):
    """Inverse of :func:`_order_key`."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _first_row(x, ROWS: tl.constexpr, KP: tl.constexpr):
    """The first ``KP`` entries of a ``(ROWS·KP,)`` int64 vector, as a ``(KP,)`` vector."""
    grid = tl.reshape(x, (ROWS, KP))
    row = tl.arange(0, ROWS)[:, None]
    return tl.sum(tl.where(row == 0, grid, 0), axis=0)


@triton.jit
def _half_topk(base_ptr, n_keys, BLOCK_N: tl.constexpr, KP: tl.constexpr):
    """Top-``KP`` of one half row as packed keys, best first: ``(KP,)`` int64."""
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n_keys
    score = tl.load(base_ptr + offs, mask=mask, other=0.0)
    low = (n_keys - 1 - offs).to(tl.int64)
    packed = (_order_key(score).to(tl.int64) << 32) | low
    packed = tl.where(mask, packed, -9223372036854775807 - 1)
    packed = tl.sort(packed, descending=True)
    return _first_row(packed, BLOCK_N // KP, KP)


@triton.jit
def _topk_merge_kernel(
    scores_ptr,
    out_s_ptr,
    out_i_ptr,
    heads,
    n_keys,
    k,
    stride_side,
    stride_head,
    stride_token,
    BLOCK_N: tl.constexpr,
    KP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # token · heads + head
    token, head = row // heads, row % heads
    base = scores_ptr + token * stride_token + head * stride_head
    best1 = _half_topk(base, n_keys, BLOCK_N, KP)
    best2 = _half_topk(base + stride_side, n_keys, BLOCK_N, KP)
    value1 = _order_value((best1 >> 32).to(tl.int32))
    value2 = _order_value((best2 >> 32).to(tl.int32))
    index1 = n_keys - 1 - (best1 & 0xFFFFFFFF)
    index2 = n_keys - 1 - (best2 & 0xFFFFFFFF)

    rank = tl.arange(0, KP)
    a, b = rank[:, None], rank[None, :]
    pair_sum = value1[:, None] + value2[None, :]  # (KP, KP)
    pair = (KP * KP - 1 - (a * KP + b)).to(tl.int64)  # lower pair first among equal sums
    packed = (_order_key(pair_sum).to(tl.int64) << 32) | pair
    packed = tl.where((a + 1) * (b + 1) <= k, packed, -9223372036854775807 - 1)
    packed = tl.sort(tl.reshape(packed, (KP * KP,)), descending=True)
    top = _first_row(packed, KP, KP)  # (KP,) best first

    score = _order_value((top >> 32).to(tl.int32))
    code = KP * KP - 1 - (top & 0xFFFFFFFF)
    rank_a, rank_b = code // KP, code % KP
    i1 = tl.sum(tl.where(rank_a[:, None] == rank[None, :], index1[None, :], 0), axis=1)
    i2 = tl.sum(tl.where(rank_b[:, None] == rank[None, :], index2[None, :], 0), axis=1)
    keep = rank < k
    tl.store(out_s_ptr + row * k + rank, score, mask=keep)
    tl.store(out_i_ptr + row * k + rank, i1 * n_keys + i2, mask=keep)


def supports(n_keys: int, k: int) -> bool:
    """Whether the kernel takes this size (else the caller uses the PyTorch path)."""
    return n_keys <= MAX_KEYS and k <= MAX_K


def half_topk_merge(half_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``half_scores (2, H, T, n_keys)`` float32 (unit stride over ``n_keys``) → ``scores (T, H, k)`` float32, best
    first, and ``indices (T, H, k)`` int64, ``index = i1 · n_keys + i2``: the exact top-k of
    ``half_scores[0, h, t, i1] + half_scores[1, h, t, i2]``. Same contract as :func:`memzoo.ops.cpu_topk.half_topk_merge`."""
    if half_scores.dtype != torch.float32:
        raise TypeError(f"triton_topk: half scores must be float32, got {half_scores.dtype}")
    _, heads, n_tokens, n_keys = half_scores.shape
    if not supports(n_keys, k):
        raise ValueError(f"triton_topk: n_keys={n_keys} (max {MAX_KEYS}) or k={k} (max {MAX_K}) is too large")
    if half_scores.stride(-1) != 1:
        half_scores = half_scores.contiguous()
    scores = half_scores.new_empty(n_tokens, heads, k)
    indices = torch.empty(n_tokens, heads, k, dtype=torch.int64, device=half_scores.device)
    if scores.numel() == 0:
        return scores, indices
    kp = max(triton.next_power_of_2(k), 2)
    block_n = max(triton.next_power_of_2(n_keys), kp)
    side, head, token, _ = half_scores.stride()
    _topk_merge_kernel[(n_tokens * heads,)](
        half_scores, scores, indices, heads, n_keys, k, side, head, token,
        BLOCK_N=block_n, KP=kp, num_warps=4 if block_n * 2 <= 2048 else 8,
    )
    return scores, indices
