"""memzoo.ops.grouped_weighted_gather: forward and both gradients against a float64 one-hot reference, on the C++
path and the PyTorch path, with duplicate rows, empty groups, sparse and accumulated gradients, double backward and
bad input."""

import pytest
import torch

from cpu_kernel_switch import kernels_switched
from memzoo.ops import cpu_read, grouped_weighted_gather


def reference(values, indices, groups, weights, n_groups):
    """Plain float64 formula: one-hot groups, every (position, chunk) product written out."""
    *lead, K = indices.shape
    M, D = weights.shape[-1], values.shape[1]
    onehot = torch.nn.functional.one_hot(groups.long(), n_groups).to(torch.float64)  # (..., K, S)
    rows = values.double()[indices].unflatten(-1, (M, D // M)) * weights.double().unsqueeze(-1)  # (..., K, M, d)
    return torch.einsum("...ks,...kmd->...smd", onehot, rows).flatten(-2)


def make(B=5, K=7, N=6, D=8, M=2, S=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(N, D, generator=gen, dtype=dtype)
    indices = torch.randint(0, N, (B, K), generator=gen)
    indices[-1, 0] = indices[0, 0]  # a row in two bags
    if K > 1:
        indices[0, 1] = indices[0, 0]  # and twice in one bag
    groups = torch.randint(0, S, (B, K), generator=gen)
    if S > 1:
        groups = groups.clamp(max=S - 2)  # group S-1 is named by no position
    weights = torch.randn(B, K, M, generator=gen, dtype=dtype)
    return values, indices, groups, weights


#: D=208, M=2 and D=72, M=3: whole register tiles of the forward, single vectors after them (float32 and float64)
CASES = [dict(), dict(M=1, S=1), dict(M=4, S=4, D=8), dict(K=1, S=2), dict(B=3, K=5, N=2, M=2, S=2),
         dict(D=208, M=2, S=4), dict(D=72, M=3, K=9)]


@pytest.mark.parametrize("kernels", ["cpp", "pytorch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_the_float64_reference(case, sparse_grad, dtype, kernels, monkeypatch):
    values, indices, groups, weights = make(dtype=dtype, **case)
    S = case.get("S", 3)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    with kernels_switched(cpu_read, monkeypatch, off=kernels == "pytorch"):
        assert cpu_read.available() == (kernels == "cpp")
        out = grouped_weighted_gather(values, indices, groups, weights, S, sparse_grad=sparse_grad)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad((out * grad_out).sum(), (values, weights))
    v64, w64 = values.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    want = reference(v64, indices, groups, w64, S)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert out.dtype == dtype and out.shape == (*indices.shape[:-1], S, values.shape[1])
    torch.testing.assert_close(out.double(), want, **tol)
    if S > 1:
        assert not out[..., S - 1, :].any()  # the group no position names
    wanted = torch.autograd.grad((want * grad_out.double()).sum(), (v64, w64))
    assert got[0].is_sparse == sparse_grad
    torch.testing.assert_close(got[0].to_dense().double(), wanted[0], **tol)
    torch.testing.assert_close(got[1].double(), wanted[1], **tol)


def test_leading_dimensions_and_an_empty_batch():
    values, indices, groups, weights = make(B=6)
    out = grouped_weighted_gather(values, indices.view(2, 3, -1), groups.view(2, 3, -1),
                                  weights.view(2, 3, *weights.shape[1:]), 3)
    torch.testing.assert_close(out, reference(values, indices, groups, weights, 3).view(2, 3, 3, -1))
    empty = grouped_weighted_gather(values.requires_grad_(), indices[:0], groups[:0], weights[:0], 3)
    assert empty.shape == (0, 3, values.shape[1])
    empty.sum().backward()
    assert not values.grad.any()


def test_gradients_accumulate_into_an_existing_dense_grad():
    """The second backward adds into the dense ``.grad`` (handed over as rows): the sum of both, still dense."""
    values, indices, groups, weights = make()
    values.requires_grad_(True)
    for _ in range(2):
        grouped_weighted_gather(values, indices, groups, weights, 3).pow(2).sum().backward()
    v64 = values.detach().requires_grad_()
    grad = torch.autograd.grad(reference(v64, indices, groups, weights, 3).pow(2).sum(), v64)[0]
    assert values.grad.layout == torch.strided
    torch.testing.assert_close(values.grad, 2 * grad)


def test_a_frozen_table_still_gives_the_weights_gradient():
    values, indices, groups, weights = make()
    weights.requires_grad_(True)
    got = torch.autograd.grad(grouped_weighted_gather(values, indices, groups, weights, 3).sum(), weights)[0]
    w64 = weights.detach().requires_grad_()
    torch.testing.assert_close(got, torch.autograd.grad(reference(values, indices, groups, w64, 3).sum(), w64)[0])


def test_double_backward_passes_gradgradcheck():
    values, indices, groups, weights = make(B=3, K=4, N=4, D=4, M=2, S=2)
    values.requires_grad_(True)
    weights.requires_grad_(True)
    fn = lambda v, w: grouped_weighted_gather(v, indices, groups, w, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (values, weights))
    assert torch.autograd.gradgradcheck(fn, (values, weights))


def test_bfloat16_takes_the_pytorch_path_and_accumulates_in_float32():
    values, indices, groups, weights = make(dtype=torch.float32, K=16)
    out = grouped_weighted_gather(values.bfloat16(), indices, groups, weights.bfloat16(), 3)
    want = reference(values.bfloat16().float(), indices, groups, weights.bfloat16().float(), 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=2e-2)


def test_the_custom_ops_pass_opcheck():
    values, indices, groups, weights = make(dtype=torch.float32)
    torch.library.opcheck(torch.ops.memzoo.grouped_weighted_gather,
                          (values.requires_grad_(), indices, groups, weights.requires_grad_(), 3, False))
    grad_out = torch.randn(indices.shape[0], 3, values.shape[1])
    for dense, dots_from_bag in ((True, 0), (False, 2)):
        torch.library.opcheck(torch.ops.memzoo.grouped_weighted_gather_backward,
                              (grad_out, indices, groups, weights.detach(), values.detach(), dense, dots_from_bag))


@pytest.mark.parametrize("kernels", ["cpp", "pytorch"])
def test_the_backward_op_gives_the_weights_gradient_of_the_last_bags_only(kernels, monkeypatch):
    """``dots_from_bag``: the table gradient sums every bag, the weights' gradient is the last bags' (as the last
    read of a shared table asks)."""
    values, indices, groups, weights = make(B=6, K=5)
    grad_out = torch.randn(6, 3, values.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with kernels_switched(cpu_read, monkeypatch, off=kernels == "pytorch"):
        op = torch.ops.memzoo.grouped_weighted_gather_backward
        rows, sums, dots = op(grad_out, indices, groups, weights, values, False, 4)
        _, dense, all_dots = op(grad_out, indices, groups, weights, values, True, 0)
    assert dots.shape == (2, 5, 2)
    torch.testing.assert_close(dots, all_dots[4:], rtol=1e-12, atol=1e-12)
    assert torch.equal(rows, indices.unique())
    torch.testing.assert_close(sums, dense[rows], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", [dict(), dict(M=1, S=1), dict(D=72, M=3, K=9), dict(K=1, S=2)])
def test_the_grouped_gather_dot_kernel_matches_the_weights_gradient_formula(case, dtype):
    """``cpu_read.gather_dot`` with groups: ``out[b,k,c]`` = chunk c of ``values[idx[b,k]] · x[b, groups[b,k]]``."""
    values, indices, groups, weights = make(dtype=dtype, **case)
    S, M, D = case.get("S", 3), weights.shape[2], values.shape[1]
    x = torch.randn(indices.shape[0], S, D, dtype=dtype, generator=torch.Generator().manual_seed(2))
    got = cpu_read.gather_dot(values, indices, x, groups, M)
    src = x.double()[torch.arange(indices.shape[0]).unsqueeze(1), groups]  # (B, K, D)
    want = (values.double()[indices] * src).unflatten(-1, (M, D // M)).sum(-1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert got.shape == (*indices.shape, M) and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("change,error,match", [
    (dict(groups=lambda g: g + 3), IndexError, r"group 4 is out of range for n_groups=3; valid: \[0, 2\]"),
    (dict(indices=lambda i: i - 6), IndexError, r"index -6 is out of range for a table of 6 rows"),
    (dict(groups=lambda g: g[:, :-1]), ValueError, r"groups must be an integer tensor of the shape of indices"),
    (dict(groups=lambda g: g.float()), ValueError, r"groups must be an integer tensor"),
    (dict(weights=lambda w: w[..., :1].expand(*w.shape[:-1], 3)), ValueError, r"M=3 must divide the table width D=8"),
    (dict(weights=lambda w: w[..., 0]), ValueError, r"weights must be \(\*indices.shape, M\)"),
    (dict(weights=lambda w: w.float()), TypeError, r"weights dtype torch.float32 differs from values dtype"),
    (dict(n_groups=0), ValueError, r"n_groups must be a positive int, got 0"),
])
def test_bad_input_names_the_value(change, error, match):
    values, indices, groups, weights = make()
    args = dict(values=values, indices=indices, groups=groups, weights=weights, n_groups=3)
    for key, edit in change.items():
        args[key] = edit(args[key]) if callable(edit) else edit
    with pytest.raises(error, match=match):
        grouped_weighted_gather(**args)
