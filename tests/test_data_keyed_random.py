"""Keyed randomness: permutations are bijections, everything is a pure function of (key, index)."""

import numpy as np
import pytest

from memzoo.data.keyed_random import KeyedPermutation, derive_key, keyed_choice, keyed_hash


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4099])
def test_permutation_is_a_bijection(n):
    perm = KeyedPermutation(n, key=derive_key(0, "test", n))
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))


def test_permutation_depends_on_key_only_and_shuffles():
    a, b = KeyedPermutation(1000, 1), KeyedPermutation(1000, 1)
    x = np.arange(1000)
    assert np.array_equal(a(x), b(x))
    assert np.array_equal(a(x[::-1]), a(x)[::-1])  # elementwise: no hidden state
    other = KeyedPermutation(1000, 2)(x)
    assert (other != a(x)).mean() > 0.9
    assert (a(x) == x).mean() < 0.05  # not the identity
    # roughly uniform: the image of the first half is spread over both halves
    assert 0.4 < (a(x[:500]) < 500).mean() < 0.6


def test_large_domain_is_cheap_and_injective():
    perm = KeyedPermutation(75**5, 3)
    out = perm(np.arange(20000))
    assert len(np.unique(out)) == 20000 and out.max() < 75**5 and out.min() >= 0


def test_out_of_range_and_bad_sizes():
    with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
        KeyedPermutation(10, 0)(np.array([10]))
    with pytest.raises(ValueError, match="n >= 1"):
        KeyedPermutation(0, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        keyed_choice(0, 1, 0)


def test_keyed_choice_is_uniform_and_deterministic():
    draws = keyed_choice(derive_key(5, "x"), np.arange(60000), 6)
    counts = np.bincount(draws, minlength=6)
    assert counts.min() > 9500 and counts.max() < 10500
    assert np.array_equal(draws, keyed_choice(derive_key(5, "x"), np.arange(60000), 6))
    assert not np.array_equal(keyed_hash(1, np.arange(10)), keyed_hash(2, np.arange(10)))
    assert derive_key(0, "a") != derive_key(0, "b") != derive_key(1, "b")
