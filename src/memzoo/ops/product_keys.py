"""Product-key top-k: exact nearest keys among ``n_keys²`` product keys in O(n_keys + k·log k) (Lample et al. 2019).

A product key is a pair of sub-keys ``(c1[i1], c2[i2])``, one from each of two sub-key sets of size ``n_keys``;
it is scored against a query ``q = [q1, q2]`` (split in halves) as

    score(i1, i2) = q1 · c1[i1] + q2 · c2[i2].

Because the score is a sum of two independent terms, every pair in the exact top-k of the ``n_keys²`` sums has
both its halves in the top-k of their own half (a pair whose ``i1`` is not in the top-k of ``q1 · c1`` is beaten
by ``k`` pairs sharing its ``i2``). So it suffices to score each half against its ``n_keys`` sub-keys, keep the
top-k of each half, and take the top-k of the candidate sums.

Not all ``k²`` candidate sums need scoring. With both halves sorted best first, pair ``(a, b)`` (ranks within the
halves) is beaten or tied by the ``(a+1)(b+1)`` pairs ``(a' <= a, b' <= b)``, and the set of pairs scoring at least
the k-th best sum is closed under that order, so it holds an exact top-k made of pairs with ``(a+1)(b+1) <= k``:
about ``k·ln k`` pairs instead of ``k²`` (50 instead of 256 for ``k = 16``).
"""

from __future__ import annotations

import torch

__all__ = ["candidate_pairs", "product_key_topk"]


def product_key_topk(
    query: torch.Tensor, sub_keys: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k product keys per head.

    Args:
        query: ``(..., H, Dk)``; the first half ``q[..., :Dk/2]`` is scored against ``sub_keys[:, 0]``, the
            second half against ``sub_keys[:, 1]``.
        sub_keys: ``(H, 2, n_keys, Dk/2)``, the two sub-key sets of every head.
        k: how many keys to return, ``1 <= k <= n_keys``.

    Returns:
        ``scores (..., H, k)`` (query dtype, sorted descending) and ``indices (..., H, k)`` (int64) with
        ``index = i1 * n_keys + i2`` in ``[0, n_keys²)``. Gradients reach ``query`` and ``sub_keys`` through
        ``scores``.

    Cost per query and head: ``2 · n_keys · Dk/2`` multiply-adds for the half scores, two top-k over ``n_keys``,
    one top-k over about ``k·ln k`` candidates; memory ``O(n_keys + k log k)``; never touches the ``n_keys²``
    product set.
    """
    _check_args(query, sub_keys, k)
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    query_halves = (query[..., :half], query[..., half:])
    # Half scores (..., H, n_keys) and their top-k (..., H, k).
    half_scores = [
        torch.einsum("...hd,hnd->...hn", q, sub_keys[:, side]) for side, q in enumerate(query_halves)
    ]
    (best1, idx1), (best2, idx2) = (s.topk(k, dim=-1) for s in half_scores)
    # The candidate pairs (a, b) of ranks with (a+1)(b+1) <= k (module docstring), summed: (..., H, m).
    rank1, rank2 = _candidate_ranks(k, query.device)
    candidates = best1[..., rank1] + best2[..., rank2]
    scores, position = candidates.topk(k, dim=-1)
    i1 = idx1.gather(-1, rank1[position])
    i2 = idx2.gather(-1, rank2[position])
    return scores, i1 * n_keys + i2


def candidate_pairs(k: int) -> int:
    """How many candidate sums :func:`product_key_topk` scores per query and head: the rank pairs ``(a, b)`` with
    ``(a+1)(b+1) <= k``, ``Σ_a floor(k / (a+1))`` (about ``k·ln k``: 50 for k = 16, 119 for k = 32)."""
    return sum(k // (a + 1) for a in range(k))


_RANKS: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _candidate_ranks(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks ``(a, b)`` of the pairs that can be in a top-k of sums of two descending lists: ``(a+1)(b+1) <= k``.
    Two int64 vectors of length :func:`candidate_pairs` ``(k)``; cached per device in eager mode (no
    host-to-device copy per call), built as graph constants under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _build_candidate_ranks(k, device)
    key = (k, torch.device(device))
    if key not in _RANKS:
        _RANKS[key] = _build_candidate_ranks(k, device)
    return _RANKS[key]


def _build_candidate_ranks(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = torch.tensor([(a, b) for a in range(k) for b in range(k // (a + 1))], dtype=torch.int64, device=device)
    return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()


def _check_args(query: torch.Tensor, sub_keys: torch.Tensor, k: int) -> None:
    if query.dim() < 2:
        raise ValueError(f"product_key_topk: query must be (..., H, Dk), got shape {tuple(query.shape)}")
    if sub_keys.dim() != 4 or sub_keys.shape[1] != 2:
        raise ValueError(
            f"product_key_topk: sub_keys must be (H, 2, n_keys, Dk/2), got shape {tuple(sub_keys.shape)}"
        )
    heads, dk = query.shape[-2], query.shape[-1]
    if dk % 2:
        raise ValueError(f"product_key_topk: query dim Dk={dk} must be even (it is split into two halves)")
    if sub_keys.shape[0] != heads or sub_keys.shape[3] != dk // 2:
        raise ValueError(
            f"product_key_topk: sub_keys shape {tuple(sub_keys.shape)} does not match query (..., H={heads}, "
            f"Dk={dk}); expected ({heads}, 2, n_keys, {dk // 2})"
        )
    if not query.is_floating_point() or query.dtype != sub_keys.dtype:
        raise TypeError(
            f"product_key_topk: query and sub_keys must share one floating dtype, got {query.dtype} and "
            f"{sub_keys.dtype}"
        )
    if query.device != sub_keys.device:
        raise ValueError(
            f"product_key_topk: query is on {query.device} but sub_keys on {sub_keys.device}; move both to one device"
        )
    n_keys = sub_keys.shape[2]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_keys:
        raise ValueError(f"product_key_topk: k must be an int in [1, n_keys={n_keys}], got {k!r}")
