"""Normalisation layers (shipped verbatim in exported Hugging Face folders).

All compute in at least float32 and return the input's dtype. :func:`rms_norm` runs memzoo's fused C++ kernel
(:mod:`memzoo.ops.cpu_dense`) for contiguous float32/float64 CPU tensors outside ``torch.compile``, else PyTorch ops.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from memzoo.ops.cpu_dense import rms_norm_backward, rms_norm_forward
from memzoo.ops.cpu_dense import supports as dense_kernels_support


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is float64 (reduced-precision inputs are upcast, doubles kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_normalize(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """``scale · x / rms(x)`` over the last dim (no learned gain): every vector gets norm ``scale · sqrt(D)``.

    :func:`rms_norm` with a constant gain ``scale`` in the compute dtype: one fused C++ pass each way where
    :func:`rms_norm` has one (contiguous float32/float64 CPU tensors), differentiable in ``x`` (twice, too).
    """
    gain = torch.full(x.shape[-1:], scale, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
    return rms_norm(x.contiguous(), gain, eps)


class _RMSNormFunction(torch.autograd.Function):
    """``y = x̂ · w`` with ``x̂ = x · r``, ``r = 1 / sqrt(mean(x²) + eps)`` over the last dim, and its closed-form
    gradient ``dx = r · (g·w − x̂ · mean(g·w·x̂))``, ``dw = Σ g·x̂`` (sum over all leading dims).

    Computed in float32 for half-precision inputs (float64 stays float64); ``y`` and ``dx`` come back in ``x``'s
    dtype, ``dw`` in ``w``'s. ``fused``: one C++ pass each way (:func:`memzoo.ops.cpu_dense.rms_norm_forward`;
    saves ``x`` and ``r``); else PyTorch ops, saving ``x``, ``x̂`` (compute dtype) and ``r``: 3 passes over ``x``
    forward (the norm, two products) and 5 backward (``mean(g·w·x̂)`` as one matrix-vector product). A
    ``create_graph`` backward recomputes ``r`` and ``x̂`` from ``x`` with PyTorch ops, so double backward is exact. (``F.rms_norm`` runs separate kernels on CPU and has no
    CPU backward kernel, so it would not be faster here.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = False) -> torch.Tensor:
        ctx.x_dtype = x.dtype
        ctx.fused = fused
        ctx.eps = eps
        if fused:  # one pass; x and r are saved, x̂ is recomputed in the backward
            y, r = rms_norm_forward(x, weight, eps)
            ctx.save_for_backward(x, r, weight)
            return y
        dtype = torch.promote_types(x.dtype, torch.float32)
        x_c = x if x.dtype == dtype else x.to(dtype)
        d = x.shape[-1]
        r = torch.linalg.vector_norm(x_c, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()  # one pass
        x_hat = x_c * r
        ctx.save_for_backward(x, x_hat, r, weight)
        y = x_hat * weight  # promotes a half-precision weight to the compute dtype
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.fused:
            x, r, weight = ctx.saved_tensors
            if not torch.is_grad_enabled():  # a first-order backward: the kernel
                grad_x, grad_w = rms_norm_backward(grad.contiguous(), x, r, weight, ctx.needs_input_grad[0],
                                                   ctx.needs_input_grad[1])
                return grad_x, grad_w, None, None
        else:
            x, x_hat, r, weight = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: x̂ and r recomputed from x, so the gradient is differentiable in x
            x_c = x.to(torch.promote_types(x.dtype, torch.float32))
            r = torch.rsqrt(x_c.pow(2).mean(dim=-1, keepdim=True) + ctx.eps)
            x_hat = x_c * r
        if grad.dtype != x_hat.dtype:
            grad = grad.to(x_hat.dtype)
        d = x_hat.shape[-1]
        g_x_hat = (grad * x_hat).reshape(-1, d)  # (N, d)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = g_x_hat.sum(dim=0)  # in the compute dtype
            if grad_w.dtype != weight.dtype:
                grad_w = grad_w.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            w = weight if weight.dtype == x_hat.dtype else weight.to(x_hat.dtype)
            dot = torch.mv(g_x_hat, w).view(x_hat.shape[:-1] + (1,))  # Σ_d g·w·x̂, one matrix-vector product
            grad_x = torch.addcmul(grad * w, x_hat, dot, value=-1.0 / d).mul(r)
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_w, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim of ``x (..., dim)``, ``weight (dim,)``.

    Computed in float32 (float64 inputs in float64), returned in ``x.dtype``; differentiable in ``x`` and ``weight``.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(
            f"rms_norm: weight of shape {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}"
        )
    fused = x.shape[-1] > 0 and not torch.compiler.is_compiling() and dense_kernels_support(x, weight)
    return _RMSNormFunction.apply(x, weight, eps, fused)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x²) + eps) · weight``, over the last dim
    (see :func:`rms_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class HeadNorm(nn.Module):
    """LayerNorm or RMSNorm over the last dim of ``x (..., H, D)``, with gain (and bias) per head and coordinate."""

    def __init__(self, heads: int, head_dim: int, kind: Literal["layernorm", "rmsnorm"], eps: float = 1e-6):
        super().__init__()
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The norm without gain in one fused pass each way (``F.layer_norm``, or :func:`rms_normalize`), then the
        per-head gain and bias in one op; in at least float32, returned in ``x.dtype``."""
        x32 = at_least_float32(x)
        if self.kind == "layernorm":
            normed = nn.functional.layer_norm(x32, x32.shape[-1:], eps=self.eps)
        else:
            normed = rms_normalize(x32, self.eps)
        weight = self.weight.to(x32.dtype)
        if self.bias is not None:
            return torch.addcmul(self.bias.to(x32.dtype), normed, weight).to(x.dtype)
        return (normed * weight).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, heads={self.weight.shape[0]}, dim={self.weight.shape[1]}, eps={self.eps}"
