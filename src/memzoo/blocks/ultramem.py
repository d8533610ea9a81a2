"""UltraMem (Huang et al., ICLR 2025, arXiv 2411.12364) and UltraMemV2 (arXiv 2508.18756): memory layers with
Tucker-decomposed query-key retrieval and implicit value expansion.

Retrieval (:class:`~memzoo.nn.tucker_router.TuckerRouter`): per token, ``H·knn`` slots of a virtual grid of
``n_keys²``, each mapped to a physical row ``n_k`` of a table of ``P`` rows and a group ``g_k``, with one score per
core ``s_kc`` (``c < M``). The value width ``D`` is split into ``M`` chunks; chunk ``c`` of a row is weighted by
core ``c``'s score (multi-core scoring).

**UltraMem** (kind ``memory`` table ``V (P, D)``), with ``E = value_expand`` projections ``W_g (D, dim)``::

    y = Σ_g W_gᵀ  [ Σ_{k: g_k = g} s_k ⊙ V[n_k] ]                 (s_k ⊙: chunk c scaled by s_kc)

``E = 1``: one projection (the groups alias the rows); ``E = n_keys²/P``: each group is a virtual memory block read
through its own projection (implicit value expansion: ``E·P`` virtual values from ``P`` physical rows).

**UltraMemV2** (kind ``experts`` table: ``down, up (P, D)``): FFN-valued slots, as PEER's single-neuron experts,
with the value input projected first, ``z = W_pre x`` (``dim → D``)::

    y = W_oᵀ Σ_k (s_k · act(down[n_k] · z)) ⊙ up[n_k]   (+ a dense SwiGLU FFN beside it, ``ffn_fraction``)

The dense FFN beside the memory is the V2 paper's memory/FFN split: its width is ``ffn_fraction`` of a plain
SwiGLU FFN of the model (``0``: memory only).

Initialisation follows the authors' code, not the model's ``std``: the router as in its docstring, value rows
``~ N(0, 0.02)`` (private tables), ``W_o ~ N(0, (E·D)^-1/2)``, ``W_pre ~ N(0, dim^-1/2)``; the dense FFN beside
V2's memory takes the model's ``std``/``residual_std``.

Cost per token (forward, a multiply-add counts 2): the router's + the reads ``2·H·knn·D`` (each of the ``H·knn``
rows read once into its group's accumulator, chunk c scaled by core c's score:
:func:`memzoo.ops.grouped_weighted_gather`) + ``2·E·D·dim`` (``W_o``); V2 adds ``2·dim·D`` (``W_pre``) +
``2·H·knn·D`` (the down dot products) + the dense FFN's.

Placement: the UltraMem paper reads the memory at layer ``i`` and adds it to the residual after layer ``j > i``
(skip-layer); a config sets it per layer with ``add_at: j`` (:mod:`memzoo.model.transformer`). The value tables
learn at ``value_lr_scale`` × the model's lr (private tables; a shared pool sets ``lr_scale``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.dense import DenseMLP, swiglu_hidden
from memzoo.blocks.pool import MemoryPool, PoolKind, ReadsPool
from memzoo.blocks.registry import register_block
from memzoo.nn.tucker_router import TuckerRouter
from memzoo.ops import gather_dot, grouped_weighted_gather

ACTIVATIONS = {"none": lambda h: h, "gelu": F.gelu}
VALUE_INIT_STD = 0.02

#: The every-block test's settings: a 6² grid over 9 rows (4 groups), 2 ranks, 2 cores.
_SMALLEST = {"n_keys": 6, "value_dim": 8, "heads": 2, "knn": 3, "k_dim": 8, "candidates": 3}


def _value_table(
    owner: str, pool: MemoryPool | None, kind: PoolKind, n_keys: int | None, value_dim: int | None, default_dim: int,
    value_expand: int, value_rows: int | None, update: str, value_lr_scale: float,
) -> tuple[MemoryPool, bool, int]:
    """The block's table (shared or a private one), whether it owns it, and the grid side ``n_keys``."""
    if isinstance(pool, str):
        raise ValueError(f"{owner}: pool {pool!r} is a name; build the block in a Transformer with pools={{...}}")
    if pool is not None:
        if not isinstance(pool, MemoryPool) or pool.kind != kind:
            raise ValueError(f"{owner}: needs a pool of kind {kind!r}, got {getattr(pool, 'kind', pool)!r}")
        if value_dim is not None and value_dim != pool.value_dim:
            raise ValueError(f"{owner}: value_dim={value_dim} differs from its pool's value_dim={pool.value_dim}")
        if n_keys is None:
            n_keys = math.isqrt(pool.num_rows * value_expand)
            if n_keys * n_keys != pool.num_rows * value_expand:
                raise ValueError(
                    f"{owner}: its pool's {pool.num_rows} rows × value_expand={value_expand} is not a square; give "
                    f"n_keys (the grid side) or a pool of n_keys²/value_expand rows"
                )
        return pool, False, n_keys
    if n_keys is None:
        raise ValueError(f"{owner}: give either a shared `pool` or `n_keys` (the grid side) for a private table")
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 1:
        raise ValueError(f"{owner}: n_keys must be a positive int, got {n_keys!r}")
    if value_rows is None:
        if (n_keys * n_keys) % value_expand:
            raise ValueError(
                f"{owner}: n_keys²={n_keys * n_keys} is not a multiple of value_expand={value_expand}; "
                f"pick n_keys as a multiple of sqrt(value_expand) or give value_rows"
            )
        value_rows = n_keys * n_keys // value_expand
    table = MemoryPool(None, value_dim or default_dim, kind=kind, update=update, lr=None, lr_scale=value_lr_scale,
                       init_std=VALUE_INIT_STD, num_rows=value_rows)
    return table, True, n_keys


class _TuckerMemory(ReadsPool, Block):
    """What UltraMem and UltraMemV2 share: the router, the grouped multi-core read and the output projection."""

    reads_pool = True
    table_kind: PoolKind = "memory"
    norm_exponent = 0.33

    def __init__(
        self, dim: int, pool: MemoryPool | None, n_keys: int | None, value_dim: int | None, value_expand: int,
        value_rows: int | None, heads: int, knn: int, k_dim: int, rank: int, cores: int, candidates: int | None,
        value_lr_scale: float, update: Literal["dense", "sparse"],
    ):
        super().__init__()
        owner = self.block_name or type(self).__name__
        if isinstance(value_expand, bool) or not isinstance(value_expand, int) or value_expand < 1:
            raise ValueError(f"{owner}: value_expand must be a positive int, got {value_expand!r}")
        table, owned, n_keys = _value_table(owner, pool, self.table_kind, n_keys, value_dim, dim, value_expand,
                                            value_rows, update, value_lr_scale)
        self.attach_pool(table, owned)
        self.router = TuckerRouter(dim, n_keys, table.num_rows, heads, knn, k_dim, rank, cores, candidates,
                                   self.norm_exponent, owner)
        if value_expand not in (1, self.router.groups):
            raise ValueError(
                f"{owner}: value_expand={value_expand} must be 1 (one projection) or n_keys²/rows="
                f"{self.router.groups} (one per virtual block)"
            )
        if table.value_dim % cores:
            raise ValueError(
                f"{owner}: value_dim={table.value_dim} must be a multiple of cores={cores} (each core weighs one "
                f"chunk of every value); use value_dim={cores * math.ceil(table.value_dim / cores)}"
            )
        self.dim, self.value_dim, self.value_expand, self.n_cores = dim, table.value_dim, value_expand, cores
        self.n_keys, self.heads, self.knn = n_keys, heads, knn
        self.out = nn.Linear(value_expand * table.value_dim, dim, bias=False)

    def grouped_read(self, table: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """``(..., E·D)``: for each group g, ``Σ_{k: g_k = g} weights[k, c] · table[rows_k]`` chunk by chunk (chunk c
        of width ``D/M`` weighed by core c; ``rows, groups (..., K)``, ``weights (..., K, M)``).

        One :func:`~memzoo.ops.grouped_weighted_gather`: each of the ``K`` rows is read once, whole, into its
        group's accumulator (``K·D`` multiply-adds; row-sparse tables get row-sparse gradients)."""
        pool = self.pool
        if pool.sharded_read is not None or pool.on_host:
            raise NotImplementedError(
                f"{type(self).__name__} reads its table directly (a grouped multi-core read), which a "
                f"memory-parallel (column-sharded) or host-resident table does not support; train it unsharded with "
                f"table_device: accelerator"
            )
        E = self.value_expand
        groups = groups if E > 1 else torch.zeros_like(rows)  # one projection: every slot in group 0
        sums = grouped_weighted_gather(table, rows, groups, weights.to(table.dtype), E, sparse_grad=pool.sparse)
        return sums.flatten(-2)  # (..., E, D) -> (..., E·D)

    def reset_parameters(self) -> None:
        """The authors' init (module docstring)."""
        self.router.reset_parameters()
        nn.init.normal_(self.out.weight, std=(self.value_expand * self.value_dim) ** -0.5)
        if self.owns_pool:
            for table in self.pool.tables().values():
                nn.init.normal_(table, std=VALUE_INIT_STD)

    def init_weights(self, std: float, residual_std: float) -> None:
        """The authors' init, whatever the model's stds (module docstring)."""
        self.reset_parameters()

    def _rows_read(self) -> int:
        return self.heads * self.knn

    def table_bytes_read_per_token(self) -> int:
        """The ``H·knn`` rows of each table read (duplicates counted: an upper bound)."""
        tables = self.pool.tables().values()
        return sum(self._rows_read() * self.value_dim * t.element_size() for t in tables)

    def _read_flops(self) -> int:
        """:meth:`grouped_read`'s: ``2·K·D`` (each of the ``K = H·knn`` rows read once)."""
        return 2 * self._rows_read() * self.value_dim

    def extra_repr(self) -> str:
        source = "private" if self.owns_pool else "shared"
        return (f"dim={self.dim}, grid={self.n_keys}², rows={self.pool.num_rows} ({source}), "
                f"value_expand={self.value_expand}, cores={self.n_cores}")


@register_block(
    "ultramem",
    paper="Huang et al. 2025, 'Ultra-Sparse Memory Network' (ICLR 2025, arXiv 2411.12364); settings of the authors' "
    "run_ultramem_v1.sh; read at layer i, added after layer j with the layer's add_at: j",
    smallest={**_SMALLEST, "value_expand": 4},
)
class UltraMem(_TuckerMemory):
    """UltraMem memory layer; ``x, y: (B, T, dim)`` (module docstring).

    It reads its table directly (:meth:`grouped_read`, not through ``pool.read``): memory parallelism and host tables
    do not apply to it (``reads_through_pool = False``).

    Args:
        dim: model width.
        pool: a shared table (kind ``memory``) the model passes for a layer's ``pool: name``.
        n_keys: keys per side (grid of ``n_keys²`` slots); with a shared pool derived from its rows if omitted.
        value_dim: width ``D`` of a value row (default ``dim``).
        value_expand: ``E``, projections (virtual memory blocks): 1 or ``n_keys²/rows``.
        value_rows: rows ``P`` of a private table (default ``n_keys²/value_expand``).
        heads: key sets (and cores) sharing the one query; each picks ``knn`` slots.
        knn: slots per head; k_dim: width of each query half; rank: Tucker rank ``r``; cores: ``M``.
        candidates: rows and columns kept per side by the rank-1 approximation (default ``knn``).
        value_lr_scale: the private table's lr as a multiple of the model's (the authors: 4).
        update: ``dense`` | ``sparse`` (row-sparse gradients, row-wise optimizer) for a private table.
    """

    reads_through_pool = False

    def __init__(
        self, dim: int, pool: MemoryPool | None = None, n_keys: int | None = None, value_dim: int | None = None,
        value_expand: int = 4, value_rows: int | None = None, heads: int = 2, knn: int = 80, k_dim: int = 192,
        rank: int = 2, cores: int = 2, candidates: int | None = None, value_lr_scale: float = 4.0,
        update: Literal["dense", "sparse"] = "dense",
    ):
        super().__init__(dim, pool, n_keys, value_dim, value_expand, value_rows, heads, knn, k_dim, rank, cores,
                         candidates, value_lr_scale, update)
        self.reset_parameters()

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        rows, groups, scores = self.router(x)  # (..., K), (..., K), (..., K, M)
        self.pool.observe(rows, scores.sum(-1))
        table = self.pool.values
        return self.out(self.grouped_read(table, rows, groups, scores.to(table.dtype)).to(x.dtype))

    def active_parameters(self) -> int:
        """The router (all keys are scored), the output projection and the rows read."""
        return (self.router.active_parameters() + self.out.weight.numel()
                + self._rows_read() * self.value_dim)

    def flops_per_token(self) -> int:
        """The module docstring's count."""
        return self.router.flops_per_token() + self._read_flops() + 2 * self.out.weight.numel()


@register_block(
    "ultramem_v2",
    paper="Huang et al. 2025, 'UltraMemV2' (arXiv 2508.18756); settings of the authors' run_ultramem_v2.sh "
    "(value input width tied to value_dim); a memory layer in every block, beside a dense FFN",
    smallest={**_SMALLEST, "value_expand": 1, "value_rows": 9, "ffn_fraction": 0.5},
)
class UltraMemV2(_TuckerMemory):
    """UltraMemV2 memory layer with FFN-valued slots and a dense FFN beside it; ``x, y: (B, T, dim)``.

    Args: as :class:`UltraMem`, with an ``experts`` table (``down``, ``up``) and:
        activation: of the slots' ``down · z`` (``none``, the authors' default ``mem_use_glu_act: false``, or
            ``gelu``).
        ffn_fraction: width of the dense SwiGLU FFN beside the memory, as a fraction of a plain FFN's
            (``swiglu_hidden(dim)``); ``0``: none.
    """

    table_kind: PoolKind = "experts"
    norm_exponent = 0.4

    def __init__(
        self, dim: int, pool: MemoryPool | None = None, n_keys: int | None = None, value_dim: int | None = None,
        value_expand: int = 1, value_rows: int | None = None, heads: int = 1, knn: int = 32, k_dim: int = 512,
        rank: int = 2, cores: int = 2, candidates: int | None = None, value_lr_scale: float = 1.0,
        update: Literal["dense", "sparse"] = "dense", activation: Literal["none", "gelu"] = "none",
        ffn_fraction: float = 1.0,
    ):
        super().__init__(dim, pool, n_keys, value_dim, value_expand, value_rows, heads, knn, k_dim, rank, cores,
                         candidates, value_lr_scale, update)
        if activation not in ACTIVATIONS:
            raise ValueError(f"ultramem_v2: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if isinstance(ffn_fraction, bool) or not isinstance(ffn_fraction, (int, float)) or not 0 <= ffn_fraction:
            raise ValueError(f"ultramem_v2: ffn_fraction must be a number >= 0 (0: no dense FFN), got {ffn_fraction!r}")
        self.activation, self.ffn_fraction = activation, float(ffn_fraction)
        self.value_in = nn.Linear(dim, self.value_dim, bias=False)
        hidden = round(self.ffn_fraction * swiglu_hidden(dim))
        self.ffn = DenseMLP(dim, hidden) if hidden > 0 else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """The authors' init for the memory (module docstring); the dense FFN with ``std``/``residual_std``."""
        super().reset_parameters()
        nn.init.normal_(self.value_in.weight, std=self.dim**-0.5)
        if self.ffn is not None:
            self.ffn.reset_parameters(std, residual_std)

    def init_weights(self, std: float, residual_std: float) -> None:
        self.reset_parameters(std, residual_std)

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        rows, groups, scores = self.router(x)  # (..., K), (..., K), (..., K, M)
        pool = self.pool
        pool.observe(rows, scores.sum(-1))
        dtype = pool.down.dtype
        z = self.value_in(x).to(dtype)
        gate = ACTIVATIONS[self.activation](gather_dot(pool.down, rows, z, sparse_grad=pool.sparse))  # (..., K)
        y = self.out(self.grouped_read(pool.up, rows, groups, scores.to(dtype) * gate.unsqueeze(-1)).to(x.dtype))
        return y if self.ffn is None else y + self.ffn(x)

    def active_parameters(self) -> int:
        """The router, both projections, the ``down`` and ``up`` rows read, and the dense FFN."""
        ffn = 0 if self.ffn is None else self.ffn.active_parameters()
        return (self.router.active_parameters() + self.out.weight.numel() + self.value_in.weight.numel()
                + 2 * self._rows_read() * self.value_dim + ffn)

    def flops_per_token(self) -> int:
        """The module docstring's count."""
        ffn = 0 if self.ffn is None else self.ffn.flops_per_token()
        return (self.router.flops_per_token() + 2 * self.value_in.weight.numel() + 2 * self._rows_read() * self.value_dim
                + self._read_flops() + 2 * self.out.weight.numel() + ffn)
