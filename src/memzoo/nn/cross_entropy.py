"""The language-model loss: mean next-token cross-entropy over the labelled positions.

:func:`cross_entropy` is ``F.cross_entropy(logits, labels, ignore_index=...)`` (mean reduction) with the forward and
backward fused into one C++ pass (:mod:`memzoo.ops.cpu_cross_entropy`) for contiguous float32/float64 CPU logits
outside ``torch.compile``; PyTorch's own kernels run everywhere else (GPUs, other dtypes, compile, tensor
subclasses). Both paths give the same value and gradient to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from memzoo.ops.cpu_cross_entropy import cross_entropy_forward
from memzoo.ops.cpu_cross_entropy import supports as cross_entropy_kernel_supports

__all__ = ["cross_entropy"]


class _CrossEntropyFunction(torch.autograd.Function):
    """``mean_{n: y[n] != ignore} −log softmax(x[n])[y[n]]`` for ``x (N, V)``; the forward also writes the gradient
    ``(softmax(x) − onehot(y)) / n_labelled`` (zero rows for ignored labels), which the backward returns as it is
    when the incoming gradient is 1 (a plain ``loss.backward()``) and scaled otherwise, never modified in place (a
    ``retain_graph`` backward may run it again). Once differentiable: a double backward raises."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, n_labelled: int,
                need_grad: bool) -> torch.Tensor:
        scale = 1.0 / n_labelled if n_labelled else math.nan  # PyTorch's mean over no labels: NaN
        rows, grad = cross_entropy_forward(logits, labels, ignore_index, scale, need_grad)
        ctx.grad = grad
        return (rows.sum(dtype=torch.float64) * scale).to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad = ctx.grad
        if not bool(grad_loss == 1):
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``logits (N, V)`` against ``labels (N,)`` over the positions whose label is not
    ``ignore_index`` (NaN when every label is ignored, as ``F.cross_entropy``). A label outside ``[0, V)`` other than
    ``ignore_index`` raises an ``IndexError`` naming it."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits must be (N, V) and labels (N,), got logits {tuple(logits.shape)} "
                         f"and labels {tuple(labels.shape)}")
    if torch.compiler.is_compiling() or not cross_entropy_kernel_supports(logits, labels):
        return F.cross_entropy(logits, labels, ignore_index=ignore_index)
    labelled = labels != ignore_index
    bad = labelled & ((labels < 0) | (labels >= logits.shape[1]))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise IndexError(f"cross_entropy: label {int(labels[row])} at position {row} is outside the vocabulary "
                         f"[0, {logits.shape[1]}) and is not ignore_index ({ignore_index})")
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return _CrossEntropyFunction.apply(logits, labels, ignore_index, int(labelled.sum()), need_grad)
