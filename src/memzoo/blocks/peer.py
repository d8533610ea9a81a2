"""PEER: a layer of up to millions of single-neuron experts, retrieved by product keys (He, 2024, arXiv 2407.04153).

Expert ``i`` of a pool of ``N = n_keys²`` experts is one hidden neuron with a down vector ``u_i`` and an up vector
``v_i`` (rows of the pool's ``down`` and ``up`` tables, both ``(N, dim)``)::

    e_i(x) = act(u_i · x) · v_i

Each of ``heads`` query heads retrieves its ``knn`` best experts by product keys and weights them ``g_hi``
(:class:`~memzoo.nn.product_key_router.ProductKeyRouter`, shared with product-key memory: exact top-k of
``q_h · key_i`` over all ``N`` keys in ``O(n_keys + knn·log knn)``, softmax over the head's ``knn`` or a sigmoid
each); the heads' outputs add up::

    y = Σ_h Σ_{i ∈ topk_h(x)} g_hi(x) · act(u_i · x) · v_i

The layer runs on the sparse ops: ``h = gather_dot(down, idx, x)`` gives the ``heads·k`` pre-activations,
``y = weighted_gather(up, idx, g · act(h))`` the output, so the ``(B, T, heads, k, dim)`` tensors of gathered expert
vectors are never built. The expert tables live in a :class:`~memzoo.blocks.pool.MemoryPool` of kind ``experts``:
a private one (``n_keys``), or a named pool the model shares between several PEER layers.

Query normalisation: the paper (after Lample et al. 2019) uses BatchNorm on the queries, which is not causal in
training (batch statistics mix every position of the batch; see the router's docstring). The default here is
``layernorm`` over each head's query features (causal); ``query_norm: batchnorm`` reproduces the paper and must be
asked for. The ``peer`` defaults are otherwise the paper's: 8 heads, top-16 experts each, product keys shared by the
heads, softmax weights, GELU experts.

Scale-free scores (``qk_norm: true``) measured better on both of memzoo's axes at the study sizes, two seeds each:
on the 4,000-exposure capacity grid (``docs/results/capacity-cpu-x4000*.md``, width 16) they store 1.18× dense's
bits at AdamW 1e-2, where the paper's scores store 1.12× at their best of three rates (1e-3 / 3e-3 / 1e-2: 0.51 /
1.12 / 1.01×, losing bits late in training at 1e-2); on Shakespeare (``docs/results/study-peer-qk-norm.md``) they
reach 1.723 / 1.731 against 1.748 / 1.743. The default stays the paper's scores, which every stored PEER result
used; set ``qk_norm: true`` for the better-measured router.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.pool import MemoryPool, ReadsPool, resolve_pool
from memzoo.blocks.registry import register_block
from memzoo.nn.checks import check_choice
from memzoo.nn.product_key_router import ProductKeyRouter
from memzoo.ops import gather_dot, weighted_gather

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


@register_block(
    "peer",
    paper="He 2024, 'Mixture of A Million Experts' (arXiv 2407.04153), with causal LayerNorm queries",
    smallest={"n_keys": 4, "heads": 2, "knn": 2, "k_dim": 8},
)
class PEER(ReadsPool, Block):
    """Parameter-efficient expert retrieval; ``x, y: (B, T, dim)``.

    Args:
        dim: model width; also the width of every expert vector (the pool's ``value_dim`` must equal it).
        pool: a shared :class:`MemoryPool` of kind ``experts`` (the model passes the pool a layer names).
        n_keys: sub-keys per half for a private pool of ``n_keys²`` experts (with a shared pool: optional, checked).
        heads: query heads; each retrieves ``knn`` experts and the heads' outputs are summed.
        knn: experts retrieved per head (``1 <= knn <= n_keys``).
        k_dim: query / product-key width (even: it is split into two halves).
        per_head_keys: give every head its own product keys (default: one set shared by all heads, as in the paper).
        score: ``softmax`` over a head's ``knn`` scores, or ``sigmoid`` of each score (the paper names both).
        query_norm: ``layernorm`` (default, causal) | ``rmsnorm`` | ``none`` | ``batchnorm`` (the paper's; not
            causal in training: router docs).
        qk_norm: scale-free scores (RMS-normalised query halves and sub-keys, dot / sqrt(k_dim/2)).
        activation: the experts' nonlinearity, ``gelu`` | ``relu`` | ``silu``.

    A private pool uses dense updates and the pool defaults; for sparse row-wise updates, a pool learning rate, or
    sharing, define a named pool (``pools: {experts: {kind: experts, n_keys: ..., value_dim: dim, ...}}``).
    """

    reads_pool = True

    def __init__(
        self,
        dim: int,
        pool: MemoryPool | None = None,
        n_keys: int | None = None,
        heads: int = 8,
        knn: int = 16,
        k_dim: int = 128,
        per_head_keys: bool = False,
        score: Literal["softmax", "sigmoid"] = "softmax",
        query_norm: Literal["layernorm", "rmsnorm", "none", "batchnorm"] = "layernorm",
        qk_norm: bool = False,
        activation: Literal["gelu", "relu", "silu"] = "gelu",
    ):
        super().__init__()
        owner = "peer"
        check_choice(owner, "activation", activation, sorted(ACTIVATIONS))
        expert_pool, owned = resolve_pool(
            "peer", pool, kind="experts", n_keys=n_keys, value_dim=None, default_value_dim=dim
        )
        if expert_pool.value_dim != dim:
            raise ValueError(
                f"peer: its expert pool has value_dim={expert_pool.value_dim}, but PEER experts map dim -> dim "
                f"with dim={dim}; set the pool's value_dim to {dim}"
            )
        self.attach_pool(expert_pool, owned)
        self.dim, self.heads, self.knn, self.k_dim = dim, heads, knn, k_dim
        self.n_keys, self.activation = expert_pool.n_keys, activation
        self.router = ProductKeyRouter(
            dim, expert_pool.n_keys, heads, knn, k_dim, per_head_keys=per_head_keys, query_norm=query_norm,
            qk_norm=qk_norm, score=score, owner=owner,
        )

    # ------------------------------------------------------------------------------------------ parameters
    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """The router with query ~ N(0, std) (:meth:`ProductKeyRouter.reset_parameters`); with a private pool,
        ``down`` ~ N(0, std) (the experts' input projection) and ``up`` ~ N(0, residual_std) (the block's residual
        output). A shared pool is owned by the model and keeps its own init (``MemoryPool.init_std``)."""
        self.router.reset_parameters(std)
        if self.owns_pool:
            nn.init.normal_(self.pool.down, std=std)
            nn.init.normal_(self.pool.up, std=residual_std)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: exactly :meth:`reset_parameters` with the model's stds."""
        self.reset_parameters(std, residual_std)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        indices, weights = self.router(x)  # (..., heads, knn)
        indices, weights = indices.flatten(-2), weights.flatten(-2)  # (..., heads·knn): heads summed below
        self.pool.observe(indices, weights)  # usage statistics, when the trainer tracks them
        return self.experts(x, indices, weights)

    def experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``Σ_i weights_i · act(u_i · x) · v_i`` over the experts ``indices (..., K)`` (weights ``(..., K)``) of
        ``x (..., dim)``: the two sparse reads, ``(..., dim)`` in ``x.dtype``."""
        pool = self.pool
        table_dtype = pool.down.dtype  # the ops take one dtype (autocast may hand us another)
        hidden = gather_dot(pool.down, indices, x.to(table_dtype), sparse_grad=pool.sparse)  # u_i · x
        gated = weights.to(table_dtype) * ACTIVATIONS[self.activation](hidden)  # g_i · act(u_i · x)
        y = weighted_gather(pool.up, indices, gated, sparse_grad=pool.sparse)  # Σ_i gated_i · v_i
        return y.to(x.dtype)

    # ------------------------------------------------------------------------------------------ accounting
    def active_parameters(self) -> int:
        """Parameters one token reads: the router (query, its norm, all sub-keys: each is scored) and the
        ``down``/``up`` rows of its ``heads·knn`` experts (an upper bound: heads may pick the same expert)."""
        return self.router.active_parameters() + self._experts_read() * 2 * self.dim

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (a multiply-add counts 2; norms, activations, softmax and top-k selection are
        not counted): the router's (:meth:`ProductKeyRouter.flops_per_token`)
        + ``2·2·heads·knn·dim`` (the experts' down and up products)."""
        return self.router.flops_per_token() + 4 * self.heads * self.knn * self.dim

    def table_bytes_read_per_token(self) -> int:
        """The ``down`` and ``up`` rows of the ``heads·knn`` experts read (capped at the pool size)."""
        return self._experts_read() * 2 * self.dim * self.pool.down.element_size()

    def _experts_read(self) -> int:
        return min(self.heads * self.knn, self.n_keys**2)

    def extra_repr(self) -> str:
        source = "private" if self.owns_pool else "shared"
        return f"dim={self.dim}, experts={self.n_keys ** 2} ({source} pool), activation={self.activation}"
