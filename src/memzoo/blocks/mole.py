"""MoLE: Mixture of Lookup Experts (Jie et al., ICML 2025, arXiv 2503.15798).

A MoLE layer's FFN slot is a dense FFN of the hidden state plus ``n_experts`` experts whose input is not the hidden
state but the token's embedding ``e_t = embed(v_t)`` (the model's embedding layer output), weighted by a router of
the hidden state; every expert is active::

    p_t = softmax(W_r h_t)                                        (n_experts,)
    y_t = W_2 gelu(W_1 h_t) + Σ_j p_tj · E_j(RMSNorm(e_t))        E_j(u) = D_j gelu(U_j u)

Because ``E_j(RMSNorm(embed(v)))`` depends only on the token id ``v``, the trained experts are *re-parameterised*
for inference into a lookup table ``L[v·n_experts + j] = E_j(RMSNorm(embed(v)))`` of ``vocab_size · n_experts``
rows of width ``dim`` (:meth:`LookupExperts.reparameterize`), and the layer becomes::

    y_t = W_2 gelu(W_1 h_t) + Σ_j p_tj · L[v_t·n_experts + j]     (mode: lookup)

with equal outputs: the experts' FLOPs are gone, and each token reads ``n_experts`` rows (which, depending only on
the token ids, are known before the layer runs: :meth:`LookupExperts.table_indices`). The table is a private
:class:`~memzoo.blocks.pool.MemoryPool`, read with ``pool.read(indices, p)``.

Shapes: ``h, y: (B, T, dim)``; the experts see ``embed(token_ids) (B, T, dim)``. The block reads the model's
embedding through a non-owning handle the model attaches (``reads_embedding``), so the state dict holds one
embedding and the experts' gradients reach it, as in the authors' training. Cost per token: ``experts`` mode
``2·dim·n_experts + 4·dim·hidden + n_experts·4·dim·expert_hidden + 2·n_experts·dim`` FLOPs; ``lookup`` mode
``2·dim·n_experts + 4·dim·hidden + 2·n_experts·dim`` FLOPs and ``n_experts·dim`` table values read.

The authors' model (JieShibo/MoLE ``modeling_mole.py``, Pythia-style): GELU MLPs (no gate) for the dense FFN and the
experts, all ``intermediate_size = 4·dim`` wide, a learnable RMSNorm on the embedding per layer, softmax router
without auxiliary loss, 4 or 16 experts, a MoLE FFN in every layer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.pool import MemoryPool, ReadsPool
from memzoo.blocks.registry import register_block
from memzoo.nn.checks import check_choice, check_positive_int
from memzoo.nn.norms import RMSNorm

MoleMode = Literal["experts", "lookup"]


class EmbeddingRef:
    """A non-owning handle from a block to the model's token embedding (keeps it out of the block's state_dict)."""

    __slots__ = ("embedding",)

    def __init__(self, embedding: nn.Embedding):
        self.embedding = embedding

    def __repr__(self) -> str:
        return f"EmbeddingRef({tuple(self.embedding.weight.shape)})"


class ExpertMLPs(nn.Module):
    """``n_experts`` GELU MLPs ``E_j(u) = D_j gelu(U_j u)`` over the same input: ``(..., dim) -> (..., n, dim)``."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Parameter(torch.empty(n_experts, hidden, dim))  # U_j
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden))  # D_j

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(torch.einsum("...d,jhd->...jh", u, self.up))
        return torch.einsum("...jh,jdh->...jd", hidden, self.down)


@register_block(
    "lookup_experts",
    paper="Jie et al. 2025, 'Mixture of Lookup Experts' (ICML 2025, arXiv 2503.15798)",
    smallest={"n_experts": 2, "hidden": 16, "expert_hidden": 8},
)
class LookupExperts(ReadsPool, Block):
    """A dense GELU FFN plus router-weighted experts of the token embedding, or their lookup table; ``x, y: (B, T,
    dim)`` (module docstring).

    Args:
        dim: model width.
        vocab_size: the model's vocabulary size (the lookup table has ``vocab_size · n_experts`` rows).
        n_experts: lookup experts, all active (the paper: 4 or 16).
        hidden: the dense FFN's inner width (``None``: 4·dim, as the paper's Pythia-style models).
        expert_hidden: each expert's inner width (``None``: ``hidden``, as the paper).
        mode: ``experts`` (training: the experts run on the embedding) or ``lookup`` (inference: their outputs
            are read from the re-parameterised table; see :meth:`reparameterize`).
        norm_eps: epsilon of the RMSNorm on the embedding.
    """

    needs_vocab_size = True
    reads_embedding = True

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        n_experts: int = 4,
        hidden: int | None = None,
        expert_hidden: int | None = None,
        mode: MoleMode = "experts",
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        owner = "lookup_experts"
        check_positive_int(owner, "vocab_size", vocab_size)
        check_positive_int(owner, "n_experts", n_experts)
        for name, value in (("hidden", hidden), ("expert_hidden", expert_hidden)):
            if value is not None:
                check_positive_int(owner, name, value)
        check_choice(owner, "mode", mode, ("experts", "lookup"))
        self.dim, self.vocab_size, self.n_experts, self.mode, self.norm_eps = dim, vocab_size, n_experts, mode, norm_eps
        self.hidden = hidden or 4 * dim
        self.expert_hidden = expert_hidden or self.hidden
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.up = nn.Linear(dim, self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, dim, bias=False)
        if mode == "experts":
            self.expert_norm = RMSNorm(dim, norm_eps)
            self.experts = ExpertMLPs(n_experts, dim, self.expert_hidden)
        else:
            self.expert_norm = self.experts = None
            self.attach_pool(self._new_table(), owned=True)
        self._embedding_ref: EmbeddingRef | None = None
        self.reset_parameters()

    def _new_table(self) -> MemoryPool:
        return MemoryPool(None, self.dim, lr=None, weight_decay=0.0, num_rows=self.vocab_size * self.n_experts)

    # ------------------------------------------------------------------------------------------ parameters
    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """Router, ``W_1`` and the experts' ``U_j`` ~ N(0, std); the residual outputs ``W_2`` and ``D_j`` ~ N(0,
        residual_std); the norm at 1. A lookup table keeps its pool init (it is meant to be filled by
        :meth:`reparameterize` or loaded)."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.up.weight, std=std)
        nn.init.normal_(self.down.weight, std=residual_std)
        if self.experts is not None:
            nn.init.normal_(self.experts.up, std=std)
            nn.init.normal_(self.experts.down, std=residual_std)
            nn.init.ones_(self.expert_norm.weight)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: :meth:`reset_parameters` with the model's stds."""
        self.reset_parameters(std, residual_std)

    def attach_embedding(self, embedding: nn.Embedding) -> None:
        """The model's token embedding, read by the experts (a handle; the model owns it)."""
        if not isinstance(embedding, nn.Embedding) or embedding.embedding_dim != self.dim:
            raise ValueError(f"lookup_experts: needs the model's nn.Embedding of width {self.dim}, got {embedding!r}")
        if embedding.num_embeddings != self.vocab_size:
            raise ValueError(f"lookup_experts: the embedding has {embedding.num_embeddings} rows but vocab_size is "
                             f"{self.vocab_size}; build the block with the model's vocab_size")
        self._embedding_ref = EmbeddingRef(embedding)

    @property
    def embedding(self) -> nn.Embedding:
        """The model's token embedding (attached by the model that built this block)."""
        if self._embedding_ref is None:
            raise RuntimeError("lookup_experts (MoLE) reads the model's token embedding, and none is attached: build "
                               "it inside a Transformer, or call block.attach_embedding(model.embed)")
        return self._embedding_ref.embedding

    # ------------------------------------------------------------------------------------------ forward
    def table_indices(self, ctx: BlockContext) -> torch.Tensor:
        """The lookup-table rows each position reads, ``(B, T, n_experts)`` int64: ``v·n_experts + j``."""
        experts = torch.arange(self.n_experts, device=ctx.token_ids.device)
        return ctx.token_ids.unsqueeze(-1) * self.n_experts + experts

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        if ctx is None:
            raise ValueError("lookup_experts (MoLE) reads the token ids: call it with a BlockContext "
                             "(BlockContext.for_tokens(token_ids))")
        if ctx.token_ids.shape != x.shape[:-1]:
            raise ValueError(f"lookup_experts: token_ids {tuple(ctx.token_ids.shape)} do not match the hidden "
                             f"states {tuple(x.shape)}; give one token id per position")
        p = torch.softmax(self.router(x), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32))  # (B, T, n)
        dense = self.down(F.gelu(self.up(x)))
        if self.mode == "experts":
            e = self.expert_norm(self.embedding(ctx.token_ids))  # RMSNorm(embed(v)), (B, T, dim)
            outs = self.experts(e.to(x.dtype))  # E_j(...), (B, T, n_experts, dim)
            mixed = torch.einsum("btj,btjd->btd", p.to(outs.dtype), outs)
        else:
            table, indices = self.pool, self.table_indices(ctx)
            weights = p.to(table.values.dtype)
            table.observe(indices, weights)
            mixed = table.read(indices, weights)  # Σ_j p_j · L[v·n + j]
        return dense + mixed.to(x.dtype)

    # ------------------------------------------------------------------------------------------ re-parameterisation
    @torch.no_grad()
    def lookup_table(self, chunk: int = 4096) -> torch.Tensor:
        """``L (vocab_size · n_experts, dim)`` with ``L[v·n + j] = E_j(RMSNorm(embed(v)))``, computed ``chunk``
        token ids at a time, in the experts' dtype."""
        if self.experts is None:
            raise ValueError("lookup_experts: the block is already in lookup mode (no experts to tabulate)")
        weight = self.embedding.weight
        rows = []
        for start in range(0, self.vocab_size, chunk):
            e = self.expert_norm(weight[start : start + chunk])
            rows.append(self.experts(e.to(self.experts.up.dtype)).flatten(0, 1))
        return torch.cat(rows)

    @torch.no_grad()
    def reparameterize(self, chunk: int = 4096) -> None:
        """Switches the block to ``mode: lookup`` with equal outputs: the experts (and their norm) are replaced by
        the table :meth:`lookup_table` (a private pool, on the experts' device and dtype); ``hparams['mode']``
        follows."""
        values = self.lookup_table(chunk)
        with torch.device(values.device):
            table = self._new_table().to(values.dtype)
        table.values.copy_(values)
        self.experts = self.expert_norm = None
        self.attach_pool(table, owned=True)
        self.mode = "lookup"
        if self.hparams is not None:
            self.hparams = {**self.hparams, "mode": "lookup"}

    # ------------------------------------------------------------------------------------------ accounting
    def active_parameters(self) -> int:
        """Router, dense FFN, and either all experts and the norm (``experts``) or the ``n_experts`` table rows a
        token reads (``lookup``); the embedding rows are the model's."""
        shared = self.dim * self.n_experts + 2 * self.dim * self.hidden
        if self.experts is not None:
            return shared + self.dim + 2 * self.n_experts * self.dim * self.expert_hidden
        return shared + self.n_experts * self.dim

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (a multiply-add counts 2; norm, gelu, softmax omitted): router
        ``2·dim·n``, dense FFN ``4·dim·hidden``, the experts ``n·4·dim·expert_hidden`` (``experts`` mode only),
        and the weighted sum of the ``n`` expert outputs or table rows ``2·n·dim``."""
        flops = 2 * self.dim * self.n_experts + 4 * self.dim * self.hidden + 2 * self.n_experts * self.dim
        if self.experts is not None:
            flops += self.n_experts * 4 * self.dim * self.expert_hidden
        return flops

    def table_bytes_read_per_token(self) -> int:
        """``lookup``: the ``n_experts`` rows of width ``dim`` (table element size); ``experts``: 0 (no table)."""
        if self.experts is not None:
            return 0
        return self.n_experts * self.dim * self.pool.values.element_size()

    def extra_repr(self) -> str:
        return (f"MoLE, mode={self.mode}, n_experts={self.n_experts}, hidden={self.hidden}, "
                f"expert_hidden={self.expert_hidden}, vocab_size={self.vocab_size}")
