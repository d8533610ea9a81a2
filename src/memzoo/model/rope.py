"""Rotary position embeddings (Su et al., 2021, "RoFormer")."""

from __future__ import annotations

import torch
import torch.nn as nn


class _RotateHalfFunction(torch.autograd.Function):
    """Rotation of each pair ``(x1_i, x2_i)`` (the two halves of the last dim) by an angle ``θ_i``:
    ``(x1·cos θ − x2·sin θ, x2·cos θ + x1·sin θ)``, i.e. ``x · (cos θ, cos θ)`` then ``∓ sin θ ·`` the other
    half added in place. The gradient is the inverse rotation (``sin θ`` negated).

    ``x (..., d)``; ``cos_full (..., d)`` broadcasts against ``x`` (best laid out like ``x`` so that the full-width
    multiply runs over long contiguous rows), ``sin (..., d/2)`` against each half, both in the compute dtype:
    float32 for half-precision ``x`` (float64 stays float64); returned in ``x.dtype``. Cost: one full-width multiply
    and two half-width multiply-adds, forward and backward; nothing saved but the tables.
    """

    @staticmethod
    def _rotate(x: torch.Tensor, cos_full: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
        out = x * cos_full
        o1, o2 = out.chunk(2, dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        o1.addcmul_(x2, sin, value=-sign)
        o2.addcmul_(x1, sin, value=sign)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_full: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_full, sin)
        return _RotateHalfFunction._rotate(x, cos_full, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos_full, sin = ctx.saved_tensors
        return _RotateHalfFunction._rotate(grad, cos_full, sin, -1.0), None, None


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotating query/key pairs by position.

    Dimension pair ``(i, i + head_dim/2)`` at position ``p`` is rotated by angle ``p · base^(-2i/head_dim)``
    (the "rotate half" layout). The tables are computed once, in float64 and stored in float32, as buffers (not
    saved in checkpoints): ``cos, sin`` of shape ``(max_seq_len, head_dim/2)`` and ``cos_full = (cos, cos)`` of shape
    ``(max_seq_len, head_dim)``.
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
        # cos at full width, (cos, cos), as the rotation multiplies it
        self.register_buffer("cos_full", torch.cat((angles.cos(), angles.cos()), dim=-1).float(), persistent=False)

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
        dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), self.cos.dtype)
        ones = (1,) * (x.dim() - 3)
        # cos laid out like x's (T, ..., head_dim) rows: the full-width multiply then runs over long contiguous rows
        cos_full = self.cos_full[start_pos : start_pos + T].to(dtype).view((1, T) + ones + (self.head_dim,))
        cos_full = cos_full.expand((1, T) + tuple(x.shape[2:])).contiguous()
        sin = self.sin[start_pos : start_pos + T].to(dtype).view((1, T) + ones + (self.head_dim // 2,))
        return _RotateHalfFunction.apply(x, cos_full, sin)
