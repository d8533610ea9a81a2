"""The token stream of a long sequence of documents, tokenised a chunk of documents at a time when first read.

For corpora rendered on the fly (the facts corpus): the documents are never all rendered, held or tokenised
up front. The stream keeps only the cumulative token count at each chunk boundary (one int per chunk of documents)
and a few recently read chunks' tokens; a read past the known part extends the boundary index chunk by chunk.
Reading is cyclic: position ``t ≥ total`` is position ``t mod total``.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class LazyTokenStream:
    """Tokens of ``n_chunks`` chunks of documents; ``render_chunk(c)`` returns chunk ``c``'s tokens (1-d int array,
    each document already followed by its eos), and must return the same tokens every time it is called."""

    def __init__(self, render_chunk: Callable[[int], np.ndarray], n_chunks: int, cached_chunks: int = 8):
        if n_chunks < 1:
            raise ValueError(f"a token stream needs at least one chunk, got n_chunks={n_chunks}")
        self._render_chunk = render_chunk
        self.n_chunks = n_chunks
        self._chunk_ends: list[int] = []  # tokens in chunks 0..c, for the chunks indexed so far
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_chunks = cached_chunks

    def chunk(self, c: int) -> np.ndarray:
        """Chunk ``c``'s tokens (least-recently-used cache)."""
        if c in self._cache:
            self._cache.move_to_end(c)
            return self._cache[c]
        tokens = np.asarray(self._render_chunk(c), dtype=np.int64)
        if len(tokens) == 0:
            raise ValueError(f"chunk {c} of a token stream rendered no tokens")
        self._cache[c] = tokens
        if len(self._cache) > self._cached_chunks:
            self._cache.popitem(last=False)
        return tokens

    def _index_through(self, position: int) -> None:
        """Extends the chunk-boundary index until it covers ``position`` or every chunk."""
        while len(self._chunk_ends) < self.n_chunks and (not self._chunk_ends or self._chunk_ends[-1] <= position):
            previous = self._chunk_ends[-1] if self._chunk_ends else 0
            self._chunk_ends.append(previous + len(self.chunk(len(self._chunk_ends))))

    @property
    def total(self) -> int:
        """Tokens in the whole stream (indexes every chunk)."""
        self._index_through(float("inf"))
        return self._chunk_ends[-1]

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens ``start, start + 1, …, start + length - 1``, positions taken modulo :attr:`total`."""
        out = np.empty(length, dtype=np.int64)
        filled, position = 0, start
        while filled < length:
            self._index_through(position)
            if position >= self._chunk_ends[-1]:  # every chunk indexed: wrap around
                position %= self._chunk_ends[-1]
                continue
            c = bisect.bisect_right(self._chunk_ends, position)
            chunk_start = self._chunk_ends[c - 1] if c else 0
            piece = self.chunk(c)[position - chunk_start : position - chunk_start + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            position += len(piece)
        return out
