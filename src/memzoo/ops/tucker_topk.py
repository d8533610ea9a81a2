"""Top-k over a Tucker-decomposed product-key grid (UltraMem, Huang et al. 2025, arXiv 2411.12364).

A query scores ``n`` row keys and ``n`` column keys in ``r`` ranks each: ``rows (..., n, r)``, ``cols (..., n, r)``.
Grid cell ``(i, j)`` of the ``n²`` cells scores, with ``M`` cores ``C_c (r, r)``::

    score_c(i, j) = Σ_{a,b} rows[i, a] · C_c[a, b] · cols[j, b]        one score per core
    score(i, j)   = Σ_c score_c(i, j)

The exact top-k would score all ``n²`` cells. :func:`tucker_topk` instead takes the rank-1 approximation
``Σ_c C_c ≈ σ·u vᵀ`` (top singular vectors, :func:`tucker_rank1`), keeps the ``m`` best rows by ``rows @ u`` and the
``m`` best columns by ``cols @ v``, and ranks the ``m × m`` candidate cells exactly by ``row_i · (Σ_c C_c) · col_j``
(one product, not one per core, and without gradient: on the CPU one C++ pass per query,
:mod:`memzoo.ops.cpu_tucker`); only the ``knn`` kept cells are then scored per core,
with gradients, so the backward touches ``knn`` cells, not ``m²`` (on the CPU the registered op
``memzoo::tucker_cell_scores``, one C++ pass each way; PyTorch ops elsewhere and under ``torch.compile``). When
``Σ_c C_c`` has rank 1, or ``m = n``, the result is the exact top-k.

Cost per query (multiply-adds): ``2·n·r`` (the two rank-1 projections) + ``m·r² + m²·r`` (ranking the candidate
cells) + ``M·knn·(r² + r)`` (the kept cells' per-core scores). Gradients flow to ``rows``, ``cols`` and the cores
through the returned scores (the selection itself is not differentiable, as in any top-k); ``u, v`` carry no
gradient.
"""

from __future__ import annotations

import torch

from memzoo.ops.cpu_tucker import cell_scores as cpu_tucker_cell_scores
from memzoo.ops.cpu_tucker import cell_scores_backward as cpu_tucker_cell_scores_backward
from memzoo.ops.cpu_tucker import supports as cpu_tucker_supports
from memzoo.ops.cpu_tucker import tucker_select

Tensor = torch.Tensor


@torch.no_grad()
def tucker_rank1(core_sum: Tensor) -> tuple[Tensor, Tensor]:
    """The top left and right singular vectors ``u, v (..., r)`` of ``core_sum (..., r, r)`` (float32 or wider),
    signed so that ``Σ u >= 0`` (``u vᵀ`` is unchanged; the sign decides which end of each side is "best")."""
    u_all, _, vh_all = torch.linalg.svd(core_sum.to(torch.promote_types(core_sum.dtype, torch.float32)))
    u, v = u_all[..., :, 0], vh_all[..., 0, :]
    sign = torch.where(u.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(u.dtype)
    return (u * sign).to(core_sum.dtype), (v * sign).to(core_sum.dtype)


def tucker_topk(rows: Tensor, cols: Tensor, cores: Tensor, knn: int, candidates: int) -> tuple[Tensor, Tensor]:
    """The ``knn`` best cells of the Tucker grid (module docstring) among ``candidates²`` candidate cells.

    Args:
        rows, cols: ``(..., n, r)`` row and column scores, per rank.
        cores: ``(..., M, r, r)`` the cores (leading dims broadcast against ``rows``' leading dims, e.g. per head).
        knn: cells returned, ``1 <= knn <= candidates²``.
        candidates: rows and columns kept by the rank-1 approximation, ``1 <= candidates <= n``.

    Returns:
        ``scores (..., knn, M)``: each returned cell's score under each core (their sum is the ranking score;
        sorted by it, best first), and ``indices (..., knn)`` int64: ``i · n + j`` of each cell.
    """
    n, r = rows.shape[-2:]
    if cols.shape[-2:] != (n, r) or cores.shape[-2:] != (r, r):
        raise ValueError(
            f"tucker_topk: rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must be (..., n, r) and cores "
            f"{tuple(cores.shape)} (..., M, r, r) with the same n and r"
        )
    if not 1 <= candidates <= n:
        raise ValueError(f"tucker_topk: candidates={candidates} must be in [1, n={n}]; lower it to at most {n}")
    if not 1 <= knn <= candidates * candidates:
        raise ValueError(
            f"tucker_topk: knn={knn} must be in [1, candidates²={candidates * candidates}]; raise candidates or "
            f"lower knn"
        )
    with torch.no_grad():  # the selection: no gradient, so no (..., M, m, m) buffer is kept for the backward
        core_sum = cores.sum(-3)  # (..., r, r)
        u, v = tucker_rank1(core_sum)  # (..., r)
        if _kernel_takes(rows, cols, core_sum):
            i, j = tucker_select(rows, cols, core_sum.to(rows.dtype), u.to(rows.dtype), v.to(rows.dtype), knn,
                                 candidates)
        else:
            i, j = _torch_select(rows, cols, core_sum, u, v, knn, candidates)
    # each kept cell's score under every core, differentiable in rows, cols and cores
    heads = _cell_kernel_heads(rows, cols, cores)
    if heads is None:
        scores = _torch_cell_scores(rows, cols, cores, i, j)
    else:  # queries laid out (Q, n, r), query q on head q mod H
        flat = _tucker_cell_scores(rows.reshape(-1, n, r), cols.reshape(-1, n, r),
                                   cores.reshape(heads, *cores.shape[-3:]), i.reshape(-1, knn), j.reshape(-1, knn))
        scores = flat.view(*i.shape, cores.shape[-3])
    return scores, i * n + j


def _torch_cell_scores(rows: Tensor, cols: Tensor, cores: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """The kept cells' per-core scores ``(..., knn, M)`` in PyTorch ops (any device and broadcast layout): each cell's
    outer product (r·r) against the flattened cores, one matmul with r² inner terms, ``(..., knn, r²) @ (r², M)``."""
    r = rows.shape[-1]
    row_k = rows.gather(-2, i.unsqueeze(-1).expand(*i.shape, r))  # (..., knn, r)
    col_k = cols.gather(-2, j.unsqueeze(-1).expand(*j.shape, r))
    outer = (row_k.unsqueeze(-1) * col_k.unsqueeze(-2)).flatten(-2)  # (..., knn, r²)
    flat_cores = cores.flatten(-2)  # (..., M, r²)
    if _per_head(rows, cores):  # per-head cores (H, M, r, r): one product per head, not per query
        return torch.einsum("...hkx,hmx->...hkm", outer, flat_cores)
    return outer @ flat_cores.transpose(-1, -2)  # shared cores (M, r, r): one matrix product; others broadcast


def _per_head(rows: Tensor, cores: Tensor) -> bool:
    """Whether ``cores (H, M, r, r)`` hold one set per head of ``rows (..., H, n, r)``."""
    return cores.dim() == 4 and rows.dim() >= 3 and cores.shape[0] == rows.shape[-3]


def _cell_kernel_heads(rows: Tensor, cols: Tensor, cores: Tensor) -> int | None:
    """The number of core sets ``H`` when the C++ cell-score kernel takes these inputs (CPU float32/float64 outside
    ``torch.compile``, one dtype, and cores shared ``(M, r, r)``, ``H = 1``, or per head ``(H, M, r, r)`` against
    rows ``(..., H, n, r)``); else ``None``."""
    if torch.compiler.is_compiling() or rows.shape != cols.shape or not cpu_tucker_supports(rows, cols, cores):
        return None
    if cores.dim() == 3:
        return 1
    return cores.shape[0] if _per_head(rows, cores) else None


def _flat_cell_scores(rows: Tensor, cols: Tensor, cores: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """``memzoo::tucker_cell_scores`` in PyTorch ops: its layout (``(Q, n, r)``, cores ``(H, M, r, r)``) as the
    per-head layout of :func:`_torch_cell_scores` (``(Q/H, H, n, r)``)."""
    n_queries, n, r = rows.shape
    heads, knn = cores.shape[0], i.shape[1]

    def per_head(t: Tensor) -> Tensor:
        return t.view(n_queries // heads, heads, *t.shape[1:])

    scores = _torch_cell_scores(per_head(rows), per_head(cols), cores, per_head(i), per_head(j))
    return scores.reshape(n_queries, knn, cores.shape[1])


def _flat_cell_scores_grad(grad: Tensor, rows: Tensor, cols: Tensor, cores: Tensor, i: Tensor,
                           j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``memzoo::tucker_cell_scores_grad`` in differentiable PyTorch ops (the backward under ``create_graph``)."""
    n_queries, _, r = rows.shape
    heads, knn, n_cores = cores.shape[0], i.shape[1], cores.shape[1]
    i_r, j_r = i.unsqueeze(-1).expand(*i.shape, r), j.unsqueeze(-1).expand(*j.shape, r)
    row_k = rows.gather(1, i_r).view(n_queries // heads, heads, knn, r)
    col_k = cols.gather(1, j_r).view(n_queries // heads, heads, knn, r)
    g = grad.reshape(n_queries // heads, heads, knn, n_cores)
    grad_row_k = torch.einsum("phkm,hmab,phkb->phka", g, cores, col_k).reshape(n_queries, knn, r)
    grad_col_k = torch.einsum("phkm,hmab,phka->phkb", g, cores, row_k).reshape(n_queries, knn, r)
    grad_cores = torch.einsum("phkm,phka,phkb->hmab", g, row_k, col_k)
    return (torch.zeros_like(rows).scatter_add(1, i_r, grad_row_k),
            torch.zeros_like(cols).scatter_add(1, j_r, grad_col_k), grad_cores)


def _check_cells(op: str, rows: Tensor, cores: Tensor, i: Tensor, j: Tensor) -> None:
    """What the C++ kernels read without checking: cells ``i, j (Q, K)`` in ``[0, n)`` and ``Q`` a multiple of the
    ``H`` core sets (queries laid out ``(..., H)``)."""
    n_queries, n, _ = rows.shape
    if i.shape != j.shape or i.dim() != 2 or i.shape[0] != n_queries or n_queries % cores.shape[0]:
        raise ValueError(f"{op}: cells i {tuple(i.shape)}, j {tuple(j.shape)} must both be (Q={n_queries}, K), and Q a "
                         f"multiple of the {cores.shape[0]} core sets")
    for name, cells in (("i", i), ("j", j)):
        if cells.numel() and not (0 <= int((bounds := torch.aminmax(cells)).min) and int(bounds.max) < n):
            raise ValueError(f"{op}: a cell index in {name} is out of range; valid: [0, {n - 1}]")


@torch.library.custom_op("memzoo::tucker_cell_scores", mutates_args=())
def _tucker_cell_scores(rows: Tensor, cols: Tensor, cores: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """``rows, cols (Q, n, r)``, ``cores (H, M, r, r)``, ``i, j (Q, K)`` → ``(Q, K, M)`` (query ``q`` on head
    ``q mod H``): one C++ pass over the kept cells (:func:`memzoo.ops.cpu_tucker.cell_scores`) where the kernel takes
    the inputs, else PyTorch ops."""
    if not cpu_tucker_supports(rows, cols, cores):
        return _flat_cell_scores(rows, cols, cores, i, j)
    _check_cells("memzoo::tucker_cell_scores", rows, cores, i, j)
    return cpu_tucker_cell_scores(rows.contiguous(), cols.contiguous(), cores.contiguous(), i.contiguous(),
                                  j.contiguous())


@_tucker_cell_scores.register_fake
def _(rows, cols, cores, i, j):
    return rows.new_empty(*i.shape, cores.shape[1])


@torch.library.custom_op("memzoo::tucker_cell_scores_grad", mutates_args=())
def _tucker_cell_scores_grad(grad: Tensor, rows: Tensor, cols: Tensor, cores: Tensor, i: Tensor,
                             j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The first-order backward of ``memzoo::tucker_cell_scores``: ``grad_rows, grad_cols, grad_cores`` (C++ where
    the kernel takes the inputs, else PyTorch ops)."""
    if not cpu_tucker_supports(grad, rows, cols, cores):
        return _flat_cell_scores_grad(grad, rows, cols, cores, i, j)
    _check_cells("memzoo::tucker_cell_scores_grad", rows, cores, i, j)
    return cpu_tucker_cell_scores_backward(grad.contiguous(), rows.contiguous(), cols.contiguous(),
                                           cores.contiguous(), i.contiguous(), j.contiguous())


@_tucker_cell_scores_grad.register_fake
def _(grad, rows, cols, cores, i, j):
    return torch.empty_like(rows), torch.empty_like(cols), torch.empty_like(cores)


def _save_cell_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _tucker_cell_scores_backward(ctx, grad):
    """One C++ pass; under ``create_graph`` the same gradients from differentiable PyTorch ops (double backward)."""
    rows, cols, cores, i, j = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad_rows, grad_cols, grad_cores = _flat_cell_scores_grad(grad, rows, cols, cores, i, j)
    else:
        grad_rows, grad_cols, grad_cores = _tucker_cell_scores_grad(grad, rows, cols, cores, i, j)
    needs = ctx.needs_input_grad
    return (grad_rows if needs[0] else None, grad_cols if needs[1] else None, grad_cores if needs[2] else None,
            None, None)


_tucker_cell_scores.register_autograd(_tucker_cell_scores_backward, setup_context=_save_cell_inputs)


def _kernel_takes(rows: Tensor, cols: Tensor, core_sum: Tensor) -> bool:
    """Whether the selection runs in the C++ kernel: CPU float32/float64 outside ``torch.compile``, rows and cols
    of one shape, and cores that broadcast to the queries' leading dims without widening them."""
    lead = rows.shape[:-2]
    return (not torch.compiler.is_compiling() and rows.shape == cols.shape and rows.shape[-1] > 0
            and torch.broadcast_shapes(core_sum.shape[:-2], lead) == lead
            and cpu_tucker_supports(rows, cols) and core_sum.device.type == "cpu")


def _torch_select(rows: Tensor, cols: Tensor, core_sum: Tensor, u: Tensor, v: Tensor, knn: int,
                  candidates: int) -> tuple[Tensor, Tensor]:
    """The selection in PyTorch ops (any device): ``(i, j)``, each ``(..., knn)``, best first."""
    r = rows.shape[-1]
    best_rows = (rows @ u.unsqueeze(-1).to(rows.dtype)).squeeze(-1).topk(candidates, dim=-1).indices
    best_cols = (cols @ v.unsqueeze(-1).to(cols.dtype)).squeeze(-1).topk(candidates, dim=-1).indices
    row_c = rows.gather(-2, best_rows.unsqueeze(-1).expand(*best_rows.shape, r))  # (..., m, r)
    col_c = cols.gather(-2, best_cols.unsqueeze(-1).expand(*best_cols.shape, r))
    ranking = (row_c @ core_sum.to(rows.dtype)) @ col_c.transpose(-1, -2)  # Σ_c score_c: (..., m, m)
    best = ranking.flatten(-2).topk(knn, dim=-1).indices  # (..., knn), best first
    return best_rows.gather(-1, best // candidates), best_cols.gather(-1, best % candidates)


def tucker_topk_flops(n: int, rank: int, cores: int, candidates: int, knn: int) -> int:
    """Forward FLOPs of one :func:`tucker_topk` call per query (a multiply-add counts 2): the two rank-1
    projections, the ranking of the candidate cells and the kept cells' per-core scores (module docstring)."""
    return (2 * (2 * n * rank) + 2 * (candidates * rank * rank + candidates * candidates * rank)
            + 2 * cores * knn * (rank * rank + rank))
