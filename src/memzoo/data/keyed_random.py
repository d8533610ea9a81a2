"""Counter-based randomness for on-the-fly corpora: every random choice is a pure function of (key, index).

Nothing here keeps a generator's state, so item ``i`` of a corpus is computed without computing items ``0..i-1``:
that is what lets the facts corpus scale to millions of entities while rendering only what is asked for.

- :func:`derive_key` turns a seed and a few labels ("names", "order", pass 3, ...) into a 64-bit key;
- :func:`keyed_hash` / :func:`keyed_choice` are the splitmix64 finaliser (Steele et al., 2014) applied to
  ``index ⊕ key``: independent-looking 64-bit words, and integers in ``[0, n)`` from them;
- :class:`KeyedPermutation` is a pseudo-random bijection of ``{0, …, n-1}``: a 4-round balanced Feistel network on
  the smallest even number of bits that covers ``n``, restricted to ``[0, n)`` by cycle-walking (Black & Rogaway,
  2002). Evaluating it costs O(1) per index and no memory.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def derive_key(seed: int, *labels: str | int) -> int:
    """A 64-bit key for one use of randomness: ``derive_key(seed, "order", 3)`` (BLAKE2b of the labels)."""
    digest = hashlib.blake2b(repr((int(seed), *labels)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def keyed_hash(key: int, index: np.ndarray | int) -> np.ndarray:
    """splitmix64(index ⊕ key) for every element: uint64 array, same shape as ``index`` (at least 1-d)."""
    z = np.atleast_1d(np.asarray(index)).astype(np.uint64) ^ np.uint64(key)
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def keyed_choice(key: int, index: np.ndarray | int, n: int) -> np.ndarray:
    """An integer in ``[0, n)`` for every element of ``index`` (int64 array); bias ≤ n / 2⁶⁴."""
    if n < 1:
        raise ValueError(f"keyed_choice needs n >= 1, got {n}")
    return (keyed_hash(key, index) % np.uint64(n)).astype(np.int64)


class KeyedPermutation:
    """A bijection of ``{0, …, n-1}`` chosen by ``key``; ``perm(x)`` maps an int array elementwise.

    Feistel: split ``x`` (``2h`` bits) into halves ``(L, R)``; each of 4 rounds maps ``(L, R) → (R, L ⊕ F_i(R))``
    with ``F_i`` a keyed hash truncated to ``h`` bits. Any round function makes this a permutation of
    ``[0, 2^{2h})``; applying it again until the value falls below ``n`` (cycle-walking) gives a permutation of
    ``[0, n)``, with fewer than 4 applications on average because ``2^{2h} < 4n``.
    """

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"KeyedPermutation needs n >= 1, got {n}")
        self.n = int(n)
        self.half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        self._round_keys = [derive_key(key, "feistel round", i) for i in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self._mask
        for round_key in self._round_keys:
            left, right = right, left ^ (keyed_hash(round_key, right) & self._mask)
        return (left << shift) | right

    def __call__(self, x: np.ndarray | int) -> np.ndarray:
        x = np.atleast_1d(np.asarray(x, dtype=np.int64))
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"KeyedPermutation of size {self.n} got indices outside [0, {self.n})")
        y = self._feistel(x.astype(np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._feistel(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)
