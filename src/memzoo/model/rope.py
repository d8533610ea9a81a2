"""Rotary position embeddings (Su et al., 2021, "RoFormer"), with the frequency scalings of Llama-family models."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn

#: Frequency scalings :func:`rope_inv_freq` implements (Hugging Face ``rope_type`` names).
ROPE_SCALINGS = ("linear", "llama3")


def rope_inv_freq(head_dim: int, base: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies ``(head_dim/2,)`` float64: ``base^(-2i/head_dim)``, then scaled.

    ``scaling`` (Hugging Face ``rope_scaling`` / ``rope_parameters`` form; ``None`` or ``rope_type: default``: none):

    - ``{rope_type: linear, factor: f}``: every frequency divided by ``f`` (positions interpolated).
    - ``{rope_type: llama3, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: L}``:
      wavelengths ``λ = 2π/ω`` longer than ``L/low_freq_factor`` are divided by ``factor``, those shorter than
      ``L/high_freq_factor`` kept, those between interpolated with ``s = (L/λ − low) / (high − low)``:
      ``ω' = (1 − s)·ω/factor + s·ω``.

    Other types (yarn, dynamic, longrope, ...) raise ``ValueError`` naming them.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = rope_scaling_type(scaling)
    if kind == "default":
        return inv_freq
    factor = _number(scaling, "factor")
    if kind == "linear":
        return inv_freq / factor
    low, high = _number(scaling, "low_freq_factor"), _number(scaling, "high_freq_factor")
    original = _number(scaling, "original_max_position_embeddings")
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_scaling_type(scaling: Mapping[str, Any] | None) -> str:
    """``default`` (no scaling) or one of :data:`ROPE_SCALINGS`; an unsupported type raises ``ValueError``."""
    if scaling is None:
        return "default"
    if not isinstance(scaling, Mapping):
        raise ValueError(f"rope_scaling must be a mapping like {{rope_type: linear, factor: 2.0}}, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind != "default" and kind not in ROPE_SCALINGS:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; memzoo implements {('default', *ROPE_SCALINGS)}"
        )
    return kind


def _number(scaling: Mapping[str, Any], key: str) -> float:
    value = scaling.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"rope_scaling {scaling.get('rope_type', scaling.get('type'))!r} needs a positive {key}, "
                         f"got {value!r}")
    return float(value)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotating query/key pairs by position.

    Dimension pair ``(i, i + head_dim/2)`` at position ``p`` is rotated by angle ``p · ω_i`` with
    ``ω_i = base^(-2i/head_dim)`` (the "rotate half" layout), scaled by ``scaling`` (see :func:`rope_inv_freq`).
    Tables are buffers (not saved in checkpoints) of shape ``(max_seq_len, head_dim/2)``.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0,
                 scaling: Mapping[str, Any] | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim} (dim / n_heads)")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.base = base
        self.scaling = dict(scaling) if scaling is not None else None
        inv_freq = rope_inv_freq(head_dim, base, scaling)
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
