"""PEER: a layer of up to millions of single-neuron experts, retrieved by product keys (He, 2024, arXiv 2407.04153).

Expert ``i`` of a pool of ``N = n_keys²`` experts is one hidden neuron with a down vector ``u_i`` and an up vector
``v_i`` (rows of the pool's ``down`` and ``up`` tables, both ``(N, dim)``)::

    e_i(x) = act(u_i · x) · v_i

Each of ``heads`` query heads maps ``x`` to a query ``q_h(x) = norm(W_q x)_h`` of size ``k_dim``, retrieves its
``k`` best experts by product keys (exact top-k of ``q_h · key_i`` over all ``N`` keys in ``O(n_keys + k·log k)``, see
:func:`memzoo.ops.product_key_topk`), turns their scores into weights ``g_hi`` (softmax over the head's ``k``, or a
sigmoid each), and the heads' outputs add up::

    y = Σ_h Σ_{i ∈ topk_h(x)} g_hi(x) · act(u_i · x) · v_i

The layer runs on the sparse ops: ``h = gather_dot(down, idx, x)`` gives the ``heads·k`` pre-activations,
``y = weighted_gather(up, idx, g · act(h))`` the output, so the ``(B, T, heads, k, dim)`` tensors of gathered expert
vectors are never built. The expert tables live in a :class:`~memzoo.blocks.pool.MemoryPool` of kind ``experts``:
a private one (``n_keys``), or a named pool the model shares between several PEER layers.

Query normalisation. The paper (after Lample et al. 2019) applies BatchNorm to the queries. **BatchNorm in training
mode is not causal**: each query is normalised with the mean and variance of all ``B·T`` queries of the batch, so a
token's retrieval depends (weakly) on later tokens of its own and other sequences. In eval mode it uses running
statistics and is causal, so training and inference see slightly different functions. ``layernorm`` and
``rmsnorm`` (per head, over ``k_dim``) and ``none`` are causal in both modes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.pool import MemoryPool, PoolRef, resolve_pool
from memzoo.model.norms import RMSNorm
from memzoo.ops import candidate_pairs, gather_dot, product_key_topk, weighted_gather
from memzoo.registry import register_block

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
SCORES = ("softmax", "sigmoid")
QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")


@register_block("peer")
class PEER(nn.Module):
    """Parameter-efficient expert retrieval; ``x, y: (B, T, dim)``.

    Args:
        dim: model width; also the width of every expert vector (the pool's ``value_dim`` must equal it).
        pool: a shared :class:`MemoryPool` of kind ``experts`` (the model passes the pool a layer names).
        n_keys: sub-keys per half for a private pool of ``n_keys²`` experts (with a shared pool: optional, checked).
        heads: query heads; each retrieves ``k`` experts and the heads' outputs are summed.
        k: experts retrieved per head (``1 <= k <= n_keys``).
        k_dim: query / product-key width (even: it is split into two halves).
        per_head_keys: give every head its own product keys (default: one set shared by all heads, as in the paper).
        score: ``softmax`` over a head's ``k`` scores, or ``sigmoid`` of each score.
        query_norm: ``batchnorm`` (paper; not causal in training, see module docstring) | ``layernorm`` |
            ``rmsnorm`` | ``none``.
        activation: the experts' nonlinearity, ``gelu`` | ``relu`` | ``silu``.

    A private pool uses dense updates and the pool defaults; for sparse row-wise updates, a pool learning rate, or
    sharing, define a named pool (``pools: {experts: {kind: experts, n_keys: ..., value_dim: dim, ...}}``).
    """

    def __init__(
        self,
        dim: int,
        pool: MemoryPool | None = None,
        n_keys: int | None = None,
        heads: int = 8,
        k: int = 16,
        k_dim: int = 128,
        per_head_keys: bool = False,
        score: Literal["softmax", "sigmoid"] = "softmax",
        query_norm: Literal["batchnorm", "layernorm", "rmsnorm", "none"] = "batchnorm",
        activation: Literal["gelu", "relu", "silu"] = "gelu",
    ):
        super().__init__()
        _check_positive_int("heads", heads)
        _check_positive_int("k", k)
        _check_positive_int("k_dim", k_dim)
        if k_dim % 2:
            raise ValueError(f"peer: k_dim={k_dim} must be even (product keys split the query in two halves)")
        if score not in SCORES:
            raise ValueError(f"peer: unknown score {score!r}; choose one of {list(SCORES)}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"peer: unknown query_norm {query_norm!r}; choose one of {list(QUERY_NORMS)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"peer: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        expert_pool, owns_pool = resolve_pool(
            "peer", pool, kind="experts", n_keys=n_keys, value_dim=None, default_value_dim=dim
        )
        if expert_pool.value_dim != dim:
            raise ValueError(
                f"peer: its expert pool has value_dim={expert_pool.value_dim}, but PEER experts map dim -> dim "
                f"with dim={dim}; set the pool's value_dim to {dim}"
            )
        if k > expert_pool.n_keys:
            raise ValueError(
                f"peer: k={k} exceeds n_keys={expert_pool.n_keys} (a head retrieves at most n_keys experts); "
                f"lower k or raise n_keys"
            )
        self.dim = dim
        self.heads = heads
        self.k = k
        self.k_dim = k_dim
        self.n_keys = expert_pool.n_keys
        self.per_head_keys = per_head_keys
        self.score = score
        self.query_norm_kind = query_norm
        self.activation = activation
        if owns_pool:
            self.private_pool = expert_pool  # a submodule: the block's state_dict holds the tables
        else:
            self._shared_pool = PoolRef(expert_pool)  # the model owns it

        self.query = nn.Linear(dim, heads * k_dim, bias=False)
        self.query_norm = _make_query_norm(query_norm, heads, k_dim)
        key_sets = heads if per_head_keys else 1
        self.sub_keys = nn.Parameter(torch.empty(key_sets, 2, self.n_keys, k_dim // 2))
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ parameters
    @property
    def pool(self) -> MemoryPool:
        """The expert pool this layer reads (private or shared)."""
        return self.private_pool if self.owns_pool else self._shared_pool.pool

    @property
    def owns_pool(self) -> bool:
        return "private_pool" in self._modules

    def reset_parameters(self) -> None:
        """Standalone init: ``query`` as ``nn.Linear``; sub-keys ~ N(0, (k_dim/2)^-1/2) so that a unit-variance
        query half scores with unit variance; norms at identity. Pools initialise themselves."""
        self.query.reset_parameters()
        nn.init.normal_(self.sub_keys, std=(self.k_dim // 2) ** -0.5)
        if isinstance(self.query_norm, RMSNorm):
            nn.init.ones_(self.query_norm.weight)
        elif hasattr(self.query_norm, "reset_parameters"):  # BatchNorm: also its running statistics
            self.query_norm.reset_parameters()

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: ``query`` ~ N(0, std); with a private pool, ``down`` ~ N(0, std) (the experts' input
        projection) and ``up`` ~ N(0, residual_std) (the block's residual output). A shared pool is owned by the
        model and keeps its own init (``MemoryPool.init_std``). Sub-keys and norms keep :meth:`reset_parameters`."""
        nn.init.normal_(self.query.weight, std=std)
        if self.owns_pool:
            nn.init.normal_(self.pool.down, std=std)
            nn.init.normal_(self.pool.up, std=residual_std)

    # ------------------------------------------------------------------------------------------ forward
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts each token uses and their weights.

        ``x (..., dim)`` → ``indices (..., heads, k)`` int64 in ``[0, n_keys²)`` and ``weights (..., heads, k)``
        (each head's ``k`` scores, best first, through softmax or sigmoid).
        """
        q = self.query(x)  # (..., heads·k_dim)
        q = self._normalise(q).unflatten(-1, (self.heads, self.k_dim))  # (..., heads, k_dim)
        keys = self.sub_keys.to(q.dtype)
        if self.per_head_keys:
            scores, indices = product_key_topk(q, keys, self.k)
        else:  # every head is a query against the one key set: a size-1 head axis of its own
            scores, indices = product_key_topk(q.unsqueeze(-2), keys, self.k)
            scores, indices = scores.squeeze(-2), indices.squeeze(-2)
        weights = scores.softmax(dim=-1) if self.score == "softmax" else scores.sigmoid()
        return indices, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, weights = self.route(x)
        indices, weights = indices.flatten(-2), weights.flatten(-2)  # (..., heads·k): heads summed below
        pool = self.pool
        pool.observe(indices, weights)  # usage statistics, when the trainer tracks them
        table_dtype = pool.down.dtype  # the ops take one dtype (autocast may hand us another)
        hidden = gather_dot(pool.down, indices, x.to(table_dtype), sparse_grad=pool.sparse)  # (..., heads·k): u_i·x
        gated = weights.to(table_dtype) * ACTIVATIONS[self.activation](hidden)  # g_i · act(u_i · x)
        y = weighted_gather(pool.up, indices, gated, sparse_grad=pool.sparse)  # Σ_i gated_i · v_i
        return y.to(x.dtype)

    def _normalise(self, q: torch.Tensor) -> torch.Tensor:
        """``q (..., heads·k_dim)`` → normalised, same shape (BatchNorm over all tokens; the others per head)."""
        if isinstance(self.query_norm, nn.BatchNorm1d):
            return self.query_norm(q.reshape(-1, q.shape[-1])).view(q.shape)
        return self.query_norm(q.unflatten(-1, (self.heads, self.k_dim))).flatten(-2)

    # ------------------------------------------------------------------------------------------ accounting
    def active_parameters(self) -> int:
        """Parameters one token reads: the query network and its norm, all sub-keys (every token scores against
        each of the ``n_keys`` sub-keys of both halves), and ``down``/``up`` rows of its ``heads·k`` experts."""
        norm = sum(p.numel() for p in self.query_norm.parameters())
        experts_read = min(self.heads * self.k, self.n_keys**2)  # an upper bound: heads may pick the same expert
        return self.query.weight.numel() + norm + self.sub_keys.numel() + experts_read * 2 * self.dim

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (a multiply-add counts 2; elementwise norms, activations, softmax and top-k
        selection are not counted):

        - query ``dim → heads·k_dim``:                          ``2·dim·heads·k_dim``
        - half scores against both sub-key sets, per head:     ``2·heads·n_keys·k_dim``
        - candidate sums per head (additions):                 ``heads·candidate_pairs(k)`` (about ``k·ln k``)
        - expert down and up products, ``heads·k`` experts:    ``2·2·heads·k·dim``
        """
        H, k = self.heads, self.k
        return (
            2 * self.dim * H * self.k_dim
            + 2 * H * self.n_keys * self.k_dim
            + H * candidate_pairs(k)
            + 4 * H * k * self.dim
        )

    def extra_repr(self) -> str:
        source = "private" if self.owns_pool else "shared"
        return (
            f"dim={self.dim}, experts={self.n_keys ** 2} (n_keys={self.n_keys}², {source} pool), heads={self.heads}, "
            f"k={self.k}, k_dim={self.k_dim}, per_head_keys={self.per_head_keys}, score={self.score}, "
            f"query_norm={self.query_norm_kind}, activation={self.activation}"
        )


def _make_query_norm(kind: str, heads: int, k_dim: int) -> nn.Module:
    if kind == "batchnorm":  # per feature over all B·T tokens (see the causality caveat above)
        return nn.BatchNorm1d(heads * k_dim)
    if kind == "layernorm":  # per head, over its k_dim; one affine shared by the heads
        return nn.LayerNorm(k_dim)
    if kind == "rmsnorm":
        return RMSNorm(k_dim)
    return nn.Identity()


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"peer: {name} must be a positive int, got {value!r}")
