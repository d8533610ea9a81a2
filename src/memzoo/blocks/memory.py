"""Product-key memory: PKM (Lample et al., 2019) and Memory+ ("Memory Layers at Scale", Berges et al., 2024).

A memory layer replaces a layer's FFN with a lookup into a table of ``n_keys²`` value rows. Per token
``x (dim,)`` and per head ``h`` (H heads, each with its own keys):

    q_h      = norm(W_q x)_h                                   query, (k_dim,)
    s_h, I_h = top-knn over (i1, i2) of  q_h[:k/2]·c_h1[i1] + q_h[k/2:]·c_h2[i2]      product keys, (knn,)
    w_h      = dropout(softmax(s_h))                           weights over the knn rows found, (knn,)
    y        = Σ_h Σ_j w_h[j] · V[I_h[j]]                      (value_dim,), ONE gather over the H·knn rows

and the layer's output is

    PKM     (gate="none"):  out = y, or W_o y when value_dim != dim
    Memory+ (gate="silu"):  out = W_2 (y ⊙ silu(W_1 x))        the paper's "swilu" output

Presets (:mod:`memzoo.blocks.presets`): ``pkm`` (Lample et al. 2019, with causal LayerNorm queries in place of the
paper's BatchNorm) and ``memory_plus`` (Berges et al. 2024: qk-norm, read from a pool the model shares between
layers: ``{block: memory_plus, pool: shared}``, with the paper's SiLU gate; :mod:`memzoo.blocks.presets` gives
the studies that kept it).

The exact top-knn over ``n_keys²`` product keys comes from :func:`memzoo.ops.product_key_topk` and the weighted
read from :func:`memzoo.ops.weighted_gather`, which never materialises the ``(..., H·knn, value_dim)`` rows.
Queries, keys and projections belong to the layer; the values ``V`` to a :class:`~memzoo.blocks.pool.MemoryPool`,
either shared by several layers (Memory+ shares one table across all memory layers) or private to this one.

The router (query projection, query norm, sub-keys, exact top-k, softmax) is
:class:`~memzoo.nn.product_key_router.ProductKeyRouter`, shared with PEER: its options (``query_norm``, ``qk_norm``,
``score``, ``per_head_keys``), their checks and init are documented there. Values ~ N(0, value_dim^-1/2) (done by the pool); the
output projection (``W_o`` or ``W_2``) ~ N(0, residual_std) and ``W_1`` ~ N(0, std) under :meth:`init_weights`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.pool import MemoryPool, ReadsPool, UpdateMode, resolve_pool
from memzoo.blocks.registry import register_block
from memzoo.nn.activations import swiglu
from memzoo.nn.checks import check_choice
from memzoo.nn.product_key_router import ProductKeyRouter

QueryNorm = Literal["none", "layernorm", "rmsnorm", "batchnorm"]
Score = Literal["softmax", "sigmoid"]
Gate = Literal["none", "silu"]

GATES = ("none", "silu")


@register_block(
    "product_key_memory",
    paper="Lample et al. 2019, 'Large Memory Layers with Product Keys' (arXiv 1907.05242); presets pkm, memory_plus",
    smallest={"n_keys": 4, "heads": 2, "knn": 2, "k_dim": 8},
)
class ProductKeyMemory(ReadsPool, Block):
    """Product-key memory layer (PKM / Memory+), ``x (B, T, dim) -> (B, T, dim)``; see the module docstring.

    Args:
        dim: model width.
        heads: memory heads H (each with its own query slice; its own sub-keys unless ``per_head_keys`` is false).
        knn: rows read per head (top-k over ``n_keys²`` product keys), ``1 <= knn <= n_keys``.
        k_dim: query/key width per head, even (split into two halves); ``None``: ``dim``.
        query_norm: ``none`` | ``layernorm`` | ``rmsnorm`` | ``batchnorm`` (not causal; router docs).
        qk_norm: scale-free scores (RMS-normalised query halves and sub-keys, dot / sqrt(k_dim/2)), Memory+.
        score: ``softmax`` over a head's knn scores (PKM, Memory+) or ``sigmoid`` of each.
        per_head_keys: every head has its own sub-keys (default), or one set shared by all heads.
        gate: ``none`` (PKM: ``out = y`` or ``W_o y``) | ``silu`` (Memory+: ``out = W_2 (y ⊙ silu(W_1 x))``).
        pool: the shared :class:`MemoryPool` the model hands in (a layer's ``pool: name``); ``None``: a private pool
            built from ``n_keys``, ``value_dim``, ``update``, ``lr``, ``weight_decay``.
        n_keys: sub-keys per half (the table has ``n_keys²`` rows); with a shared pool, optional and checked.
        value_dim: width of a value row; ``None``: the pool's, or ``dim`` for a private pool. PKM projects the
            read rows by ``W_o (value_dim → dim)`` when ``value_dim != dim``.
        value_dropout: dropout on the ``H·knn`` value weights (after the softmax), as Lample et al.'s code
            (``value_dropout`` of XLM's ``HashingMemory``).
        update, lr, weight_decay: a private pool's update mode (``dense`` | ``sparse``), learning rate and weight
            decay (``None``: :class:`MemoryPool`'s defaults). A shared pool sets these in the model's ``pools:``.
    """

    reads_pool = True

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
        update: UpdateMode | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
    ):
        super().__init__()
        owner = "product_key_memory"
        k_dim = dim if k_dim is None else k_dim
        check_choice(owner, "gate", gate, GATES)
        if not 0.0 <= value_dropout < 1.0:
            raise ValueError(f"{owner}: value_dropout must be in [0, 1), got {value_dropout!r}")
        private_pool_args = {"update": update, "lr": lr, "weight_decay": weight_decay}
        given = {key: value for key, value in private_pool_args.items() if value is not None}
        if pool is not None and given:
            raise ValueError(
                f"{owner}: {', '.join(f'{k}={v!r}' for k, v in given.items())} set(s) a private pool's "
                f"options, but this layer reads a shared pool; set them on the pool (model pools: {{name: ...}})"
            )
        memory, owned = resolve_pool(
            owner, pool, kind="memory", n_keys=n_keys, value_dim=value_dim, default_value_dim=dim, **given,
        )
        self.router = ProductKeyRouter(
            dim, memory.n_keys, heads, knn, k_dim, per_head_keys=per_head_keys, query_norm=query_norm,
            qk_norm=qk_norm, score=score, owner=owner,
        )
        self.attach_pool(memory, owned)
        self.dim, self.heads, self.knn, self.k_dim = dim, heads, knn, k_dim
        self.n_keys, self.value_dim, self.gate = memory.n_keys, memory.value_dim, gate
        self.value_dropout = nn.Dropout(value_dropout)
        # Memory+: W_1 (dim -> value_dim) gates y; W_2 = out_proj (value_dim -> dim) projects it out
        self.gate_proj = nn.Linear(dim, memory.value_dim, bias=False) if gate == "silu" else None
        projects = gate == "silu" or memory.value_dim != dim
        self.out_proj = nn.Linear(memory.value_dim, dim, bias=False) if projects else None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------- parameters
    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """Router as :meth:`ProductKeyRouter.reset_parameters` (query ~ N(0, std)); ``W_1`` ~ N(0, std); the output
        projection ~ N(0, residual_std). The values are the pool's (shared pools: initialised once, by the
        model; a private pool: by itself, ~ N(0, value_dim^-1/2))."""
        self.router.reset_parameters(std)
        for linear, linear_std in ((self.gate_proj, std), (self.out_proj, residual_std)):
            if linear is not None:
                nn.init.normal_(linear.weight, std=linear_std)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init (see :meth:`reset_parameters`); the residual-branch weight is ``W_o`` / ``W_2``."""
        self.reset_parameters(std, residual_std)

    @torch.no_grad()
    def zero_output(self) -> bool:
        """Zeroes the pool's value table (every row, also other layers' reads of a shared pool): the output is
        zero while ``W_1`` / ``W_2`` keep their weights, so the values get gradient from the first step."""
        for table in self.pool.tables().values():
            table.zero_()
        return True

    # ----------------------------------------------------------------------------------------- forward
    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows each token reads and their weights: ``indices, weights (..., H·knn)`` for ``x (..., dim)``.

        ``indices`` are int64 in ``[0, n_keys²)``; ``weights`` (values' dtype, after value dropout).
        """
        indices, weights = self.router(x)  # (..., H, knn)
        weights = self.value_dropout(weights)
        return indices.flatten(-2), weights.to(self.pool.values.dtype).flatten(-2)

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        indices, weights = self.lookup(x)
        pool = self.pool
        pool.observe(indices, weights)
        y = pool.read(indices, weights).to(x.dtype)  # Σ w·V[I]: weighted_gather of the (maybe sharded) values
        if self.gate_proj is not None:
            y = swiglu(self.gate_proj(x), y)  # Memory+: silu(W_1 x) ⊙ y
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y

    # ----------------------------------------------------------------------------------------- accounting
    def active_parameters(self) -> int:
        """Parameters one token reads: the router (query, norm, ALL sub-keys: each is scored), the projections,
        and the ``H · knn`` value rows read (capped at the table size; an upper bound: heads may hit one row)."""
        dense = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("private_pool."))
        return dense + self._rows_read() * self.value_dim

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-add; norms, softmax, silu and products omitted): the router's
        (:meth:`ProductKeyRouter.flops_per_token`) + ``2·H·knn·value_dim``
        (weighted read) + ``2·dim·value_dim`` per projection (``W_1`` and ``W_2`` for Memory+, ``W_o`` for PKM)."""
        flops = self.router.flops_per_token() + 2 * self.heads * self.knn * self.value_dim
        flops += sum(2 * self.dim * self.value_dim for proj in (self.gate_proj, self.out_proj) if proj is not None)
        return flops

    def table_bytes_read_per_token(self) -> int:
        """The ``H·knn`` value rows read (capped at the table size), in the table's element size."""
        values = self.pool.values
        return self._rows_read() * self.value_dim * values.element_size()

    def _rows_read(self) -> int:
        return min(self.heads * self.knn, self.n_keys**2)

    def extra_repr(self) -> str:
        kind = "Memory+" if self.gate == "silu" else "PKM"
        return f"{kind}, rows={self.n_keys**2}, value_dim={self.value_dim}, pool={'private' if self.owns_pool else 'shared'}"
