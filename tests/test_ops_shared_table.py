"""One table gradient per shared table: several eager reads of one table (a pool shared by layers) on the C++ path
hand autograd one row-sparse gradient, summed by the last read to run, instead of one each for autograd to add.
Checked against float64 references and against the per-read route: mixed ops (weighted_gather, gather_dot),
different bag widths, duplicates, torch.autograd.grad, retain_graph, a graph never backwarded, an existing dense
.grad, partial backward, a whole shared-pool model; grouped reads (UltraMem's) of one table summed among themselves,
beside a plain read of it, and a shared UltraMemV2 pool."""

import pytest
import torch

import references
from memzoo.ops import gather_dot, grouped_weighted_gather, weighted_gather
from memzoo.ops import grouped_gather as gg
from memzoo.ops import sparse_gather as sg


@pytest.fixture
def spy(monkeypatch):
    """Counts the reads that deposited their term and the ones that summed (the route was taken)."""
    calls = {"deposit": 0, "sum": 0}
    pending = sg._pending_reader

    def counting(ctx, task, dense_grad):
        result = pending(ctx, task, dense_grad)
        calls["deposit" if result else "sum"] += 1
        return result

    monkeypatch.setattr(sg, "_pending_reader", counting)
    return calls


def use_per_read_route(monkeypatch):
    """Every read returns its own table gradient (the route off in both op modules)."""
    for module in (sg, gg):
        monkeypatch.setattr(module, "_shared_route", lambda ctx, values: False)


def reads(dtype=torch.float64, seed=0):
    """A table and three reads of it: two weighted_gather (bag widths 5 and 3) and a gather_dot (width 4), with
    duplicate rows inside and across bags and reads."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(40, 7, generator=gen, dtype=dtype).requires_grad_()
    idx = [torch.randint(0, 40, shape, generator=gen) for shape in ((6, 5), (4, 3), (5, 4))]
    idx[1][0, 0] = idx[0][0, 0]
    idx[2][1, :2] = idx[0][0, 0]
    w = [torch.randn(i.shape, generator=gen, dtype=dtype).requires_grad_() for i in idx[:2]]
    x = torch.randn(5, 7, generator=gen, dtype=dtype).requires_grad_()
    upstream = [torch.randn(s, generator=gen, dtype=dtype) for s in ((6, 7), (4, 7), (5, 4))]
    return values, idx, w, x, upstream


def loss_of(read, values, idx, w, x, upstream, sparse_grad=True):
    flag = {"sparse_grad": sparse_grad} if read is OPS else {}  # (the references read densely)
    y0 = read[0](values, idx[0], w[0], **flag)
    h = read[2](values, idx[2], x, **flag)
    y1 = read[1](values, idx[1], w[1], **flag)
    return (y0 * upstream[0]).sum() + (y1 * upstream[1]).sum() + (h * upstream[2]).sum()


OPS = (weighted_gather, weighted_gather, gather_dot)
REFS = (references.weighted_gather, references.weighted_gather, references.gather_dot)


def reference_grads(values, idx, w, x, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (values, *w, x)]
    loss = loss_of(REFS, leaves[0], idx, leaves[1:3], leaves[3], upstream, sparse_grad=False)
    return torch.autograd.grad(loss, leaves)


def test_three_reads_give_one_coalesced_gradient_equal_to_the_reference(spy):
    values, idx, w, x, upstream = reads()
    loss_of(OPS, values, idx, w, x, upstream).backward()
    assert spy == {"deposit": 2, "sum": 1}
    grad = values.grad
    assert grad.is_sparse  # (AccumulateGrad may drop the coalesced flag; the rows are distinct and ascending:)
    assert torch.equal(grad._indices()[0], torch.cat([i.flatten() for i in idx]).unique())
    want = reference_grads(values, idx, w, x, upstream)
    torch.testing.assert_close(grad.to_dense(), want[0])
    for got, ref in zip((w[0].grad, w[1].grad, x.grad), want[1:]):
        torch.testing.assert_close(got, ref)


def test_same_gradients_as_the_per_read_route(monkeypatch):
    values, idx, w, x, upstream = reads(dtype=torch.float32, seed=1)
    loss_of(OPS, values, idx, w, x, upstream).backward()
    shared = [t.grad.clone() for t in (values, *w, x)]
    for t in (values, *w, x):
        t.grad = None
    use_per_read_route(monkeypatch)
    loss_of(OPS, values, idx, w, x, upstream).backward()
    for got, want in zip(shared, (values.grad, *(t.grad for t in w), x.grad)):
        torch.testing.assert_close(got.to_dense() if got.is_sparse else got, want.to_dense() if want.is_sparse else want,
                                   rtol=1e-6, atol=1e-6)


def test_autograd_grad_retain_graph_and_a_graph_never_backwarded(spy):
    values, idx, w, x, upstream = reads(seed=2)
    stale = weighted_gather(values, idx[0], w[0], sparse_grad=True)  # noqa: F841 - a read whose graph is never used
    loss = loss_of(OPS, values, idx, w, x, upstream)
    want = reference_grads(values, idx, w, x, upstream)
    got = torch.autograd.grad(loss, (values, w[0]), retain_graph=True)
    torch.testing.assert_close(got[0].to_dense(), want[0])
    torch.testing.assert_close(got[1], want[1])
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(values.grad.to_dense(), 2 * want[0])
    assert not sg._DEPOSITS  # every deposit was collected


def test_rows_added_into_an_existing_dense_grad(spy):
    """gradient accumulation: .grad is dense (set_to_none=False); the one summed gradient is added into it."""
    values, idx, w, x, upstream = reads(seed=3)
    values.grad = torch.ones_like(values)
    loss_of(OPS, values, idx, w, x, upstream, sparse_grad=False).backward()
    assert spy["deposit"] == 2 and not values.grad.is_sparse
    torch.testing.assert_close(values.grad, 1 + reference_grads(values, idx, w, x, upstream)[0])


def test_dense_table_gradients_take_the_per_read_route(spy):
    values, idx, w, x, upstream = reads(seed=4)
    loss_of(OPS, values, idx, w, x, upstream, sparse_grad=False).backward()
    assert spy == {"deposit": 0, "sum": 0} and not values.grad.is_sparse
    torch.testing.assert_close(values.grad, reference_grads(values, idx, w, x, upstream)[0])


def test_backward_to_some_inputs_only(spy):
    """backward(inputs=[x]): no table gradient is wanted; nothing is left deposited."""
    values, idx, w, x, upstream = reads(seed=5)
    loss_of(OPS, values, idx, w, x, upstream).backward(inputs=[x, w[1]])
    want = reference_grads(values, idx, w, x, upstream)
    assert values.grad is None
    torch.testing.assert_close(x.grad, want[3])
    torch.testing.assert_close(w[1].grad, want[2])
    assert not sg._DEPOSITS


_MEMORY_PLUS = {"block": "memory_plus", "pool": "memory", "k_dim": 16, "heads": 2, "knn": 4}
_ULTRAMEM_V2 = {"block": "ultramem_v2", "pool": "experts", "heads": 1, "knn": 4, "k_dim": 8, "ffn_fraction": 0.5}


@pytest.mark.parametrize("layer,pools,spied", [
    # Memory+'s values: layer 3's read deposits, layer 1's sums both
    (_MEMORY_PLUS, {"memory": {"n_keys": 8, "value_dim": 32, "update": "sparse"}}, {"deposit": 1, "sum": 1}),
    # UltraMemV2's down (gather_dot) and up (the grouped read): the same per table
    (_ULTRAMEM_V2, {"experts": {"kind": "experts", "n_keys": 8, "value_dim": 16, "update": "sparse"}},
     {"deposit": 2, "sum": 2}),
], ids=["memory_plus", "ultramem_v2"])
def test_a_shared_pool_model_trains_like_the_per_read_route(monkeypatch, spy, layer, pools, spied):
    """Layers 1 and 3 reading one pool: one gradient per table, and the pool's gradient and every other gradient
    match the per-read route (float32, summation order differs)."""
    import memzoo

    config = {
        "seed_everything": 0,
        "model": {"class_path": "memzoo.LanguageModel", "init_args": {"architecture": {
            "dim": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 16, "block": "dense", "layers": {1: layer, 3: layer},
            "pools": pools}}},
    }
    module = memzoo.build_model(config, vocab_size=40)
    batch = torch.randint(0, 40, (3, 17), generator=torch.Generator().manual_seed(0))

    def grads():
        module.model.zero_grad(set_to_none=True)
        logits = module.model(batch[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
                for n, p in module.model.named_parameters() if p.grad is not None}

    shared = grads()
    assert spy == spied
    use_per_read_route(monkeypatch)
    per_read = grads()
    assert shared.keys() == per_read.keys()
    for name in shared:
        torch.testing.assert_close(shared[name], per_read[name], rtol=1e-5, atol=1e-6, msg=name)


def grouped_reads(dtype=torch.float64, seed=0):
    """A table (12 rows of width 6), two grouped reads of it (bag widths 5 and 3, 3 groups, 2 chunks) and a plain
    weighted_gather, with rows repeated inside and across reads, and the upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(12, 6, generator=gen, dtype=dtype).requires_grad_()
    idx = [torch.randint(0, 12, shape, generator=gen) for shape in ((4, 5), (3, 3), (2, 4))]
    idx[1][0, :2] = idx[0][1, 0]
    idx[2][1, 0] = idx[0][1, 0]
    groups = [torch.randint(0, 3, i.shape, generator=gen) for i in idx[:2]]
    w = [torch.randn(*i.shape, 2, generator=gen, dtype=dtype).requires_grad_() for i in idx[:2]]
    w.append(torch.randn(idx[2].shape, generator=gen, dtype=dtype).requires_grad_())
    upstream = [torch.randn(s, generator=gen, dtype=dtype) for s in ((4, 3, 6), (3, 3, 6), (2, 6))]
    return values, idx, groups, w, upstream


def grouped_loss(values, idx, groups, w, upstream, sparse_grad=True):
    y0 = grouped_weighted_gather(values, idx[0], groups[0], w[0], 3, sparse_grad=sparse_grad)
    h = weighted_gather(values, idx[2], w[2], sparse_grad=sparse_grad)
    y1 = grouped_weighted_gather(values, idx[1], groups[1], w[1], 3, sparse_grad=sparse_grad)
    return (y0 * upstream[0]).sum() + (y1 * upstream[1]).sum() + (h * upstream[2]).sum()


def grouped_reference(values, idx, groups, w, upstream):
    """The float64 gradients with every read's formula written out (one-hot groups, chunk weights)."""
    leaves = [t.detach().double().requires_grad_() for t in (values, *w)]
    v = leaves[0]
    loss = (references.weighted_gather(v, idx[2], leaves[3]) * upstream[2].double()).sum()
    for i in range(2):
        onehot = torch.nn.functional.one_hot(groups[i], 3).double()  # (B, K, S)
        rows = v[idx[i]].unflatten(-1, (2, 3)) * leaves[1 + i].unsqueeze(-1)  # (B, K, M, d)
        y = torch.einsum("bks,bkmd->bsmd", onehot, rows).flatten(-2)
        loss = loss + (y * upstream[i].double()).sum()
    return torch.autograd.grad(loss, leaves)


def test_grouped_reads_sum_each_others_terms_and_a_plain_read_keeps_its_own(spy):
    """The two grouped reads hand autograd one gradient (the second deposits, the first sums both); the plain read
    of the same table sums only its own; every gradient equals the float64 reference."""
    values, idx, groups, w, upstream = grouped_reads()
    grouped_loss(values, idx, groups, w, upstream).backward()
    assert spy == {"deposit": 1, "sum": 2}
    want = grouped_reference(values, idx, groups, w, upstream)
    torch.testing.assert_close(values.grad.to_dense(), want[0], rtol=1e-12, atol=1e-12)
    for got, ref in zip((t.grad for t in w), want[1:]):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert not sg._DEPOSITS


def test_grouped_reads_give_the_per_read_routes_gradients(monkeypatch, spy):
    """float32, into an existing dense .grad too (the summed rows are added in place)."""
    values, idx, groups, w, upstream = grouped_reads(dtype=torch.float32, seed=1)
    results = []
    for route in ("shared", "per-read"):
        if route == "per-read":
            use_per_read_route(monkeypatch)
        for t in (values, *w):
            t.grad = None
        grouped_loss(values, idx, groups, w, upstream).backward()
        values.grad = values.grad.to_dense()
        grouped_loss(values, idx, groups, w, upstream, sparse_grad=False).backward()
        results.append([t.grad.clone() for t in (values, *w)])
    assert spy["deposit"] == 2  # the shared route ran in both backwards of the first pass
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_grouped_reads_of_other_shapes_keep_their_own_gradients(spy):
    """Reads whose groups differ (3 and 2) take no part in each other's sums: one gradient each, both right."""
    values, idx, groups, w, upstream = grouped_reads(seed=2)
    y0 = grouped_weighted_gather(values, idx[0], groups[0], w[0], 3, sparse_grad=True)
    y1 = grouped_weighted_gather(values, idx[1], groups[1].clamp(max=1), w[1], 2, sparse_grad=True)
    ((y0 * upstream[0]).sum() + (y1 * upstream[1][:, :2]).sum()).backward()
    assert spy == {"deposit": 0, "sum": 2}
    v = values.detach().clone().requires_grad_()
    want = torch.autograd.grad((grouped_weighted_gather(v, idx[0], groups[0], w[0].detach(), 3) * upstream[0]).sum()
                               + (grouped_weighted_gather(v, idx[1], groups[1].clamp(max=1), w[1].detach(), 2)
                                  * upstream[1][:, :2]).sum(), v)[0]
    torch.testing.assert_close(values.grad.to_dense(), want, rtol=1e-12, atol=1e-12)


def test_the_private_autograd_queries_behave_as_the_route_needs():
    """``torch._C._current_graph_task_id`` (-1 outside a backward, one id per backward, increasing: deposits of
    earlier backwards are dropped by that order) and ``_will_engine_execute_node``: pinned, so an upgrade that
    changes them fails here, by name."""
    assert sg._current_graph_task_id is not None and sg._will_engine_execute_node is not None
    assert sg._current_graph_task_id() == -1
    seen, executes = [], []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(sg._current_graph_task_id())
            executes.append(sg._will_engine_execute_node(other.grad_fn))
            return grad

    x, z = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    other = z * 2
    (Probe.apply(x) + Probe.apply(x) + other).sum().backward()
    (Probe.apply(x) * other.detach()).sum().backward()
    assert seen[0] == seen[1] >= 0 and seen[2] > seen[0]
    assert executes == [True, True, False]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_reads_under_activation_checkpointing_equal_the_per_read_route(monkeypatch, use_reentrant):
    """Reads recomputed in the backward (activation checkpointing) register new nodes mid-backward: the gradients
    still equal the per-read route's."""
    from torch.utils.checkpoint import checkpoint

    values, idx, w, x, upstream = reads(dtype=torch.float32, seed=3)

    def run():
        y0 = checkpoint(lambda v, ww: weighted_gather(v, idx[0], ww, sparse_grad=True), values, w[0],
                        use_reentrant=use_reentrant)
        y1 = checkpoint(lambda v, ww: weighted_gather(v, idx[1], ww, sparse_grad=True), values, w[1],
                        use_reentrant=use_reentrant)
        h = gather_dot(values, idx[2], x, sparse_grad=True)
        ((y0 * upstream[0]).sum() + (y1 * upstream[1]).sum() + (h * upstream[2]).sum()).backward()
        grads = [t.grad.to_dense() if t.grad.is_sparse else t.grad.clone() for t in (values, *w, x)]
        for t in (values, *w, x):
            t.grad = None
        return grads

    shared = run()
    use_per_read_route(monkeypatch)
    for got, want in zip(shared, run()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings(r"ignore:Using backward\(\) with create_graph=True")  # its .grad is reset to None
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_grouped_reads_under_activation_checkpointing_equal_the_per_read_route(monkeypatch, spy, use_reentrant):
    """Grouped reads recomputed in the backward register new nodes mid-backward; a create_graph backward takes the
    differentiable reference: both give the per-read route's gradients."""
    from torch.utils.checkpoint import checkpoint

    values, idx, groups, w, upstream = grouped_reads(dtype=torch.float32, seed=4)

    def read(i):
        return lambda v, ww: grouped_weighted_gather(v, idx[i], groups[i], ww, 3, sparse_grad=True)

    def run(create_graph=False):
        y0 = checkpoint(read(0), values, w[0], use_reentrant=use_reentrant)
        y1 = checkpoint(read(1), values, w[1], use_reentrant=use_reentrant)
        ((y0 * upstream[0]).sum() + (y1 * upstream[1]).sum()).backward(create_graph=create_graph)
        grads = [t.grad.to_dense().detach() if t.grad.is_sparse else t.grad.detach().clone() for t in (values, *w[:2])]
        for t in (values, *w):
            t.grad = None
        return grads

    shared, graphed = run(), run(create_graph=True)
    # non-reentrant: the first-order backward took the route; reentrant checkpoints run each read's backward in a
    # graph task of its own, where no other read is pending, so each sums its own term
    assert (spy["deposit"] > 0) == (not use_reentrant)
    use_per_read_route(monkeypatch)
    for got in (shared, graphed):
        for g, want in zip(got, run()):
            torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-6)

