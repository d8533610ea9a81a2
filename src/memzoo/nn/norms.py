"""Normalisation layers (plain torch; shipped verbatim in exported Hugging Face folders).

All compute in at least float32 and return the input's dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is float64 (reduced-precision inputs are upcast, doubles kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x)`` over the last dim (no gain): every vector gets norm ``sqrt(D)``."""
    x32 = at_least_float32(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x²) + eps) · weight``, over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_float32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)

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
        x32 = at_least_float32(x)
        if self.kind == "layernorm":
            x32 = x32 - x32.mean(dim=-1, keepdim=True)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.to(x32.dtype)
        if self.bias is not None:
            normed = normed + self.bias.to(x32.dtype)
        return normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, heads={self.weight.shape[0]}, dim={self.weight.shape[1]}, eps={self.eps}"


class HalfLayerNorm(nn.Module):
    """LayerNorm over each half of each head's query, ``x (..., H, 2·half) → same``, one gain and bias ``(half,)``
    shared by all heads and both halves (the query norm of lucidrains' ``product-key-memory``)."""

    def __init__(self, half: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(half))
        self.bias = nn.Parameter(torch.zeros(half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_float32(x).unflatten(-1, (2, self.weight.shape[0]))
        normed = F.layer_norm(x32, self.weight.shape, self.weight.to(x32.dtype), self.bias.to(x32.dtype), self.eps)
        return normed.flatten(-2).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"half={self.weight.shape[0]}, eps={self.eps}"
