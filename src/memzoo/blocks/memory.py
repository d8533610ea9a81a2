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

The router (query projection, query norm, sub-keys, exact top-k, softmax) is
:class:`~memzoo.nn.product_key_router.ProductKeyRouter`, shared with PEER: its options (``query_norm``, ``qk_norm``,
``score``, ``per_head_keys``) and init are documented there. Values ~ N(0, value_dim^-1/2) (done by the pool); the
output projection (``W_o`` or ``W_2``) ~ N(0, residual_std) and ``W_1`` ~ N(0, std) under :meth:`init_weights`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.pool import MemoryPool, ReadsPool, UpdateMode, resolve_pool
from memzoo.nn.checks import check_bool, check_choice, check_positive_int
from memzoo.nn.product_key_router import QUERY_NORMS, SCORES, ProductKeyRouter
from memzoo.ops import candidate_pairs, product_key_topk, weighted_gather
from memzoo.registry import register_block

QueryNorm = Literal["none", "layernorm", "rmsnorm", "half_layernorm", "batchnorm"]
Score = Literal["softmax", "sigmoid"]
Gate = Literal["none", "silu"]

GATES = ("none", "silu")


@register_block("product_key_memory")
class ProductKeyMemory(ReadsPool, nn.Module):
    """Product-key memory layer (PKM / Memory+), ``x (B, T, dim) -> (B, T, dim)``; see the module docstring.

    Args:
        dim: model width.
        heads: memory heads H (each with its own query slice; its own sub-keys unless ``per_head_keys`` is false).
        knn: rows read per head (top-k over ``n_keys²`` product keys), ``1 <= knn <= n_keys``.
        k_dim: query/key width per head, even (split into two halves); ``None``: ``dim``.
        query_norm: ``none`` | ``layernorm`` | ``rmsnorm`` | ``half_layernorm`` | ``batchnorm`` (router docs).
        qk_norm: scale-free scores (RMS-normalised query halves and sub-keys, dot / sqrt(k_dim/2)).
        score: ``softmax`` over a head's knn scores (PKM, Memory+) or ``sigmoid`` of each.
        per_head_keys: every head has its own sub-keys (default), or one set shared by all heads.
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
        score: Score = "softmax",
        per_head_keys: bool = True,
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
        _check_args(heads, knn, k_dim, query_norm, qk_norm, score, per_head_keys, gate, value_dropout, output_proj)
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
        if gate == "silu" and output_proj is False:
            raise ValueError(
                "product_key_memory: gate='silu' (Memory+) always projects its output with W_2; drop output_proj or "
                "set it true"
            )
        if gate == "none" and output_proj is False and memory.value_dim != dim:
            raise ValueError(
                f"product_key_memory: value_dim={memory.value_dim} differs from dim={dim}, so the output needs W_o; "
                f"set output_proj true (or null) or value_dim={dim}"
            )
        self.attach_pool(memory, owned)
        self.dim, self.heads, self.knn, self.k_dim = dim, heads, knn, k_dim
        self.n_keys, self.value_dim, self.gate = memory.n_keys, memory.value_dim, gate
        self.output_proj = gate == "silu" or (output_proj if output_proj is not None else memory.value_dim != dim)

        self.router = ProductKeyRouter(
            dim, memory.n_keys, heads, knn, k_dim, per_head_keys=per_head_keys, query_norm=query_norm,
            qk_norm=qk_norm, score=score, bias=bias, topk=product_key_topk,
        )
        self.value_dropout = nn.Dropout(value_dropout)
        # Memory+: W_1 (dim -> value_dim) gates y; W_2 = out_proj (value_dim -> dim) projects it out
        self.gate_proj = nn.Linear(dim, memory.value_dim, bias=bias) if gate == "silu" else None
        self.out_proj = nn.Linear(memory.value_dim, dim, bias=bias) if self.output_proj else None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- parameters
    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """Router as :meth:`ProductKeyRouter.reset_parameters` (query ~ N(0, std)); ``W_1`` ~ N(0, std); the output
        projection ~ N(0, residual_std); biases 0. The values are the pool's (shared pools: initialised once, by
        the model)."""
        self.router.reset_parameters(std)
        for linear, linear_std in ((self.gate_proj, std), (self.out_proj, residual_std)):
            if linear is not None:
                nn.init.normal_(linear.weight, std=linear_std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init (see :meth:`reset_parameters`); the residual-branch weight is ``W_o`` / ``W_2``."""
        self.reset_parameters(std, residual_std)

    # ----------------------------------------------------------------------------------------- forward
    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows each token reads and their weights: ``indices, weights (..., H·knn)`` for ``x (..., dim)``.

        ``indices`` are int64 in ``[0, n_keys²)``; ``weights`` (values' dtype, after value dropout).
        """
        indices, weights = self.router(x)  # (..., H, knn)
        weights = self.value_dropout(weights)
        return indices.flatten(-2), weights.to(self.pool.values.dtype).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, weights = self.lookup(x)
        pool = self.pool
        pool.observe(indices, weights)
        y = weighted_gather(pool.values, indices, weights, sparse_grad=pool.sparse).to(x.dtype)  # Σ w·V[I]
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x))  # Memory+: y ⊙ silu(W_1 x)
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y

    # ----------------------------------------------------------------------------------------- accounting
    def active_parameters(self) -> int:
        """Parameters one token reads: the router (query, norm, ALL sub-keys: each is scored), the projections,
        and the ``H · knn`` value rows read (capped at the table size; an upper bound: heads may hit one row)."""
        dense = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("private_pool."))
        rows_read = min(self.heads * self.knn, self.n_keys**2)
        return dense + rows_read * self.value_dim

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-add; norms, softmax, silu and products omitted): the router's
        (:meth:`ProductKeyRouter.flops_per_token` with ``candidate_pairs(knn)`` sums) + ``2·H·knn·value_dim``
        (weighted read) + ``2·dim·value_dim`` per projection (``W_1`` and ``W_2`` for Memory+, ``W_o`` for PKM)."""
        flops = self.router.flops_per_token(candidate_pairs(self.knn)) + 2 * self.heads * self.knn * self.value_dim
        flops += sum(2 * self.dim * self.value_dim for proj in (self.gate_proj, self.out_proj) if proj is not None)
        return flops

    def extra_repr(self) -> str:
        kind = "Memory+" if self.gate == "silu" else "PKM"
        return f"{kind}, rows={self.n_keys**2}, value_dim={self.value_dim}, pool={'private' if self.owns_pool else 'shared'}"


def _check_args(
    heads: int, knn: int, k_dim: int, query_norm: str, qk_norm: bool, score: str, per_head_keys: bool, gate: str,
    value_dropout: float, output_proj: bool | None,
) -> None:
    owner = "product_key_memory"
    for name, value in (("heads", heads), ("knn", knn), ("k_dim", k_dim)):
        check_positive_int(owner, name, value)
    if k_dim % 2:
        raise ValueError(
            f"{owner}: k_dim={k_dim} must be even (queries are split into two product-key halves); "
            f"use e.g. k_dim={k_dim + 1}"
        )
    check_choice(owner, "query_norm", query_norm, QUERY_NORMS)
    check_choice(owner, "score", score, SCORES)
    check_choice(owner, "gate", gate, GATES)
    check_bool(owner, "qk_norm", qk_norm)
    check_bool(owner, "per_head_keys", per_head_keys)
    if output_proj is not None and not isinstance(output_proj, bool):
        raise TypeError(f"{owner}: output_proj must be true, false or null, got {output_proj!r}")
    if not 0.0 <= value_dropout < 1.0:
        raise ValueError(f"{owner}: value_dropout must be in [0, 1), got {value_dropout!r}")
