"""Sparse reads of a large table: ``weighted_gather`` (memory layers) and its adjoint ``gather_dot`` (PEER).

(Over 500 lines because the two ops, their autograd and the one-gradient-per-shared-table route below share the
backward's private helpers and must change together.)

For a table ``values (N, D)`` and bags of ``K`` row indices ``idx (..., K)``:

    weighted_gather:  out[b]    = Σ_j w[b,j] · values[idx[b,j]]          (..., D)
    gather_dot:       out[b, j] = values[idx[b,j]] · x[b]                (..., K)

The two are adjoint in their non-table argument, so each one's backward is made of the other plus one more
kernel, ``weighted_scatter`` (the adjoint in ``values``):

    weighted_scatter: G[r] = Σ_{(b,j): idx[b,j]=r} w[b,j] · src[b]         (N, D), duplicates summed

    d weighted_gather:  grad_w = gather_dot(values, idx, grad_out),     grad_values = weighted_scatter(grad_out, idx, w)
    d gather_dot:       grad_x = weighted_gather(values, idx, grad_out), grad_values = weighted_scatter(x, idx, grad_out)
    d weighted_scatter: grad_src = weighted_gather(G', idx, w),          grad_w = gather_dot(G', idx, src)

so the three are closed under differentiation (double backward works). Each is a ``torch.library`` custom op
(``memzoo::...``) with a fake implementation, so ``torch.compile(fullgraph=True)`` traces through them as single
nodes. No op ever materialises the ``(..., K, D)`` gathered tensor: cost is one pass over the ``B·K`` indexed
rows, ``O(B·K·D)`` time, ``O(B·D + B·K)`` memory (plus ``O(N·D)`` for a dense table gradient).

Kernels: on CPU :mod:`memzoo.ops.cpu_read` (C++/OpenMP, float32/float64; built on first use) or, for other
dtypes or without a compiler, :mod:`memzoo.ops.cpu_gather` (vectorised PyTorch); :mod:`memzoo.ops.triton_gather`
on CUDA. ``weighted_gather``'s first-order backward is one op, ``memzoo::weighted_gather_backward``: on the C++
path one call sorts the positions by row once and computes the table's row gradient and the weights' gradient
(:func:`memzoo.ops.cpu_read.scatter_dot`), replacing a sort, a ``unique``, an ``embedding_bag`` and aten's
per-sample-weights backward.

``sparse_grad=True`` makes the table's gradient a coalesced sparse COO tensor ``(N, D)`` holding only the rows
used (as ``nn.Embedding(sparse=True)`` does): a row-wise optimizer then updates O(rows used) instead of O(N).
The autograd engine accepts a sparse gradient for a dense leaf and ``AccumulateGrad`` sums gradients of several
calls on one table in either layout, so the flag is just an argument of the custom op's backward (no separate
``autograd.Function`` is needed). Two caveats, both PyTorch's: ``param.grad`` may carry the "uncoalesced" flag
after accumulation although its rows are distinct (``AccumulateGrad`` re-wraps it), so consumers should call
``.coalesce()`` (cheap here); and under ``torch.compile`` a graph may read a table with ``sparse_grad=True`` only
once, since AOTAutograd cannot yet add two sparse gradients of one input inside a traced graph (compile per
block, so each layer's sparse gradient leaves its own graph and eager autograd sums them).

One gradient per shared table: when several eager reads of one table (a pool shared by layers) run their
first-order backward on the C++ path with row-sparse table gradients, autograd would add their sparse gradients
(a zero-filled buffer of all their rows and a merge, before the table's ``AccumulateGrad``). Instead a read that
finds another read of the same table still to run in this backward (one the engine will execute) returns no table
gradient and leaves its ``(src, indices, weights)`` with the table; the last read sorts the positions of every
deposited term and its own by row and sums them in one pass (a fixed order), and returns the table's one gradient.
The other gradients are unchanged; compiled graphs, double backward and dense table gradients take the per-read
route. Reads sum only terms of their own kind: ``weighted_gather`` and ``gather_dot`` each other's, UltraMem's
grouped reads (:mod:`memzoo.ops.grouped_gather`) those with the same groups and chunks.

A dense table gradient is added where it lands. When the table's ``.grad`` already holds a dense buffer (the
second and later micro-batches of gradient accumulation, or ``zero_grad(set_to_none=False)``), the backward hands
autograd the gradient as coalesced rows instead of a fresh ``(N, D)`` tensor; ``AccumulateGrad`` adds a sparse
gradient into a dense ``.grad`` in place, so ``.grad`` stays dense and the step never allocates, zero-fills and
adds ``N·D`` elements to update the few rows a batch touched (a 4 GiB transient for a 2^20 × 1024 fp32 table).
When ``.grad`` is ``None`` (the first micro-batch; Lightning's default ``set_to_none``) the dense gradient is
returned and ``AccumulateGrad`` keeps that buffer as ``.grad``, so there is no transient either. The row form is
used only where it is invisible: eager mode, a first-order backward (no ``create_graph``), a leaf table whose
``.grad`` is a dense tensor of its dtype and device, and a backward that accumulates into it (``.backward()``;
``torch.autograd.grad`` still receives a dense gradient). Tensor hooks registered on the table itself
(``table.register_hook``) then see the sparse rows; ``register_post_accumulate_grad_hook`` sees the dense sum.
"""

import threading
import weakref
from typing import Callable, NamedTuple

import torch

from memzoo.ops.cpu_gather import gather_dot as cpu_gather_dot
from memzoo.ops.cpu_gather import weighted_gather as cpu_weighted_gather
from memzoo.ops.cpu_gather import weighted_scatter as cpu_weighted_scatter
from memzoo.ops.cpu_gather import weighted_scatter_rows as cpu_weighted_scatter_rows
from memzoo.ops.cpu_read import gather_dot as cpu_read_gather_dot
from memzoo.ops.cpu_read import scatter_dot as cpu_read_scatter_dot
from memzoo.ops.cpu_read import supports as cpu_read_supports

__all__ = ["gather_dot", "weighted_gather"]

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------- public API


def weighted_gather(values: Tensor, indices: Tensor, weights: Tensor, *, sparse_grad: bool = False) -> Tensor:
    """Weighted sum of table rows per bag: ``out[b] = Σ_j weights[b,j] · values[indices[b,j]]``.

    Args:
        values: ``(N, D)`` floating table (the memory values).
        indices: ``(..., K)`` integer row indices in ``[0, N)``; duplicates are summed.
        weights: ``(..., K)``, same dtype as ``values``.
        sparse_grad: make ``values.grad`` a sparse COO ``(N, D)`` tensor holding only the rows used.

    Returns:
        ``(..., D)`` in ``values.dtype`` (accumulated in fp32 for bf16/fp16). Differentiable in ``values`` and
        ``weights``. Time ``O(B·K·D)`` for ``B`` bags; the ``(..., K, D)`` gathered rows are never stored.
    """
    _check_table("weighted_gather", values, indices, sparse_grad)
    _check_per_index("weighted_gather", "weights", weights, values, indices)
    bags = (indices.shape[:-1].numel(), indices.shape[-1])
    out = _weighted_gather(values, indices.reshape(bags).long(), weights.reshape(bags), sparse_grad)
    return out.view(*indices.shape[:-1], values.shape[1])


def gather_dot(values: Tensor, indices: Tensor, x: Tensor, *, sparse_grad: bool = False) -> Tensor:
    """Dot products of each bag's vector with its rows: ``out[b, j] = values[indices[b,j]] · x[b]``.

    Args:
        values: ``(N, D)`` floating table (e.g. PEER's expert down-projections).
        indices: ``(..., K)`` integer row indices in ``[0, N)``.
        x: ``(..., D)``, same leading shape as ``indices`` and same dtype as ``values``.
        sparse_grad: make ``values.grad`` a sparse COO ``(N, D)`` tensor holding only the rows used.

    Returns:
        ``(..., K)`` in ``values.dtype``. Differentiable in ``values`` and ``x``. Time ``O(B·K·D)``; the gathered
        rows are never stored for the whole batch.
    """
    _check_table("gather_dot", values, indices, sparse_grad)
    lead = indices.shape[:-1]
    if x.shape != (*lead, values.shape[-1]):
        raise ValueError(
            f"gather_dot: x must have shape (*indices.shape[:-1], D) = {(*lead, values.shape[-1])}, "
            f"got {tuple(x.shape)}"
        )
    _check_same("gather_dot", "x", x, values)
    n_bags = indices.shape[:-1].numel()
    out = _gather_dot(
        values,
        indices.reshape(n_bags, indices.shape[-1]).long(),
        x.reshape(n_bags, values.shape[1]),
        sparse_grad,
    )
    return out.view(indices.shape)


# ----------------------------------------------------------------------------------------------- checks


def _check_table(op: str, values: Tensor, indices: Tensor, sparse_grad: bool) -> None:
    if values.dim() != 2 or not values.is_floating_point():
        raise ValueError(
            f"{op}: values must be a 2-D floating table (N, D), got shape {tuple(values.shape)} {values.dtype}"
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{op}: indices must be an integer tensor (int64), got {indices.dtype}; use .long()")
    if indices.dim() < 1:
        raise ValueError(f"{op}: indices must be (..., K), got a 0-d tensor")
    if indices.device != values.device:
        raise ValueError(
            f"{op}: indices are on {indices.device} but values on {values.device}; move them to one device"
        )
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"{op}: sparse_grad must be a bool, got {sparse_grad!r}")


def _check_per_index(op: str, name: str, tensor: Tensor, values: Tensor, indices: Tensor) -> None:
    if tensor.shape != indices.shape:
        raise ValueError(
            f"{op}: {name} must have the shape of indices {tuple(indices.shape)}, got {tuple(tensor.shape)}"
        )
    _check_same(op, name, tensor, values)


def _check_same(op: str, name: str, tensor: Tensor, values: Tensor) -> None:
    if tensor.device != values.device:
        raise ValueError(
            f"{op}: {name} is on {tensor.device} but values on {values.device}; move them to one device"
        )
    if tensor.dtype != values.dtype:
        raise TypeError(
            f"{op}: {name} dtype {tensor.dtype} differs from values dtype {values.dtype}; cast with "
            f".to(values.dtype)"
        )


def _check_index_range(op: str, indices: Tensor, num_rows: int, name: str = "index",
                       limit: str | None = None) -> None:
    """Runs inside the custom ops (opaque to the compiler): every value of ``indices`` (``name``: what they are) in
    ``[0, num_rows)``; ``limit`` says what bounds them (default: a table of ``num_rows`` rows).

    CPU: exact, names the offending value. CUDA: asynchronous, like ``F.embedding`` there: a device-side assert
    with the valid range, raised at a later synchronisation. A host-side check would stall the stream every call
    (about 60 µs, a fifth of the forward at N = 2^20, D = 1024 on an H200).
    """
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    if indices.is_cuda:
        in_range = (low >= 0) & (high < num_rows)
        torch._assert_async(in_range, f"{op}: {name} out of range; valid: [0, {num_rows - 1}]")
        return
    low, high = int(low), int(high)
    if low < 0 or high >= num_rows:
        bad = low if low < 0 else high
        limit = f"a table of {num_rows} rows" if limit is None else limit
        raise IndexError(f"{op}: {name} {bad} is out of range for {limit}; valid: [0, {num_rows - 1}]")


class _Kernels(NamedTuple):
    """One device's kernels (the functions of :mod:`memzoo.ops.cpu_gather` or :mod:`memzoo.ops.triton_gather`)."""

    weighted_gather: Callable
    gather_dot: Callable
    weighted_scatter: Callable
    weighted_scatter_rows: Callable


_CPU_KERNELS = _Kernels(cpu_weighted_gather, cpu_gather_dot, cpu_weighted_scatter, cpu_weighted_scatter_rows)


def _kernels(device: torch.device) -> _Kernels:
    """The kernels for a device: Triton on CUDA, vectorised PyTorch elsewhere."""
    if device.type == "cuda":
        from memzoo.ops.triton_gather import (
            gather_dot,
            weighted_gather,
            weighted_scatter,
            weighted_scatter_rows,
        )

        return _Kernels(weighted_gather, gather_dot, weighted_scatter, weighted_scatter_rows)
    return _CPU_KERNELS


# ----------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("memzoo::weighted_gather", mutates_args=())
def _weighted_gather(values: Tensor, indices: Tensor, weights: Tensor, sparse_grad: bool) -> Tensor:
    """``(N, D), (B, K), (B, K) -> (B, D)``."""
    _check_index_range("weighted_gather", indices, values.shape[0])
    return _kernels(values.device).weighted_gather(
        values.contiguous(), indices.contiguous(), weights.contiguous()
    )


@_weighted_gather.register_fake
def _(values, indices, weights, sparse_grad):
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("memzoo::gather_dot", mutates_args=())
def _gather_dot(values: Tensor, indices: Tensor, x: Tensor, sparse_grad: bool) -> Tensor:
    """``(N, D), (B, K), (B, D) -> (B, K)``."""
    _check_index_range("gather_dot", indices, values.shape[0])
    values, indices, x = values.contiguous(), indices.contiguous(), x.contiguous()
    if cpu_read_supports(values, x):
        return cpu_read_gather_dot(values, indices, x)
    return _kernels(values.device).gather_dot(values, indices, x)


@_gather_dot.register_fake
def _(values, indices, x, sparse_grad):
    return values.new_empty(indices.shape)


@torch.library.custom_op("memzoo::weighted_scatter", mutates_args=())
def _weighted_scatter(src: Tensor, indices: Tensor, weights: Tensor, num_rows: int) -> Tensor:
    """``(B, D), (B, K), (B, K) -> (num_rows, D)``: ``G[r] = Σ_{idx[b,j]=r} w[b,j] · src[b]``."""
    src, indices, weights = src.contiguous(), indices.contiguous(), weights.contiguous()
    if cpu_read_supports(src, weights):
        return cpu_read_scatter_dot(src, indices, weights, None, num_rows, dense=True)[1]
    return _kernels(src.device).weighted_scatter(src, indices, weights, num_rows)


@_weighted_scatter.register_fake
def _(src, indices, weights, num_rows):
    return src.new_empty(num_rows, src.shape[1])


@torch.library.custom_op("memzoo::weighted_scatter_rows", mutates_args=())
def _weighted_scatter_rows(src: Tensor, indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Row-sparse ``weighted_scatter``: ``rows (U,)`` ascending distinct indices, ``sums (U, D)``."""
    src, indices, weights = src.contiguous(), indices.contiguous(), weights.contiguous()
    if cpu_read_supports(src, weights):
        rows, sums, _ = cpu_read_scatter_dot(src, indices, weights, None, _rows_bound(indices), dense=False)
        return rows, sums
    return _kernels(src.device).weighted_scatter_rows(src, indices, weights)


@_weighted_scatter_rows.register_fake
def _(src, indices, weights):
    n_rows_used = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty(n_rows_used), src.new_empty(n_rows_used, src.shape[1])


@torch.library.custom_op("memzoo::weighted_gather_backward", mutates_args=())
def _weighted_gather_backward_op(
    grad_out: Tensor, indices: Tensor, weights: Tensor, values: Tensor, dense: bool, dots_from_bag: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """First-order backward of ``weighted_gather`` in one op: ``(rows, grad_table, grad_weights)``.

    ``grad_table[r] = Σ_{idx[b,j]=r} w[b,j] · grad_out[b]``: with ``dense`` ``(N, D)`` (``rows`` empty), else the
    ``U`` distinct rows ``rows (U,)`` ascending and ``(U, D)``; ``grad_weights[b,j] = values[idx[b,j]] · grad_out[b]``
    for the bags ``b >= dots_from_bag`` (``(B - dots_from_bag, K)``: the last read of a shared table sums the other
    reads' terms with its own but needs only its own weights' gradient).
    """
    grad_out, indices, weights = grad_out.contiguous(), indices.contiguous(), weights.contiguous()
    values = values.contiguous()
    if cpu_read_supports(grad_out, weights, values):
        rows, grad_table, dots = cpu_read_scatter_dot(
            grad_out, indices, weights, values, values.shape[0], dense, dots_from_bag=dots_from_bag
        )
        return (indices.new_empty(0) if rows is None else rows), grad_table, dots
    kernels = _kernels(values.device)
    dots = kernels.gather_dot(values, indices[dots_from_bag:], grad_out[dots_from_bag:])
    if dense:
        return indices.new_empty(0), kernels.weighted_scatter(grad_out, indices, weights, values.shape[0]), dots
    rows, sums = kernels.weighted_scatter_rows(grad_out, indices, weights)
    return rows, sums, dots


@_weighted_gather_backward_op.register_fake
def _(grad_out, indices, weights, values, dense, dots_from_bag=0):
    dots = values.new_empty(indices.shape[0] - dots_from_bag, indices.shape[1])
    if dense:
        return indices.new_empty(0), values.new_empty(values.shape), dots
    n_rows_used = torch.library.get_ctx().new_dynamic_size()
    return indices.new_empty(n_rows_used), values.new_empty(n_rows_used, values.shape[1]), dots


def _rows_bound(indices: Tensor) -> int:
    """An upper bound on the row indices (for the counting sort's size choice): their maximum + 1."""
    return int(indices.max()) + 1 if indices.numel() else 1


# ----------------------------------------------------------------------------------------------- autograd


def _table_grad(src: Tensor, indices: Tensor, weights: Tensor, table: Tensor, sparse: bool) -> Tensor:
    """Gradient of a ``(N, D)`` table read at ``indices``: dense, or sparse COO with only the rows used (asked for,
    or to be added into an existing dense ``.grad`` in place, see the module docstring)."""
    if not (sparse or _adds_into_dense_grad(table)):
        return _weighted_scatter(src, indices, weights, table.shape[0])
    rows, sums = _weighted_scatter_rows(src, indices, weights)
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), sums, table.shape, is_coalesced=True, check_invariants=False
    )


def _adds_into_dense_grad(table: Tensor) -> bool:
    """Whether this backward will add the table's gradient into a dense ``.grad`` buffer it already has, so that
    a row-sparse gradient is added in place by ``AccumulateGrad`` and the caller never sees it (module docstring).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # create_graph, or traced: keep the dense form
        return False
    if not (table.is_leaf and table.requires_grad):
        return False
    grad = table.grad
    if grad is None or grad.layout != torch.strided or grad.dtype != table.dtype or grad.device != table.device:
        return False
    if grad.is_cuda and torch.are_deterministic_algorithms_enabled():  # CUDA dense += sparse may alert there
        return False
    if _will_engine_execute_node is None:  # a PyTorch without the query: always the dense form
        return False
    try:  # True for .backward(); raises inside torch.autograd.grad (which captures the gradient instead)
        return _will_engine_execute_node(torch.autograd.graph.get_gradient_edge(table).node)
    except RuntimeError:
        return False


#: Whether the running backward will execute an autograd node (PyTorch's own ``register_multi_grad_hook`` uses it).
_will_engine_execute_node = getattr(torch._C, "_will_engine_execute_node", None)
#: The id of the running backward (``-1`` outside one): private to autograd, pinned by tests/test_ops_shared_table.py;
#: without it every read takes the per-read route.
_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def _save_table_read(ctx, inputs, output):
    """``weighted_gather`` / ``gather_dot`` inputs: ``(values, indices, weights or x, sparse_grad)``."""
    *tensors, sparse_grad = inputs
    ctx.save_for_backward(*tensors)
    ctx.sparse_grad = sparse_grad
    _register_reader(ctx, tensors[0])


def _save_scatter(ctx, inputs, output):
    """``weighted_scatter`` inputs: ``(src, indices, weights, num_rows)``."""
    ctx.save_for_backward(*inputs[:3])


# ------------------------------------------------------------------------------- one gradient per shared table
#
# When several reads of one table (a pool shared by layers) each return a row-sparse gradient, autograd adds them
# (sparse + sparse: a zero-filled buffer of all their rows, then a merge) before the table's AccumulateGrad. Instead,
# a read whose backward finds another read of the same table still to run in this backward (one the engine will
# execute, :func:`_pending_reader`) returns no table gradient and leaves its term (``(src, indices, weights)``; a
# grouped read's adds its groups) with the table; the last read of that kind to run sums every deposited term and its
# own in one row pass (the positions of all of them sorted by row, summed in a fixed order) and returns the one
# gradient. Only in eager first-order backwards through the C++ kernels; everything else takes the per-read route.

_shared_lock = threading.Lock()
#: id(table) -> the autograd nodes of its eager CPU reads (weak: a graph freed without backward drops out)
_READERS: dict[int, weakref.WeakSet] = {}
#: graph task id -> ids of the read nodes whose backward has run in it
_RAN: dict[int, set[int]] = {}
#: (graph task id, id(table)) -> the table (held: its id cannot be reused while a term waits) and the deposited
#: (src, indices, weights) terms of its gradient
_DEPOSITS: dict[tuple[int, int], tuple[Tensor, list[tuple[Tensor, Tensor, Tensor]]]] = {}


def _register_reader(ctx, values: Tensor, kind: tuple = ("plain",)) -> None:
    """Records an eager read of ``values`` that may take part in the shared-table route (its node, weakly).
    ``kind``: reads sum each other's terms only when their kinds are equal (``("plain",)``: ``weighted_gather`` and
    ``gather_dot``, whose terms are ``(src, indices, weights)``; the grouped read names its groups and chunks)."""
    ctx.table_key, ctx.route_kind = None, kind
    if (torch.compiler.is_compiling() or not values.requires_grad or _will_engine_execute_node is None
            or _current_graph_task_id is None):
        return
    if not cpu_read_supports(values):
        return
    ctx.table_key = id(values)  # the saved table keeps the id from being reused while the node lives
    with _shared_lock:
        readers = _READERS.get(ctx.table_key)
        if readers is None:
            for key in [key for key, nodes in _READERS.items() if not nodes]:
                del _READERS[key]
            readers = _READERS[ctx.table_key] = weakref.WeakSet()
        readers.add(ctx)


def _shared_route(ctx, values: Tensor) -> bool:
    """Whether this read's table gradient takes the shared-table route: an eager first-order backward, a
    registered read, a row-sparse table gradient (asked for, or added into a dense ``.grad``)."""
    if getattr(ctx, "table_key", None) is None or not ctx.needs_input_grad[0]:
        return False
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return ctx.sparse_grad or _adds_into_dense_grad(values)


def _pending_reader(ctx, task: int, dense_grad: bool) -> bool:
    """Whether another read of this node's table will still run its backward in graph task ``task`` and take the
    shared-table route (so it will collect this one's deposit)."""
    with _shared_lock:
        readers = list(_READERS.get(ctx.table_key, ()))
        ran = _RAN.get(task, set())
    for node in readers:
        if node is ctx or id(node) in ran or not node.needs_input_grad[0] or node.route_kind != ctx.route_kind:
            continue
        if not (node.sparse_grad or dense_grad):
            continue
        try:
            if _will_engine_execute_node(node):
                return True
        except RuntimeError:  # no answer here (e.g. inside torch.autograd.grad): this read sums what it has
            return False
    return False


def _collect_terms(ctx, values: Tensor, term: tuple[Tensor, ...]) -> list[tuple[Tensor, ...]] | None:
    """The shared-table route's bookkeeping for one read's table-gradient ``term`` (its ``indices`` second):
    ``None`` when another read of the table, of this read's kind, will still run its backward in this one (the term
    is left with the table for it); else every term deposited for this read to sum, with ``term`` last."""
    task = _current_graph_task_id()
    dense_grad = _adds_into_dense_grad(values)
    key = (task, ctx.table_key, ctx.route_kind)
    if _pending_reader(ctx, task, dense_grad):
        with _shared_lock:
            _RAN.setdefault(task, set()).add(id(ctx))
            _DEPOSITS.setdefault(key, (values, []))[1].append(term)
        return None
    with _shared_lock:
        table, terms = _DEPOSITS.pop(key, (values, []))
        # the same table: activation checkpointing hands each read its own unpacked alias of it, so compare storage
        if table.data_ptr() != values.data_ptr() or table.shape != values.shape:
            raise RuntimeError("memzoo: a deposited table-gradient term belongs to another table")
        _RAN.setdefault(task, set()).add(id(ctx))
        for old in [t for t in _RAN if t < task]:  # earlier backwards are over (or failed): forget them
            del _RAN[old]
        for old in [k for k in _DEPOSITS if k[0] < task]:
            del _DEPOSITS[old]
    return [t for t in terms if t[1].numel()] + [term]


def _rows_gradient(values: Tensor, rows: Tensor, sums: Tensor) -> Tensor:
    """The table's row-sparse gradient: ``sums (U, D)`` at the distinct ascending ``rows (U,)``, coalesced."""
    return torch.sparse_coo_tensor(rows.unsqueeze(0), sums, values.shape, is_coalesced=True, check_invariants=False)


def _shared_table_grad(ctx, values: Tensor, src: Tensor, indices: Tensor, weights: Tensor, want_dots: bool):
    """The table gradient of a read on the shared-table route: ``(grad_values or None, dots or None)``; ``dots`` =
    ``gather_dot(values, indices, src)`` when ``want_dots`` (the weights' gradient of ``weighted_gather``)."""
    terms = _collect_terms(ctx, values, (src, indices, weights))
    if terms is None:
        return None, (_gather_dot(values, indices, src, False) if want_dots else None)
    if len(terms) == 1:
        cat_src, cat_indices, cat_weights = src, indices, weights
    else:
        width = max(term[1].shape[1] for term in terms)
        cat_src = torch.cat([term[0] for term in terms])
        cat_indices = torch.cat([_pad_bags(term[1], width, term[1][:, :1]) for term in terms])
        cat_weights = torch.cat([_pad_bags(term[2], width, term[2].new_zeros(())) for term in terms])
    if want_dots:  # this read's weights' gradient: the dots of its own (last) bags only
        first = cat_src.shape[0] - src.shape[0]
        rows, sums, dots = _weighted_gather_backward_op(cat_src, cat_indices, cat_weights, values, False, first)
        dots = dots[:, : indices.shape[1]]
    else:
        rows, sums = _weighted_scatter_rows(cat_src, cat_indices, cat_weights)
        dots = None
    return _rows_gradient(values, rows, sums), dots


def _pad_bags(tensor: Tensor, width: int, fill: Tensor) -> Tensor:
    """``(B, K, ...) -> (B, width, ...)``, the new columns ``fill`` (a zero weight, a group 0, or the bag's first
    index: a term of 0)."""
    if tensor.shape[1] == width:
        return tensor
    return torch.cat([tensor, fill.expand(tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:])], dim=1)


def _weighted_gather_backward(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    if _shared_route(ctx, values):
        grad_values, grad_weights = _shared_table_grad(ctx, values, grad_out, indices, weights, ctx.needs_input_grad[2])
        return grad_values, None, grad_weights, None
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[2] and not torch.is_grad_enabled():
        sparse = ctx.sparse_grad or _adds_into_dense_grad(values)
        rows, grad_values, grad_weights = _weighted_gather_backward_op(grad_out, indices, weights, values, not sparse)
        if sparse:
            grad_values = _rows_gradient(values, rows, grad_values)
        return grad_values, None, grad_weights, None
    grad_values = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_values = _table_grad(grad_out, indices, weights, values, sparse=ctx.sparse_grad)
    if ctx.needs_input_grad[2]:
        grad_weights = _gather_dot(values, indices, grad_out, False)
    return grad_values, None, grad_weights, None


def _gather_dot_backward(ctx, grad_out):
    values, indices, x = ctx.saved_tensors
    grad_values = grad_x = None
    if _shared_route(ctx, values):
        grad_values, _ = _shared_table_grad(ctx, values, x, indices, grad_out, False)
    elif ctx.needs_input_grad[0]:
        grad_values = _table_grad(x, indices, grad_out, values, sparse=ctx.sparse_grad)
    if ctx.needs_input_grad[2]:
        grad_x = _weighted_gather(values, indices, grad_out, False)
    return grad_values, None, grad_x, None


def _weighted_scatter_backward(ctx, grad_out):
    src, indices, weights = ctx.saved_tensors
    grad_src = grad_weights = None
    if ctx.needs_input_grad[0]:
        grad_src = _weighted_gather(grad_out, indices, weights, False)
    if ctx.needs_input_grad[2]:
        grad_weights = _gather_dot(grad_out, indices, src, False)
    return grad_src, None, grad_weights, None


_weighted_gather.register_autograd(_weighted_gather_backward, setup_context=_save_table_read)
_gather_dot.register_autograd(_gather_dot_backward, setup_context=_save_table_read)
_weighted_scatter.register_autograd(_weighted_scatter_backward, setup_context=_save_scatter)
