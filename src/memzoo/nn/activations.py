"""The gated linear unit of SwiGLU MLPs (Shazeer, 2020): ``swiglu(a, b) = silu(a) · b``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memzoo.ops.cpu_dense import supports as dense_kernels_support
from memzoo.ops.cpu_dense import swiglu_backward, swiglu_forward


class _SwiGLUFunction(torch.autograd.Function):
    """``h = silu(a) · b`` by one C++ pass (:func:`memzoo.ops.cpu_dense.swiglu_forward`), saving ``a`` and ``b``;
    the backward ``da = g·b·s·(1 + a·(1 − s))``, ``db = g·a·s`` (``s = sigmoid(a)``) by one more. A ``create_graph``
    backward takes PyTorch ops instead, so double backward works."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return swiglu_backward(grad.contiguous(), a, b)
        s = torch.sigmoid(a)
        return grad * b * s * (1 + a * (1 - s)), grad * a * s


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) · b`` for ``a, b`` of one shape (the gate and up projections), differentiable in both.

    Contiguous float32/float64 CPU tensors outside ``torch.compile`` take the fused C++ kernels (one pass forward,
    one backward, no ``silu(a)`` tensor); anything else (CUDA, half precision, compiled graphs, which fuse it
    themselves) is ``F.silu(a) * b``.
    """
    if a.shape == b.shape and not torch.compiler.is_compiling() and dense_kernels_support(a, b):
        return _SwiGLUFunction.apply(a, b)
    return F.silu(a) * b
