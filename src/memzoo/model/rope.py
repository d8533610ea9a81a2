"""Rotary position embeddings (Su et al., 2021, "RoFormer")."""

from __future__ import annotations

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotating query/key pairs by position.

    Dimension pair ``(i, i + head_dim/2)`` at position ``p`` is rotated by angle ``p · base^(-2i/head_dim)``
    (the "rotate half" layout). Tables are buffers (not saved in checkpoints) of shape ``(max_seq_len, head_dim/2)``.
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
        """Rotates ``x: (B, T, H, head_dim)`` for positions ``start_pos .. start_pos + T - 1``."""
        T = x.shape[1]
        if start_pos + T > self.max_seq_len:
            raise ValueError(
                f"sequence reaches position {start_pos + T} but the model's max_seq_len is {self.max_seq_len}; "
                f"raise model.max_seq_len or use shorter sequences"
            )
        cos = self.cos[start_pos : start_pos + T].view(1, T, 1, -1)
        sin = self.sin[start_pos : start_pos + T].view(1, T, 1, -1)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return rotated.to(x.dtype)
