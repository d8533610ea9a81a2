"""Language-model samples cut from one long token array (a tokenised corpus, documents separated by eos).

A *window* of ``block_size + 1`` tokens ``w`` gives the sample ``input_ids = w[:-1]``, ``labels = w[1:]``: label
``t`` is the token that follows ``input_ids[..t]``.

- :class:`ChunkWindows`: windows starting at ``0, B, 2B, …`` (stride ``block_size``, overlapping by one token), the
  last one padded, so every token but the first is a label exactly once: nothing dropped, nothing counted twice.
- :class:`RandomWindows`: windows at pseudo-random starts (nanoGPT's sampling), ``samples_per_epoch`` per epoch.

Both are streams in the sense of :mod:`memzoo.data.sampling`. ``tokens`` is an integer array, or a
:class:`TokenFile`, a range of a ``.npy`` file that each process memory-maps on first use (so worker processes
never copy the corpus).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from memzoo.data.keyed_random import derive_key, keyed_choice
from memzoo.nn.constants import IGNORE_INDEX


def lm_sample(window: np.ndarray, block_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``window`` (≤ block_size + 1 tokens) → ``input_ids, labels: (block_size,)`` LongTensors, padded at the end."""
    window = torch.as_tensor(np.asarray(window, dtype=np.int64))
    n = len(window) - 1
    input_ids = torch.full((block_size,), pad_id, dtype=torch.long)
    labels = torch.full((block_size,), IGNORE_INDEX, dtype=torch.long)
    input_ids[:n] = window[:-1]
    labels[:n] = window[1:]
    return {"input_ids": input_ids, "labels": labels}


@dataclass(frozen=True)
class TokenFile:
    """Tokens ``start:stop`` of a 1-d ``.npy`` array on disk (``stop=None``: to the end)."""

    path: str | Path
    start: int = 0
    stop: int | None = None

    def load(self) -> np.ndarray:
        """The range, memory-mapped (nothing is read until used)."""
        return np.load(self.path, mmap_mode="r")[self.start : self.stop]


class _TokenWindows(Dataset):
    def __init__(self, tokens: np.ndarray | TokenFile, block_size: int, pad_id: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._file = tokens if isinstance(tokens, TokenFile) else None
        self._tokens = None if isinstance(tokens, TokenFile) else np.asarray(tokens)
        self.block_size, self.pad_id = block_size, pad_id
        self.n_tokens = len(self.tokens)

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = self._file.load()
        return self._tokens

    def __getstate__(self) -> dict:  # a file-backed corpus travels to worker processes as its TokenFile
        state = dict(self.__dict__)
        if self._file is not None:
            state["_tokens"] = None
        return state


class ChunkWindows(_TokenWindows):
    """Window ``i`` = ``tokens[i·B : i·B + B + 1]``; ``ceil((n - 1) / B)`` windows, the last padded."""

    def __init__(self, tokens: np.ndarray | TokenFile, block_size: int, pad_id: int):
        super().__init__(tokens, block_size, pad_id)
        if self.n_tokens < 2:
            raise ValueError(f"ChunkWindows needs at least 2 tokens, got {self.n_tokens}")

    def __len__(self) -> int:
        return (self.n_tokens - 2) // self.block_size + 1  # ceil((n - 1) / B)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = (index % len(self)) * self.block_size
        return lm_sample(self.tokens[start : start + self.block_size + 1], self.block_size, self.pad_id)


class RandomWindows(_TokenWindows):
    """Sample ``j`` = the window at start ``hash(seed, j) mod (n - B)``; ``samples_per_epoch`` samples per epoch."""

    def __init__(self, tokens: np.ndarray | TokenFile, block_size: int, pad_id: int, samples_per_epoch: int,
                 seed: int):
        super().__init__(tokens, block_size, pad_id)
        if self.n_tokens < block_size + 1:
            raise ValueError(f"RandomWindows needs at least block_size + 1 = {block_size + 1} tokens, "
                             f"got {self.n_tokens}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.samples_per_epoch = samples_per_epoch
        self._key = derive_key(seed, "random windows")

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(keyed_choice(self._key, index, self.n_tokens - self.block_size)[0])
        return lm_sample(self.tokens[start : start + self.block_size + 1], self.block_size, self.pad_id)
