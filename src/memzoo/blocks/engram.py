"""Engram: hashed n-gram memory indexed by the token ids (DeepSeek, "Conditional Memory via Scalable Lookup",
arXiv 2601.07372).

For position ``t`` with compressed token ids ``x'`` (:mod:`memzoo.blocks.engram_vocab`; identity until a tokenizer
is bound, see :meth:`Engram.bind_tokenizer`), every n-gram suffix ``g_{t,n} = (x'_{t-n+1} .. x'_t)``,
``n = 2..N``, is hashed by ``H`` heads into prime-sized tables ``E_{n,h}`` (``M_{n,h}`` rows of width
``d_head = ngram_dim / H``) with the multiplicative-XOR hash of the authors' code::

    z_{t,n,h} = (⊕_{k<n} x'_{t-k} · m_k) mod M_{n,h}          (m_k odd, seeded by seed + 10007 · layer_id)
    e_t = ‖_{n,h} E_{n,h}[z_{t,n,h}]                          (concatenated: width (N-1) · ngram_dim)

Positions before the sequence's first token read the padding id (the compressed id of the tokenizer's ``pad_id``
once a tokenizer is bound; ``vocab_size``, an id no token has, before). Fusion with the hidden state ``h_t``::

    k_t = W_k e_t + b_k,  v_t = W_v e_t + b_v
    s_t = RMSNorm(h_t) · RMSNorm(k_t) / sqrt(dim);  α_t = σ(sign(s_t) · sqrt(|s_t|))    (signed sqrt: authors' code)
    ṽ_t = α_t · v_t
    y_t = ṽ_t + SiLU(DepthwiseCausalConv(RMSNorm(ṽ))_t)                          (kernel 4, dilation N)

All ``K = (N-1)·H`` tables are ONE private :class:`~memzoo.blocks.pool.MemoryPool` of ``Σ M_{n,h}`` rows (head
``(n, h)`` at its row offset), read with ``pool.read`` (one row of weight 1 per head, so the heads concatenate), so
``update: sparse`` gives row-sparse gradients and a row-wise optimizer, the pool its own learning rate, and data
parallel its row exchange. :meth:`Engram.table_indices` gives the ``(B, T, K)`` rows from the token ids alone.

The ``table`` control (does the table store anything, or do the gate and convolution do the work?):
``learned`` (the paper's), ``single_row`` (each head's table has one learned row: ``e_t`` is a constant, so no token
information; same gate, convolution and projections), ``frozen_random`` (the hashed tables keep their random init
and get no gradient: token information without learning the rows).

Placement: the paper adds Engram to the residual stream beside the FFN of chosen layers; in memzoo that is
``{block: beside, base: {block: dense}, add: {block: engram, layer_id: i}}`` in a layer of ``layers:`` (the
authors add it before attention, memzoo after; the RMSNorm of ``h`` makes the pre-norm input equivalent up to a
gain). The paper's hyper-connections (``hc_mult`` branches with a gate and key projection each) are not part of
memzoo's decoder: this is the single-branch block (``hc_mult = 1``).

KV-cache decoding keeps in ``ctx.state`` the last ``N - 1`` compressed ids (the n-gram windows span the cache
boundary) and the convolution's last ``(kernel - 1) · dilation`` inputs. Left-padded batches (prompts of different
lengths decoded together) are read as tokens: a prompt's first n-grams then see the pad token (the same padding id as
a sequence start, once the tokenizer is bound) but the convolution also sees the padded positions' values, so such
a row is not exactly the prompt decoded alone.
Cost per token: ``2·2·E·dim`` (key and value projections, ``E = (N-1)·ngram_dim``) ``+ 2·kernel·dim`` (the
convolution) ``+ 2·E`` (reading ``E`` table values); ``E`` values read from the table.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.engram_vocab import (
    compressed_vocabulary,
    hash_multipliers,
    table_primes,
    tokenizer_id_texts,
)
from memzoo.blocks.pool import MemoryPool, ReadsTokenTable, TableDevice, UpdateMode
from memzoo.blocks.registry import register_block
from memzoo.nn.checks import check_choice
from memzoo.nn.norms import RMSNorm

TableMode = Literal["learned", "single_row", "frozen_random"]
TABLE_MODES = ("learned", "single_row", "frozen_random")
_STATE_IDS, _STATE_CONV = "engram.ids", "engram.conv"


@register_block(
    "engram",
    paper="DeepSeek 2026, 'Conditional Memory via Scalable Lookup' (Engram, arXiv 2601.07372), single branch",
    smallest={"max_ngram": 3, "ngram_dim": 8, "heads": 2, "table_rows": 11, "kernel_size": 2},
)
class Engram(ReadsTokenTable, Block):
    """Hashed n-gram memory with a context gate and a short convolution; ``x, y: (B, T, dim)`` (module docstring).

    Args:
        dim: model width.
        vocab_size: the model's vocabulary (the lookup buffer's length); passed in by the model.
        max_ngram: ``N``, the longest n-gram (orders ``2..N``).
        ngram_dim: width of one order's embedding (its ``heads`` head rows concatenated).
        heads: hash heads per order (``H``); ``ngram_dim`` must be a multiple.
        table_rows: where each order's prime table sizes start (an int for every order or one per order);
            ``None``: ``5 · vocab_size`` (the authors' demo).
        kernel_size: the short convolution's kernel (4).
        dilation: the convolution's dilation (``None``: ``max_ngram``, as the authors).
        layer_id: seeds the hash multipliers with ``seed + 10007 · layer_id`` (give each Engram layer its own).
        seed: base seed of the multipliers.
        table: ``learned`` | ``single_row`` | ``frozen_random`` (module docstring).
        update: the table pool's update mode, ``dense`` or ``sparse`` (row-sparse gradients, row-wise optimizer).
        lr: the table pool's learning rate (``None``: the optimizer's).
        weight_decay: the table pool's weight decay.
        table_device: ``accelerator`` | ``host``: keep the tables in host memory, their rows gathered ahead of the
            layer (see :mod:`memzoo.blocks.pool`); a placement, not part of the architecture.
    """

    reads_pool = False  # the tables are a private pool, not one the model names
    needs_vocab_size = True

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        max_ngram: int = 3,
        ngram_dim: int = 512,
        heads: int = 8,
        table_rows: int | Sequence[int] | None = None,
        kernel_size: int = 4,
        dilation: int | None = None,
        layer_id: int = 0,
        seed: int = 0,
        table: TableMode = "learned",
        update: UpdateMode = "dense",
        lr: float | None = None,
        weight_decay: float = 0.0,
        table_device: TableDevice = "accelerator",
    ):
        super().__init__()
        check_choice("engram", "table", table, TABLE_MODES)
        _check_positive("vocab_size", vocab_size)
        _check_positive("ngram_dim", ngram_dim)
        _check_positive("heads", heads)
        _check_positive("kernel_size", kernel_size)
        if isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 2:
            raise ValueError(f"engram: max_ngram must be an int >= 2 (orders 2..max_ngram), got {max_ngram!r}")
        if ngram_dim % heads:
            raise ValueError(f"engram: ngram_dim={ngram_dim} must be a multiple of heads={heads} (each head reads "
                             f"ngram_dim / heads values)")
        dilation = max_ngram if dilation is None else dilation
        _check_positive("dilation", dilation)
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or layer_id < 0:
            raise ValueError(f"engram: layer_id must be an int >= 0, got {layer_id!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"engram: seed must be an int >= 0, got {seed!r}")
        orders = max_ngram - 1
        starts = _table_starts(table_rows, orders, vocab_size)
        self.dim, self.vocab_size, self.max_ngram, self.ngram_dim, self.heads = dim, vocab_size, max_ngram, ngram_dim, heads
        self.table_rows = table_rows
        self.kernel_size, self.dilation, self.layer_id, self.seed, self.table = kernel_size, dilation, layer_id, seed, table
        self.head_dim = ngram_dim // heads
        self.memory_dim = orders * ngram_dim  # E: the concatenated embedding
        n_lookups = orders * heads  # K
        primes = [p for order in table_primes(starts, heads) for p in order]
        sizes = [1] * n_lookups if table == "single_row" else primes
        offsets = [sum(sizes[:i]) for i in range(n_lookups)]
        # the hashing state (buffers, so checkpoints and exports need no tokenizer and no recomputation)
        self.register_buffer("lookup", torch.arange(vocab_size, dtype=torch.int64))
        self.register_buffer("pad_id", torch.tensor(vocab_size, dtype=torch.int64))
        self.register_buffer("multipliers", hash_multipliers(max_ngram, vocab_size, seed, layer_id))
        self.register_buffer("primes", torch.tensor(primes, dtype=torch.int64))
        self.register_buffer("row_offsets", torch.tensor(offsets, dtype=torch.int64))
        pool = MemoryPool(None, self.head_dim, update=update, lr=lr, weight_decay=weight_decay, num_rows=sum(sizes),
                          table_device=table_device)
        if table == "frozen_random":
            pool.values.requires_grad_(False)
        self.attach_pool(pool, owned=True)
        self.key_proj = nn.Linear(self.memory_dim, dim)
        self.value_proj = nn.Linear(self.memory_dim, dim)
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)
        self.conv_norm = RMSNorm(dim, eps=1e-5)
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, bias=False, dilation=dilation)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------ tokenizer
    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Builds the compressed vocabulary of ``tokenizer`` (memzoo's byte or Hugging Face tokenizer) into the
        ``lookup`` buffer and sets the padding id to its ``pad_id``'s compressed id. Ids the tokenizer does not
        have (the model's vocabulary may be larger) keep ids of their own after the compressed ones."""
        lookup, size = compressed_vocabulary(tokenizer_id_texts(tokenizer))
        if len(lookup) > self.vocab_size:
            raise ValueError(f"engram: the tokenizer has {len(lookup)} ids but the model's vocab_size is "
                             f"{self.vocab_size}; set the model's vocab_size >= {len(lookup)}")
        lookup += range(size, size + self.vocab_size - len(lookup))
        with torch.no_grad():
            self.lookup.copy_(torch.tensor(lookup, dtype=torch.int64))
            self.pad_id.fill_(lookup[int(tokenizer.pad_id)])

    # ------------------------------------------------------------------------------------------ parameters
    def reset_parameters(self, std: float = 0.02, residual_std: float = 0.02) -> None:
        """Table rows and the key projection ~ N(0, std), the value projection (the block's residual output)
        ~ N(0, residual_std), biases 0, norms 1, the convolution 0 (the block starts as ``ṽ``; the authors' demo
        keeps PyTorch's default Conv1d init)."""
        nn.init.normal_(self.pool.values, std=std)
        nn.init.normal_(self.key_proj.weight, std=std)
        nn.init.normal_(self.value_proj.weight, std=residual_std)
        nn.init.zeros_(self.key_proj.bias)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.zeros_(self.conv.weight)
        for norm in (self.query_norm, self.key_norm, self.conv_norm):
            nn.init.ones_(norm.weight)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Model-driven init: exactly :meth:`reset_parameters` with the model's stds."""
        self.reset_parameters(std, residual_std)

    # ------------------------------------------------------------------------------------------ forward
    def table_indices(self, ctx: BlockContext) -> torch.Tensor:
        """``(B, T, K)`` int64 pool rows of ``ctx.token_ids (B, T)``, order-major (order 2's heads first); they
        depend on the token ids only (and, when decoding, on the previous ids kept in ``ctx.state``)."""
        ids = self.lookup[ctx.token_ids]
        B, T = ids.shape
        if self.table == "single_row":
            return self.row_offsets.expand(B, T, -1)
        full = torch.cat([self._previous_ids(ctx, B), ids], dim=1)  # full[:, N-1+t] is position t
        start = self.max_ngram - 1
        mix = full[:, start:] * self.multipliers[0]
        mixes = []
        for k in range(1, self.max_ngram):  # order n = k + 1 adds the token k positions back
            mix = torch.bitwise_xor(mix, full[:, start - k : start - k + T] * self.multipliers[k])
            mixes.append(mix)
        mixed = torch.stack(mixes, dim=-1).repeat_interleave(self.heads, dim=-1)  # (B, T, K)
        return mixed % self.primes + self.row_offsets

    def read_indices(self, ctx: BlockContext) -> torch.Tensor:
        """``(B, T, K, 1)``: one row per bag, so the heads' rows concatenate."""
        return self.table_indices(ctx).unsqueeze(-1)

    def _previous_ids(self, ctx: BlockContext, batch: int) -> torch.Tensor:
        """``(B, N-1)`` compressed ids before ``ctx``'s first token: kept in ``ctx.state`` when decoding, else the
        padding id (positions before the sequence's start)."""
        if ctx.state is not None and _STATE_IDS in ctx.state:
            return ctx.state[_STATE_IDS]
        return self.pad_id.expand(batch, self.max_ngram - 1)

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        if ctx is None:
            raise ValueError("engram is indexed by token ids: call it as block(x, BlockContext.for_tokens(ids))")
        if ctx.token_ids.shape != x.shape[:2]:
            raise ValueError(f"engram: token_ids {tuple(ctx.token_ids.shape)} must match x's (B, T) "
                             f"{tuple(x.shape[:2])}")
        indices = self.rows_for(ctx)  # (B, T, K, 1): one row of weight 1 per head
        pool = self.pool
        ones = torch.ones(indices.shape, dtype=pool.values.dtype, device=indices.device)
        pool.observe(indices.squeeze(-1), ones.squeeze(-1))
        # (B, T, K, 1) bags -> (B, T, K, head_dim) -> concatenated (B, T, E)
        memory = pool.read(indices, ones).flatten(-2).to(x.dtype)
        key = self.key_norm(self.key_proj(memory))
        score = (self.query_norm(x) * key).sum(dim=-1, keepdim=True) / math.sqrt(self.dim)
        gate = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
        value = gate * self.value_proj(memory)  # ṽ (B, T, dim)
        conv_in = self.conv_norm(value)
        reach = (self.kernel_size - 1) * self.dilation  # inputs before t the convolution reads
        B, T, _ = value.shape
        past = conv_in.new_zeros(B, reach, self.dim)
        if ctx.state is not None:
            past = ctx.state.get(_STATE_CONV, past)
            full = torch.cat([past, conv_in], dim=1)
            ctx.state[_STATE_CONV] = full[:, full.shape[1] - reach :]
            ids = torch.cat([self._previous_ids(ctx, B), self.lookup[ctx.token_ids]], dim=1)
            ctx.state[_STATE_IDS] = ids[:, ids.shape[1] - (self.max_ngram - 1) :]
        else:
            full = torch.cat([past, conv_in], dim=1)
        conv = F.silu(self.conv(full.transpose(1, 2))).transpose(1, 2)  # (B, T, dim), causal
        return value + conv

    # ------------------------------------------------------------------------------------------ accounting
    def active_parameters(self) -> int:
        """Parameters one token reads: the projections, norms and convolution, and its ``K`` table rows (``E``
        values)."""
        dense = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("private_pool."))
        return dense + self.memory_dim

    def flops_per_token(self) -> int:
        """``2·2·E·dim`` (key and value projections) + ``2·kernel·dim`` (convolution) + ``2·E`` (table read);
        norms, the gate's dot product and the hashing are not counted."""
        return 4 * self.memory_dim * self.dim + 2 * self.kernel_size * self.dim + 2 * self.memory_dim

    def table_bytes_read_per_token(self) -> int:
        """The ``E`` table values of the token's ``K`` rows."""
        return self.memory_dim * self.pool.values.element_size()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, orders=2..{self.max_ngram}, heads={self.heads}, ngram_dim={self.ngram_dim}, "
                f"rows={self.pool.num_rows}, table={self.table}, kernel={self.kernel_size}, dilation={self.dilation}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"engram: {name} must be a positive int, got {value!r}")


def _table_starts(table_rows: int | Sequence[int] | None, orders: int, vocab_size: int) -> list[int]:
    if table_rows is None:
        return [5 * vocab_size] * orders
    if isinstance(table_rows, int) and not isinstance(table_rows, bool):
        starts = [table_rows] * orders
    elif isinstance(table_rows, (list, tuple)):
        starts = list(table_rows)
        if len(starts) != orders:
            raise ValueError(f"engram: table_rows has {len(starts)} entries but max_ngram gives {orders} orders "
                             f"(2..max_ngram); give one per order or a single int")
    else:
        raise ValueError(f"engram: table_rows must be an int, a list of ints (one per order) or null, got "
                         f"{table_rows!r}")
    for start in starts:
        _check_positive("table_rows", start)
    return starts
