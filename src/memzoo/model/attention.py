"""Causal multi-head self-attention with rotary embeddings and a pluggable kernel backend.

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (any device);
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only; imported lazily, only on CUDA);
- ``auto``: xformers on CUDA tensors when it imports and runs, otherwise SDPA, silently.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.model.attention_memory import AttentionMemory
from memzoo.model.rope import RotaryEmbedding

AttentionBackend = Literal["auto", "sdpa", "xformers"]
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")


class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here."""


@functools.lru_cache(maxsize=1)
def _xformers_status() -> tuple[bool, str]:
    """Whether xformers' memory-efficient attention runs on this machine's CUDA device, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device is available (xformers' kernels run only on CUDA)"
    try:
        xops = _xformers_ops()
    except Exception as err:  # ImportError or a broken build
        return False, f"xformers does not import: {err}"
    try:
        q = torch.zeros(1, 8, 1, 16, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q, attn_bias=xops.LowerTriangularMask())
    except Exception as err:
        return False, f"xformers imports but its attention kernel fails here: {err}"
    return True, ""


def _xformers_ops():
    """``xformers.ops`` (optional: imported inside a try, so import checkers such as Hugging Face's remote-code
    loader treat it as optional; the ImportError reaches the caller)."""
    try:
        import xformers.ops as xops
    except ImportError as err:
        raise ImportError(f"xformers does not import: {err}") from err
    return xops


def check_attention_backend(backend: str) -> None:
    """Raises if ``backend`` is unknown, or is ``xformers`` on a machine where xformers cannot run."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "xformers":
        ok, why = _xformers_status()
        if not ok:
            raise AttentionBackendError(
                f"attention_backend: xformers cannot run: {why}. Use attention_backend: auto (xformers on CUDA "
                f"when available, PyTorch SDPA otherwise) or sdpa."
            )


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Plain causal softmax attention for tests. ``q: (B, H, Tq, hd)``, ``k, v: (B, H, Tk, hd)``.

    Query ``i`` sits at absolute position ``q_offset + i`` and sees keys ``0 .. q_offset + i``.
    """
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    Tq, Tk = q.shape[-2], k.shape[-2]
    visible = torch.arange(Tk, device=q.device)[None, :] <= (q_offset + torch.arange(Tq, device=q.device))[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


@dataclass
class LayerKVCache:
    """Keys and values of one attention layer for incremental decoding, ``(B, H_kv, max_len, head_dim)`` each.

    The cache contract :class:`CausalSelfAttention` uses: ``length`` (positions held) and :meth:`append`. Another
    store (e.g. a Hugging Face ``Cache`` layer) takes part by offering the same two. ``block_state`` is the decode
    state of the layer's FFN-slot block (:class:`~memzoo.blocks.base.BlockContext` ``state``); ``memory_state`` that
    of the layer's attention memory (its document choice, :mod:`memzoo.model.memory_documents`).
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    block_state: dict = field(default_factory=dict)
    memory_state: dict = field(default_factory=dict)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores ``k, v (B, H_kv, T, hd)`` after the held positions; returns all keys and values held,
        ``(B, H_kv, length, hd)``."""
        start, T = self.length, k.shape[2]
        if start + T > self.k.shape[2]:
            raise ValueError(f"KV cache of length {self.k.shape[2]} cannot hold {start + T} positions")
        self.k[:, :, start : start + T] = k
        self.v[:, :, start : start + T] = v
        self.length = start + T
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


def padding_attention_mask(attention_mask: torch.Tensor, start: int, length: int) -> torch.Tensor | None:
    """The boolean attention mask ``(B, 1, T, start + T)`` (True: may attend) of ``length`` new queries after
    ``start`` held positions, from ``attention_mask (B, >= start + T)`` (1: token, 0: padding); ``None`` when nothing
    is padding (plain causal attention).

    Query ``i`` (position ``start + i``) sees the non-padding keys ``0 .. start + i``, and always itself, so a
    padding query's row is never empty.
    """
    keep = attention_mask[:, : start + length].bool()
    if bool(keep.all()):
        return None
    device = attention_mask.device
    query_pos = start + torch.arange(length, device=device)
    key_pos = torch.arange(start + length, device=device)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
    itself = key_pos[None, :] == query_pos[:, None]
    return ((causal[None] & keep[:, None, :]) | itself[None])[:, None]


class CausalSelfAttention(nn.Module):
    """``y = W_o · softmax(causal(RoPE(W_q x) · RoPE(W_k x)ᵀ / sqrt(hd))) · W_v x``; ``x, y: (B, T, dim)``.

    Grouped-query attention when ``n_kv_heads < n_heads``: keys and values have ``n_kv_heads`` heads, query head
    ``h`` reads key/value head ``h // (n_heads / n_kv_heads)`` (Llama / Mistral / Qwen2 layout). ``qkv`` is one
    linear whose output rows are ``[q (n_heads·hd); k (n_kv_heads·hd); v (n_kv_heads·hd)]``, with a bias when
    ``qkv_bias``; ``proj`` has one when ``proj_bias``. ``rope_scaling``: see :func:`memzoo.model.rope.rope_inv_freq`.

    ``memory``: an :class:`~memzoo.model.attention_memory.AttentionMemory` (attention over an external bank of keys
    and values); while it holds entries it computes the attention, otherwise the layer is the plain one above.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        max_seq_len: int,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
        backend: AttentionBackend = "auto",
        n_kv_heads: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        rope_scaling: dict | None = None,
        memory: AttentionMemory | None = None,
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}; pick n_heads dividing dim")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, int) or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads={n_kv_heads!r} must be a positive int dividing n_heads={n_heads} (grouped-query attention)"
            )
        check_attention_backend(backend)
        self.dim = dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.backend = backend
        self.dropout = dropout
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_base, rope_scaling)
        self.memory = memory

    def _rotated_qkv(
        self, x: torch.Tensor, start: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q (B, T, H, hd)`` and ``k (B, T, H_kv, hd)`` rotated for positions ``start ..`` (or the ``(B, T)``
        positions in ``start``), ``v``, and the keys before rotation (a view)."""
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if not isinstance(start, torch.Tensor):  # one C++ pass each way where it applies
            fused = self.rope.rotate_qkv(qkv, (self.n_heads, self.n_kv_heads, self.n_kv_heads), start)
            if fused is not None:
                k_raw = qkv.view(B, T, -1, self.head_dim)[:, :, self.n_heads : self.n_heads + self.n_kv_heads]
                return (*fused, k_raw)
        if self.n_kv_heads == self.n_heads:
            # split (not slicing) so that the backward joins the gradients of (q, k) and v with one copy
            qk, v = qkv.view(B, T, 3, self.n_heads, self.head_dim).split((2, 1), dim=2)
            q, k = self.rope(qk, start).unbind(dim=2)  # queries and keys rotated in one pass
            return q, k, v.squeeze(2), qk[:, :, 1]
        kv = self.n_kv_heads * self.head_dim
        q, k_raw, v = qkv.split([self.dim, kv, kv], dim=-1)
        k_raw = k_raw.view(B, T, self.n_kv_heads, self.head_dim)
        q = self.rope(q.view(B, T, self.n_heads, self.head_dim), start)
        k = self.rope(k_raw, start)
        return q, k, v.view(B, T, self.n_kv_heads, self.head_dim), k_raw

    def _expand_kv(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """Repeats each key/value head for the ``n_heads / n_kv_heads`` query heads that read it."""
        if self.n_kv_heads == self.n_heads:
            return t
        return t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=axis)

    def _use_xformers(self, x: torch.Tensor) -> bool:
        if self.backend == "sdpa" or not x.is_cuda:
            if self.backend == "xformers":
                raise AttentionBackendError(
                    "attention_backend: xformers runs only on CUDA tensors; use auto or sdpa on this device"
                )
            return False
        return self.backend == "xformers" or _xformers_status()[0]

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerKVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, T, dim)`` → ``(B, T, dim)``, continuing ``cache`` (if any; see :class:`LayerKVCache`).

        ``positions (B, T)``: rotary positions (default ``start .. start + T - 1``, ``start = cache.length``);
        ``mask (B, 1, T, start + T)`` bool: which keys each query may see (:func:`padding_attention_mask`; default
        causal). Both serve batches of left-padded prompts.
        """
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        q, k, v, k_raw = self._rotated_qkv(x, start if positions is None else positions)  # q (B,T,H,hd); k, v (B,T,H_kv,hd)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None:
            k_all, v_all = cache.append(k.transpose(1, 2), v.transpose(1, 2))  # (B, H_kv, start + T, hd)
        if self.memory is not None and self.memory.active:
            if mask is not None:
                raise ValueError("attention memory does not take a padding mask; decode unpadded prompts")
            k_local = k_all if cache is not None else k.transpose(1, 2)
            v_local = v_all if cache is not None else v.transpose(1, 2)
            y = self.memory(q, k_local, v_local, start, dropout_p, k_raw,
                            getattr(cache, "memory_state", None))
        elif cache is not None or mask is not None:
            if cache is None:
                k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
            k_all, v_all = self._expand_kv(k_all, 1), self._expand_kv(v_all, 1)
            qh = q.transpose(1, 2)
            if mask is None and (T == 1 or start == 0):
                y = F.scaled_dot_product_attention(qh, k_all, v_all, is_causal=start == 0 and T > 1)
            else:  # a chunk after a prefix, or padding: query i sees keys 0 .. start + i (less the padding)
                if mask is None:
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(qh, k_all, v_all, attn_mask=mask)
            y = y.transpose(1, 2)
        elif self._use_xformers(x):
            xops = _xformers_ops()
            k, v = self._expand_kv(k, 2), self._expand_kv(v, 2)
            y = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask(), p=dropout_p)
        else:
            k, v = self._expand_kv(k, 2), self._expand_kv(v, 2)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, dropout_p=dropout_p
            ).transpose(1, 2)
        return self.proj(y.reshape(B, T, self.dim))

    def new_cache(self, batch_size: int, max_len: int, device, dtype) -> LayerKVCache:
        shape = (batch_size, self.n_kv_heads, max_len, self.head_dim)
        return LayerKVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
