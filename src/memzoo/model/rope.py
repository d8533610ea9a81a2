"""Rotary position embeddings (Su et al., 2021, "RoFormer"), with the frequency scalings of Llama-family models."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from memzoo.ops.cpu_dense import rope_qkv_backward, rope_qkv_forward
from memzoo.ops.cpu_dense import supports as dense_kernels_support

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


def rotate_for_position(x: torch.Tensor, inv_freq: torch.Tensor, position: float) -> torch.Tensor:
    """``x (..., head_dim)`` rotated as a key or query at ``position`` (any real number, negative included, beyond
    the tables too): pair ``(x1_i, x2_i)`` by angle ``position · inv_freq_i`` ("rotate half" layout, as
    :class:`RotaryEmbedding`). Computed in float64, returned in ``x.dtype``."""
    angles = position * inv_freq.to(device=x.device, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


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


class _RotaryQKVFunction(torch.autograd.Function):
    """``qkv (B, T, (Hq + Hk + Hv)·hd)`` → rotated ``q``, ``k`` and ``v`` (fresh contiguous tensors) by one C++ pass
    (:func:`memzoo.ops.cpu_dense.rope_qkv_forward`); the backward writes ``qkv``'s gradient in one pass. Saves only
    the tables. A ``create_graph`` backward takes PyTorch ops (the inverse rotation), so double backward works."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: tuple[int, int, int], cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return rope_qkv_forward(qkv, heads, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return rope_qkv_backward(grad_q, grad_k, grad_v, cos, sin), None, None, None
        B, T = grad_q.shape[:2]
        c, s = cos[None, :, None], sin[None, :, None]  # (1, T, 1, hd/2)

        def rotate_back(g: torch.Tensor) -> torch.Tensor:
            g1, g2 = g.chunk(2, dim=-1)
            return torch.cat((g1 * c + g2 * s, g2 * c - g1 * s), dim=-1)

        return torch.cat([rotate_back(grad_q), rotate_back(grad_k), grad_v], dim=2).reshape(B, T, -1), None, None, None


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for rotating query/key pairs by position.

    Dimension pair ``(i, i + head_dim/2)`` at position ``p`` is rotated by angle ``p · ω_i`` with
    ``ω_i = base^(-2i/head_dim)`` (the "rotate half" layout), scaled by ``scaling`` (see :func:`rope_inv_freq`).
    The tables are computed once, in float64 and stored in float32, as buffers (not saved in checkpoints):
    ``cos, sin`` of shape ``(max_seq_len, head_dim/2)`` and ``cos_full = (cos, cos)`` of shape
    ``(max_seq_len, head_dim)``.
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
        for name, table in self._tables():
            self.register_buffer(name, table, persistent=False)

    def _tables(self) -> list[tuple[str, torch.Tensor]]:
        inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        # cos at full width, (cos, cos), as the rotation multiplies it
        return [("cos", cos.float()), ("sin", sin.float()), ("cos_full", torch.cat((cos, cos), dim=-1).float())]

    def _check_end(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ValueError(
                f"sequence reaches position {end} but the model's max_seq_len is {self.max_seq_len}; "
                f"raise model.max_seq_len or use shorter sequences"
            )

    def rotate_qkv(self, qkv: torch.Tensor, heads: tuple[int, int, int], start_pos: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A fused projection ``qkv (B, T, (Hq + Hk + Hv)·hd)`` split into ``q (B, T, Hq, hd)`` and
        ``k (B, T, Hk, hd)`` rotated for positions ``start_pos ..`` and ``v (B, T, Hv, hd)``, by memzoo's C++ kernel
        (one pass forward, one backward); ``None`` where that kernel does not apply (not a contiguous float32/float64
        CPU tensor, or under ``torch.compile``): then rotate the views with :meth:`forward`."""
        if torch.compiler.is_compiling() or qkv.dim() != 3 or not dense_kernels_support(qkv):
            return None
        T = qkv.shape[1]
        self._check_end(start_pos + T)
        cos, sin = self.cos[start_pos : start_pos + T], self.sin[start_pos : start_pos + T]
        if cos.dtype != qkv.dtype:
            cos, sin = cos.to(qkv.dtype), sin.to(qkv.dtype)
        if not dense_kernels_support(qkv, cos, sin):
            return None
        return _RotaryQKVFunction.apply(qkv, tuple(heads), cos, sin)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """Recomputes the tables in place (for a module whose buffers were allocated but not filled, as when a
        loader builds the model on the meta device and then materialises it)."""
        for name, table in self._tables():
            getattr(self, name).copy_(table)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotates ``x: (B, T, ..., head_dim)`` (e.g. ``(B, T, H, hd)``, or queries and keys together as
        ``(B, T, 2, H, hd)``) for positions ``start_pos .. start_pos + T - 1``, or for the positions in
        ``start_pos`` when it is a ``(B, T)`` int tensor (each row its own, e.g. after left padding); returns a new
        tensor in ``x.dtype``."""
        T = x.shape[1]
        per_row = isinstance(start_pos, torch.Tensor)
        self._check_end(int(start_pos.max()) + 1 if per_row and start_pos.numel() else (0 if per_row else start_pos + T))
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"rotary embedding of head_dim {self.head_dim} got x of shape {tuple(x.shape)}")
        dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), self.cos.dtype)
        ones = (1,) * (x.dim() - 3)
        if per_row:
            B = x.shape[0]
            cos_full = self.cos_full[start_pos].to(dtype).view((B, T) + ones + (self.head_dim,))
            cos_full = cos_full.expand((B, T) + tuple(x.shape[2:])).contiguous()
            sin = self.sin[start_pos].to(dtype).view((B, T) + ones + (self.head_dim // 2,))
            return _RotateHalfFunction.apply(x, cos_full, sin)
        # cos laid out like x's (T, ..., head_dim) rows: the full-width multiply then runs over long contiguous rows
        cos_full = self.cos_full[start_pos : start_pos + T].to(dtype).view((1, T) + ones + (self.head_dim,))
        cos_full = cos_full.expand((1, T) + tuple(x.shape[2:])).contiguous()
        sin = self.sin[start_pos : start_pos + T].to(dtype).view((1, T) + ones + (self.head_dim // 2,))
        return _RotateHalfFunction.apply(x, cos_full, sin)
