"""LazyTokenStream against the plain reference: all chunks concatenated, read cyclically."""

import numpy as np
import pytest

from memzoo.data.doc_stream import LazyTokenStream


def _chunks(n_chunks, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 100, size=rng.integers(1, 9)) for _ in range(n_chunks)]


def test_windows_match_the_concatenation_cyclically():
    chunks = _chunks(11)
    reference = np.concatenate(chunks)
    calls = []
    stream = LazyTokenStream(lambda c: calls.append(c) or chunks[c], len(chunks), cached_chunks=2)
    for start in [0, 3, len(reference) - 2, len(reference), 2 * len(reference) + 5, 1]:
        for length in [1, 5, len(reference) + 7]:
            expected = reference[np.arange(start, start + length) % len(reference)]
            assert np.array_equal(stream.window(start, length), expected), (start, length)
    assert stream.total == len(reference)


def test_reads_only_what_it_needs():
    chunks = _chunks(1000)
    calls = []
    stream = LazyTokenStream(lambda c: calls.append(c) or chunks[c], len(chunks))
    stream.window(0, 3)
    assert set(calls) <= {0, 1, 2}  # a short read at the start renders only the first chunk(s)
    calls.clear()
    stream.window(0, 3)
    assert calls == []  # cached


def test_errors():
    with pytest.raises(ValueError, match="at least one chunk"):
        LazyTokenStream(lambda c: np.arange(3), 0)
    with pytest.raises(ValueError, match="chunk 0 .* no tokens"):
        LazyTokenStream(lambda c: np.zeros(0, dtype=np.int64), 1).window(0, 1)
