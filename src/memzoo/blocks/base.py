"""The block contract: what every module filling a transformer layer's FFN slot is and declares.

A block is a :class:`Block` (an ``nn.Module``) built as ``cls(dim, **hyperparameters)`` whose
``forward(x, ctx)`` maps ``x (B, T, dim)`` to ``(B, T, dim)``. ``ctx`` is a :class:`BlockContext`: the token ids of
the sequence and their absolute positions, which blocks indexed by tokens (n-gram tables, per-token embeddings) read
and others ignore; during KV-cache generation it holds only the new tokens and their absolute positions.

Everything the model, the accounting and the exporter need from a block is declared here, with defaults a block
overrides when they do not hold for it (nothing is probed with ``hasattr``):

- ``reads_pool`` (class variable): the block reads a model-owned :class:`~memzoo.blocks.pool.MemoryPool` that a
  layer names with ``pool: name``; the model then hands it the pool as the ``pool`` constructor argument.
- ``needs_vocab_size`` (class variable): the block is indexed by token ids; the model passes its ``vocab_size`` as
  the ``vocab_size`` constructor argument (unless the layer sets one).
- ``reads_embedding`` (class variable): the block reads the model's token embedding ``embed(token_ids)`` (e.g.
  MoLE's experts); the model hands its ``nn.Embedding`` to :meth:`attach_embedding` when it builds the block, and
  the block keeps it as a non-owning handle, so the state dict holds the embedding once (the model's).
- Decoding state: with a KV cache, ``ctx.state`` is a dict private to the block's layer that persists across the
  decode steps of one batch (empty at the first step), e.g. the last ``n - 1`` token ids of an n-gram block or a
  causal convolution's last inputs; it is ``None`` when the forward sees whole sequences.
- :meth:`bind_tokenizer`: called with the data tokenizer once it is known (training setup, ``memzoo.build_model``),
  for blocks whose tables depend on the tokens' text (Engram's compressed vocabulary); default: nothing. What a
  block derives from it must live in its state dict (buffers), so checkpoints and exports need no tokenizer.
- ``hparams``: the block's resolved hyperparameters ``{"block": name, ...}`` as :func:`memzoo.create_block`
  recorded them (``None`` for a block built directly from its class).
- :meth:`prefetch`: called by the model for every layer's block with that layer's context BEFORE any layer runs,
  so a block whose table rows follow from the token ids alone can start moving them early (a host table's
  ``pool.prefetch(indices)``, see :mod:`memzoo.blocks.pool`); default: nothing.
- :meth:`init_weights`, :meth:`aux_losses`, :meth:`active_parameters`, :meth:`flops_per_token`,
  :meth:`table_bytes_read_per_token`: see each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn


@dataclass(frozen=True)
class BlockContext:
    """What a block may read besides the hidden states: ``token_ids (B, T)`` int64 and their absolute ``positions
    (B, T)`` int64 (``start .. start + T - 1`` when decoding with a KV cache after ``start`` tokens), and ``state``:
    with a KV cache, the block's own dict that persists between decode steps (``None`` without a cache)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    state: dict[str, Any] | None = None

    def with_state(self, state: dict[str, Any] | None) -> BlockContext:
        """This context with ``state`` as the block's decode state (what each layer hands its block)."""
        return BlockContext(self.token_ids, self.positions, state)

    @classmethod
    def for_tokens(cls, token_ids: torch.Tensor, start: int = 0) -> BlockContext:
        """The context of ``token_ids (B, T)`` that follow ``start`` earlier tokens of their sequences."""
        B, T = token_ids.shape
        positions = torch.arange(start, start + T, device=token_ids.device).expand(B, T)
        return cls(token_ids, positions)


class Block(nn.Module):
    """Base class of every FFN-slot block (module docstring). Subclasses define ``__init__(self, dim, ...)`` and
    ``forward(self, x, ctx=None)``, and override the accounting methods whose defaults do not describe them."""

    #: The block reads a model-owned pool named by its layer's ``pool:`` (passed in as the ``pool`` argument).
    reads_pool: ClassVar[bool] = False
    #: The block reads its pool only through ``pool.read`` (so a memory-parallel sharded read or a host table
    #: applies); ``False`` for a block that indexes the table tensor itself, which memory parallelism then refuses.
    reads_through_pool: ClassVar[bool] = True
    #: The block is indexed by token ids and takes the model's ``vocab_size`` as a constructor argument.
    needs_vocab_size: ClassVar[bool] = False
    #: The block reads the model's token embedding, handed over with :meth:`attach_embedding`.
    reads_embedding: ClassVar[bool] = False
    #: The registered name of the class (set by ``@register_block``).
    block_name: ClassVar[str | None] = None
    #: Resolved hyperparameters, ``{"block": name, **arguments}``, recorded by ``create_block``.
    hparams: dict[str, Any] | None = None

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must define forward(x, ctx)")

    def prefetch(self, ctx: BlockContext) -> None:
        """Starts fetching what ``forward(x, ctx)`` will read; called with the same ``ctx`` (its ``state`` too, as
        it is before this forward) before the model runs its layers. Must not change ``ctx.state`` or any output:
        a forward without a prefetch gives the same result. Default: nothing.

        A token-indexed block on a host pool: ``self.pool.prefetch(self.table_indices(ctx))``; its forward then
        reads ``self.pool.read(indices, weights)`` with the same indices (the same tensor is fastest; equal values
        also match, at the cost of a comparison)."""

    def attach_embedding(self, embedding: nn.Embedding) -> None:
        """Gives a block that ``reads_embedding`` the model's token embedding (a handle: the model owns it)."""
        raise TypeError(f"{type(self).__name__} does not read the model's embedding (reads_embedding is False)")

    def init_weights(self, std: float, residual_std: float) -> None:
        """The model's init: input-side weights ~ N(0, std), the residual output projection ~ N(0, residual_std).
        Default: keep the block's own init."""

    def weight_scales(self) -> tuple[float, float] | None:
        """``(std, residual_std)`` of the block's current weights, as :meth:`init_weights` takes them (input-side
        weights, residual output projection); read from a pretrained block by ``beside``'s ``init: base_scale``.
        Default: ``None`` (not defined)."""
        return None

    def zero_output(self) -> bool:
        """Makes the block's output exactly zero without zeroing its projections (``beside``'s
        ``init: base_scale``); returns whether it could. Default: ``False`` (it cannot)."""
        return False

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Tells the block the data tokenizer (a :class:`memzoo.data.tokenizers.Tokenizer`: memzoo's byte
        tokenizer or a Hugging Face ``tokenizer.json``), once it is known; default: nothing. A block that derives
        tables from it keeps them as buffers; without a call those keep their tokenizer-free defaults."""

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses (already weighted) of the last forward, by name; default none."""
        return {}

    def active_parameters(self) -> int:
        """Parameters one token's forward reads; default: all of the block's (distinct) parameters."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (a multiply-add counts 2). Default, an estimate: ``2 · active_parameters()``;
        :meth:`declares_flops` tells whether a class computes its own."""
        return 2 * self.active_parameters()

    def table_bytes_read_per_token(self) -> int:
        """Bytes of table rows (pools, large embedding tables) one token reads; default 0 (no table)."""
        return 0

    @classmethod
    def declares_flops(cls) -> bool:
        """Whether this class counts its own FLOPs (else :meth:`flops_per_token` is the ``2·active`` estimate)."""
        return cls.flops_per_token is not Block.flops_per_token
