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

Implementation: one ``torch.library`` custom op, ``memzoo::product_key_topk`` (a fake implementation for
``torch.compile``), whose half scores are one batched matmul and whose top-k + merge is a kernel:
:mod:`memzoo.ops.cpu_topk` (C++/OpenMP) on CPU, :mod:`memzoo.ops.triton_topk` on CUDA (float32 half scores up to
its size limits), and the vectorised PyTorch formulation above (:func:`_torch_half_topk_merge`) everywhere else,
including when the C++ kernel cannot be built. The backward is ``memzoo::product_key_topk_grad``: the query's
gradient gathers the ``k`` chosen sub-keys, the sub-keys' gradient scatters the query halves (C++ on CPU; the
``weighted_gather`` kernels elsewhere); under ``create_graph`` it is built from the differentiable gather ops, so
double backward works.
"""

from __future__ import annotations

import torch

from memzoo.ops.cpu_topk import backward as cpu_topk_backward
from memzoo.ops.cpu_topk import half_topk_merge as cpu_half_topk_merge
from memzoo.ops.cpu_topk import library as cpu_topk_library
from memzoo.ops.sparse_gather import _kernels, _weighted_gather, _weighted_scatter

Tensor = torch.Tensor

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

    Cost per query and head: ``2 · n_keys · Dk/2`` multiply-adds for the half scores (one batched matmul), then
    the top-k and merge kernel (:mod:`memzoo.ops.cpu_topk` on CPU, :mod:`memzoo.ops.triton_topk` on CUDA, the
    vectorised PyTorch formulation elsewhere or when no kernel can be built): ``O(n_keys + k·log k)`` work and
    memory, never the ``n_keys²`` product set. Backward: ``O(k · Dk)`` per query and head (a weighted gather of
    the chosen sub-keys for the query, its adjoint scatter for the sub-keys), no dense ``n_keys`` pass.
    """
    _check_args(query, sub_keys, k)
    lead = query.shape[:-2]
    flat = query.reshape(-1, *query.shape[-2:])
    scores, indices = _product_key_topk(flat, sub_keys.contiguous(), k)
    return scores.view(*lead, *scores.shape[1:]), indices.view(*lead, *indices.shape[1:])


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


# ----------------------------------------------------------------------------------------------- custom op


@torch.library.custom_op("memzoo::product_key_topk", mutates_args=())
def _product_key_topk(query: Tensor, sub_keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``query (T, H, Dk)``, ``sub_keys (H, 2, n_keys, Dk/2)`` → ``scores, indices (T, H, k)``."""
    half_scores = _half_scores(query, sub_keys)  # (2, H, T, n_keys)
    exact = half_scores if half_scores.dtype in (torch.float32, torch.float64) else half_scores.float()
    if query.device.type == "cpu" and cpu_topk_library() is not None:
        scores, indices = cpu_half_topk_merge(exact, k)
    elif query.is_cuda and exact.dtype == torch.float32 and _triton_takes(sub_keys.shape[2], k):
        from memzoo.ops.triton_topk import half_topk_merge

        scores, indices = half_topk_merge(exact, k)
    else:
        scores, indices = _torch_half_topk_merge(half_scores, k)
    return scores.to(query.dtype), indices


@_product_key_topk.register_fake
def _(query, sub_keys, k):
    shape = (query.shape[0], query.shape[1], k)
    return query.new_empty(shape), query.new_empty(shape, dtype=torch.int64)


def _half_scores(query: Tensor, sub_keys: Tensor) -> Tensor:
    """``(T, H, Dk), (H, 2, n_keys, Dk/2)`` → ``(2, H, T, n_keys)``: every query half against its sub-keys, one
    batched matmul over ``(side, head)``."""
    n_tokens, heads, dk = query.shape
    halves = query.view(n_tokens, heads, 2, dk // 2).permute(2, 1, 0, 3)  # (2, H, T, Dk/2)
    return torch.matmul(halves, sub_keys.transpose(0, 1).transpose(-1, -2))


def _torch_half_topk_merge(half_scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The vectorised PyTorch kernel: top-k of each half, then the top-k of the candidate sums of rank pairs with
    ``(a+1)(b+1) <= k`` (module docstring); ``(2, H, T, n_keys)`` → ``scores, indices (T, H, k)``."""
    n_keys = half_scores.shape[-1]
    (best1, idx1), (best2, idx2) = (half.transpose(0, 1).topk(k, dim=-1) for half in half_scores)
    rank1, rank2 = _candidate_ranks(k, half_scores.device)
    scores, position = (best1[..., rank1] + best2[..., rank2]).topk(k, dim=-1)
    i1 = idx1.gather(-1, rank1[position])
    i2 = idx2.gather(-1, rank2[position])
    return scores, i1 * n_keys + i2


def _save_for_backward(ctx, inputs, output):
    query, sub_keys, _ = inputs
    ctx.save_for_backward(query, sub_keys, output[1])
    # the indices output has no gradient: autograd would otherwise hand the backward a zero-filled (T, H, k) tensor
    # for it every step
    ctx.set_materialize_grads(False)


def _product_key_topk_backward(ctx, grad_scores, _grad_indices):
    """``scores[t,h,j] = q1[t,h] · c1[h, i1] + q2[t,h] · c2[h, i2]``: the query's gradient is a weighted gather of
    the chosen sub-keys, the sub-keys' gradient its adjoint scatter of the query halves (duplicates summed).
    A first-order backward runs as one kernel; under ``create_graph`` it is built from the differentiable
    ``weighted_gather`` / ``weighted_scatter`` ops, so double backward works."""
    query, sub_keys, indices = ctx.saved_tensors
    if grad_scores is None:  # a backward through the indices alone (gradcheck asks for each output's in turn)
        return None, None, None
    if torch.is_grad_enabled():
        grad_query, grad_keys = _gather_backward(grad_scores, indices, query, sub_keys, differentiable=True)
    else:
        grad_query, grad_keys = _product_key_topk_grad(grad_scores, indices, query, sub_keys)
    return (
        grad_query if ctx.needs_input_grad[0] else None,
        grad_keys if ctx.needs_input_grad[1] else None,
        None,
    )


@torch.library.custom_op("memzoo::product_key_topk_grad", mutates_args=())
def _product_key_topk_grad(grad_scores: Tensor, indices: Tensor, query: Tensor, sub_keys: Tensor) -> tuple[
    Tensor, Tensor
]:
    """``grad_scores, indices (T, H, k)``, ``query (T, H, Dk)``, ``sub_keys (H, 2, n_keys, Dk/2)`` →
    ``grad_query``, ``grad_sub_keys`` (dense)."""
    if query.device.type == "cpu" and cpu_topk_library() is not None:
        compute = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
        grad_query, grad_keys = cpu_topk_backward(
            grad_scores.to(compute), indices, query.to(compute), sub_keys.to(compute)
        )
        return grad_query.to(query.dtype), grad_keys.to(sub_keys.dtype)
    return _gather_backward(grad_scores, indices, query, sub_keys, differentiable=False)


@_product_key_topk_grad.register_fake
def _(grad_scores, indices, query, sub_keys):
    return torch.empty_like(query), torch.empty_like(sub_keys)


def _gather_backward(
    grad_scores: Tensor, indices: Tensor, query: Tensor, sub_keys: Tensor, differentiable: bool
) -> tuple[Tensor, Tensor]:
    """The backward as one weighted gather (query) and its adjoint scatter (sub-keys) over the flat sub-key table
    ``sub_keys.view(H·2·n_keys, Dk/2)``; ``differentiable``: through the autograd-aware ``memzoo::`` ops, else the
    device's kernels directly."""
    n_tokens, heads, dk = query.shape
    n_keys, half, k = sub_keys.shape[2], dk // 2, indices.shape[-1]
    # row of (head, side, i) in the flat table: (2·head + side)·n_keys + i
    base = torch.arange(0, 2 * heads * n_keys, n_keys, device=indices.device).view(1, heads, 2, 1)
    rows = (torch.stack((indices // n_keys, indices % n_keys), dim=2) + base).view(-1, k)  # (T·H·2, k)
    grads = grad_scores.unsqueeze(2).expand(n_tokens, heads, 2, k).reshape(-1, k)
    table, halves = sub_keys.reshape(-1, half), query.reshape(-1, half)
    if differentiable:
        grad_query = _weighted_gather(table, rows, grads, False)
        grad_keys = _weighted_scatter(halves, rows, grads, 2 * heads * n_keys)
    else:
        kernels = _kernels(query.device)
        grad_query = kernels.weighted_gather(table.contiguous(), rows, grads.contiguous())
        grad_keys = kernels.weighted_scatter(halves.contiguous(), rows, grads.contiguous(), 2 * heads * n_keys)
    return grad_query.view(query.shape), grad_keys.view(sub_keys.shape)


_product_key_topk.register_autograd(_product_key_topk_backward, setup_context=_save_for_backward)


def _triton_takes(n_keys: int, k: int) -> bool:
    """Whether the Triton kernel can run here (Triton importable) and takes this size."""
    try:
        from memzoo.ops.triton_topk import supports
    except ImportError:
        return False
    return supports(n_keys, k)
