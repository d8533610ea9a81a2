"""Rotary position embeddings (Su et al., 2021, "RoFormer")."""

from __future__ import annotations

import torch
import torch.nn as nn


class _RotateHalfFunction(torch.autograd.Function):
    """Rotation of each pair ``(x1_i, x2_i)`` (the two halves of the last dim) by the angle whose cos/sin are given:
    ``(x1·cos − x2·sin, x2·cos + x1·sin)``. The gradient is the inverse rotation of the incoming gradient.

    ``x (..., 2·h)``; ``cos, sin`` broadcast against ``(..., h)``. Computed in float32 for half-precision inputs
    (float64 stays float64), returned in ``x.dtype``. Cost: 4 half-width multiply(-add) passes forward and backward,
    nothing saved but the tables.
    """

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
        dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), cos.dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        x1, x2 = x.chunk(2, dim=-1)
        o1, o2 = out.chunk(2, dim=-1)
        sign = 1.0 if inverse else -1.0
        torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=sign)
        torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=-sign)
        return out.to(x.dtype)

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _RotateHalfFunction._rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _RotateHalfFunction._rotate(grad, cos, sin, inverse=True), None, None


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotating query/key pairs by position.

    Dimension pair ``(i, i + head_dim/2)`` at position ``p`` is rotated by angle ``p · base^(-2i/head_dim)``
    (the "rotate half" layout). The tables are computed once, in float64 and stored in float32, as buffers (not
    saved in checkpoints) of shape ``(max_seq_len, head_dim/2)``.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim} (dim / n_heads)")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotates ``x: (B, T, ..., head_dim)`` (e.g. ``(B, T, H, hd)``, or queries and keys together as
        ``(B, T, 2, H, hd)``) for positions ``start_pos .. start_pos + T - 1``; returns a new tensor in ``x.dtype``."""
        T = x.shape[1]
        if start_pos + T > self.max_seq_len:
            raise ValueError(
                f"sequence reaches position {start_pos + T} but the model's max_seq_len is {self.max_seq_len}; "
                f"raise model.max_seq_len or use shorter sequences"
            )
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embedding of head_dim {self.head_dim} got x of shape {tuple(x.shape)}")
        shape = (1, T) + (1,) * (x.dim() - 3) + (-1,)
        cos = self.cos[start_pos : start_pos + T].view(shape)
        sin = self.sin[start_pos : start_pos + T].view(shape)
        return _RotateHalfFunction.apply(x, cos, sin)
