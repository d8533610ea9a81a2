"""Reads of a table kept in host memory by a model that computes on an accelerator (``table_device: host``).

For a host table ``values (N, D)`` (CPU) and bags ``indices, weights (..., K)`` on the compute device:

    out[b] = Σ_j weights[b,j] · values[indices[b,j]]                       (..., D) on the compute device

as :func:`memzoo.ops.weighted_gather`, computed in three steps so only the rows a batch uses cross the bus:

1. **stage** (:func:`stage_rows`): on the host, the distinct rows ``rows (U,)`` (ascending) and each index's place
   among them ``inverse (..., K)`` (``torch.unique``); the ``U`` rows gathered (``index_select``) into a pinned
   staging buffer and copied to the compute device with ``non_blocking=True``;
2. **attach** (:class:`HostRows`): the staged ``(U, D)`` rows enter autograd as a function of the host table; its
   backward copies their ``(U, D)`` gradient to the host and returns the table's gradient there: a coalesced
   row-sparse COO tensor (``sparse_grad=True``, for the row-wise optimizers) or a dense ``(N, D)`` tensor (as the
   rows alone when the table's ``.grad`` is already a dense buffer that ``AccumulateGrad`` adds them into in place,
   the rule of :mod:`memzoo.ops.sparse_gather`);
3. **sum** on the compute device: ``weighted_gather(staged, inverse, weights)``.

Outputs equal the on-device read and the gradients are the same sums (the order of additions may differ). Cost per
read: ``U·D`` elements gathered on the host and copied over the bus (``U <= B·K``: duplicate rows cross once), a
host sort of the ``B·K`` indices, and in backward ``U·D`` copied back (a dense table gradient also allocates and
fills ``N·D`` on the host when ``.grad`` is ``None``: use ``update: sparse`` for large host tables). First-order
gradients only.

Ahead of the layer. A token-indexed block knows its indices before the layer runs, so staging can start early
(:func:`stage_rows` with ``asynchronous=True``): on CUDA, the indices go to the host by a non-blocking copy, a
worker thread waits for that copy, sorts and gathers, and copies the rows to the device on a side stream, recording
an event; :meth:`StagedRows.wait` makes the current stream wait for that event. The calling thread only launches
work, so the gathers of later layers overlap the compute of earlier ones. On CPU (or when the compute device is the
host) staging is done at once, unless :data:`THREADED_ON_CPU` (a test switch) sends it to the worker thread too.
Nothing here runs inside a ``torch.compile`` graph (:func:`host_weighted_gather` is
excluded from compilation; the weighted sum is an ordinary call of the custom op).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from memzoo.ops.sparse_gather import _adds_into_dense_grad, weighted_gather

__all__ = ["HostRows", "StagedRows", "host_weighted_gather", "stage_rows"]

Tensor = torch.Tensor

#: Stage asynchronous reads on the worker thread on CPU too (tests use it to run the threaded path without CUDA).
THREADED_ON_CPU = False

_WORKER: ThreadPoolExecutor | None = None
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _worker() -> ThreadPoolExecutor:
    """One background thread for host gathers (torch ops release the GIL; one thread keeps copies in order)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memzoo-host-rows")
    return _WORKER


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


@dataclass
class _Rows:
    rows: Tensor  # (U,) int64 on the host, ascending, distinct
    inverse: Tensor  # (..., K) int64 on the compute device
    staged: Tensor  # (U, D) on the compute device
    ready: torch.cuda.Event | None  # recorded after the copies (CUDA), else None


@dataclass
class StagedRows:
    """The rows of one read, staged (or being staged) on the compute device.

    ``indices`` is the tensor the rows were staged for (the key :meth:`MemoryPool.read` matches against);
    ``version`` the host table's ``_version`` when staging began. :meth:`wait` returns the finished rows.
    """

    indices: Tensor
    version: int
    _result: _Rows | Future = field(repr=False)

    def wait(self) -> _Rows:
        """The staged rows, after making the current stream wait for their copies (CUDA)."""
        result = self._result.result() if isinstance(self._result, Future) else self._result
        if result.ready is not None:
            stream = torch.cuda.current_stream(result.staged.device)
            stream.wait_event(result.ready)
            # allocated on the side stream, used on this one: keep the caching allocator from reusing them early
            result.staged.record_stream(stream)
            result.inverse.record_stream(stream)
            result.ready = None
        self._result = result
        return result

    def done(self) -> bool:
        """Whether the host part of staging has finished (the device copies may still be in flight)."""
        return not isinstance(self._result, Future) or self._result.done()


def _gather(table: Tensor, indices_host: Tensor, device: torch.device, after: torch.cuda.Event | None) -> _Rows:
    """Sorts ``indices_host`` into distinct rows, gathers them and copies them to ``device`` (step 1)."""
    if after is not None:
        after.synchronize()  # the non-blocking copy of the indices to the host has landed
    rows, inverse = torch.unique(indices_host, sorted=True, return_inverse=True)
    n_rows = table.shape[0]
    if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= n_rows):
        bad = int(rows[0]) if int(rows[0]) < 0 else int(rows[-1])
        raise IndexError(f"host table read: row index {bad} is out of range for a table of {n_rows} rows")
    values = table.detach()
    if device.type != "cuda":
        staged = values.index_select(0, rows).to(device)
        return _Rows(rows, inverse.to(device), staged, None)
    pinned = torch.empty((rows.numel(), values.shape[1]), dtype=values.dtype, pin_memory=True)
    torch.index_select(values, 0, rows, out=pinned)
    inverse_pinned = inverse.pin_memory()
    stream = _side_stream(device)
    with torch.cuda.stream(stream):
        # pinned blocks come from the caching host allocator, which keeps them until these copies finish
        staged = pinned.to(device, non_blocking=True)
        inverse_device = inverse_pinned.to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return _Rows(rows, inverse_device, staged, ready)


def stage_rows(table: Tensor, indices: Tensor, device: torch.device, *, asynchronous: bool = False) -> StagedRows:
    """Starts staging the rows ``indices (..., K)`` of the host ``table (N, D)`` on ``device`` (step 1).

    ``asynchronous`` (CUDA ``device`` only; elsewhere staging is done at once): the indices' copy to the host is
    non-blocking and the gather runs on a worker thread, so this returns without waiting for the device.
    """
    with torch.no_grad():
        if asynchronous and device.type == "cuda" and indices.device.type == "cuda":
            indices_host = torch.empty(indices.shape, dtype=torch.int64, pin_memory=True)
            indices_host.copy_(indices, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(indices.device))
            future = _worker().submit(_gather, table, indices_host, device, copied)
            return StagedRows(indices, table._version, future)
        if asynchronous and THREADED_ON_CPU and device.type == "cpu":
            future = _worker().submit(_gather, table, indices.to("cpu", torch.int64), device, None)
            return StagedRows(indices, table._version, future)
        indices_host = indices.to("cpu", torch.int64)
        rows = _gather(table, indices_host, device, None)
        return StagedRows(indices, table._version, rows)


class HostRows(torch.autograd.Function):
    """``staged (U, D)`` (on the compute device) as a function of the host ``table (N, D)``: ``staged = table[rows]``
    (step 2). Backward: the table's gradient on the host, row-sparse COO (``sparse_grad``) or dense."""

    @staticmethod
    def forward(ctx, table: Tensor, rows: Tensor, staged_box: list, sparse_grad: bool) -> Tensor:
        ctx.save_for_backward(rows, table)
        ctx.table_shape, ctx.table_dtype, ctx.sparse_grad = tuple(table.shape), table.dtype, sparse_grad
        return staged_box[0]

    @staticmethod
    def backward(ctx, grad_staged: Tensor):
        if torch.is_grad_enabled():  # the engine enables grad mode for a backward with create_graph=True
            raise RuntimeError(
                "a read of a host table (table_device: host) has first-order gradients only; run the backward "
                "without create_graph=True, or keep the table on the accelerator"
            )
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        rows, table = ctx.saved_tensors
        grad_rows = grad_staged.to("cpu", ctx.table_dtype)
        if ctx.sparse_grad or _adds_into_dense_grad(table):
            grad = torch.sparse_coo_tensor(rows[None], grad_rows, ctx.table_shape, is_coalesced=True,
                                           check_invariants=False)
        else:
            grad = grad_rows.new_zeros(ctx.table_shape).index_copy_(0, rows, grad_rows)
        return grad, None, None, None


@torch.compiler.disable
def host_weighted_gather(
    table: Tensor,
    indices: Tensor,
    weights: Tensor,
    *,
    sparse_grad: bool = False,
    staged: StagedRows | None = None,
) -> Tensor:
    """``Σ_j weights[..., j] · table[indices[..., j]]`` on ``weights.device`` for a host ``table (N, D)``.

    ``staged``: the rows :func:`stage_rows` staged for these ``indices`` (else they are staged now, synchronously).
    ``weights`` must have the table's dtype. Gradients reach ``weights`` (on its device) and ``table`` (on the host).
    """
    if staged is None:
        staged = stage_rows(table, indices, weights.device)
    rows = staged.wait()
    values = HostRows.apply(table, rows.rows, [rows.staged], sparse_grad)
    return weighted_gather(values, rows.inverse, weights)
