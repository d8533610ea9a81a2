"""weighted_gather and gather_dot against plain materialising references: forward, gradients (dense and sparse),
accumulation across calls, torch.compile, memory use, and every bad-input error."""

import pytest
import torch

import references
from memzoo.ops import gather_dot, weighted_gather

reference_weighted_gather, reference_gather_dot = references.weighted_gather, references.gather_dot


OPS = {
    "weighted_gather": (weighted_gather, reference_weighted_gather),
    "gather_dot": (gather_dot, reference_gather_dot),
}


def make_inputs(op, n_rows, dim, lead, k, dtype=torch.float64, seed=0):
    """values (N, D), indices (*lead, K) with deliberate duplicates, and the op's third argument."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n_rows, dim, generator=gen, dtype=dtype).requires_grad_()
    indices = torch.randint(0, n_rows, (*lead, k), generator=gen)
    if indices.numel() >= 3:
        flat = indices.view(-1)
        flat[1] = flat[0]  # a duplicate inside a bag (K > 1) or across bags (K = 1)
        flat[-1] = flat[0]  # and across bags
    if op == "weighted_gather":
        third = torch.randn(*lead, k, generator=gen, dtype=dtype)
    else:
        third = torch.randn(*lead, dim, generator=gen, dtype=dtype)
    return values, indices, third.requires_grad_()


CASES = [  # (n_rows, dim, lead, k)
    (10, 6, (4,), 3),
    (7, 5, (2, 3), 8),  # K > n_rows: many duplicates
    (50, 33, (5,), 1),  # K = 1
    (20, 4, (), 6),  # a single bag, indices (K,)
    (1, 3, (4,), 2),  # a one-row table: every index is 0
    (300, 70, (40,), 32),  # several gather_dot chunks are not needed, but many bags
]


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_reference(op_name, case):
    op, reference = OPS[op_name]
    values, indices, third = make_inputs(op_name, *case)
    out = op(values, indices, third)
    ref = reference(values, indices, third)
    torch.testing.assert_close(out, ref)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad((out * upstream).sum(), (values, third))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (values, third))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op_name", OPS)
def test_gradcheck_and_gradgradcheck(op_name):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 6, 4, (3,), 4)
    fn = lambda v, t: op(v, indices, t)
    assert torch.autograd.gradcheck(fn, (values, third))
    assert torch.autograd.gradgradcheck(fn, (values, third))


def test_zero_weights_give_zero_output_but_still_weight_gradients():
    values, indices, weights = make_inputs("weighted_gather", 12, 5, (3,), 4)
    weights = torch.zeros_like(weights, requires_grad=True)
    out = weighted_gather(values, indices, weights)
    assert torch.equal(out, torch.zeros_like(out))
    grad_values, grad_weights = torch.autograd.grad(out.sum(), (values, weights))
    assert torch.equal(grad_values, torch.zeros_like(grad_values))
    torch.testing.assert_close(grad_weights, values[indices].sum(-1))


def test_all_indices_one_row_sums_every_contribution():
    values = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.full((4, 6), 2)
    weights = torch.randn(4, 6, dtype=torch.float64)
    grad_out = torch.randn(4, 3, dtype=torch.float64)
    (grad_values,) = torch.autograd.grad(weighted_gather(values, indices, weights), values, grad_out)
    expected = torch.zeros_like(grad_values)
    expected[2] = (weights.sum(1, keepdim=True) * grad_out).sum(0)
    torch.testing.assert_close(grad_values, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op_name", OPS)
def test_low_precision_matches_fp64_reference(op_name, dtype):
    op, reference = OPS[op_name]
    values, indices, third = make_inputs(op_name, 40, 24, (6,), 9, dtype=dtype)
    out = op(values, indices, third)
    assert out.dtype == dtype
    ref = reference(values.double(), indices, third.double())
    # fp32 accumulation bound: one rounding to `dtype` plus K fp32 roundings, relative to Σ|terms|
    bound = torch.finfo(dtype).eps + 9 * torch.finfo(torch.float32).eps
    scale = reference(values.double().abs(), indices, third.double().abs()).max().item()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=bound * scale)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad((out * upstream).sum(), (values, third))
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), (values, third))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        tol = 2 * bound * want.abs().max().item()
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=tol)


@pytest.mark.parametrize("op_name", OPS)
def test_sparse_grad_equals_dense_grad(op_name):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 30, 5, (4,), 6)
    upstream = torch.randn_like(op(values, indices, third))
    dense = torch.autograd.grad((op(values, indices, third) * upstream).sum(), (values, third))
    sparse = torch.autograd.grad(
        (op(values, indices, third, sparse_grad=True) * upstream).sum(), (values, third)
    )
    assert sparse[0].layout == torch.sparse_coo and sparse[0].shape == values.shape
    torch.testing.assert_close(sparse[0].to_dense(), dense[0])
    torch.testing.assert_close(sparse[1], dense[1])
    # only the rows used are stored, each once
    assert sparse[0].is_coalesced()
    assert torch.equal(sparse[0].indices()[0], indices.unique())


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_two_calls_on_one_table_accumulate(sparse_grad):
    """Two layers sharing a pool: their gradients add up in values.grad, in either layout."""
    values = torch.nn.Parameter(torch.randn(16, 4, dtype=torch.float64))
    weights = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    idx_a, idx_b = torch.randint(0, 16, (3, 5)), torch.randint(0, 8, (3, 5))

    def loss(v, gather, dot):
        return (gather(v, idx_a, weights) ** 2).sum() + (dot(v, idx_b, x) ** 3).sum()

    loss(values, weighted_gather, gather_dot).backward()  # dense first, then the mode under test, then again
    op_kw = {"sparse_grad": sparse_grad}
    loss(values, lambda *a: weighted_gather(*a, **op_kw), lambda *a: gather_dot(*a, **op_kw)).backward()
    ref_values = values.detach().clone().requires_grad_()
    loss(ref_values, reference_weighted_gather, reference_gather_dot).backward()
    torch.testing.assert_close(values.grad.to_dense(), 2 * ref_values.grad)


def test_sparse_grads_of_two_calls_stay_sparse_and_feed_sparse_adam():
    values = torch.nn.Parameter(torch.randn(100, 8))
    before = values.detach().clone()
    optimizer = torch.optim.SparseAdam([values], lr=0.1)
    used = torch.tensor([[3, 7], [7, 42]])
    weighted_gather(values, used, torch.ones(2, 2), sparse_grad=True).sum().backward()
    gather_dot(values, used[:1], torch.ones(1, 8), sparse_grad=True).sum().backward()
    assert values.grad.layout == torch.sparse_coo
    optimizer.step()
    changed = (values.detach() != before).any(1).nonzero().flatten()
    assert changed.tolist() == [3, 7, 42]


def test_empty_batch_and_empty_bags():
    values = torch.randn(5, 3, requires_grad=True)
    out = weighted_gather(values, torch.zeros(0, 4, dtype=torch.int64), torch.zeros(0, 4))
    assert out.shape == (0, 3)
    out = weighted_gather(values, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0))
    assert torch.equal(out, torch.zeros(2, 3))
    out.sum().backward()
    assert torch.equal(values.grad, torch.zeros(5, 3))
    assert gather_dot(values, torch.zeros(2, 0, dtype=torch.int64), torch.ones(2, 3)).shape == (2, 0)


def test_int32_indices_are_accepted():
    values, indices, weights = make_inputs("weighted_gather", 10, 4, (3,), 2)
    torch.testing.assert_close(
        weighted_gather(values, indices.int(), weights), reference_weighted_gather(values, indices, weights)
    )


def peak_cpu_bytes(fn):
    """Peak of live CPU tensor bytes allocated while running ``fn`` (torch.profiler memory events)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    allocations = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(allocations, key=lambda e: e.start_ns()):
        live += event.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("op_name", OPS)
def test_never_materialises_the_gathered_rows(op_name, sparse_grad):
    """Peak temporary memory (beyond outputs and gradients) stays under 1/8 of the (B, K, D) gathered rows."""
    op, reference = OPS[op_name]
    n_bags, k, dim = 512, 32, 256
    values, indices, third = make_inputs(op_name, 4096, dim, (n_bags,), k, dtype=torch.float32)
    gathered_bytes = n_bags * k * dim * 4  # 16 MiB
    outputs = {}

    def forward():
        outputs["out"] = op(values, indices, third, sparse_grad=sparse_grad)

    def backward():
        outputs.pop("out").sum().backward()

    forward_extra = peak_cpu_bytes(forward) - outputs["out"].numel() * 4
    backward_extra = peak_cpu_bytes(backward) - third.numel() * 4
    if sparse_grad:
        backward_extra -= values.grad._values().numel() * 4 + values.grad._indices().numel() * 8
    else:
        backward_extra -= values.numel() * 4
    assert forward_extra < gathered_bytes / 8
    assert backward_extra < gathered_bytes / 8
    naive_peak = peak_cpu_bytes(lambda: reference(values, indices, third).sum().backward())
    assert naive_peak >= gathered_bytes  # the measurement does see a materialised (B, K, D) tensor


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    values, indices, weights = make_inputs("weighted_gather", 30, 8, (2, 3), 4, dtype=torch.float32)
    x = torch.randn(2, 3, 8, requires_grad=True)

    def read(v, w, x):  # the table is read twice: its two dense gradients are summed inside the graph
        return torch.tanh(weighted_gather(v, indices, w)) + gather_dot(v, indices, x).sum(-1, keepdim=True)

    compiled = torch.compile(read, fullgraph=True, backend="aot_eager")
    out, ref = compiled(values, weights, x), read(values, weights, x)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (values, weights, x))
    ref_grads = torch.autograd.grad(ref.square().sum(), (values, weights, x))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", OPS)
def test_torch_compile_fullgraph_with_sparse_grad(op_name):
    """One sparse read of the table per compiled graph (see the module docstring of sparse_gather)."""
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 30, 8, (2, 3), 4, dtype=torch.float32)

    def read(v, t):
        return torch.sin(op(v, indices, t, sparse_grad=True))

    compiled = torch.compile(read, fullgraph=True, backend="aot_eager")
    out, ref = compiled(values, third), read(values, third)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (values, third))
    ref_grads = torch.autograd.grad(ref.square().sum(), (values, third))
    assert grads[0].layout == torch.sparse_coo
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.to_dense(), want.to_dense())


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("op_name", OPS)
@pytest.mark.parametrize("bad, shown", [(10, "index 10"), (-1, "index -1")])
def test_out_of_range_index(op_name, bad, shown):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 10, 4, (3,), 2)
    indices[1, 1] = bad
    with pytest.raises(IndexError, match=rf"{shown} is out of range for a table of 10 rows; valid: \[0, 9\]"):
        op(values, indices, third)


@pytest.mark.parametrize("op_name", OPS)
def test_float_indices(op_name):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 10, 4, (3,), 2)
    with pytest.raises(TypeError, match="indices must be an integer tensor.*got torch.float32"):
        op(values, indices.float(), third)


def test_weights_shape_mismatch():
    values, indices, _ = make_inputs("weighted_gather", 10, 4, (3,), 2)
    with pytest.raises(ValueError, match=r"weights must have the shape of indices \(3, 2\), got \(3, 3\)"):
        weighted_gather(values, indices, torch.randn(3, 3, dtype=torch.float64))


def test_x_shape_mismatch():
    values, indices, _ = make_inputs("gather_dot", 10, 4, (3,), 2)
    with pytest.raises(ValueError, match=r"x must have shape .* = \(3, 4\), got \(3, 5\)"):
        gather_dot(values, indices, torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("op_name", OPS)
def test_dtype_mismatch(op_name):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 10, 4, (3,), 2)
    with pytest.raises(TypeError, match="dtype torch.float32 differs from values dtype torch.float64"):
        op(values, indices, third.float())


@pytest.mark.parametrize("op_name", OPS)
def test_device_mismatch(op_name):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 10, 4, (3,), 2)
    with pytest.raises(ValueError, match="is on meta but values on cpu"):
        op(values, indices, third.to("meta"))
    with pytest.raises(ValueError, match="indices are on meta but values on cpu"):
        op(values, indices.to("meta"), third)


@pytest.mark.parametrize("op_name", OPS)
def test_bad_table_and_flag(op_name):
    op, _ = OPS[op_name]
    values, indices, third = make_inputs(op_name, 10, 4, (3,), 2)
    with pytest.raises(
        ValueError, match=r"values must be a 2-D floating table \(N, D\), got shape \(10, 4, 1\)"
    ):
        op(values.unsqueeze(-1), indices, third)
    with pytest.raises(TypeError, match="sparse_grad must be a bool, got 'yes'"):
        op(values, indices, third, sparse_grad="yes")
