"""The product-key top-k kernels (C++ on CPU; the PyTorch fallback) against the float64 brute force over all
n_keys² product keys: forward, backward, ties, NaN, dtypes, threads, torch.compile, and the fallback when no
kernel can be built."""

import shutil
import warnings

import pytest
import torch

from cpu_kernel_switch import kernels_switched
from memzoo.ops import cpu_topk, product_key_topk
from memzoo.ops import product_keys as pk


def brute_force(half_scores, k):
    """``(2, H, T, n)`` → the top-k of all ``n²`` sums, ``(T, H, k)``, index ``i1·n + i2``."""
    s1, s2 = half_scores[0].transpose(0, 1), half_scores[1].transpose(0, 1)
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2).topk(k, dim=-1)


def reference_topk(query, sub_keys, k):
    half = sub_keys.shape[-1]
    s1 = torch.einsum("...hd,hnd->...hn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", query[..., half:], sub_keys[:, 1])
    return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2).topk(k, dim=-1)


def random_inputs(lead, heads, n_keys, dk, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(*lead, heads, dk, generator=gen, dtype=dtype).requires_grad_()
    sub_keys = torch.randn(heads, 2, n_keys, dk // 2, generator=gen, dtype=dtype).requires_grad_()
    return query, sub_keys


def test_the_cpu_kernel_builds_here():
    """g++ is present on the machines memzoo is tested on, so the fast path must be the one tested."""
    assert shutil.which("g++") or shutil.which("c++")
    assert cpu_topk.available(), cpu_topk._KERNELS.state.get("error")


# (n_keys, k): the kernel's fast route needs n_keys >= its chunk count (8 for k <= 8, 16 or 32 above) and k <= 64.
# Plain route: (5, 1), (5, 5), (6, 20), (8, 16), (20, 40) (three with k > n_keys), (100, 70); fast route at 8 chunks:
# (9, 8), (64, 8), (200, 7); at 16: (16, 16), (37, 32), (64, 17), (128, 32); at 32: (300, 64), (1024, 32)
SIZES = [(5, 1), (5, 5), (6, 20), (8, 16), (9, 8), (16, 16), (20, 40), (37, 32), (64, 8), (64, 17), (128, 32),
         (200, 7), (300, 64), (100, 70), (1024, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_keys, k", SIZES)
def test_cpu_kernel_equals_brute_force(n_keys, k, dtype):
    half_scores = torch.randn(2, 3, 40, n_keys, dtype=dtype, generator=torch.Generator().manual_seed(n_keys))
    scores, indices = cpu_topk.half_topk_merge(half_scores, k)
    ref_scores, ref_indices = brute_force(half_scores, k)
    assert torch.equal(scores, ref_scores)  # the same IEEE additions
    assert torch.equal(indices, ref_indices)  # continuous data: no ties, the order is determined


@pytest.mark.parametrize("k", [0, 26, True])
def test_cpu_kernel_rejects_k_beyond_the_product_set(k):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, n_keys² = 25\]"):
        cpu_topk.half_topk_merge(torch.randn(2, 1, 3, 5), k)


@pytest.mark.parametrize("n_keys, k", [(16, 16), (37, 32), (64, 8), (128, 32), (20, 3)])
def test_cpu_kernel_with_many_ties(n_keys, k):
    """Integer scores tie everywhere: the scores are the exact top-k, every index scores what it claims, no index
    is returned twice."""
    gen = torch.Generator().manual_seed(k)
    half_scores = torch.randint(-3, 4, (2, 2, 50, n_keys), generator=gen).float()
    scores, indices = cpu_topk.half_topk_merge(half_scores, k)
    ref_scores, _ = brute_force(half_scores, k)
    assert torch.equal(scores, ref_scores)
    all_sums = (half_scores[0].transpose(0, 1)[..., :, None] + half_scores[1].transpose(0, 1)[..., None, :]).flatten(-2)
    assert torch.equal(all_sums.gather(-1, indices), scores)
    assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_keys, k", [(16, 16), (37, 32), (128, 32), (300, 64), (100, 1)])
def test_cpu_kernel_with_coarse_ties_and_near_ties(n_keys, k, dtype):
    """Scores on a coarse grid (long runs of equal sums, which the bisection of the candidate pairs must not split
    wrongly) and scores a few ulps apart: the exact top-k scores, each index scoring what it claims, no repeats."""
    gen = torch.Generator().manual_seed(n_keys + k)
    coarse = torch.randint(0, 6, (2, 3, 40, n_keys), generator=gen).to(dtype) / 4
    near = 1 + torch.randint(0, 4, (2, 3, 40, n_keys), generator=gen).to(dtype) * torch.finfo(dtype).eps
    for half_scores in (coarse, near, torch.cat([coarse[:, :, :20], near[:, :, 20:]], dim=2)):
        scores, indices = cpu_topk.half_topk_merge(half_scores, k)
        ref_scores, _ = brute_force(half_scores, k)
        assert torch.equal(scores, ref_scores)
        sums = (half_scores[0].transpose(0, 1)[..., :, None] + half_scores[1].transpose(0, 1)[..., None, :]).flatten(-2)
        assert torch.equal(sums.gather(-1, indices), scores)
        assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist())


@pytest.mark.parametrize("k", [1, 32, 64])
def test_cpu_kernel_with_hundreds_of_equal_candidates(k):
    """Equal scores everywhere (e.g. zero queries) and rows with 200 tied maxima: more than 128 candidates per half
    take the partial sort; the scores are exact, each index scores what it claims, none repeats."""
    half_scores = torch.zeros(2, 2, 6, 1024)
    half_scores[:, 1, :3, :200] = 1.0
    half_scores[0, 1, 3:] = torch.randn(3, 1024, generator=torch.Generator().manual_seed(k)).round()
    scores, indices = cpu_topk.half_topk_merge(half_scores, k)
    ref_scores, _ = brute_force(half_scores, k)
    assert torch.equal(scores, ref_scores)
    sums = (half_scores[0].transpose(0, 1)[..., :, None] + half_scores[1].transpose(0, 1)[..., None, :]).flatten(-2)
    assert torch.equal(sums.gather(-1, indices), scores)
    assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist())


def test_cpu_kernel_rows_with_infinities_take_the_plain_route():
    """A row holding +inf (or -inf) in one half: its sums are infinite, the bounds of the fast route are not
    finite, and the plain route gives the brute force's scores; the other rows stay exact."""
    half_scores = torch.randn(2, 2, 6, 64, generator=torch.Generator().manual_seed(7))
    half_scores[0, 0, 1, 5] = float("inf")
    half_scores[1, 1, 2, :40] = float("-inf")
    half_scores[0, 1, 3, 9] = float("inf")
    half_scores[0, 1, 3, 11] = float("inf")
    scores, indices = cpu_topk.half_topk_merge(half_scores, 8)
    ref_scores, ref_indices = brute_force(half_scores, 8)
    assert torch.equal(scores, ref_scores)
    sums = (half_scores[0].transpose(0, 1)[..., :, None] + half_scores[1].transpose(0, 1)[..., None, :]).flatten(-2)
    assert torch.equal(sums.gather(-1, indices), scores)
    finite = ref_scores.isfinite().all(-1)
    assert torch.equal(indices[finite], ref_indices[finite])


def test_cpu_kernel_ranks_nan_first_like_torch_topk():
    half_scores = torch.randn(2, 1, 4, 40, generator=torch.Generator().manual_seed(1))
    half_scores[0, 0, 1, 7] = float("nan")
    scores, indices = cpu_topk.half_topk_merge(half_scores, 5)
    assert scores[1, 0].isnan().all() and indices[1, 0].div(40, rounding_mode="floor").eq(7).all()
    ref_scores, ref_indices = brute_force(half_scores, 5)
    assert torch.equal(indices[[0, 2, 3]], ref_indices[[0, 2, 3]])


def test_cpu_kernel_same_result_on_two_threads():
    half_scores = torch.randn(2, 4, 300, 128, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_topk.half_topk_merge(half_scores, 32)
        torch.set_num_threads(2)
        two = cpu_topk.half_topk_merge(half_scores, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("n_keys", [64, 37])
def test_cpu_backward_kernel_same_result_on_one_and_two_threads(n_keys):
    """One thread takes a fused pass over the picks, several threads two passes (rows; head and side): the same
    additions in the same order, so the same bits."""
    query, sub_keys = random_inputs((70,), 3, n_keys, 16, dtype=torch.float32, seed=n_keys)
    scores, indices = product_key_topk(query, sub_keys, 32)
    upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_topk.backward(upstream, indices, query.detach(), sub_keys.detach())
        torch.set_num_threads(2)
        two = cpu_topk.backward(upstream, indices, query.detach(), sub_keys.detach())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    only_query = cpu_topk.backward(upstream, indices, query.detach(), sub_keys.detach(), need_keys=False)
    only_keys = cpu_topk.backward(upstream, indices, query.detach(), sub_keys.detach(), need_query=False)
    assert only_query[1] is None and torch.equal(only_query[0], one[0])
    assert only_keys[0] is None and torch.equal(only_keys[1], one[1])


@pytest.mark.parametrize("lead, heads, n_keys, dk, k", [((6,), 2, 20, 8, 5), ((2, 3), 3, 40, 12, 32), ((4,), 1, 9, 6, 9)])
def test_op_forward_and_backward_equal_float64_reference(lead, heads, n_keys, dk, k):
    query, sub_keys = random_inputs(lead, heads, n_keys, dk)
    scores, indices = product_key_topk(query, sub_keys, k)
    ref_scores, ref_indices = reference_topk(query, sub_keys, k)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)
    upstream = torch.randn(scores.shape, dtype=scores.dtype, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((scores * upstream).sum(), (query, sub_keys))
    ref_grads = torch.autograd.grad((ref_scores * upstream).sum(), (query, sub_keys))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_cpu_backward_kernel_sums_duplicate_sub_keys():
    """Every token picks the same few sub-keys (one dominant key per half): the sub-key gradient sums them."""
    query, sub_keys = random_inputs((30,), 2, 12, 8)
    with torch.no_grad():
        sub_keys[:, :, 3] *= 50
        query.abs_()
        sub_keys[:, :, 3].abs_()
    scores, indices = product_key_topk(query, sub_keys, 4)
    assert (indices // 12 == 3).float().mean() > 0.5
    grads = torch.autograd.grad(scores.sum(), (query, sub_keys))
    ref_grads = torch.autograd.grad(reference_topk(query, sub_keys, 4)[0].sum(), (query, sub_keys))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n_keys", [64, 37])
def test_cpu_backward_kernel_equals_float64_gather_formula(n_keys):
    """The backward kernel (float32) at a power-of-two n_keys (shift) and another (reciprocal division) against the
    float64 gather/scatter formula at the same indices, with repeated sub-keys across tokens and within a row."""
    query, sub_keys = random_inputs((50,), 3, n_keys, 16, dtype=torch.float32, seed=n_keys)
    scores, indices = product_key_topk(query, sub_keys, 32)
    upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((scores * upstream).sum(), (query, sub_keys))
    q64, c64 = query.detach().double(), sub_keys.detach().double()
    ref_grads = pk._gather_backward(upstream.double(), indices, q64, c64, differentiable=False)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gradcheck_and_double_backward():
    query, sub_keys = random_inputs((3,), 2, 7, 4)
    fn = lambda q, c: product_key_topk(q, c, 4)[0]
    assert torch.autograd.gradcheck(fn, (query, sub_keys))
    assert torch.autograd.gradgradcheck(fn, (query, sub_keys))


def test_bfloat16_input():
    query, sub_keys = random_inputs((16,), 2, 24, 8, dtype=torch.bfloat16, seed=4)
    scores, indices = product_key_topk(query, sub_keys, 6)
    assert scores.dtype == torch.bfloat16 and indices.dtype == torch.int64
    q64, c64 = query.detach().double(), sub_keys.detach().double()
    ref_scores, _ = reference_topk(q64, c64, 6)
    torch.testing.assert_close(scores.double(), ref_scores, atol=0.1, rtol=0.02)
    # each returned index scores what is returned for it (recomputed in float64 from the bf16 inputs)
    half = 4
    i1, i2 = indices // 24, indices % 24
    heads = torch.arange(2).view(1, 2, 1)
    claimed = (q64[..., None, :half] * c64[heads, 0, i1]).sum(-1) + (q64[..., None, half:] * c64[heads, 1, i2]).sum(-1)
    torch.testing.assert_close(claimed, scores.double(), atol=0.1, rtol=0.02)
    upstream = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    grads = torch.autograd.grad((scores * upstream).sum(), (query, sub_keys))
    assert grads[0].dtype == grads[1].dtype == torch.bfloat16
    # the gradient formula at the returned indices, in float64 by the (independent) gather/scatter kernels
    ref_grads = pk._gather_backward(upstream.double(), indices, q64, c64, differentiable=False)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, atol=0.05, rtol=0.02)


def test_torch_compile_fullgraph_forward_and_backward():
    query, sub_keys = random_inputs((8,), 2, 32, 8, dtype=torch.float32)

    def loss(q, c):
        scores, indices = product_key_topk(q, c, 5)
        return (scores.softmax(-1) * (indices % 7).float()).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(query, sub_keys)
    grads = torch.autograd.grad(got, (query, sub_keys))
    want = loss(query, sub_keys)
    ref_grads = torch.autograd.grad(want, (query, sub_keys))
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


@pytest.fixture
def no_cpu_kernel(monkeypatch):
    """The kernel state as after a failed build (restored afterwards)."""
    saved = dict(cpu_topk._KERNELS.state)
    cpu_topk._KERNELS.state.clear()

    def failing_build():
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(cpu_topk, "_build", failing_build)
    yield
    cpu_topk._KERNELS.state.clear()
    cpu_topk._KERNELS.state.update(saved)


def test_fallback_when_the_kernel_cannot_be_built_warns_once_and_stays_exact(no_cpu_kernel):
    query, sub_keys = random_inputs((5,), 2, 20, 8)
    with pytest.warns(RuntimeWarning, match="could not be built.*no compiler in this test"):
        scores, indices = product_key_topk(query, sub_keys, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call must not warn again
        product_key_topk(query, sub_keys, 6)
    assert cpu_topk.library() is None
    ref_scores, ref_indices = reference_topk(query, sub_keys, 6)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(indices, ref_indices)
    grads = torch.autograd.grad(scores.sum(), (query, sub_keys))
    ref_grads = torch.autograd.grad(ref_scores.sum(), (query, sub_keys))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_environment_switch_turns_the_kernel_off_silently(monkeypatch):
    with kernels_switched(cpu_topk, monkeypatch):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu_topk.library() is None
            half_scores = torch.randn(2, 2, 10, 16, dtype=torch.float64)
            scores, indices = pk._torch_half_topk_merge(half_scores, 4)
            ref = brute_force(half_scores, 4)
            assert torch.equal(indices, ref[1])
        with pytest.raises(RuntimeError, match="MEMZOO_CPU_KERNELS=0"):
            cpu_topk.half_topk_merge(half_scores, 4)


def test_empty_batch():
    query, sub_keys = random_inputs((0,), 2, 16, 8)
    scores, indices = product_key_topk(query, sub_keys, 4)
    assert scores.shape == indices.shape == (0, 2, 4)
    grads = torch.autograd.grad(scores.sum(), (query, sub_keys), allow_unused=True)
    assert grads[1] is None or not grads[1].any()


@pytest.mark.parametrize("n_keys", [64, 128, 256])
def test_cpu_kernel_at_every_ranking_network_size(n_keys):
    """k from 1 to 64 puts the candidate lists, the chunk maxima and the candidate pairs at every size the ranking
    takes (sorting networks of 8, 16, 32 and 64 keys with AVX-512 and the counting ranks past them): on continuous
    data the brute force's scores and indices; on data with signed zeros, mixed signs and ties the exact scores,
    each index scoring what it claims, none twice."""
    gen = torch.Generator().manual_seed(n_keys)
    continuous = torch.randn(2, 2, 24, n_keys, generator=gen)
    tied = torch.randint(-2, 3, (2, 2, 24, n_keys), generator=gen).float() / 2
    tied[tied == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (int((tied == 0).sum()),), generator=gen)]
    for k in (1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 63, 64):
        scores, indices = cpu_topk.half_topk_merge(continuous, k)
        ref_scores, ref_indices = brute_force(continuous, k)
        assert torch.equal(scores, ref_scores) and torch.equal(indices, ref_indices), k
        scores, indices = cpu_topk.half_topk_merge(tied, k)
        assert torch.equal(scores, brute_force(tied, k)[0]), k
        sums = (tied[0].transpose(0, 1)[..., :, None] + tied[1].transpose(0, 1)[..., None, :]).flatten(-2)
        assert torch.equal(sums.gather(-1, indices), scores), k
        assert all(len(set(row)) == k for row in indices.reshape(-1, k).tolist()), k
