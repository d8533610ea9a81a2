"""Product-key memory: PKM (Lample et al., 2019) and Memory+ ("Memory Layers at Scale", Berges et al., 2024).

A memory layer replaces a layer's FFN with a lookup into a table of ``n_keys²`` value rows. Per token
``x (dim,)`` and per head ``h`` (H heads, each with its own keys):

    q_h      = norm(W_q x)_h                                   query, (k_dim,)
    s_h, I_h = top-knn over (i1, i2) of  q_h[:k/2]·c_h1[i1] + q_h[k/2:]·c_h2[i2]      product keys, (knn,)
    w_h      = dropout(softmax(s_h))                           weights over the knn rows found, (knn,)
    y        = Σ_h Σ_j w_h[j] · V[I_h[j]]                      (value_dim,), ONE gather over the H·knn rows

and the layer's output is

    PKM     (gate="none"):  out = y, or W_o y when value_dim != dim (or output_proj=True)
    Memory+ (gate="silu"):  out = W_2 (y ⊙ silu(W_1 x))        the paper's "swilu" output

The exact top-knn over ``n_keys²`` product keys comes from :func:`memzoo.ops.product_key_topk` and the weighted
read from :func:`memzoo.ops.weighted_gather`, which never materialises the ``(..., H·knn, value_dim)`` rows.
Queries, keys and projections belong to the layer; the values ``V`` to a :class:`~memzoo.blocks.pool.MemoryPool`,
either shared by several layers (Memory+ shares one table across all memory layers) or private to this one.

Normalisation of the scores (two independent knobs):

- ``query_norm``: a learnable norm over each head's ``k_dim`` query coordinates (``layernorm`` or ``rmsnorm``,
  gain and bias per head and coordinate), in the place of Lample et al.'s BatchNorm on the query.
- ``qk_norm``: scale-free scoring, as qk-norm attention (Dehghani et al., 2023): each query half and each sub-key
  is RMS-normalised and their dot product divided by ``sqrt(k_dim/2)``, so each half score is
  ``sqrt(k_dim/2) · cosine(q_half, c)``, bounded whatever the scale of queries and keys.

Initialisation: sub-keys ~ U(-1/sqrt(k_dim/2), 1/sqrt(k_dim/2)) (Lample et al.'s uniform init, bound set by the
sub-key width); values ~ N(0, value_dim^-1/2) (done by the pool); projections ~ N(0, std) and the output
projection (``W_o`` or ``W_2``) ~ N(0, residual_std) under the model's :meth:`init_weights`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.pool import MemoryPool, PoolRef, UpdateMode, resolve_pool
from memzoo.ops import candidate_pairs, product_key_topk
from memzoo.registry import register_block

QueryNorm = Literal["none", "layernorm", "rmsnorm"]
Gate = Literal["none", "silu"]

QUERY_NORMS = ("none", "layernorm", "rmsnorm")
GATES = ("none", "silu")


class HeadNorm(nn.Module):
    """LayerNorm or RMSNorm over the last dim of ``x (..., H, D)``, with gain (and bias) per head and coordinate.

    Computed in (at least) float32, cast back to ``x.dtype``.
    """

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


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or float64 if it is float64 (reduced-precision inputs are upcast, doubles kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x)`` over the last dim (no gain): every vector gets norm ``sqrt(D)``. Computed in >= float32."""
    x32 = at_least_float32(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


@register_block("product_key_memory")
class ProductKeyMemory(nn.Module):
    """Product-key memory layer (PKM / Memory+), ``x (B, T, dim) -> (B, T, dim)``; see the module docstring.

    Args:
        dim: model width.
        heads: memory heads H, each with its own query slice and two sets of ``n_keys`` sub-keys.
        knn: rows read per head (top-k over ``n_keys²`` product keys), ``1 <= knn <= n_keys``.
        k_dim: query/key width per head, even (split into two halves); ``None``: ``dim``.
        query_norm: ``none`` | ``layernorm`` | ``rmsnorm``, learnable, per head.
        qk_norm: scale-free scores (RMS-normalised query halves and sub-keys, dot / sqrt(k_dim/2)).
        gate: ``none`` (PKM: ``out = y`` or ``W_o y``) | ``silu`` (Memory+: ``out = W_2 (y ⊙ silu(W_1 x))``).
        pool: the shared :class:`MemoryPool` the model hands in; ``None``: a private pool built from ``n_keys``,
            ``value_dim``, ``update``, ``lr``, ``weight_decay``.
        n_keys: sub-keys per half (the table has ``n_keys²`` rows); with a shared pool, optional and checked.
        value_dim: width of a value row; ``None``: the pool's, or ``dim`` for a private pool.
        value_dropout: dropout on the ``H·knn`` value weights (after the softmax), as Lample et al.
        output_proj: PKM only: project ``y`` by ``W_o (value_dim → dim)``; ``None``: only when value_dim != dim.
        bias: biases on the dense projections.
        update, lr, weight_decay: a private pool's update mode (``dense`` | ``sparse``), learning rate and weight
            decay (``None``: :class:`MemoryPool`'s defaults). A shared pool sets these in the model's ``pools:``.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        knn: int = 32,
        k_dim: int | None = None,
        query_norm: QueryNorm = "none",
        qk_norm: bool = False,
        gate: Gate = "none",
        pool: MemoryPool | None = None,
        n_keys: int | None = None,
        value_dim: int | None = None,
        value_dropout: float = 0.0,
        output_proj: bool | None = None,
        bias: bool = False,
        update: UpdateMode | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
    ):
        super().__init__()
        k_dim = dim if k_dim is None else k_dim
        _check_args(heads, knn, k_dim, query_norm, qk_norm, gate, value_dropout, output_proj)
        private_pool_args = {"update": update, "lr": lr, "weight_decay": weight_decay}
        given = {key: value for key, value in private_pool_args.items() if value is not None}
        if pool is not None and given:
            raise ValueError(
                f"product_key_memory: {', '.join(f'{k}={v!r}' for k, v in given.items())} set(s) a private pool's "
                f"options, but this layer reads a shared pool; set them on the pool (model pools: {{name: ...}})"
            )
        memory, owned = resolve_pool(
            "product_key_memory", pool, kind="memory", n_keys=n_keys, value_dim=value_dim, default_value_dim=dim,
            **given,
        )
        if knn > memory.n_keys:
            raise ValueError(
                f"product_key_memory: knn={knn} exceeds n_keys={memory.n_keys} (top-k is taken per sub-key half); "
                f"lower knn or raise n_keys"
            )
        if owned:
            self.private_pool = memory
        else:
            self._pool_ref = PoolRef(memory)
        self.dim, self.heads, self.knn, self.k_dim = dim, heads, knn, k_dim
        self.n_keys, self.value_dim = memory.n_keys, memory.value_dim
        self.query_norm_kind, self.qk_norm, self.gate = query_norm, qk_norm, gate

        self.query = nn.Linear(dim, heads * k_dim, bias=bias)
        self.query_norm = HeadNorm(heads, k_dim, query_norm) if query_norm != "none" else None
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, memory.n_keys, k_dim // 2))
        self.value_dropout = nn.Dropout(value_dropout)
        if gate == "silu":  # Memory+: W_1 (dim -> value_dim) gates y, W_2 (value_dim -> dim) projects out
            if output_proj is False:
                raise ValueError(
                    "product_key_memory: gate='silu' (Memory+) always projects its output with W_2; drop "
                    "output_proj or set it true"
                )
            self.gate_proj = nn.Linear(dim, memory.value_dim, bias=bias)
            self.out_proj = nn.Linear(memory.value_dim, dim, bias=bias)
        else:
            if output_proj is False and memory.value_dim != dim:
                raise ValueError(
                    f"product_key_memory: value_dim={memory.value_dim} differs from dim={dim}, so the output needs "
                    f"W_o; set output_proj true (or null) or value_dim={dim}"
                )
            self.gate_proj = None
            use_proj = output_proj if output_proj is not None else memory.value_dim != dim
            self.out_proj = nn.Linear(memory.value_dim, dim, bias=bias) if use_proj else None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- parameters
    @property
    def pool(self) -> MemoryPool:
        """The value table this layer reads (shared or private)."""
        return self.private_pool if "private_pool" in self._modules else self._pool_ref.pool

    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """Keys as Lample et al.; projections ~ N(0, std), the output projection ~ N(0, residual_std).

        The values are not touched: the pool initialises them (shared pools are initialised once, by the model).
        """
        bound = 1.0 / math.sqrt(self.k_dim // 2)
        nn.init.uniform_(self.sub_keys, -bound, bound)
        nn.init.normal_(self.query.weight, std=std)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()
        if self.gate_proj is not None:
            nn.init.normal_(self.gate_proj.weight, std=std)
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, std=residual_std)
        for linear in (self.query, self.gate_proj, self.out_proj):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init (see :meth:`reset_parameters`); the residual-branch weight is ``W_o`` / ``W_2``."""
        self.reset_parameters(std, residual_std)

    # ----------------------------------------------------------------------------------------- forward
    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows each token reads and their weights: ``indices, weights (..., H·knn)`` for ``x (..., dim)``.

        ``indices`` are int64 in ``[0, n_keys²)``, ``weights`` (values' dtype) sum to 1 per head before dropout.
        """
        query = self.query(x).unflatten(-1, (self.heads, self.k_dim))  # (..., H, k_dim)
        if self.query_norm is not None:
            query = self.query_norm(query)
        sub_keys = self.sub_keys
        query = query.to(sub_keys.dtype)
        if self.qk_norm:
            half = self.k_dim // 2
            query = torch.cat([rms_normalize(q) for q in query.split(half, dim=-1)], dim=-1) / math.sqrt(half)
            sub_keys = rms_normalize(sub_keys)
        scores, indices = product_key_topk(query, sub_keys, self.knn)  # (..., H, knn)
        weights = self.value_dropout(F.softmax(at_least_float32(scores), dim=-1))
        values = self.pool.values
        return indices.flatten(-2), weights.to(values.dtype).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, weights = self.lookup(x)
        pool = self.pool
        pool.observe(indices, weights)
        y = pool.read(indices, weights)  # (..., value_dim): weighted_gather of the values
        if self.gate_proj is not None:
            y = y.to(x.dtype) * F.silu(self.gate_proj(x))
        if self.out_proj is not None:
            y = self.out_proj(y.to(x.dtype))
        return y.to(x.dtype)

    # ----------------------------------------------------------------------------------------- accounting
    def active_parameters(self) -> int:
        """Parameters one token reads: every dense weight of the layer, ALL its sub-keys, and the value rows read.

        Sub-keys count as active because every token scores every one of them (``H · 2 · n_keys · k_dim/2``
        numbers; small next to the ``n_keys²``-row table). Value rows: ``H · knn`` lookups of ``value_dim``,
        capped at the table size (an upper bound: heads may hit the same row).
        """
        dense = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("private_pool."))
        rows_read = min(self.heads * self.knn, self.n_keys**2)
        return dense + rows_read * self.value_dim

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-add; elementwise norms, softmax, silu and products omitted).

        ``2·dim·H·k_dim`` (query) + ``2·H·n_keys·k_dim`` (both halves scored against all sub-keys)
        + ``H·candidate_pairs(knn)`` (candidate sums before the final top-k, about ``knn·ln knn``; the top-k
        selections themselves are comparisons, not counted) + ``2·H·knn·value_dim`` (weighted read)
        + ``2·dim·value_dim`` per projection (``W_1`` and ``W_2`` for Memory+, ``W_o`` for a projecting PKM).
        """
        h, dv = self.heads, self.value_dim
        flops = 2 * self.dim * h * self.k_dim + 2 * h * self.n_keys * self.k_dim + h * candidate_pairs(self.knn)
        flops += 2 * h * self.knn * dv
        flops += sum(2 * self.dim * dv for proj in (self.gate_proj, self.out_proj) if proj is not None)
        return flops

    def extra_repr(self) -> str:
        kind = "Memory+" if self.gate == "silu" else "PKM"
        return (
            f"{kind}, heads={self.heads}, knn={self.knn}, k_dim={self.k_dim}, rows={self.n_keys**2}, "
            f"value_dim={self.value_dim}, query_norm={self.query_norm_kind}, qk_norm={self.qk_norm}, "
            f"pool={'private' if 'private_pool' in self._modules else 'shared'}"
        )


def _check_args(
    heads: int, knn: int, k_dim: int, query_norm: str, qk_norm: bool, gate: str, value_dropout: float,
    output_proj: bool | None,
) -> None:
    for name, value in (("heads", heads), ("knn", knn), ("k_dim", k_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"product_key_memory: {name} must be a positive int, got {value!r}")
    if k_dim % 2:
        raise ValueError(
            f"product_key_memory: k_dim={k_dim} must be even (queries are split into two product-key halves); "
            f"use e.g. k_dim={k_dim + 1}"
        )
    if query_norm not in QUERY_NORMS:
        raise ValueError(f"product_key_memory: query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
    if gate not in GATES:
        raise ValueError(
            f"product_key_memory: gate must be one of {GATES} ('none': PKM, 'silu': Memory+), got {gate!r}"
        )
    if not isinstance(qk_norm, bool):
        raise TypeError(f"product_key_memory: qk_norm must be true or false, got {qk_norm!r}")
    if output_proj is not None and not isinstance(output_proj, bool):
        raise TypeError(f"product_key_memory: output_proj must be true, false or null, got {output_proj!r}")
    if not 0.0 <= value_dropout < 1.0:
        raise ValueError(f"product_key_memory: value_dropout must be in [0, 1), got {value_dropout!r}")
