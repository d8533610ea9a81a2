"""UltraMem's retrieval: Tucker-decomposed query-key scores over a virtual grid of ``n_keys²`` memory slots
(Huang et al. 2025, arXiv 2411.12364; UltraMemV2, arXiv 2508.18756). ``x → (rows, groups, scores)``.

Per token ``x (dim,)``, with ``H`` heads (which share the one query and differ in keys and cores, as in the
authors' code), ``r`` ranks and ``M`` cores::

    q1, q2     = LN(W_q x)[:k_dim], LN(W_q x)[k_dim:]               the query's two halves, each LayerNormed
    row_a(i)   = q1 · LN(K1[h, i, :, a]),  col_b(j) = q2 · LN(K2[h, j, :, b])     (n_keys, r) per side and head
    score_c(i, j) = Σ_{a,b} row_a(i) · C[h, c, a, b] · col_b(j)       one score per core c
    (i, j)     = top-knn of Σ_c score_c over the candidates² cells of the rank-1 approximation (ops.tucker_topk)

The selected grid cell ``g = i · n_keys + j`` is mapped through a fixed random permutation ``π`` (a buffer) to a
physical row and a group: ``row = π(g) mod P``, ``group = π(g) div P`` for a table of ``P`` rows. The groups are
UltraMem's implicit value expansion: a block reads the rows of each group through that group's own projection.

LayerNorms have a gain and no bias (initialised at ``k_dim ** -norm_exponent``: 0.33 in UltraMem, 0.4 in
UltraMemV2); ``W_q ~ N(0, k_dim^-1/2)``, keys ``~ N(0, k_dim^-1/2)``, cores ``~ U(0, 1)`` (the authors' init).

Cost per token (forward, a multiply-add counts 2): ``2·dim·2·k_dim`` (query) + ``H·2·2·n_keys·r·k_dim`` (both sides
against all keys, every rank) + ``H·tucker_topk_flops``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.ops.tucker_topk import tucker_topk, tucker_topk_flops

LAYER_NORM_EPS = 1e-5


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class TuckerRouter(nn.Module):
    """``forward(x (..., dim)) -> rows, groups (..., H·knn) int64, scores (..., H·knn, M)`` (module docstring).

    Args:
        dim: model width.
        n_keys: keys per side; the grid has ``n_keys²`` virtual slots.
        physical_rows: rows ``P`` of the value table (``n_keys²`` must be a multiple of it).
        heads, knn, k_dim, rank, cores: ``H``, cells kept per head, query-half width, Tucker rank ``r``, cores ``M``.
        candidates: rows and columns the rank-1 approximation keeps per side (``None``: ``knn``, as the authors).
        norm_exponent: LayerNorm gains start at ``k_dim ** -norm_exponent``.
        owner: the block name used in error messages.
    """

    def __init__(
        self, dim: int, n_keys: int, physical_rows: int, heads: int, knn: int, k_dim: int, rank: int, cores: int,
        candidates: int | None, norm_exponent: float, owner: str,
    ):
        super().__init__()
        candidates = knn if candidates is None else candidates
        for name, value in (("n_keys", n_keys), ("heads", heads), ("knn", knn), ("k_dim", k_dim), ("rank", rank),
                            ("cores", cores), ("candidates", candidates), ("physical_rows", physical_rows)):
            _positive_int(owner, name, value)
        if candidates > n_keys:
            raise ValueError(f"{owner}: candidates={candidates} exceeds n_keys={n_keys}; use candidates <= {n_keys}")
        if knn > candidates * candidates:
            raise ValueError(
                f"{owner}: knn={knn} exceeds candidates²={candidates * candidates}; raise candidates or lower knn"
            )
        if (n_keys * n_keys) % physical_rows:
            raise ValueError(
                f"{owner}: the grid of n_keys²={n_keys * n_keys} slots must be a multiple of the table's "
                f"{physical_rows} rows; pick n_keys and value_expand so that n_keys² = value_expand · rows"
            )
        self.dim, self.n_keys, self.physical_rows = dim, n_keys, physical_rows
        self.heads, self.knn, self.k_dim, self.rank, self.n_cores = heads, knn, k_dim, rank, cores
        self.candidates, self.norm_exponent = candidates, norm_exponent
        self.query = nn.Linear(dim, 2 * k_dim, bias=False)
        self.query_norm = nn.Parameter(torch.empty(k_dim))
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, rank, k_dim))
        self.key_norm = nn.Parameter(torch.empty(k_dim))
        self.cores = nn.Parameter(torch.empty(heads, cores, rank, rank))
        self.register_buffer("permutation", torch.randperm(n_keys * n_keys))
        self.reset_parameters()

    @property
    def groups(self) -> int:
        """Virtual slots per physical row: ``n_keys² / P``."""
        return self.n_keys * self.n_keys // self.physical_rows

    def reset_parameters(self) -> None:
        nn.init.normal_(self.query.weight, std=self.k_dim**-0.5)
        nn.init.normal_(self.keys, std=self.k_dim**-0.5)
        nn.init.constant_(self.query_norm, self.k_dim**-self.norm_exponent)
        nn.init.constant_(self.key_norm, self.k_dim**-self.norm_exponent)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        self.permutation.copy_(torch.randperm(self.n_keys * self.n_keys, device=self.permutation.device))

    def half_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows, cols (..., H, n_keys, r)``: each query half against its side's keys, per rank."""
        q = self.query(x).unflatten(-1, (2, self.k_dim))
        q = F.layer_norm(q, (self.k_dim,), self.query_norm, None, LAYER_NORM_EPS)  # (..., 2, k_dim)
        keys = F.layer_norm(self.keys, (self.k_dim,), self.key_norm, None, LAYER_NORM_EPS)  # (H, 2, n, r, k_dim)
        # one (tokens, k_dim) @ (k_dim, H·n·r) product per side: the keys are never broadcast per token
        side_keys = keys.transpose(0, 1).flatten(1, 3).transpose(-1, -2)  # (2, k_dim, H·n·r)
        scores = torch.bmm(q.reshape(-1, 2, self.k_dim).transpose(0, 1), side_keys)  # (2, tokens, H·n·r)
        scores = scores.unflatten(-1, (self.heads, self.n_keys, self.rank))
        rows, cols = (s.reshape(*q.shape[:-2], self.heads, self.n_keys, self.rank) for s in scores)
        return rows, cols

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, cols = self.half_scores(x)
        scores, cells = tucker_topk(rows, cols, self.cores, self.knn, self.candidates)  # (..., H, knn, M), (..., H, knn)
        slots = self.permutation[cells.flatten(-2)]
        return slots % self.physical_rows, slots // self.physical_rows, scores.flatten(-3, -2)

    def active_parameters(self) -> int:
        """Every parameter is read by every token (all keys are scored)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        """The module docstring's count."""
        return (2 * self.dim * 2 * self.k_dim + self.heads * 2 * 2 * self.n_keys * self.rank * self.k_dim
                + self.heads * tucker_topk_flops(self.n_keys, self.rank, self.n_cores, self.candidates, self.knn))
