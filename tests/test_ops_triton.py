"""The Triton kernels equal the vectorised PyTorch kernels: on CPU tensors under TRITON_INTERPRET=1 (small sizes),
and on a GPU (``cuda`` marker) against the CPU reference."""

import os

import pytest
import torch

from memzoo.ops import cpu_gather, gather_dot, sparse_gather, weighted_gather

pytest.importorskip("triton")


#: Triton picks interpreting or compiling when a ``@triton.jit`` function is defined, and its standard library
#: (``tl.zeros``, ``tl.sum``) is defined when ``triton`` is first imported, which pytest or ``torch.compile`` may
#: have done already in this process. So the interpreter tests run in the child pytest that
#: ``test_ops_triton_interpreter.py`` starts with ``TRITON_INTERPRET=1`` (and directly when the session has it set).
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpreter_only = pytest.mark.skipif(
    not INTERPRETER, reason="runs in the child process with TRITON_INTERPRET=1"
)


@pytest.fixture(scope="module")
def interpreted():
    """``memzoo.ops.triton_gather`` with its kernels interpreted on CPU tensors."""
    from memzoo.ops import triton_gather

    assert type(triton_gather._weighted_gather_kernel).__name__ == "InterpretedFunction"
    return triton_gather


def make_batch(n_rows, dim, n_bags, k, dtype, seed=0, duplicates=True):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_rows, dim, generator=gen).to(dtype)
    indices = torch.randint(0, n_rows, (n_bags, k), generator=gen)
    if duplicates and indices.numel() >= 2:
        indices.view(-1)[: min(12, indices.numel())] = indices.view(-1)[
            0
        ]  # one row hit many times (> BLOCK_P)
    weights = torch.randn(n_bags, k, generator=gen).to(dtype)
    weights[0, -1] = 0.0  # a zero weight
    x = torch.randn(n_bags, dim, generator=gen).to(dtype)
    return values, indices, weights, x


SIZES = [  # (n_rows, dim, n_bags, k): K = 1, D and K not powers of two, D > MAX_BLOCK_D, K > MAX_BLOCK_K
    (20, 8, 4, 1),
    (33, 37, 5, 7),
    (64, 300, 3, 20),
    (5, 16, 6, 4),  # more positions than rows: every row duplicated
]


def tolerance(dtype, reference):
    """One rounding to ``dtype`` of the fp32-accumulated result, plus fp32 accumulation-order differences."""
    scale = max(1.0, reference.abs().max().item())
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}[
        dtype
    ] * scale


def assert_kernels_equal(triton_kernels, values, indices, weights, x):
    n_rows = values.shape[0]
    pairs = [
        (
            triton_kernels.weighted_gather(values, indices, weights),
            cpu_gather.weighted_gather(values, indices, weights),
        ),
        (triton_kernels.gather_dot(values, indices, x), cpu_gather.gather_dot(values, indices, x)),
        (
            triton_kernels.weighted_scatter(x, indices, weights, n_rows),
            cpu_gather.weighted_scatter(x, indices, weights, n_rows),
        ),
    ]
    rows, sums = triton_kernels.weighted_scatter_rows(x, indices, weights)
    ref_rows, ref_sums = cpu_gather.weighted_scatter_rows(x, indices, weights)
    assert torch.equal(rows, ref_rows)
    pairs.append((sums, ref_sums))
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=tolerance(values.dtype, want))


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_interpreted_kernels_equal_pytorch_kernels(interpreted, size, dtype):
    assert_kernels_equal(interpreted, *make_batch(*size, dtype=dtype))


@interpreter_only
def test_interpreted_kernels_with_all_zero_weights(interpreted):
    values, indices, weights, x = make_batch(16, 12, 3, 5, torch.float32)
    out = interpreted.weighted_gather(values, indices, torch.zeros_like(weights))
    assert torch.equal(out, torch.zeros_like(out))
    grad = interpreted.weighted_scatter(x, indices, torch.zeros_like(weights), 16)
    assert torch.equal(grad, torch.zeros_like(grad))


@interpreter_only
def test_run_ends_mark_where_each_run_of_equal_rows_stops(interpreted):
    """The dense scatter's sync-free segmentation: at a run's first position, the end of that run."""
    ends = interpreted._run_ends(torch.tensor([2, 2, 2, 5, 7, 7]))
    assert [ends[i].item() for i in (0, 3, 4)] == [3, 4, 6]  # the three run starts
    assert interpreted._run_ends(torch.tensor([4])).tolist() == [1]
    assert interpreted._run_ends(torch.tensor([1, 1, 1])).tolist()[0] == 3


@interpreter_only
def test_interpreted_kernels_on_an_empty_batch(interpreted):
    values, _, _, _ = make_batch(8, 4, 1, 1, torch.float32)
    empty = torch.zeros(0, 3, dtype=torch.int64)
    assert interpreted.weighted_gather(values, empty, torch.zeros(0, 3)).shape == (0, 4)
    assert interpreted.gather_dot(values, empty, torch.zeros(0, 4)).shape == (0, 3)
    assert torch.equal(
        interpreted.weighted_scatter(torch.zeros(0, 4), empty, torch.zeros(0, 3), 8), torch.zeros(8, 4)
    )


@interpreter_only
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_interpreted_ops_match_references(interpreted, monkeypatch, sparse_grad):
    """The full custom ops (forward and backward) with their kernels forced to Triton on CPU tensors."""
    monkeypatch.setattr(sparse_gather, "_kernels", lambda device: interpreted)
    values, indices, weights, x = make_batch(24, 10, 6, 5, torch.float64)
    values.requires_grad_(), weights.requires_grad_(), x.requires_grad_()
    mixed = weighted_gather(values, indices, weights, sparse_grad=sparse_grad)
    scores = gather_dot(values, indices, x, sparse_grad=sparse_grad)
    ref_mixed = (weights.unsqueeze(-1) * values[indices]).sum(-2)
    ref_scores = (values[indices] * x.unsqueeze(-2)).sum(-1)
    torch.testing.assert_close(mixed, ref_mixed)
    torch.testing.assert_close(scores, ref_scores)
    loss = mixed.square().sum() + scores.sin().sum()
    ref_loss = ref_mixed.square().sum() + ref_scores.sin().sum()
    grads = torch.autograd.grad(loss, (values, weights, x))
    ref_grads = torch.autograd.grad(ref_loss, (values, weights, x))
    assert grads[0].layout == (torch.sparse_coo if sparse_grad else torch.strided)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to_dense(), want)


# ---------------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_match_cpu_reference(dtype, sparse_grad):
    values, indices, weights, x = make_batch(4096, 200, 64, 32, dtype)
    cpu_inputs = [t.double().requires_grad_() for t in (values, weights, x)]
    gpu_inputs = [t.cuda().requires_grad_() for t in (values, weights, x)]
    outs = {}
    for name, (v, w, xx), idx in (("cpu", cpu_inputs, indices), ("gpu", gpu_inputs, indices.cuda())):
        mixed = weighted_gather(v, idx, w, sparse_grad=sparse_grad)
        scores = gather_dot(v, idx, xx, sparse_grad=sparse_grad)
        grads = torch.autograd.grad(mixed.square().sum() + scores.sum(), (v, w, xx))
        outs[name] = [mixed, scores, *grads]
    assert outs["gpu"][2].layout == (torch.sparse_coo if sparse_grad else torch.strided)
    for got, want in zip(outs["gpu"], outs["cpu"]):
        want = want.to_dense()
        got = got.to_dense().double().cpu()
        bound = torch.finfo(dtype).eps + 32 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(got, want, rtol=0, atol=4 * bound * max(1.0, want.abs().max().item()))


@pytest.mark.cuda
@cuda
def test_cuda_kernels_equal_cpu_kernels_exactly_in_float64():
    from memzoo.ops import triton_gather

    values, indices, weights, x = make_batch(1000, 130, 50, 17, torch.float64)
    gpu = [t.cuda() for t in (values, indices, weights, x)]
    torch.testing.assert_close(
        triton_gather.weighted_gather(*gpu[:3]).cpu(), cpu_gather.weighted_gather(values, indices, weights)
    )
    torch.testing.assert_close(
        triton_gather.gather_dot(gpu[0], gpu[1], gpu[3]).cpu(), cpu_gather.gather_dot(values, indices, x)
    )
    rows, sums = triton_gather.weighted_scatter_rows(gpu[3], gpu[1], gpu[2])
    ref_rows, ref_sums = cpu_gather.weighted_scatter_rows(x, indices, weights)
    assert torch.equal(rows.cpu(), ref_rows)
    torch.testing.assert_close(sums.cpu(), ref_sums)
