"""The Triton kernels of the grouped read (memzoo.ops.triton_grouped_gather) equal the C++ kernels and the float64
formula: on CPU tensors under TRITON_INTERPRET=1 (small sizes, run by test_ops_triton_interpreter.py in a child
pytest), and on a GPU (``cuda`` marker) through the whole op."""

import os

import pytest
import torch

from memzoo.ops import cpu_read, grouped_gather, grouped_weighted_gather

pytest.importorskip("triton")

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"  # why a child process: see test_ops_triton.py
interpreter_only = pytest.mark.skipif(not INTERPRETER, reason="runs in the child process with TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def interpreted():
    """``memzoo.ops.triton_grouped_gather`` with its kernels interpreted on CPU tensors."""
    from memzoo.ops import triton_grouped_gather

    assert type(triton_grouped_gather._grouped_gather_kernel).__name__ == "InterpretedFunction"
    return triton_grouped_gather


def make(B, K, N, D, M, S, dtype=torch.float64, seed=0):
    """A read with a row repeated across bags and within one (more often than a block of positions), a group no
    position names (S > 1) and a zero weight."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=gen, dtype=dtype)
    indices = torch.randint(0, N, (B, K), generator=gen)
    indices.view(-1)[: min(10, indices.numel())] = indices.view(-1)[0]
    groups = torch.randint(0, max(S - 1, 1), (B, K), generator=gen)
    weights = torch.randn(B, K, M, generator=gen, dtype=dtype)
    weights[0, -1, 0] = 0.0
    src = torch.randn(B, S, D, generator=gen, dtype=dtype)
    return values, indices, groups, weights, src


#: (B, K, N, D, M, S): one position, D and K not powers of two, D past a block, chunks that split vectors, one group
SIZES = [(4, 1, 20, 8, 2, 3), (5, 7, 33, 36, 3, 2), (3, 20, 64, 300, 2, 4), (6, 4, 5, 16, 4, 1), (2, 9, 40, 12, 1, 5)]


def tolerance(dtype):
    return {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}[dtype]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_interpreted_kernels_equal_the_cpp_kernels(interpreted, size, dtype):
    values, indices, groups, weights, src = make(*size, dtype=dtype)
    n_rows, n_groups, chunks = values.shape[0], size[5], size[4]
    tol = tolerance(dtype)
    torch.testing.assert_close(interpreted.grouped_gather(values, indices, groups, weights, n_groups),
                               cpu_read.grouped_gather(values, indices, groups, weights, n_groups), **tol)
    torch.testing.assert_close(interpreted.gather_dot(values, indices, src, groups, chunks),
                               cpu_read.gather_dot(values, indices, src, groups, chunks), **tol)
    rows, sums = interpreted.scatter(src, indices, groups, weights, n_rows, dense=False)
    want_rows, want_sums, _ = cpu_read.scatter_dot(src, indices, weights, None, n_rows, False, groups=groups)
    assert torch.equal(rows, want_rows)
    torch.testing.assert_close(sums, want_sums, **tol)
    none, dense = interpreted.scatter(src, indices, groups, weights, n_rows, dense=True)
    assert none is None and dense.shape == (n_rows, values.shape[1])
    torch.testing.assert_close(dense, cpu_read.scatter_dot(src, indices, weights, None, n_rows, True,
                                                           groups=groups)[1], **tol)


@interpreter_only
def test_interpreted_kernels_on_an_empty_batch(interpreted):
    values, _, _, _, _ = make(1, 1, 8, 4, 2, 2)
    empty = torch.zeros(0, 3, dtype=torch.int64)
    weights = torch.zeros(0, 3, 2, dtype=values.dtype)
    assert interpreted.grouped_gather(values, empty, empty, weights, 2).shape == (0, 2, 4)
    assert interpreted.gather_dot(values, empty, torch.zeros(0, 2, 4, dtype=values.dtype), empty, 2).shape == (0, 3, 2)
    src = torch.zeros(0, 2, 4, dtype=values.dtype)
    assert torch.equal(interpreted.scatter(src, empty, empty, weights, 8, dense=True)[1], torch.zeros(8, 4).double())
    rows, sums = interpreted.scatter(src, empty, empty, weights, 8, dense=False)
    assert rows.numel() == 0 and sums.shape == (0, 4)


@interpreter_only
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_interpreted_op_matches_the_float64_formula(interpreted, monkeypatch, sparse_grad):
    """The whole op (forward, both gradients) with its kernels forced to Triton on CPU tensors."""
    monkeypatch.setattr(grouped_gather, "_triton_kernels", lambda device: interpreted)
    values, indices, groups, weights, _ = make(6, 5, 24, 12, 3, 3)
    values.requires_grad_(), weights.requires_grad_()
    out = grouped_weighted_gather(values, indices, groups, weights, 3, sparse_grad=sparse_grad)
    onehot = torch.nn.functional.one_hot(groups, 3).double()
    rows = values[indices].unflatten(-1, (3, 4)) * weights.unsqueeze(-1)
    want = torch.einsum("bks,bkmd->bsmd", onehot, rows).flatten(-2)
    torch.testing.assert_close(out, want)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum(), (values, weights))
    wanted = torch.autograd.grad((want * upstream).sum(), (values, weights))
    assert got[0].layout == (torch.sparse_coo if sparse_grad else torch.strided)
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g.to_dense(), w)


# ---------------------------------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_matches_the_cpu_reference(dtype, sparse_grad):
    """UltraMem's shape class on the GPU: 4,096 rows of width 256, 2 heads x 32 positions in 4 groups, 2 cores."""
    values, indices, groups, weights, _ = make(64, 64, 4096, 256, 2, 4, dtype=torch.float32)
    outs = {}
    for device in ("cpu", "cuda"):
        cast = torch.float64 if device == "cpu" else dtype
        v = values.to(device, cast).requires_grad_()
        w = weights.to(device, cast).requires_grad_()
        out = grouped_weighted_gather(v, indices.to(device), groups.to(device), w, 4, sparse_grad=sparse_grad)
        grads = torch.autograd.grad(out.float().square().sum(), (v, w))
        outs[device] = [out, *grads]
    assert outs["cuda"][1].layout == (torch.sparse_coo if sparse_grad else torch.strided)
    for got, want in zip(outs["cuda"], outs["cpu"]):
        want, got = want.to_dense(), got.to_dense().double().cpu()
        bound = torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(got, want, rtol=0, atol=8 * bound * max(1.0, want.abs().max().item()))
