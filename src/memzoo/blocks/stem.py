"""STEM: a SwiGLU FFN whose up-projection is a per-layer table indexed by the current token (arXiv 2601.10639).

A dense SwiGLU FFN computes ``W_down (silu(W_gate x) ⊙ W_up x)``. STEM replaces the up-projection ``W_up x`` by a
row of a layer-local embedding table ``U (vocab_size, hidden)`` chosen by the token id ``v_t`` at that position::

    y_t = W_down ( silu(W_gate x_t) ⊙ U[v_t] )          x_t, y_t: (dim,),  U[v_t]: (hidden,)

So the layer has ``vocab_size · hidden`` table parameters but reads one row per token: per token it costs the
gate and down matmuls (``2·2·dim·hidden`` FLOPs, two thirds of the dense FFN's) plus reading ``hidden`` table
values. The rows depend only on the token ids (:meth:`TokenEmbeddingFFN.table_indices`), so they are known before
the layer runs. The gate and the down projection see the hidden state; the table sees only the token.

The table is a private :class:`~memzoo.blocks.pool.MemoryPool` of ``vocab_size`` rows read with ``pool.read``
(one row per position, weight 1), so ``update: sparse`` gives row-sparse gradients and a row-wise optimizer, and
the table has its own learning rate and weight decay. The authors' code (Infini-AI-Lab/STEM, ``lingua/stem.py``)
trains the tables with the model's AdamW (same learning rate, weight decay 0.1) and initialises them Xavier-normal,
``std = sqrt(2 / (vocab_size + hidden))``; the ``stem`` preset does the same (``lr: null``: the optimizer's).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.dense import swiglu_hidden
from memzoo.blocks.pool import MemoryPool, ReadsTokenTable, TableDevice, UpdateMode
from memzoo.blocks.registry import register_block
from memzoo.nn.activations import swiglu
from memzoo.nn.checks import check_choice, check_positive_int


@register_block(
    "token_embedding_ffn",
    paper="STEM (arXiv 2601.10639): SwiGLU FFN with the up-projection replaced by a per-layer token-indexed table",
    smallest={"hidden": 16},
)
class TokenEmbeddingFFN(ReadsTokenTable, Block):
    """``y = W_down(silu(W_gate x) ⊙ U[token])`` (module docstring); ``x, y: (B, T, dim)``.

    Args:
        dim: model width.
        vocab_size: rows of the table ``U`` (the model's vocabulary size; given by the model).
        hidden: inner width, the table's row width (``None``: the dense SwiGLU default, 8/3·dim rounded up to 64).
        update: ``dense`` | ``sparse`` (row-sparse gradients, row-wise optimizer) updates of the table.
        lr: the table's learning rate (``None``: the optimizer's, as the authors train it).
        weight_decay: the table's weight decay.
        init_std: std of the table's normal init (``None``: Xavier, ``sqrt(2 / (vocab_size + hidden))``).
        table_device: ``accelerator`` | ``host``: keep the table in host memory, its rows gathered ahead of the
            layer (see :mod:`memzoo.blocks.pool`); a placement, not part of the architecture.
    """

    needs_vocab_size = True

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        hidden: int | None = None,
        update: UpdateMode = "dense",
        lr: float | None = None,
        weight_decay: float = 0.1,
        init_std: float | None = None,
        table_device: TableDevice = "accelerator",
    ):
        super().__init__()
        owner = "token_embedding_ffn"
        check_positive_int(owner, "vocab_size", vocab_size)
        if hidden is not None:
            check_positive_int(owner, "hidden", hidden)
        check_choice(owner, "update", update, ("dense", "sparse"))
        self.dim, self.vocab_size = dim, vocab_size
        self.hidden = hidden or swiglu_hidden(dim)
        self.init_std = init_std if init_std is not None else math.sqrt(2.0 / (vocab_size + self.hidden))
        self.gate = nn.Linear(dim, self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, dim, bias=False)
        table = MemoryPool(None, self.hidden, update=update, lr=lr, weight_decay=weight_decay,
                           init_std=self.init_std, num_rows=vocab_size, table_device=table_device)
        self.attach_pool(table, owned=True)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """``W_gate`` ~ N(0, std), the residual output ``W_down`` ~ N(0, residual_std), the table ~ N(0,
        ``init_std``)."""
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.down.weight, std=residual_std)
        self.pool.reset_parameters()

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: :meth:`reset_parameters` with the model's stds."""
        self.reset_parameters(std, residual_std)

    def table_indices(self, ctx: BlockContext) -> torch.Tensor:
        """The table rows the positions read, ``(B, T, 1)`` int64: each position's own token id."""
        return ctx.token_ids.unsqueeze(-1)

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        if ctx is None:
            raise ValueError("token_embedding_ffn (STEM) reads the token ids: call it with a BlockContext "
                             "(BlockContext.for_tokens(token_ids))")
        if ctx.token_ids.shape != x.shape[:-1]:
            raise ValueError(f"token_embedding_ffn: token_ids {tuple(ctx.token_ids.shape)} do not match the hidden "
                             f"states {tuple(x.shape)}; give one token id per position")
        indices = self.rows_for(ctx)
        table = self.pool
        ones = torch.ones(indices.shape, dtype=table.values.dtype, device=x.device)
        table.observe(indices, ones)
        up = table.read(indices, ones)  # U[v_t], (B, T, hidden)
        return self.down(swiglu(self.gate(x), up.to(x.dtype)))

    # ------------------------------------------------------------------------------------------ accounting
    def active_parameters(self) -> int:
        """``W_gate`` and ``W_down``, and the one table row a token reads."""
        return 2 * self.dim * self.hidden + self.hidden

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (a multiply-add counts 2; silu and the product omitted): the gate and down
        matmuls, ``2·2·dim·hidden``, and the row read (``2·hidden``, a weighted read of one row)."""
        return 2 * 2 * self.dim * self.hidden + 2 * self.hidden

    def table_bytes_read_per_token(self) -> int:
        """One row of ``hidden`` values in the table's element size."""
        return self.hidden * self.pool.values.element_size()

    def extra_repr(self) -> str:
        return f"STEM, dim={self.dim}, hidden={self.hidden}, table={self.vocab_size}x{self.hidden}"
