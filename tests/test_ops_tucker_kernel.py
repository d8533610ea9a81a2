"""The C++ selection of tucker_topk (memzoo.ops.cpu_tucker) against the PyTorch selection it replaces and a plain
brute force: the same cells, best first, for small and large candidate counts (the kernel's bisection route and its
insertion-buffer and partial-sort fallbacks), many ties,
per-head and shared cores, float32 and float64, two threads, ties, NaN; and the kept cells' per-core scores
(``memzoo::tucker_cell_scores``) against plain loops, forward and gradients, repeated rows and columns, two threads,
double backward, opcheck."""

import itertools

import pytest
import torch

from cpu_kernel_switch import kernels_switched
from memzoo.ops import cpu_tucker
from memzoo.ops.tucker_topk import _cell_kernel_heads, _kernel_takes, _torch_select, tucker_rank1, tucker_topk
from memzoo.ops.tucker_topk import _tucker_cell_scores as tucker_cell_op
from memzoo.ops.tucker_topk import _tucker_cell_scores_grad as tucker_cell_grad_op


def selection_inputs(lead, n, r, cores_lead, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(*lead, n, r, generator=g, dtype=torch.float64).to(dtype)
    cols = torch.randn(*lead, n, r, generator=g, dtype=torch.float64).to(dtype)
    cores = torch.rand(*cores_lead, 3, r, r, generator=g, dtype=torch.float64).to(dtype)
    return rows, cols, cores


def brute_force(rows, cols, cores, knn, m):
    """Per query, in float64 Python loops: the m best rows and columns by the rank-1 projections, then the knn best
    of their m x m cells by row · S · col (ties: lower index first)."""
    lead, r = rows.shape[:-2], rows.shape[-1]
    core_sum = cores.sum(-3).double()
    u, v = tucker_rank1(core_sum)
    core_sum, u, v = core_sum.expand(*lead, r, r), u.expand(*lead, r), v.expand(*lead, r)
    out_i, out_j = torch.empty(*lead, knn, dtype=torch.long), torch.empty(*lead, knn, dtype=torch.long)
    for q in itertools.product(*(range(s) for s in lead)):
        S_q, u_q, v_q = core_sum[q], u[q], v[q]
        R, C = rows[q].double(), cols[q].double()
        best_r = sorted(range(R.shape[0]), key=lambda i: (-float(R[i] @ u_q), i))[:m]
        best_c = sorted(range(C.shape[0]), key=lambda j: (-float(C[j] @ v_q), j))[:m]
        cells = sorted(((a, b) for a in range(m) for b in range(m)),
                       key=lambda ab: (-float(R[best_r[ab[0]]] @ S_q @ C[best_c[ab[1]]]), ab[0] * m + ab[1]))[:knn]
        out_i[q] = torch.tensor([best_r[a] for a, _ in cells])
        out_j[q] = torch.tensor([best_c[b] for _, b in cells])
    return out_i, out_j


def test_the_tucker_kernel_builds_here():
    assert cpu_tucker.available(), cpu_tucker._KERNELS.state.get("error")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead, cores_lead, n, r, m, knn", [
    ((5,), (), 12, 2, 4, 6),          # shared cores, small m (insertion buffer)
    ((2, 3), (3,), 40, 3, 20, 32),    # per-head cores, knn > 16
    ((2,), (), 80, 2, 70, 100),       # m > 64: the partial sort
    ((7, 1), (1,), 9, 1, 9, 81),      # rank 1, every candidate, every cell
    ((3,), (), 16, 4, 6, 10),         # rank 4: the last compile-time rank of the projections
    ((3,), (), 16, 5, 6, 10),         # rank 5: the projections' general loop
])
def test_the_kernel_selects_what_the_brute_force_selects(lead, cores_lead, n, r, m, knn, dtype):
    rows, cols, cores = selection_inputs(lead, n, r, cores_lead, dtype)
    core_sum = cores.sum(-3)
    assert _kernel_takes(rows, cols, core_sum)
    u, v = tucker_rank1(core_sum)
    i, j = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, knn, m)
    ref_i, ref_j = brute_force(rows, cols, cores, knn, m)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)
    torch_i, torch_j = _torch_select(rows, cols, core_sum, u, v, knn, m)
    assert torch.equal(i * n + j, torch_i * n + torch_j)  # random data: no near-ties, the same cells in order


def test_ties_keep_the_lower_index_first():
    rows = torch.ones(1, 6, 2)  # every row and column ties: the first m of each, cells in index order
    cols = torch.ones(1, 6, 2)
    cores = torch.ones(1, 2, 2)
    core_sum = cores.sum(-3)
    u, v = tucker_rank1(core_sum)
    i, j = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, knn=4, candidates=3)
    assert i.tolist() == [[0, 0, 0, 1]] and j.tolist() == [[0, 1, 2, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_ties_select_what_the_brute_force_selects(dtype):
    """Two thirds of the rows and columns are zero vectors (+0 and -0), the rest score below them: the m best rows
    and columns all tie, and so do most cells; the bisection route (m < n, no NaN) keeps them in index order."""
    g = torch.Generator().manual_seed(3)
    palette = torch.tensor([[0.0, 0.0], [-0.0, -0.0], [-1.0, -1.0]], dtype=dtype)
    pattern = torch.arange(21) % 3
    pick = lambda: torch.stack([pattern[torch.randperm(21, generator=g)] for _ in range(6)])  # noqa: E731
    rows, cols = palette[pick()], palette[pick()]
    cores = torch.rand(3, 2, 2, generator=g, dtype=dtype)
    core_sum = cores.sum(-3)
    u, v = tucker_rank1(core_sum)
    assert (u > 0).all() and (v > 0).all()  # so a -0 vector projects to -0
    i, j = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, knn=30, candidates=9)
    ref_i, ref_j = brute_force(rows, cols, cores, 30, 9)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_more_than_128_survivors_of_the_bisection_take_the_sort(dtype):
    """Ten rows and columns score above the rest, which all tie at zero: the bisection keeps all 140 (past the 128
    the counting ranks take) and the m² cells tie but for the few above; the sort keeps ties in index order."""
    g = torch.Generator().manual_seed(5)
    rows, cols = torch.zeros(1, 140, 2, dtype=dtype), torch.zeros(1, 140, 2, dtype=dtype)
    rows[0, torch.randperm(140, generator=g)[:10]] = torch.rand(10, 1, generator=g, dtype=dtype) + 0.5
    cols[0, torch.randperm(140, generator=g)[:10]] = torch.rand(10, 1, generator=g, dtype=dtype) + 0.5
    cores = torch.rand(3, 2, 2, generator=g, dtype=dtype)
    core_sum = cores.sum(-3)
    u, v = tucker_rank1(core_sum)
    assert (u > 0).all() and (v > 0).all()
    i, j = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, knn=150, candidates=135)
    ref_i, ref_j = brute_force(rows, cols, cores, 150, 135)
    assert torch.equal(i, ref_i) and torch.equal(j, ref_j)

def test_a_nan_row_score_ranks_first_like_torch_topk():
    rows, cols, cores = selection_inputs((1,), 8, 2, (), torch.float64)
    rows[0, 5] = float("nan")
    core_sum = cores.sum(-3)
    u, v = tucker_rank1(core_sum)
    i, _ = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, knn=1, candidates=2)
    assert i.tolist() == [[5]]


def test_two_threads_select_the_same_cells():
    rows, cols, cores = selection_inputs((64, 2), 16, 2, (2,), torch.float32)
    core_sum = cores.sum(-3)
    u, v = tucker_rank1(core_sum)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, 8, 8)
        torch.set_num_threads(2)
        two = cpu_tucker.tucker_select(rows, cols, core_sum, u, v, 8, 8)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_tucker_topk_gives_the_same_scores_and_gradients_with_the_kernel_off(monkeypatch):
    rows, cols, cores = selection_inputs((4, 2), 10, 2, (2,), torch.float64)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (rows, cols, cores)]
        scores, indices = tucker_topk(*leaves, knn=5, candidates=4)
        grads = torch.autograd.grad((scores * torch.arange(scores.numel()).view_as(scores)).sum(), leaves)
        return scores.detach(), indices, grads

    with_kernel = run()
    with kernels_switched(cpu_tucker, monkeypatch):
        assert not _kernel_takes(rows, cols, cores.sum(-3))
        without = run()
    assert torch.equal(with_kernel[1], without[1])
    torch.testing.assert_close(with_kernel[0], without[0])
    for a, b in zip(with_kernel[2], without[2]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cores_lead", [(), (2,), (1,)])
def test_the_kept_cells_per_core_scores_and_gradients_match_the_broadcast_product(cores_lead):
    """Per-head cores take one einsum per head, shared cores one matrix product: the same numbers and gradients
    as the plain broadcast ``outer @ cores`` of every query."""
    rows, cols, cores = selection_inputs((3, 2), 7, 3, cores_lead, torch.float64, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (rows, cols, cores)]
    scores, indices = tucker_topk(*leaves, knn=4, candidates=3)
    i, j = indices // 7, indices % 7
    row_k = leaves[0].gather(-2, i.unsqueeze(-1).expand(*i.shape, 3))
    col_k = leaves[1].gather(-2, j.unsqueeze(-1).expand(*j.shape, 3))
    want = torch.stack([(row_k @ leaves[2][..., m, :, :] * col_k).sum(-1) for m in range(3)], dim=-1)
    torch.testing.assert_close(scores, want)
    weights = torch.randn_like(scores)
    got = torch.autograd.grad((scores * weights).sum(), leaves)
    ref = torch.autograd.grad((want * weights).sum(), leaves)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------- the kept cells' scores
def cell_inputs(queries, n, r, heads, cores_n, knn, dtype, seed=0):
    """Rows, cols ``(Q, n, r)``, cores ``(H, M, r, r)`` and kept cells whose rows and columns repeat (a top-knn
    shares rows and columns across cells; the first two cells of every query are the same cell)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(queries, n, r, generator=g, dtype=torch.float64)
    cols = torch.randn(queries, n, r, generator=g, dtype=torch.float64)
    cores = torch.rand(heads, cores_n, r, r, generator=g, dtype=torch.float64)
    i = torch.randint(0, min(n, 3), (queries, knn), generator=g)
    j = torch.randint(0, n, (queries, knn), generator=g)
    i[:, 1], j[:, 1] = i[:, 0], j[:, 0]
    return [t.to(dtype) for t in (rows, cols, cores)], i, j


def plain_cell_scores(rows, cols, cores, i, j):
    """Float64 loops: scores[q, t, c] = rows[q, i] · cores[q mod H, c] · cols[q, j]."""
    queries, knn, heads = i.shape[0], i.shape[1], cores.shape[0]
    out = torch.zeros(queries, knn, cores.shape[1], dtype=torch.float64)
    for q in range(queries):
        for t in range(knn):
            for c in range(cores.shape[1]):
                out[q, t, c] = rows[q, i[q, t]].double() @ cores[q % heads, c].double() @ cols[q, j[q, t]].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# (r 5, 3 cores: 75 core entries a query, past the local sums' 64, and a run-time rank; r 9: past the cell's
# local row and column sums too)
@pytest.mark.parametrize("queries, n, r, heads, cores_n, knn", [(6, 5, 2, 2, 2, 4), (4, 7, 3, 1, 3, 9),
                                                               (3, 4, 1, 3, 1, 2), (3, 6, 5, 1, 3, 4),
                                                               (2, 10, 9, 1, 1, 3)])
def test_the_cell_score_kernel_and_its_gradients_match_plain_loops(queries, n, r, heads, cores_n, knn, dtype):
    (rows, cols, cores), i, j = cell_inputs(queries, n, r, heads, cores_n, knn, dtype)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    leaves = [t.clone().requires_grad_(True) for t in (rows, cols, cores)]
    got = tucker_cell_op(*leaves, i, j)
    refs = [t.double().requires_grad_(True) for t in (rows, cols, cores)]
    want = plain_cell_scores(*refs, i, j)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol)
    upstream = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((got * upstream.to(dtype)).sum(), leaves)
    wants = torch.autograd.grad((want * upstream).sum(), refs)
    for name, a, b in zip(("rows", "cols", "cores"), grads, wants):
        torch.testing.assert_close(a.double(), b, msg=name, **tol)
    assert torch.count_nonzero(grads[0][:, 3:]) == 0  # rows no kept cell reads get exactly zero


def test_the_cell_score_gradients_are_the_same_bits_on_two_threads_and_double_backward_works():
    (rows, cols, cores), i, j = cell_inputs(64, 6, 2, 2, 2, 5, torch.float64, seed=1)
    grad = torch.randn(64, 5, 2, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_tucker.cell_scores_backward(grad, rows, cols, cores, i, j)
        torch.set_num_threads(2)
        two = cpu_tucker.cell_scores_backward(grad, rows, cols, cores, i, j)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
    small = [t[:4].clone() for t in (rows, cols)] + [cores.clone()]
    leaves = [t.requires_grad_(True) for t in small]
    assert torch.autograd.gradgradcheck(lambda a, b, c: tucker_cell_op(a, b, c, i[:4], j[:4]), leaves)


def test_the_cell_score_ops_pass_opcheck():
    (rows, cols, cores), i, j = cell_inputs(4, 5, 2, 2, 2, 3, torch.float32)
    torch.library.opcheck(tucker_cell_op, (rows, cols, cores, i, j), test_utils=("test_schema", "test_faketensor"))
    grad = torch.randn(4, 3, 2)
    torch.library.opcheck(tucker_cell_grad_op, (grad, rows, cols, cores, i, j),
                          test_utils=("test_schema", "test_faketensor"))


def test_tucker_topk_scores_its_cells_in_the_kernel_where_it_takes_them():
    rows, cols, cores = selection_inputs((3, 2), 6, 2, (2,), torch.float32)
    assert _cell_kernel_heads(rows, cols, cores) == 2
    assert _cell_kernel_heads(rows, cols, cores[0]) == 1
    assert _cell_kernel_heads(rows, cols, cores[:1].expand(3, 2, 3, 2, 2)) is None  # per-query cores: PyTorch
    assert _cell_kernel_heads(rows.double(), cols.double(), cores) is None  # mixed dtypes: PyTorch


def test_the_cell_score_ops_compute_in_pytorch_where_the_kernel_does_not_take_the_inputs(monkeypatch):
    (rows, cols, cores), i, j = cell_inputs(4, 5, 2, 2, 2, 3, torch.float64, seed=2)
    grad = torch.randn(4, 3, 2, dtype=torch.float64)
    with_kernel = tucker_cell_op(rows, cols, cores, i, j), tucker_cell_grad_op(grad, rows, cols, cores, i, j)
    with kernels_switched(cpu_tucker, monkeypatch):
        assert not cpu_tucker.supports(rows)
        without = tucker_cell_op(rows, cols, cores, i, j), tucker_cell_grad_op(grad, rows, cols, cores, i, j)
    torch.testing.assert_close(with_kernel[0], without[0])
    for a, b in zip(with_kernel[1], without[1]):
        torch.testing.assert_close(a, b)


def test_the_cell_score_ops_refuse_cells_the_kernel_would_read_out_of_bounds():
    (rows, cols, cores), i, j = cell_inputs(4, 5, 2, 2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match=r"cell index in j is out of range; valid: \[0, 4\]"):
        tucker_cell_op(rows, cols, cores, i, torch.full_like(j, 5))
    with pytest.raises(ValueError, match=r"cell index in i is out of range"):
        tucker_cell_grad_op(torch.zeros(4, 3, 2), rows, cols, cores, i - 1 - i.max(), j)
    with pytest.raises(ValueError, match="multiple of the 3 core sets"):
        tucker_cell_op(rows, cols, torch.rand(3, 2, 2, 2), i, j)
