"""product_key_topk against a brute-force top-k over all n_keys² product keys: values, indices, gradients, errors."""

import pytest
import torch

from memzoo.ops import candidate_pairs, product_key_topk
from memzoo.ops.product_keys import _candidate_ranks


def brute_force_topk(query, sub_keys, k):
    """Score every one of the n_keys² product keys, then take the top-k (the definition)."""
    half = sub_keys.shape[-1]
    s1 = torch.einsum("...hd,hnd->...hn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", query[..., half:], sub_keys[:, 1])
    all_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # index i1 * n_keys + i2
    return all_scores.topk(k, dim=-1)


def random_inputs(lead, heads, n_keys, dk, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(*lead, heads, dk, generator=gen, dtype=dtype, requires_grad=True)
    sub_keys = torch.randn(heads, 2, n_keys, dk // 2, generator=gen, dtype=dtype, requires_grad=True)
    return query, sub_keys


@pytest.mark.parametrize(
    "lead, heads, n_keys, dk, k",
    [
        ((), 1, 5, 4, 1),
        ((3,), 2, 16, 8, 4),
        ((2, 5), 4, 32, 16, 32),
        ((7,), 3, 9, 6, 9),
        ((4,), 2, 64, 12, 1),
    ],
)
def test_equals_brute_force_topk(lead, heads, n_keys, dk, k):
    query, sub_keys = random_inputs(lead, heads, n_keys, dk)
    scores, indices = product_key_topk(query, sub_keys, k)
    ref_scores, ref_indices = brute_force_topk(query, sub_keys, k)
    assert scores.shape == indices.shape == (*lead, heads, k)
    assert indices.dtype == torch.int64
    torch.testing.assert_close(scores, ref_scores)
    # continuous random data has no ties, so even the order matches; compare as sets as well to be explicit
    assert torch.equal(indices, ref_indices)
    assert torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values)
    assert bool((scores[..., :-1] >= scores[..., 1:]).all()), "scores must be sorted descending"
    assert int(indices.min()) >= 0 and int(indices.max()) < n_keys**2


def test_gradients_match_brute_force():
    query, sub_keys = random_inputs((3, 2), 2, 12, 8)
    upstream = torch.randn(3, 2, 2, 5, dtype=torch.float64)
    scores, _ = product_key_topk(query, sub_keys, 5)
    grads = torch.autograd.grad((scores * upstream).sum(), (query, sub_keys))
    ref_scores, _ = brute_force_topk(query, sub_keys, 5)
    ref_grads = torch.autograd.grad((ref_scores * upstream).sum(), (query, sub_keys))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    assert sub_keys.grad is None and grads[1].abs().sum() > 0


def test_backward_is_not_handed_a_zero_filled_gradient_for_the_indices():
    """The indices output carries no gradient: autograd must not allocate and zero-fill a (T, H, k) tensor for it
    on every backward (the kernel reads only the scores' gradient)."""
    query, sub_keys = random_inputs((64,), 4, 16, 8, dtype=torch.float32)
    scores, _ = product_key_topk(query, sub_keys, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        scores.square().sum().backward()
    zero_filled = [e.input_shapes[0] for e in prof.events() if e.name == "aten::zero_" and e.input_shapes]
    assert [64, 4, 8] not in zero_filled, zero_filled
    assert query.grad is not None and sub_keys.grad is not None and query.grad.abs().sum() > 0


def test_gradcheck():
    query, sub_keys = random_inputs((2,), 2, 6, 4)
    assert torch.autograd.gradcheck(lambda q, c: product_key_topk(q, c, 3)[0], (query, sub_keys))


def test_float32_and_bfloat16_agree_with_brute_force_scores():
    for dtype in (torch.float32, torch.bfloat16):
        query, sub_keys = random_inputs((8,), 2, 20, 8, dtype=dtype, seed=3)
        scores, indices = product_key_topk(query, sub_keys, 4)
        ref_scores, _ = brute_force_topk(query, sub_keys, 4)
        assert scores.dtype == dtype
        torch.testing.assert_close(scores, ref_scores)
        # the returned indices address keys whose (recomputed) scores are the returned scores
        all_scores = brute_force_topk(query, sub_keys, 400)
        flat = torch.full((8, 2, 400), float("nan"), dtype=dtype)
        flat.scatter_(-1, all_scores[1], all_scores[0])
        torch.testing.assert_close(flat.gather(-1, indices), scores)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    query, sub_keys = random_inputs((4,), 2, 16, 8, dtype=torch.float32)

    def lookup(q, c):
        scores, indices = product_key_topk(q, c, 4)
        return scores.softmax(-1), indices

    compiled = torch.compile(lookup, fullgraph=True, backend="aot_eager")
    (s, i), (ref_s, ref_i) = compiled(query, sub_keys), lookup(query, sub_keys)
    torch.testing.assert_close(s, ref_s)
    assert torch.equal(i, ref_i)


@pytest.mark.parametrize(
    "query_shape, keys_shape, k, error, match",
    [
        ((3, 2, 8), (2, 2, 10, 4), 11, ValueError, r"k must be an int in \[1, n_keys=10\], got 11"),
        ((3, 2, 8), (2, 2, 10, 4), 0, ValueError, r"k must be an int in \[1, n_keys=10\], got 0"),
        ((3, 2, 7), (2, 2, 10, 4), 2, ValueError, "Dk=7 must be even"),
        ((3, 2, 8), (3, 2, 10, 4), 2, ValueError, r"expected \(2, 2, n_keys, 4\)"),
        ((3, 2, 8), (2, 2, 10, 5), 2, ValueError, r"expected \(2, 2, n_keys, 4\)"),
        ((3, 2, 8), (2, 3, 10, 4), 2, ValueError, r"sub_keys must be \(H, 2, n_keys, Dk/2\)"),
        ((3, 2, 8), (2, 10, 4), 2, ValueError, r"sub_keys must be \(H, 2, n_keys, Dk/2\)"),
        ((8,), (1, 2, 10, 4), 2, ValueError, r"query must be \(..., H, Dk\)"),
    ],
)
def test_bad_shapes_and_k(query_shape, keys_shape, k, error, match):
    with pytest.raises(error, match=match):
        product_key_topk(torch.randn(query_shape), torch.randn(keys_shape), k)


def test_bad_k_type():
    with pytest.raises(ValueError, match="got 2.0"):
        product_key_topk(torch.randn(2, 8), torch.randn(2, 2, 4, 4), 2.0)


def test_dtype_mismatch():
    with pytest.raises(TypeError, match="torch.float32 and torch.float64"):
        product_key_topk(torch.randn(3, 2, 8), torch.randn(2, 2, 10, 4, dtype=torch.float64), 2)
    with pytest.raises(TypeError, match="floating dtype"):
        product_key_topk(
            torch.ones(3, 2, 8, dtype=torch.int64), torch.ones(2, 2, 10, 4, dtype=torch.int64), 2
        )


def test_device_mismatch():
    with pytest.raises(ValueError, match="query is on meta but sub_keys on cpu"):
        product_key_topk(torch.randn(3, 2, 8, device="meta"), torch.randn(2, 2, 10, 4), 2)


@pytest.mark.parametrize("k", [1, 2, 3, 6, 16])
def test_ties_keep_the_exact_top_k_scores(k):
    """Integer-valued sub-keys make many equal sums; the pruned candidate set (pairs of ranks with
    (a+1)(b+1) <= k) must still give the brute-force top-k scores, and every index must score what it claims."""
    gen = torch.Generator().manual_seed(k)
    n_keys, dk = 16, 4
    query = torch.randint(-2, 3, (20, 2, dk), generator=gen).double()
    sub_keys = torch.randint(-1, 2, (2, 2, n_keys, dk // 2), generator=gen).double()
    scores, indices = product_key_topk(query, sub_keys, k)
    ref_scores, _ = brute_force_topk(query, sub_keys, k)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    half = dk // 2
    i1, i2 = indices // n_keys, indices % n_keys
    heads = torch.arange(2).view(1, 2, 1)
    claimed = (query[..., None, :half] * sub_keys[heads, 0, i1]).sum(-1) + \
        (query[..., None, half:] * sub_keys[heads, 1, i2]).sum(-1)
    torch.testing.assert_close(claimed, scores, rtol=0, atol=0)
    assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist()), "an index was returned twice"


@pytest.mark.parametrize("k, pairs", [(1, 1), (2, 3), (3, 5), (16, 50), (32, 119)])
def test_candidate_pairs_counts_the_rank_pairs_scored(k, pairs):
    """The accounting's count is the number of (a, b) with (a+1)(b+1) <= k, the pairs product_key_topk sums."""
    by_definition = sum(1 for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k)
    assert candidate_pairs(k) == pairs == by_definition == len(_candidate_ranks(k, torch.device("cpu"))[0])
