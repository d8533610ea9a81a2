"""``grouped_weighted_gather``: UltraMem's grouped multi-core read, each indexed row read once.

For a table ``values (N, D)`` split into ``M`` chunks of width ``d = D/M``, and per bag ``K`` positions with a row
``idx[b,k]``, a group ``g[b,k]`` in ``[0, S)`` and one weight per chunk ``w[b,k,c]``:

    out[b, s, c·d : (c+1)·d] = Σ_{k: g[b,k] = s} w[b,k,c] · values[idx[b,k], c·d : (c+1)·d]         (B, S, D)

Backward (``G = grad_out``):

    grad_values[r, chunk c] = Σ_{(b,k): idx[b,k] = r} w[b,k,c] · G[b, g[b,k], chunk c]
    grad_w[b,k,c]           = values[idx[b,k], chunk c] · G[b, g[b,k], chunk c]

Cost: ``K·D`` multiply-adds per bag forward (each indexed row read once) and ``2·K·D`` backward, where a
``weighted_gather`` per (group, chunk) slot with zero weights outside the group reads ``S·M·K`` chunks: ``S`` times
more. A ``torch.library`` custom op (``memzoo::grouped_weighted_gather``, with a fake implementation); its
first-order backward is one op (``memzoo::grouped_weighted_gather_backward``), and a backward that builds a graph
(``create_graph``) runs the differentiable reference, so double backward works.

Kernels: on CUDA the Triton kernels of :mod:`memzoo.ops.triton_grouped_gather` (each indexed row read once forward;
the table gradient by sort and segment, deterministic); on CPU for float32/float64
:func:`memzoo.ops.cpu_read.grouped_gather` (forward) and :func:`memzoo.ops.cpu_read.scatter_dot` with ``groups``
(both gradients in one pass over the positions sorted by row, deterministic); elsewhere (bf16/fp16 on CPU, no
compiler) the PyTorch reference, which gathers the ``(B, K, D)`` rows (accumulating in float32 for bf16/fp16).
``sparse_grad=True`` makes ``values.grad`` a coalesced sparse COO tensor of the rows used; a dense gradient headed
for a dense ``.grad`` is handed over as rows and added in place, as :func:`memzoo.ops.weighted_gather` does. Grouped
reads of one table (a pool shared by UltraMem layers) with the same groups and chunks hand autograd one row-sparse
gradient, summed by the last read in one pass (:mod:`memzoo.ops.sparse_gather`'s shared-table route); a read that
leaves its term to it computes only its weights' gradient (:func:`memzoo.ops.cpu_read.gather_dot` with ``groups``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from memzoo.ops.cpu_read import gather_dot as cpu_gather_dot
from memzoo.ops.cpu_read import grouped_gather as cpu_grouped_gather
from memzoo.ops.cpu_read import scatter_dot as cpu_scatter_dot
from memzoo.ops.cpu_read import supports as cpu_read_supports
from memzoo.ops.sparse_gather import (
    _adds_into_dense_grad,
    _check_index_range,
    _check_same,
    _check_table,
    _collect_terms,
    _pad_bags,
    _register_reader,
    _rows_gradient,
    _shared_route,
)

__all__ = ["grouped_weighted_gather"]

Tensor = torch.Tensor
OP = "grouped_weighted_gather"


def grouped_weighted_gather(values: Tensor, indices: Tensor, groups: Tensor, weights: Tensor, n_groups: int, *,
                            sparse_grad: bool = False) -> Tensor:
    """Per bag, the weighted sum of its rows into the group each position names, one weight per chunk.

    Args:
        values: ``(N, D)`` floating table.
        indices: ``(..., K)`` integer rows in ``[0, N)``; duplicates are summed.
        groups: ``(..., K)`` integer groups in ``[0, n_groups)``.
        weights: ``(..., K, M)`` in ``values.dtype``, ``M`` dividing ``D``: position ``k``'s weight for chunk ``c``
            (columns ``c·D/M`` to ``(c+1)·D/M``) of its row.
        n_groups: ``S``, the groups of the output.
        sparse_grad: make ``values.grad`` a sparse COO ``(N, D)`` tensor holding only the rows used.

    Returns:
        ``(..., S, D)`` in ``values.dtype`` (module docstring); a group no position names is zero. Differentiable in
        ``values`` and ``weights``; time ``O(B·K·D + B·S·D)`` for ``B`` bags.
    """
    _check_table(OP, values, indices, sparse_grad)
    if groups.shape != indices.shape or groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"{OP}: groups must be an integer tensor of the shape of indices {tuple(indices.shape)}, got "
                         f"{tuple(groups.shape)} {groups.dtype}")
    if groups.device != values.device:
        raise ValueError(f"{OP}: groups are on {groups.device} but values on {values.device}; move them to one device")
    if weights.dim() != indices.dim() + 1 or weights.shape[:-1] != indices.shape:
        raise ValueError(f"{OP}: weights must be (*indices.shape, M) = {(*indices.shape, 'M')}, got "
                         f"{tuple(weights.shape)}")
    chunks = weights.shape[-1]
    if chunks < 1 or values.shape[1] % chunks:
        raise ValueError(f"{OP}: weights' last dimension M={chunks} must divide the table width D={values.shape[1]} "
                         f"(one weight per chunk of D/M columns)")
    _check_same(OP, "weights", weights, values)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"{OP}: n_groups must be a positive int, got {n_groups!r}")
    lead = indices.shape[:-1]
    bags = (lead.numel(), indices.shape[-1])
    out = _grouped_gather(values, indices.reshape(bags).long(), groups.reshape(bags).long(),
                          weights.reshape(*bags, chunks), n_groups, sparse_grad)
    return out.view(*lead, n_groups, values.shape[1])


# ----------------------------------------------------------------------------------------------- reference


def _slots(indices: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """``(B·K,)``: the output row ``b·S + g[b,k]`` of each position."""
    bag = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1)
    return (bag * n_groups + groups).reshape(-1)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reference(values: Tensor, indices: Tensor, groups: Tensor, weights: Tensor, n_groups: int) -> Tensor:
    """The forward in PyTorch ops (differentiable): gathers the ``(B, K, D)`` rows."""
    (n_bags, n_per_bag), chunks, dim = indices.shape, weights.shape[2], values.shape[1]
    acc = _accumulation_dtype(values.dtype)
    rows = values[indices].to(acc).view(n_bags, n_per_bag, chunks, dim // chunks) * weights.to(acc).unsqueeze(-1)
    out = values.new_zeros(n_bags * n_groups, dim, dtype=acc)
    out = out.index_add(0, _slots(indices, groups, n_groups), rows.view(n_bags * n_per_bag, dim))
    return out.view(n_bags, n_groups, dim).to(values.dtype)


def _reference_grads(grad_out: Tensor, indices: Tensor, groups: Tensor, weights: Tensor,
                     values: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad_rows (B·K, D), grad_weights (B, K, M))`` in PyTorch ops (differentiable); ``grad_rows[p]`` is the
    gradient position ``p`` adds to its row ``indices[p]``."""
    (n_bags, n_per_bag), chunks, dim = indices.shape, weights.shape[2], values.shape[1]
    acc = _accumulation_dtype(values.dtype)
    shape = (n_bags, n_per_bag, chunks, dim // chunks)
    src = grad_out.reshape(-1, dim)[_slots(indices, groups, grad_out.shape[1])].to(acc).view(shape)
    grad_weights = (values[indices].to(acc).view(shape) * src).sum(-1).to(weights.dtype)
    grad_rows = (weights.to(acc).unsqueeze(-1) * src).view(n_bags * n_per_bag, dim).to(values.dtype)
    return grad_rows, grad_weights


def _rows_to_table_grad(indices: Tensor, grad_rows: Tensor, values: Tensor, sparse: bool) -> Tensor:
    """The table's gradient from each position's row gradient ``grad_rows (B·K, D)``: a sparse COO tensor (not
    coalesced) or a dense ``(N, D)`` one; differentiable."""
    flat = indices.reshape(-1)
    if sparse:
        return torch.sparse_coo_tensor(flat.unsqueeze(0), grad_rows, values.shape, check_invariants=False)
    return values.new_zeros(values.shape).index_add(0, flat, grad_rows)


# ----------------------------------------------------------------------------------------------- custom ops


class _TritonKernels(NamedTuple):
    """The functions of :mod:`memzoo.ops.triton_grouped_gather`."""

    grouped_gather: Callable
    gather_dot: Callable
    scatter: Callable


def _triton_kernels(device: torch.device) -> _TritonKernels | None:
    """The Triton kernels for CUDA tensors; ``None`` elsewhere (the C++ kernels or the reference)."""
    if device.type != "cuda":
        return None
    from memzoo.ops.triton_grouped_gather import gather_dot, grouped_gather, scatter

    return _TritonKernels(grouped_gather, gather_dot, scatter)


@torch.library.custom_op("memzoo::grouped_weighted_gather", mutates_args=())
def _grouped_gather(values: Tensor, indices: Tensor, groups: Tensor, weights: Tensor, n_groups: int,
                    sparse_grad: bool) -> Tensor:
    """``(N, D), (B, K), (B, K), (B, K, M) -> (B, S, D)``."""
    _check_index_range(OP, indices, values.shape[0])
    _check_index_range(OP, groups, n_groups, name="group", limit=f"n_groups={n_groups}")
    values, indices = values.contiguous(), indices.contiguous()
    groups, weights = groups.contiguous(), weights.contiguous()
    triton_kernels = _triton_kernels(values.device)
    if triton_kernels is not None:
        return triton_kernels.grouped_gather(values, indices, groups, weights, n_groups)
    if cpu_read_supports(values, weights):
        return cpu_grouped_gather(values, indices, groups, weights, n_groups)
    return _reference(values, indices, groups, weights, n_groups)


@_grouped_gather.register_fake
def _(values, indices, groups, weights, n_groups, sparse_grad):
    return values.new_empty(indices.shape[0], n_groups, values.shape[1])


@torch.library.custom_op("memzoo::grouped_weighted_gather_backward", mutates_args=())
def _grouped_gather_backward_op(grad_out: Tensor, indices: Tensor, groups: Tensor, weights: Tensor, values: Tensor,
                                dense: bool, dots_from_bag: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """First-order backward in one op: ``(rows, grad_values, grad_weights)``; with ``dense`` ``grad_values (N, D)``
    (``rows`` empty), else the ``U`` distinct rows ``rows (U,)`` ascending and their gradients ``(U, D)``;
    ``grad_weights`` for the bags ``b >= dots_from_bag`` only (``(B - dots_from_bag, K, M)``: the last read of a
    shared table sums the other reads' terms with its own but needs only its own weights' gradient)."""
    grad_out, indices, groups = grad_out.contiguous(), indices.contiguous(), groups.contiguous()
    weights, values = weights.contiguous(), values.contiguous()
    triton_kernels = _triton_kernels(values.device)
    if triton_kernels is not None:  # the table gradient (sort, segment), the weights' gradient of the last bags
        rows, grad_values = triton_kernels.scatter(grad_out, indices, groups, weights, values.shape[0], dense)
        grad_weights = triton_kernels.gather_dot(values, indices[dots_from_bag:], grad_out[dots_from_bag:],
                                                 groups[dots_from_bag:], weights.shape[2])
        return (indices.new_empty(0) if rows is None else rows), grad_values, grad_weights
    if cpu_read_supports(grad_out, weights, values):
        rows, grad_values, grad_weights = cpu_scatter_dot(grad_out, indices, weights, values, values.shape[0], dense,
                                                          dots_from_bag, groups=groups)
        return (indices.new_empty(0) if rows is None else rows), grad_values, grad_weights
    grad_rows, grad_weights = _reference_grads(grad_out, indices, groups, weights, values)
    grad_weights = grad_weights[dots_from_bag:].clone()
    grad_values = _rows_to_table_grad(indices, grad_rows, values, sparse=not dense)
    if dense:
        return indices.new_empty(0), grad_values, grad_weights
    grad_values = grad_values.coalesce()
    return grad_values.indices()[0], grad_values.values(), grad_weights


@_grouped_gather_backward_op.register_fake
def _(grad_out, indices, groups, weights, values, dense, dots_from_bag=0):
    grad_weights = weights.new_empty(weights.shape[0] - dots_from_bag, *weights.shape[1:])
    if dense:
        return indices.new_empty(0), values.new_empty(values.shape), grad_weights
    n_rows_used = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty(n_rows_used), values.new_empty(n_rows_used, values.shape[1]), grad_weights


# ----------------------------------------------------------------------------------------------- autograd


def _save(ctx, inputs, output):
    values, indices, groups, weights, n_groups, sparse_grad = inputs
    ctx.save_for_backward(values, indices, groups, weights)
    ctx.sparse_grad = sparse_grad
    # reads of one table sum each other's terms when their outputs (groups) and chunks agree
    _register_reader(ctx, values, ("grouped", n_groups, weights.shape[2]))


def _shared_table_grad(ctx, values: Tensor, grad_out: Tensor, indices: Tensor, groups: Tensor, weights: Tensor,
                       want_dots: bool) -> tuple[Tensor | None, Tensor | None]:
    """The table gradient of a read on the shared-table route (:mod:`memzoo.ops.sparse_gather`): ``(grad_values or
    None, grad_weights or None)``; the last grouped read of the table sums every read's term in one pass."""
    terms = _collect_terms(ctx, values, (grad_out, indices, groups, weights))
    if terms is None:  # another read sums this one's term: only the weights' gradient here
        dots = cpu_gather_dot(values, indices, grad_out, groups, weights.shape[2]) if want_dots else None
        return None, dots
    if len(terms) == 1:
        cat_src, cat_indices, cat_groups, cat_weights = terms[0]
    else:
        width = max(term[1].shape[1] for term in terms)
        cat_src = torch.cat([term[0] for term in terms])
        cat_indices = torch.cat([_pad_bags(term[1], width, term[1][:, :1]) for term in terms])
        cat_groups = torch.cat([_pad_bags(term[2], width, term[2].new_zeros(())) for term in terms])
        cat_weights = torch.cat([_pad_bags(term[3], width, term[3].new_zeros(())) for term in terms])
    first = cat_src.shape[0] - grad_out.shape[0]
    if want_dots:  # this read's weights' gradient: its own (last) bags only
        rows, sums, dots = _grouped_gather_backward_op(cat_src, cat_indices, cat_groups, cat_weights, values, False,
                                                       first)
        dots = dots[:, : indices.shape[1]]
    else:
        rows, sums, _ = cpu_scatter_dot(cat_src, cat_indices, cat_weights, None, values.shape[0], False,
                                        groups=cat_groups)
        dots = None
    return _rows_gradient(values, rows, sums), dots


def _backward(ctx, grad_out):
    values, indices, groups, weights = ctx.saved_tensors
    need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    if _shared_route(ctx, values):
        grad_values, grad_weights = _shared_table_grad(ctx, values.contiguous(), grad_out.contiguous(),
                                                       indices.contiguous(), groups.contiguous(), weights.contiguous(),
                                                       need_weights)
        return grad_values, None, None, grad_weights, None, None
    if torch.is_grad_enabled():  # create_graph: the differentiable reference, so the gradients have a graph
        grad_rows, grad_weights = _reference_grads(grad_out, indices, groups, weights, values)
        grad_values = _rows_to_table_grad(indices, grad_rows, values, ctx.sparse_grad) if need_values else None
        return grad_values, None, None, grad_weights if need_weights else None, None, None
    # rows form when asked for, when added into a dense .grad, or when the table needs no gradient (no N·D buffer)
    sparse = not need_values or ctx.sparse_grad or _adds_into_dense_grad(values)
    rows, grad_values, grad_weights = _grouped_gather_backward_op(grad_out, indices, groups, weights, values,
                                                                  not sparse)
    if not need_values:
        grad_values = None
    elif sparse:
        grad_values = _rows_gradient(values, rows, grad_values)
    return grad_values, None, None, grad_weights if need_weights else None, None, None


_grouped_gather.register_autograd(_backward, setup_context=_save)
