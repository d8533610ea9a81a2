"""The C++ sparse-read kernels (memzoo.ops.cpu_read) and the one-op weighted_gather backward against plain float64
references: forward, both gradients, dense and row-sparse table gradients, duplicate indices, empty batches,
bf16 (PyTorch path), the fused LazyAdam rows, opcheck of the new op's fake, torch.compile, and the fallback."""

import shutil
import warnings

import pytest
import torch

from cpu_kernel_switch import kernels_switched
from memzoo.ops import cpu_read, gather_dot, weighted_gather
from memzoo.ops import sparse_gather as sg
from memzoo.training.optim import LazyAdam


def inputs(n_rows, dim, n_bags, k, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_rows, dim, generator=gen, dtype=dtype)
    indices = torch.randint(0, n_rows, (n_bags, k), generator=gen)
    if indices.numel() >= 3:
        indices.view(-1)[1] = indices.view(-1)[0]  # duplicates inside a bag and across bags
        indices.view(-1)[-1] = indices.view(-1)[0]
    weights = torch.randn(n_bags, k, generator=gen, dtype=dtype)
    src = torch.randn(n_bags, dim, generator=gen, dtype=dtype)
    return values, indices, weights, src


def reference_scatter(src, indices, weights, n_rows):
    out = torch.zeros(n_rows, src.shape[1], dtype=torch.float64)
    contributions = weights.double().unsqueeze(-1) * src.double().unsqueeze(1)  # (B, K, D)
    return out.index_add_(0, indices.reshape(-1), contributions.reshape(-1, src.shape[1]))


def test_the_read_kernels_build_here():
    assert shutil.which("g++") or shutil.which("c++")
    assert cpu_read.available(), cpu_read._KERNELS.state.get("error")


# dims 16, 20 (float64) and 128: runs summed in vector registers (whole vectors, up to 16 of them); 37, 20 (float32)
# and 136 (17 vectors of float32, 34 of float64): the loop in memory; N <= 4·P (counting sort) and N > 4·P (key sort)
@pytest.mark.parametrize("case", [(10, 16, 4, 3), (7, 37, 3, 8), (5000, 20, 6, 4), (1, 5, 4, 2), (40, 128, 6, 16),
                                  (40, 136, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_match_float64_reference(case, dtype):
    n_rows, dim, n_bags, k = case
    values, indices, weights, src = inputs(*case, dtype=dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    dots_ref = (values.double()[indices] * src.double().unsqueeze(1)).sum(-1)
    torch.testing.assert_close(cpu_read.gather_dot(values, indices, src).double(), dots_ref, **tol)
    grad_ref = reference_scatter(src, indices, weights, n_rows)
    rows, dense, dots = cpu_read.scatter_dot(src, indices, weights, values, n_rows, dense=True)
    assert rows is None and dense.shape == (n_rows, dim)
    torch.testing.assert_close(dense.double(), grad_ref, **tol)
    torch.testing.assert_close(dots.double(), dots_ref, **tol)
    rows, sums, dots = cpu_read.scatter_dot(src, indices, weights, None, n_rows, dense=False)
    assert dots is None
    assert torch.equal(rows, torch.unique(indices))  # distinct, ascending
    torch.testing.assert_close(sums.double(), grad_ref[rows], **tol)


def test_kernels_on_an_empty_batch():
    values = torch.randn(6, 4, dtype=torch.float64)
    for n_bags, k in ((0, 3), (3, 0)):
        indices = torch.zeros(n_bags, k, dtype=torch.int64)
        weights, src = torch.zeros(n_bags, k, dtype=torch.float64), torch.randn(n_bags, 4, dtype=torch.float64)
        assert cpu_read.gather_dot(values, indices, src).shape == (n_bags, k)
        rows, sums, dots = cpu_read.scatter_dot(src, indices, weights, values, 6, dense=False)
        assert rows.numel() == 0 and sums.shape == (0, 4) and dots.shape == (n_bags, k)
        _, dense, _ = cpu_read.scatter_dot(src, indices, weights, values, 6, dense=True)
        assert torch.equal(dense, torch.zeros(6, 4, dtype=torch.float64))


@pytest.mark.parametrize("bad", [-1, 30, 2**40])
def test_an_index_outside_the_table_raises_before_anything_is_written(bad):
    """Each kernel range-checks its indices (and groups) before it reads or writes: an out-of-range row would
    otherwise read or write outside the table or the sort's buckets. The error names the value and the range; the
    table and the optimizer state are untouched."""
    values, indices, weights, src = inputs(30, 8, 4, 3)
    indices[2, 1] = bad
    message = rf"indices holds {bad}, outside \[0, 30\)"
    with pytest.raises(IndexError, match=rf"gather_dot: {message}"):
        cpu_read.gather_dot(values, indices, src)
    for dense in (False, True):
        with pytest.raises(IndexError, match=rf"scatter_dot: {message}"):
            cpu_read.scatter_dot(src, indices, weights, values, 30, dense=dense)
    groups, chunked = torch.zeros_like(indices), weights.unsqueeze(-1).expand(-1, -1, 2).contiguous()
    with pytest.raises(IndexError, match=rf"grouped_gather: {message}"):
        cpu_read.grouped_gather(values, indices, groups, chunked, 1)
    indices[2, 1] = 0
    groups[1, 0] = 3
    with pytest.raises(IndexError, match=r"grouped_gather: groups holds 3, outside \[0, 2\)"):
        cpu_read.grouped_gather(values, indices, groups, chunked, 2)
    with pytest.raises(IndexError, match=r"scatter_dot: groups holds 3, outside \[0, 2\)"):
        cpu_read.scatter_dot(torch.randn(4, 2, 8, dtype=torch.float64), indices, chunked, values, 30, False,
                             groups=groups)
    with pytest.raises(IndexError, match=r"gather_dot: groups holds 3, outside \[0, 2\)"):
        cpu_read.gather_dot(values, indices, torch.randn(4, 2, 8, dtype=torch.float64), groups, 2)
    param, moments, step = values.clone(), torch.zeros(2, 30, 8, dtype=torch.float64), torch.zeros(30, dtype=torch.int64)
    rows = torch.tensor([3, bad])
    with pytest.raises(IndexError, match=rf"adam_rows_: rows holds {bad}, outside \[0, 30\)"):
        cpu_read.adam_rows_(param, moments[0], moments[1], step, rows, torch.ones(2, 8, dtype=torch.float64), 0.1,
                            (0.9, 0.99), 1e-8, 0.0)
    assert torch.equal(param, values) and not moments.any() and not step.any()
    cpu_read.adam_rows_(param, moments[0], moments[1], step, rows[:0], torch.ones(0, 8, dtype=torch.float64), 0.1,
                        (0.9, 0.99), 1e-8, 0.0)  # no row touched: nothing to do (not "every row")
    assert torch.equal(param, values) and not moments.any() and not step.any()


def test_a_wrong_layout_raises_naming_the_argument():
    """The kernels read raw row-major memory: a non-contiguous, mistyped or misshapen argument is refused by name
    (a float32 step count, an int32 index, a transposed table, a gradient of another width, mixed float dtypes)."""
    values, indices, weights, src = inputs(30, 8, 4, 3)
    table = torch.zeros(30, 8, dtype=torch.float64)
    grad, rows = torch.ones(2, 8, dtype=torch.float64), torch.tensor([1, 2])

    def adam(step=torch.zeros(30, dtype=torch.int64), grad=grad, rows=rows):
        cpu_read.adam_rows_(table, table.clone(), table.clone(), step, rows, grad, 0.1, (0.9, 0.99), 1e-8, 0.0)

    with pytest.raises(ValueError, match=r"adam_rows_: step must be torch.int64, got torch.float32"):
        adam(step=torch.zeros(30))
    with pytest.raises(ValueError, match=r"adam_rows_: step has shape \(15,\), expected \(30,\)"):
        adam(step=torch.zeros(15, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"adam_rows_: grad has shape \(2, 4\), expected \(2, 8\)"):
        adam(grad=torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"adam_rows_: grad has shape \(2, 8\), expected \(30, 8\)"):
        adam(rows=None)
    with pytest.raises(ValueError, match=r"gather_dot: indices must be torch.int64, got torch.int32"):
        cpu_read.gather_dot(values, indices.int(), src)
    with pytest.raises(ValueError, match=r"gather_dot: values must be a contiguous CPU tensor"):
        cpu_read.gather_dot(values.t().contiguous().t(), indices, src)
    with pytest.raises(ValueError, match=r"scatter_dot: weights must be torch.float64, got torch.float32"):
        cpu_read.scatter_dot(src, indices, weights.float(), values, 30, dense=True)
    with pytest.raises(ValueError, match=r"scatter_dot: values has shape \(30, 8\), expected \(40, 8\)"):
        cpu_read.scatter_dot(src, indices, weights, values, 40, dense=True)
    with pytest.raises(ValueError, match=r"scatter_dot: dots_from_bag=5 outside \[0, 4\]"):
        cpu_read.scatter_dot(src, indices, weights, values, 30, dense=True, dots_from_bag=5)
    with pytest.raises(ValueError, match=r"grouped_gather: 3 weights a position do not divide D=8"):
        cpu_read.grouped_gather(values, indices, torch.zeros_like(indices), torch.ones(4, 3, 3, dtype=torch.float64), 1)


@pytest.mark.parametrize("first", [0, 2, 5])
def test_scatter_dot_takes_dots_from_a_bag_on(first):
    """dots only for the bags from dots_from_bag on (the last read of a shared table); the table gradient over all."""
    values, indices, weights, src = inputs(30, 13, 5, 4, dtype=torch.float32, seed=first)
    rows, sums, dots = cpu_read.scatter_dot(src, indices, weights, values, 30, dense=False, dots_from_bag=first)
    full_rows, full_sums, full_dots = cpu_read.scatter_dot(src, indices, weights, values, 30, dense=False)
    assert torch.equal(rows, full_rows) and torch.equal(sums, full_sums)
    assert dots.shape == (5 - first, 4) and torch.equal(dots, full_dots[first:])


@pytest.mark.parametrize("n_rows", [9, 400])  # N <= 4·P (counting sort) and N > 4·P (key sort)
@pytest.mark.parametrize("touched", [[0, 3, 4, 8], [5], [8, 2, 2], [0]])
def test_dense_scatter_writes_every_row(n_rows, touched):
    """The dense table gradient is not zero-filled first: rows no index points to (before the first touched row,
    between two, after the last) are written as zeros by the kernel, touched rows get their sums; non-power-of-two
    bags (K = 3) and repeated rows."""
    gen = torch.Generator().manual_seed(len(touched))
    indices = torch.tensor(touched * 3, dtype=torch.int64).view(-1, 3)
    weights = torch.randn(indices.shape, generator=gen, dtype=torch.float64)
    src = torch.randn(indices.shape[0], 11, generator=gen, dtype=torch.float64)
    values = torch.randn(n_rows, 11, generator=gen, dtype=torch.float64)
    for _ in range(3):  # fresh buffers from the allocator each time, possibly holding old data
        torch.full((n_rows, 11), float("nan"), dtype=torch.float64)
        _, dense, dots = cpu_read.scatter_dot(src, indices, weights, values, n_rows, dense=True)
        torch.testing.assert_close(dense, reference_scatter(src, indices, weights, n_rows), rtol=0, atol=1e-12)
        untouched = torch.ones(n_rows, dtype=torch.bool)
        untouched[indices.unique()] = False
        assert torch.equal(dense[untouched], torch.zeros(int(untouched.sum()), 11, dtype=torch.float64))
        torch.testing.assert_close(dots, (values[indices] * src.unsqueeze(1)).sum(-1))


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weighted_gather_and_gather_dot_grads_match_float64(sparse_grad, dtype):
    """Through the public ops (the one-op backward; bf16 takes the PyTorch kernels), with duplicates."""
    values, indices, weights, src = inputs(12, 19, 5, 6, dtype=dtype)
    tol = {"float64": {}, "float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 2e-2, "atol": 5e-2}}
    tol = tol[str(dtype).split(".")[1]]
    for op in ("weighted_gather", "gather_dot"):
        table = values.clone().requires_grad_()
        third = (weights if op == "weighted_gather" else src).clone().requires_grad_()
        fn = weighted_gather if op == "weighted_gather" else gather_dot
        out = fn(table, indices, third, sparse_grad=sparse_grad)
        table64 = values.detach().double().clone().requires_grad_()
        third64 = third.detach().double().clone().requires_grad_()
        ref = (table64[indices] * third64.unsqueeze(-1)).sum(1) if op == "weighted_gather" else (
            (table64[indices] * third64.unsqueeze(1)).sum(-1))
        torch.testing.assert_close(out.double(), ref, **tol)
        upstream = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (out.double() * upstream).sum().backward()
        (ref * upstream).sum().backward()
        grad = table.grad.to_dense() if sparse_grad else table.grad
        assert table.grad.is_sparse == sparse_grad
        torch.testing.assert_close(grad.double(), table64.grad, **tol)
        torch.testing.assert_close(third.grad.double(), third64.grad, **tol)


def test_fused_backward_op_passes_opcheck():
    values, indices, weights, src = inputs(9, 8, 4, 5, dtype=torch.float32)
    for dense in (True, False):
        for first in (0, 3):  # dots of the bags from `first` on (the last read of a shared table)
            torch.library.opcheck(sg._weighted_gather_backward_op, (src, indices, weights, values, dense, first),
                                  test_utils=("test_schema", "test_faketensor"))
            _, _, dots = sg._weighted_gather_backward_op(src, indices, weights, values, dense, first)
            _, _, all_dots = sg._weighted_gather_backward_op(src, indices, weights, values, dense)
            assert torch.equal(dots, all_dots[first:])


def test_compiled_read_matches_eager_through_the_fused_backward():
    values, indices, weights, _ = inputs(30, 16, 8, 4, dtype=torch.float32)

    def read(table, w):
        return (weighted_gather(table, indices, w) ** 2).sum()

    grads = []
    for fn in (read, torch.compile(read, fullgraph=True, backend="aot_eager")):
        table, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        fn(table, w).backward()
        grads.append((table.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_lazy_adam_matches_the_pytorch_path(weight_decay, monkeypatch):
    """The C++ rows update against the blockwise PyTorch update of the same optimizer (the latter is tested
    against AdamW in test_optim_sparse), with a dense and a row-sparse gradient over several steps."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(20, 7, generator=gen)
    grads = [torch.randn(20, 7, generator=gen) for _ in range(3)]
    rows = torch.tensor([1, 4, 5, 19])
    from memzoo.training import rowwise_optim as optim

    assert optim._fused_rows(start, start, start, torch.zeros(20, dtype=torch.int64), grads[0])  # the C++ path
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr("memzoo.training.rowwise_optim._fused_rows", lambda *tensors: False)
        table = torch.nn.Parameter(start.clone())
        optimizer = LazyAdam([table], lr=1e-2, betas=(0.9, 0.99), weight_decay=weight_decay)
        for step, grad in enumerate(grads):
            if step == 1:
                table.grad = torch.sparse_coo_tensor(
                    rows.unsqueeze(0), grad[rows], table.shape, check_invariants=True
                ).coalesce()
            else:
                table.grad = grad.clone()
            optimizer.step()
        results.append((table.detach().clone(), optimizer.state[table]))
    (fused_table, fused_state), (plain_table, plain_state) = results
    torch.testing.assert_close(fused_table, plain_table, rtol=1e-6, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fused_state[key], plain_state[key], rtol=1e-6, atol=1e-7)
    assert torch.equal(fused_state["step"], plain_state["step"])


def test_without_the_kernels_the_pytorch_path_gives_the_same_grads(monkeypatch):
    values, indices, weights, _ = inputs(15, 9, 4, 5)
    grads = []
    for disabled in (False, True):
        with kernels_switched(cpu_read, monkeypatch, off=disabled), warnings.catch_warnings():
            warnings.simplefilter("error")  # the switch turns them off without a warning
            assert cpu_read.available() != disabled
            table, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
            weighted_gather(table, indices, w, sparse_grad=True).square().sum().backward()
            grads.append((table.grad.to_dense(), w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
