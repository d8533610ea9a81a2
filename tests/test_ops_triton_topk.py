"""The Triton product-key top-k kernel equals the float64 brute force: on CPU tensors under TRITON_INTERPRET=1
(small sizes, in the child process of test_ops_triton_interpreter.py), and on a GPU (``cuda`` marker) through the full op."""

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(not INTERPRETER, reason="runs in the child process with TRITON_INTERPRET=1")


def brute_force(half_scores, k):
    s1, s2 = half_scores[0].transpose(0, 1), half_scores[1].transpose(0, 1)
    return (s1[..., :, None] + s2[..., None, :]).flatten(-2).topk(k, dim=-1)


@pytest.fixture(scope="module")
def interpreted():
    from memzoo.ops import triton_topk

    assert type(triton_topk._topk_merge_kernel).__name__ == "InterpretedFunction"
    return triton_topk


@interpreter_only
# k=32 (a 1024-sum merge) on one row: each row costs ~2.5 s of CPU interpreted; the other cases have several rows
@pytest.mark.parametrize("tokens, heads, n_keys, k", [(3, 2, 16, 4), (1, 1, 37, 32), (4, 3, 8, 1), (2, 2, 20, 5)])
def test_interpreted_kernel_equals_brute_force(interpreted, tokens, heads, n_keys, k):
    half_scores = torch.randn(2, heads, tokens, n_keys, generator=torch.Generator().manual_seed(n_keys))
    scores, indices = interpreted.half_topk_merge(half_scores, k)
    ref_scores, ref_indices = brute_force(half_scores, k)
    assert torch.equal(scores, ref_scores) and torch.equal(indices, ref_indices)


@interpreter_only
def test_interpreted_kernel_with_ties_and_a_strided_layout(interpreted):
    gen = torch.Generator().manual_seed(0)
    half_scores = torch.randint(-2, 3, (2, 6, 2, 12), generator=gen).float().transpose(1, 2)  # (2, H=2, T=6, n)
    scores, indices = interpreted.half_topk_merge(half_scores, 6)
    assert torch.equal(scores, brute_force(half_scores, 6)[0])
    sums = (half_scores[0].transpose(0, 1)[..., :, None] + half_scores[1].transpose(0, 1)[..., None, :]).flatten(-2)
    assert torch.equal(sums.gather(-1, indices), scores)
    assert all(len(set(row)) == 6 for row in indices.reshape(-1, 6).tolist())


@interpreter_only
def test_interpreted_kernel_limits(interpreted):
    assert interpreted.supports(4096, 64) and not interpreted.supports(4097, 8) and not interpreted.supports(64, 65)
    with pytest.raises(TypeError, match="float32"):
        interpreted.half_topk_merge(torch.zeros(2, 1, 1, 8, dtype=torch.float64), 2)


# ---------------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("n_keys, k", [(128, 32), (1024, 32), (512, 8), (100, 64)])
def test_cuda_kernel_equals_brute_force(n_keys, k):
    from memzoo.ops import triton_topk

    half_scores = torch.randn(2, 4, 257, n_keys, generator=torch.Generator().manual_seed(n_keys))
    scores, indices = triton_topk.half_topk_merge(half_scores.cuda(), k)
    ref_scores, ref_indices = brute_force(half_scores, k)
    assert torch.equal(scores.cpu(), ref_scores) and torch.equal(indices.cpu(), ref_indices)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_forward_and_backward_match_cpu(dtype):
    from memzoo.ops import product_key_topk

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(64, 4, 32, generator=gen).to(dtype)
    sub_keys = torch.randn(4, 2, 256, 16, generator=gen).to(dtype)
    outs = {}
    for device in ("cpu", "cuda"):
        q, c = query.to(device).requires_grad_(), sub_keys.to(device).requires_grad_()
        scores, indices = product_key_topk(q, c, 16)
        grads = torch.autograd.grad(scores.float().square().sum(), (q, c))
        outs[device] = [scores.float().cpu(), indices.cpu(), *(g.float().cpu() for g in grads)]
    tol = dict(rtol=0, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.02, atol=0.1)
    torch.testing.assert_close(outs["cuda"][0], outs["cpu"][0], **tol)
    if dtype == torch.float32:
        assert (outs["cuda"][1] == outs["cpu"][1]).float().mean() > 0.99  # matmul rounding may swap near-ties
        for got, want in zip(outs["cuda"][2:], outs["cpu"][2:]):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
