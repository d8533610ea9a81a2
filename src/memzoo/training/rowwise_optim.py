"""Row-wise optimizers: updates that touch only the rows of a table present in its (row-sparse) gradient.

A memory pool's table can have millions of rows, of which a step reads a few thousand. With ``update: sparse`` the
gradient is a row-sparse COO tensor, and these optimizers update only those rows, so a step costs O(rows used), not
O(rows); a dense gradient updates every row. :class:`LazyAdam` (Adam moments per element, a step count per row),
:class:`RowwiseAdagrad` (one accumulator per row) and :class:`RowwiseSGD`; :mod:`memzoo.training.optim` bundles them
with the dense optimizer.

Host tables (``table_device: host``): their gradients are on the host, so these optimizers update them there, with
their state in host memory (LazyAdam's C++ row kernel runs on them).

Memory-parallel tables (:mod:`memzoo.parallel.memory_parallel`): a ``DTensor`` whose local shard holds all rows and
``D/M`` columns, with a row-sparse gradient of that shard. The optimizers update the local shard in place and keep
the ``(N, D)`` states as ``DTensor`` s of the same layout (so sharded checkpoints hold each rank's part) and the
per-row states (``step``, ``sum``) whole on every rank of the group, equal there because every rank of a group
reads the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from memzoo.ops import cpu_read
from memzoo.parallel.torch_private import local_shard

ParamGroup = dict[str, Any]

__all__ = ["BLOCK_ELEMENTS", "LazyAdam", "RowwiseAdagrad", "RowwiseSGD", "row_blocks", "rows_per_block", "touched_rows"]


# Rows per block are chosen so that a block of a (N, D) table holds about this many elements (2 MiB in fp32): the
# gathered rows, their moments and one scratch buffer then stay in cache while the update's arithmetic passes over
# them, and no temporary ever has the size of all touched rows. Tests shrink it to exercise block boundaries.
BLOCK_ELEMENTS = 2**19


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rows a gradient touches and their gradients: ``(rows (U,) int64, row_grads (U, D))``, rows distinct.

    A sparse COO gradient (rows sparse, rows dense: ``sparse_dim == 1``) whose row indices are already strictly
    ascending is used as it is, without a copy, whether or not it carries the coalesced flag (autograd's gradient
    accumulation drops the flag of the already-coalesced gradients ``weighted_gather(sparse_grad=True)`` makes);
    any other is coalesced, so duplicate rows (e.g. ``F.embedding(sparse=True)``'s) are summed. A dense gradient
    touches every row: ``(None, grad)``.
    """
    if not grad.is_sparse:
        return None, grad
    if grad.sparse_dim() != 1:
        raise ValueError(
            f"row-wise optimizers need row-sparse gradients (sparse_dim=1, dense rows), got sparse_dim="
            f"{grad.sparse_dim()}; produce them with weighted_gather(..., sparse_grad=True)"
        )
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if bool((rows[1:] > rows[:-1]).all()):  # O(U) check instead of an O(U log U + U·D) sort and copy
            return rows, grad._values()
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def rows_per_block(row_dim: int) -> int:
    """How many rows of ``row_dim`` elements make one block of about ``BLOCK_ELEMENTS`` elements (at least 1)."""
    return max(1, BLOCK_ELEMENTS // max(1, row_dim))


def row_blocks(
    tensors: Sequence[torch.Tensor], rows: torch.Tensor | None, n_rows: int
) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """The touched rows of several ``(N, ...)`` tensors of one table, block by block, for in-place updates.

    ``rows (U,)`` are distinct table rows (``None``: a dense gradient, every row, ``U = N``), ``n_rows = U``.
    Yields ``(span, blocks)``: ``span`` selects the block's rows of the gradient ``(U, D)``; ``blocks`` holds the
    block's rows of each tensor. For a dense gradient they are views, so in-place updates land in the tensors;
    otherwise they are gathered into buffers reused by every block and, when the loop body is done with them,
    written back (a loop left early leaves its last block unwritten). Memory: one block per tensor.
    """
    block = min(rows_per_block(tensors[0].shape[1:].numel()), max(1, n_rows))
    buffers = None
    for start in range(0, n_rows, block):
        span = slice(start, min(start + block, n_rows))
        if rows is None:
            yield span, [tensor[span] for tensor in tensors]
            continue
        if buffers is None:
            buffers = [tensor.new_empty((block, *tensor.shape[1:])) for tensor in tensors]
        block_rows = rows[span]
        n = block_rows.numel()
        blocks = [torch.index_select(t, 0, block_rows, out=buffer[:n]) for t, buffer in zip(tensors, buffers)]
        yield span, blocks
        for tensor, values in zip(tensors, blocks):
            tensor.index_copy_(0, block_rows, values)


def _fused_rows(param: torch.Tensor, *state_and_grad: torch.Tensor) -> bool:
    """Whether a row-wise update can run in the C++ kernel (:mod:`memzoo.ops.cpu_read`): a contiguous float32 /
    float64 CPU table and state, a gradient of the same dtype, the kernels built."""
    grad = state_and_grad[-1]
    tensors = (param, *state_and_grad[:-1])
    return (
        not any(isinstance(t, DTensor) for t in (param, grad))
        and grad.dtype == param.dtype
        and all(t.is_contiguous() for t in tensors)
        and cpu_read.supports(param, grad, *state_and_grad[:-2])
    )


def _check_table(optimizer: str, param: torch.Tensor) -> None:
    if param.dim() != 2:
        raise ValueError(
            f"{optimizer} updates (num_rows, row_dim) tables row by row, got a parameter of shape "
            f"{tuple(param.shape)}; give it to the dense optimizer"
        )


def _check_hyperparameters(name: str, lr: float, eps: float, weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"{name}: lr must be >= 0, got {lr!r}")
    if not eps >= 0.0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay!r}")


class _RowwiseOptimizer(Optimizer):
    """Base of the row-wise table optimizers: ``step`` updates each table that has a gradient, row by row."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update_table(param, group)
        return loss

    def _update_table(self, param: torch.Tensor, group: ParamGroup) -> None:
        raise NotImplementedError


class LazyAdam(_RowwiseOptimizer):
    """AdamW applied row by row, only to the rows a gradient touches (lazy Adam for embedding tables).

    Exact semantics. Every row ``r`` of a ``(N, D)`` table keeps its own ``step[r]`` (touches so far), first and
    second moments ``m[r], v[r]``. A step touches the rows present in the (coalesced) sparse gradient, or every
    row for a dense gradient. For each touched row, with ``t = step[r] + 1`` and its gradient ``g``:

        p[r] ← p[r] · (1 − lr · weight_decay)                  decoupled weight decay, only when touched
        m[r] ← β1 · m[r] + (1 − β1) · g
        v[r] ← β2 · v[r] + (1 − β2) · g²
        p[r] ← p[r] − lr / (1 − β1^t) · m[r] / (sqrt(v[r] / (1 − β2^t)) + eps)
        step[r] ← t

    Untouched rows (parameter, moments, step) do not change at all. So a row's trajectory is exactly that of
    ``torch.optim.AdamW`` run on that row alone, fed only the gradients of the steps that touched it (bias
    correction per row, by its own step count; ``torch.optim.SparseAdam`` instead uses the global step count and
    has no weight decay). A dense gradient makes it AdamW on the whole table. ``lr`` is read at every step, so
    schedulers work; rows pay the lr of the steps that touch them.

    State per table: ``exp_avg``, ``exp_avg_sq`` ``(N, D)`` in the parameter's dtype and ``step`` ``(N,)`` int64.

    Cost: on CPU (float32/float64, contiguous) one C++ pass per touched row updates table, moments and step in
    place (:func:`memzoo.ops.cpu_read.adam_rows_`, rows in parallel): O(U·D) traffic, no temporaries. Elsewhere
    the touched rows are updated in blocks of about ``BLOCK_ELEMENTS`` elements: gather the block's rows of
    the table, moments and step counts, update them in place, write them back. Memory traffic is O(U·D) for U
    touched rows, temporaries O(block); bias corrections are computed per row in float64 ``(block, 1)``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        _check_hyperparameters("LazyAdam", lr, eps, weight_decay)
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"LazyAdam: betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for param in group["params"]:
                _check_table("LazyAdam", param)


    def _update_table(self, sharded: torch.Tensor, group: ParamGroup) -> None:
        param, (rows, grad) = local_shard(sharded), touched_rows(local_shard(sharded.grad))
        state = self.state[sharded]
        if not state:
            state["step"] = torch.zeros(param.shape[0], dtype=torch.int64, device=param.device)
            state["exp_avg"] = torch.zeros_like(sharded, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(sharded, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq, step = (local_shard(state[key]) for key in ("exp_avg", "exp_avg_sq", "step"))
        if _fused_rows(param, exp_avg, exp_avg_sq, step, grad):  # one C++ pass per touched row, in place
            lr, betas, eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            cpu_read.adam_rows_(param, exp_avg, exp_avg_sq, step, rows, grad.contiguous(), lr, betas, eps,
                                weight_decay)
            return
        update = param.new_empty(min(rows_per_block(param.shape[1]), grad.shape[0]), param.shape[1])  # scratch
        tensors = [param, exp_avg, exp_avg_sq, step]
        for span, (table, exp_avg, exp_avg_sq, step) in row_blocks(tensors, rows, grad.shape[0]):
            row_grad = grad[span].to(param.dtype)
            self._adam_rows_(table, exp_avg, exp_avg_sq, step, row_grad, update[: table.shape[0]], group)

    @staticmethod
    def _adam_rows_(
        table: torch.Tensor,
        exp_avg: torch.Tensor,
        exp_avg_sq: torch.Tensor,
        step: torch.Tensor,
        grad: torch.Tensor,
        update: torch.Tensor,
        group: ParamGroup,
    ) -> None:
        """The class docstring's update on a block of rows, in place: ``table, exp_avg, exp_avg_sq, grad,
        update (scratch)`` ``(B, D)``, ``step (B,)`` int64."""
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step.add_(1)
        if weight_decay:
            table.mul_(1.0 - lr * weight_decay)
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        # per row, c1 = 1 − β1^t, c2 = sqrt(1 − β2^t):  lr/c1 · m / (sqrt(v)/c2 + eps) = m / ((sqrt(v) + eps·c2) · s)
        # with s = c1 / (lr·c2): two (B, 1) columns, computed in float64, and three passes over the block
        t = step.to(torch.float64).unsqueeze(1)
        bias_correction1, bias_correction2_sqrt = 1.0 - beta1**t, (1.0 - beta2**t).sqrt_()
        eps_column = (eps * bias_correction2_sqrt).to(table.dtype)
        scale = (bias_correction1 / (lr * bias_correction2_sqrt)).to(table.dtype)
        denom = torch.sqrt(exp_avg_sq, out=update).add_(eps_column).mul_(scale)
        table.addcdiv_(exp_avg, denom, value=-1.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch keeps a loaded "step" where it was (assuming a scalar); ours is a per-row tensor next to its table
        for param, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=param.device, dtype=torch.int64)


class RowwiseAdagrad(_RowwiseOptimizer):
    """Adagrad with one accumulator per row (the row-wise Adagrad of large recommender embedding tables).

    For each touched row ``r`` (present in the coalesced sparse gradient; every row for a dense one), gradient
    ``g (D,)``:

        p[r]   ← p[r] · (1 − lr · weight_decay)     decoupled weight decay, only when touched
        sum[r] ← sum[r] + mean(g²)                  one number per row: the mean of the squared row gradient
        p[r]   ← p[r] − lr · g / (sqrt(sum[r]) + eps)

    Untouched rows do not change. State per table: ``sum (N,)`` (parameter dtype), starting at
    ``initial_accumulator_value``: D times less optimizer memory than Adam's two ``(N, D)`` moments. Rows are
    updated in blocks, as in :class:`LazyAdam`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
    ):
        _check_hyperparameters("RowwiseAdagrad", lr, eps, weight_decay)
        if not initial_accumulator_value >= 0.0:
            raise ValueError(
                f"RowwiseAdagrad: initial_accumulator_value must be >= 0, got {initial_accumulator_value!r}"
            )
        defaults = {"lr": lr, "eps": eps, "weight_decay": weight_decay,
                    "initial_accumulator_value": initial_accumulator_value}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                _check_table("RowwiseAdagrad", param)


    def _update_table(self, sharded: torch.Tensor, group: ParamGroup) -> None:
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        param, (rows, grad) = local_shard(sharded), touched_rows(local_shard(sharded.grad))
        state = self.state[sharded]
        if not state:
            state["sum"] = torch.full(
                (param.shape[0],), group["initial_accumulator_value"], dtype=param.dtype, device=param.device
            )
        squares = param.new_empty(min(rows_per_block(param.shape[1]), grad.shape[0]), param.shape[1])  # scratch
        column_group = _column_shard_group(sharded)
        if column_group is not None:  # mean(g²) of a row split over ranks: the sum of the ranks' sums / D
            mean_squares = torch.empty(grad.shape[0], dtype=param.dtype, device=param.device)
            block = max(1, squares.shape[0])
            for start in range(0, grad.shape[0], block):
                row_grad = grad[start : start + block].to(param.dtype)
                square = torch.mul(row_grad, row_grad, out=squares[: row_grad.shape[0]])
                torch.sum(square, dim=1, out=mean_squares[start : start + block])
            torch.distributed.all_reduce(mean_squares, group=column_group)
            mean_squares.div_(sharded.shape[1])
        for span, (table, accumulator) in row_blocks([param, state["sum"]], rows, grad.shape[0]):
            row_grad = grad[span].to(param.dtype)
            if weight_decay:
                table.mul_(1.0 - lr * weight_decay)
            if column_group is not None:
                accumulator.add_(mean_squares[span])
            else:
                accumulator.add_(torch.mul(row_grad, row_grad, out=squares[: table.shape[0]]).mean(dim=1))
            table.addcdiv_(row_grad, accumulator.sqrt().add_(eps).unsqueeze(1), value=-lr)


class RowwiseSGD(_RowwiseOptimizer):
    """Plain SGD on the rows a gradient touches: ``p[r] ← p[r] · (1 − lr · weight_decay) − lr · g[r]``.

    Untouched rows do not change; no state. Sparse memory finetuning found SGD to forget less than AdamW
    (Lin et al., 2025).
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, weight_decay: float = 0.0):
        _check_hyperparameters("RowwiseSGD", lr, 0.0, weight_decay)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        for group in self.param_groups:
            for param in group["params"]:
                _check_table("RowwiseSGD", param)

    def _update_table(self, sharded: torch.Tensor, group: ParamGroup) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        param, (rows, grad) = local_shard(sharded), touched_rows(local_shard(sharded.grad))
        for span, (table,) in row_blocks([param], rows, grad.shape[0]):
            if weight_decay:
                table.mul_(1.0 - lr * weight_decay)
            table.add_(grad[span].to(param.dtype), alpha=-lr)


def _column_shard_group(table: torch.Tensor) -> Any:
    """The process group over which ``table``'s columns are split (a ``DTensor`` sharded along dim 1 over more
    than one rank), else ``None``."""
    if not isinstance(table, DTensor) or table.device_mesh.size() == 1:
        return None
    if table.device_mesh.ndim != 1 or not table.placements[0].is_shard(1):
        raise ValueError(
            f"row-wise optimizers step tables whose columns are split over a 1-D mesh (Shard(1)), got placements "
            f"{table.placements} on a {table.device_mesh.ndim}-D mesh"
        )
    return table.device_mesh.get_group()
