"""Optimizers for memory pools: parameter groups, LazyAdam / RowwiseAdagrad against plain references, the bundle."""

import copy
import io

import lightning as L
import pytest
import torch

from memzoo.model.transformer import Transformer
from memzoo.ops.sparse_gather import weighted_gather
from memzoo.training import rowwise_optim as optim
from memzoo.training.optim import (
    LazyAdam,
    OptimizerBundle,
    RowwiseAdagrad,
    build_optimizer,
    clip_dense_grad_norm_,
    param_groups,
)
from memzoo.training.rowwise_optim import row_blocks, rows_per_block, touched_rows


def adamw(params):
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1)


def memory_model(shared_update="sparse", **kw):
    layer = dict(block="product_key_memory", heads=2, knn=3, k_dim=8)
    args = dict(
        vocab_size=40, dim=16, n_layers=4, n_heads=2, max_seq_len=32,
        layers={0: {**layer, "pool": "shared", "gate": "silu"}, 1: {**layer, "n_keys": 4},
                3: {**layer, "pool": "shared"}},
        pools={"shared": {"n_keys": 8, "value_dim": 16, "update": shared_update, "lr": None, "weight_decay": 0.05}},
    )
    args.update(kw)
    return Transformer(**args)


def sparse_grad(rows: list[int], grads: torch.Tensor, shape) -> torch.Tensor:
    """An uncoalesced row-sparse gradient (rows may repeat: they are summed)."""
    return torch.sparse_coo_tensor(torch.tensor([rows], dtype=torch.int64), grads, shape, check_invariants=True)


@pytest.fixture(params=[None, 2, 1], ids=["default_blocks", "2_row_blocks", "1_row_blocks"])
def rows_per_block_of(request, monkeypatch):
    """Run a test with the default block size, then with blocks of 2 rows and of 1 row (partial last blocks,
    many gathers and write-backs): returns ``f(row_dim) -> rows per block``."""
    def set_for(row_dim: int) -> int:
        if request.param is not None:
            monkeypatch.setattr(optim, "BLOCK_ELEMENTS", request.param * row_dim)
        return rows_per_block(row_dim)
    return set_for


# ---------------------------------------------------------------------------------------------- groups
def test_param_groups_cover_every_parameter_once_with_pool_settings():
    model = memory_model(pools={
        "shared": {"n_keys": 8, "value_dim": 16, "update": "sparse", "lr": None, "weight_decay": 0.05},
    }, layers={
        0: dict(block="product_key_memory", pool="shared", knn=3, k_dim=8),
        1: dict(block="product_key_memory", n_keys=4, knn=2, k_dim=8, lr=5e-3, weight_decay=0.2),
        3: dict(block="product_key_memory", pool="shared", knn=3, k_dim=8),
    })
    dense, sparse = param_groups(model)
    assert [g["name"] for g in dense] == ["decay", "no_decay", "layers.1.ffn.private_pool"]
    assert [g["name"] for g in sparse] == ["pools.shared"]
    grouped = [p for g in dense + sparse for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    shared, private = sparse[0], dense[2]
    assert shared["params"] == [model.pools["shared"].values]  # one table, once, though two layers read it
    assert "lr" not in shared and shared["weight_decay"] == 0.05  # lr None: the optimizer's base lr
    assert private["params"] == [model.layers[1].ffn.private_pool.values]
    assert private["lr"] == 5e-3 and private["weight_decay"] == 0.2
    no_decay = dense[1]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    assert "weight_decay" not in dense[0] and all(p.ndim >= 2 for p in dense[0]["params"])
    assert any(p is model.layers[0].ffn.router.sub_keys for p in dense[0]["params"])


# ---------------------------------------------------------------------------------------------- LazyAdam
def test_lazy_adam_rows_follow_adamw_on_their_own_gradient_streams(rows_per_block_of):
    """Semantics: each row is AdamW run on only the steps that touched it (own step count, decay when touched)."""
    n, d = 7, 3
    rows_per_block_of(d)
    init = torch.randn(n, d, dtype=torch.float64)
    table = torch.nn.Parameter(init.clone())
    opt = LazyAdam([table], lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
    # (lr, touched rows with duplicates) per step; step 3 touches nothing (empty sparse gradient)
    schedule = [(0.1, [0, 2, 2]), (0.05, [2, 5]), (0.07, []), (0.02, [0, 5, 1, 5]), (0.1, [2])]
    row_grads: dict[int, list[tuple[float, torch.Tensor]]] = {r: [] for r in range(n)}
    snapshots = []
    for lr, rows in schedule:
        values = torch.randn(len(rows), d, dtype=torch.float64)
        table.grad = sparse_grad(rows, values, (n, d))
        for r in set(rows):
            row_grads[r].append((lr, values[[i for i, x in enumerate(rows) if x == r]].sum(0)))
        opt.param_groups[0]["lr"] = lr
        before = table.detach().clone()
        opt.step()
        changed = (table != before).any(1).nonzero().flatten().tolist()
        assert changed == sorted(set(rows))  # exactly the touched rows move
        snapshots.append(table.detach().clone())
    for r in range(n):
        ref = torch.nn.Parameter(init[r].clone())
        ref_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.3)
        for lr, g in row_grads[r]:
            ref_opt.param_groups[0]["lr"] = lr
            ref.grad = g
            ref_opt.step()
        torch.testing.assert_close(table[r], ref.detach(), rtol=1e-12, atol=1e-14)
    assert torch.equal(table[3], init[3]) and torch.equal(table[4], init[4])
    assert opt.state[table]["step"].tolist() == [2, 1, 3, 0, 0, 2, 0]


def test_lazy_adam_with_dense_gradients_is_adamw(rows_per_block_of):
    rows_per_block_of(4)
    table = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    ref = torch.nn.Parameter(table.detach().clone())
    opt, ref_opt = LazyAdam([table], lr=0.01, weight_decay=0.1), torch.optim.AdamW([ref], lr=0.01, weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(5, 4, dtype=torch.float64)
        table.grad, ref.grad = grad, grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(table, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[table]["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"])


def test_lazy_adam_with_zero_lr_moves_moments_and_steps_but_not_the_table():
    table = torch.nn.Parameter(torch.randn(4, 3))
    before = table.detach().clone()
    opt = LazyAdam([table], lr=0.0, weight_decay=0.5)
    table.grad = sparse_grad([0, 2], torch.randn(2, 3), (4, 3))
    opt.step()
    assert torch.equal(table, before)
    assert opt.state[table]["step"].tolist() == [1, 0, 1, 0] and opt.state[table]["exp_avg"][[0, 2]].ne(0).all()


def test_lazy_adam_state_survives_a_checkpoint_round_trip():
    table = torch.nn.Parameter(torch.randn(6, 2))
    opt = LazyAdam([table])
    table.grad = sparse_grad([1, 4], torch.randn(2, 2), (6, 2))
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = torch.nn.Parameter(table.detach().clone())
    restored = LazyAdam([clone])
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.state[clone]["step"].dtype == torch.int64
    grad = sparse_grad([4, 5], torch.randn(2, 2), (6, 2))
    table.grad, clone.grad = grad, grad.clone()
    opt.step()
    restored.step()
    assert torch.equal(table, clone)


def two_reads_of_one_table(table, idx_a, idx_b, w_a, w_b, sparse):
    """Two layers reading one pool: each read's sparse gradient is coalesced; autograd adds them (and drops the
    flag)."""
    return (weighted_gather(table, idx_a, w_a, sparse_grad=sparse).square().sum()
            + weighted_gather(table, idx_b, w_b, sparse_grad=sparse).sin().sum())


def embedding_reads(table, idx_a, idx_b, w_a, w_b, sparse):
    """``F.embedding(sparse=True)``: one gradient row per index, so duplicate rows reach the optimizer."""
    idx = torch.cat([idx_a, idx_b]).flatten()
    weights = torch.cat([w_a, w_b]).reshape(-1, 1)
    return (torch.nn.functional.embedding(idx, table, sparse=sparse) * weights).sin().sum()


@pytest.mark.parametrize("read, duplicates", [(two_reads_of_one_table, False), (embedding_reads, True)],
                         ids=["two_layers_share_a_pool", "embedding_duplicate_rows"])
def test_lazy_adam_on_real_sparse_gradients_is_adamw_on_the_rows_read(read, duplicates, rows_per_block_of):
    """All rows read are at the same step count, so LazyAdam must equal AdamW on those rows fed the dense
    gradient's rows; rows not read stay as they were."""
    n, d = 50, 8
    rows_per_block_of(d)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(n, d, generator=gen)
    idx_a, idx_b = torch.randint(0, n, (6, 4), generator=gen), torch.randint(0, n, (6, 4), generator=gen)
    w_a, w_b = torch.rand(6, 4, generator=gen), torch.rand(6, 4, generator=gen)
    touched = torch.cat([idx_a.flatten(), idx_b.flatten()]).unique()
    table = torch.nn.Parameter(init.clone())
    dense_table = torch.nn.Parameter(init.clone())
    reference = torch.nn.Parameter(init[touched].clone())
    opt = LazyAdam([table], lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([reference], lr=0.05, weight_decay=0.1)
    for _ in range(2):
        table.grad = dense_table.grad = None
        read(table, idx_a, idx_b, w_a, w_b, True).backward()
        read(dense_table, idx_a, idx_b, w_a, w_b, False).backward()
        assert table.grad.is_sparse and (table.grad._nnz() > touched.numel()) == duplicates
        reference.grad = dense_table.grad[touched]
        opt.step()
        ref_opt.step()
        with torch.no_grad():
            dense_table.copy_(table)
    torch.testing.assert_close(table[touched], reference.detach())
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(table[untouched], init[untouched])
    assert opt.state[table]["step"][touched].eq(2).all() and opt.state[table]["step"][untouched].eq(0).all()


def test_touched_rows_uses_ascending_rows_as_they_are_and_coalesces_the_rest():
    values = torch.randn(3, 2)
    # ascending distinct rows without the coalesced flag (as autograd's accumulation leaves them): no copy
    unflagged = sparse_grad([1, 4, 5], values, (6, 2))
    assert not unflagged.is_coalesced()
    rows, grads = touched_rows(unflagged)
    assert rows.tolist() == [1, 4, 5] and grads.data_ptr() == values.data_ptr()
    flagged = unflagged.coalesce()
    rows, grads = touched_rows(flagged)
    assert rows.tolist() == [1, 4, 5] and grads.data_ptr() == flagged.values().data_ptr()
    # distinct but out of order, and duplicates: sorted, summed
    rows, grads = touched_rows(sparse_grad([5, 1, 4], values, (6, 2)))
    assert rows.tolist() == [1, 4, 5] and torch.equal(grads, values[[1, 2, 0]])
    rows, grads = touched_rows(sparse_grad([4, 1, 4], values, (6, 2)))
    assert rows.tolist() == [1, 4] and torch.equal(grads, torch.stack([values[1], values[0] + values[2]]))
    rows, grads = touched_rows(sparse_grad([1, 4, 4], values, (6, 2)))  # ascending, not strictly: summed too
    assert rows.tolist() == [1, 4] and torch.equal(grads, torch.stack([values[0], values[1] + values[2]]))
    # one row, no rows, dense
    assert touched_rows(sparse_grad([3], values[:1], (6, 2)))[0].tolist() == [3]
    rows, grads = touched_rows(sparse_grad([], values[:0], (6, 2)))
    assert rows.numel() == 0 and grads.shape == (0, 2)
    assert touched_rows(values)[0] is None


def test_lazy_adam_on_the_sparse_gradient_of_weighted_gather_takes_it_without_a_copy():
    """One read per step: the op's gradient is already coalesced (rows ascending), so it is used as it is."""
    table = torch.nn.Parameter(torch.randn(40, 4))
    dense_table = torch.nn.Parameter(table.detach().clone())
    idx, w = torch.randint(0, 40, (5, 3)), torch.rand(5, 3)
    weighted_gather(table, idx, w, sparse_grad=True).sum().backward()
    weighted_gather(dense_table, idx, w).sum().backward()
    rows, grads = touched_rows(table.grad)
    assert grads.data_ptr() == table.grad._values().data_ptr()
    assert torch.equal(rows, idx.unique()) and torch.equal(grads, dense_table.grad[rows])


def test_row_blocks_gathers_and_writes_back_or_gives_views(rows_per_block_of):
    per_block = rows_per_block_of(3)
    table, counts = torch.zeros(10, 3), torch.zeros(10, dtype=torch.int64)
    rows = torch.tensor([0, 3, 4, 8, 9])
    spans = []
    for span, (table_rows, count_rows) in row_blocks([table, counts], rows, rows.numel()):
        spans.append((span.start, span.stop))
        table_rows += torch.arange(span.start, span.stop, dtype=table.dtype).unsqueeze(1) + 1
        count_rows += 1
    assert spans == [(s, min(s + per_block, 5)) for s in range(0, 5, per_block)]
    assert table[:, 0].tolist() == [1, 0, 0, 2, 3, 0, 0, 0, 4, 5]
    assert counts.tolist() == [1, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    for _span, (table_rows,) in row_blocks([table], None, 10):  # dense: every row, through views
        assert table_rows._base is table
        table_rows.zero_()
    assert not table.any()
    assert list(row_blocks([table], rows[:0], 0)) == []


def test_rows_per_block_is_at_least_one():
    assert rows_per_block(optim.BLOCK_ELEMENTS // 4) == 4
    assert rows_per_block(optim.BLOCK_ELEMENTS * 3) == 1


# ---------------------------------------------------------------------------------------------- RowwiseAdagrad
def test_rowwise_adagrad_matches_a_plain_loop(rows_per_block_of):
    n, d, lr, eps, wd, init_acc = 5, 4, 0.3, 1e-8, 0.1, 0.01
    rows_per_block_of(d)
    table = torch.nn.Parameter(torch.randn(n, d, dtype=torch.float64))
    ref = [row.clone() for row in table.detach()]
    acc = [init_acc] * n
    opt = RowwiseAdagrad([table], lr=lr, eps=eps, weight_decay=wd, initial_accumulator_value=init_acc)
    for rows in ([0, 3, 3], [3, 1], [], [4, 0, 0, 0]):
        values = torch.randn(len(rows), d, dtype=torch.float64)
        table.grad = sparse_grad(rows, values, (n, d))
        opt.step()
        for r in set(rows):
            g = sum(values[i] for i, x in enumerate(rows) if x == r)
            ref[r] = ref[r] * (1 - lr * wd)
            acc[r] += float((g**2).mean())
            ref[r] = ref[r] - lr * g / (acc[r] ** 0.5 + eps)
    torch.testing.assert_close(table.detach(), torch.stack(ref), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[table]["sum"], torch.tensor(acc, dtype=torch.float64))
    assert opt.state[table]["sum"][2] == init_acc  # row 2 never touched


def test_rowwise_adagrad_dense_gradient_updates_every_row(rows_per_block_of):
    rows_per_block_of(2)
    table = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    before = table.detach().clone()
    grad = torch.randn(3, 2, dtype=torch.float64)
    table.grad = grad
    RowwiseAdagrad([table], lr=0.5).step()
    expected = before - 0.5 * grad / (grad.pow(2).mean(1, keepdim=True).sqrt() + 1e-10)
    torch.testing.assert_close(table.detach(), expected)


@pytest.mark.parametrize("cls", [LazyAdam, RowwiseAdagrad])
def test_row_wise_optimizer_errors(cls):
    with pytest.raises(ValueError, match=r"updates \(num_rows, row_dim\) tables .* shape \(4,\)"):
        cls([torch.nn.Parameter(torch.zeros(4))])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        cls([torch.nn.Parameter(torch.zeros(4, 2))], lr=-1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        cls([torch.nn.Parameter(torch.zeros(4, 2))], weight_decay=-0.1)
    table = torch.nn.Parameter(torch.zeros(4, 2))
    table.grad = torch.zeros(4, 2).to_sparse()  # sparse in both dims
    with pytest.raises(ValueError, match="need row-sparse gradients .*sparse_dim=2"):
        cls([table]).step()


def test_lazy_adam_and_adagrad_hyperparameter_errors():
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        LazyAdam([torch.nn.Parameter(torch.zeros(2, 2))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="initial_accumulator_value must be >= 0"):
        RowwiseAdagrad([torch.nn.Parameter(torch.zeros(2, 2))], initial_accumulator_value=-1.0)


# ---------------------------------------------------------------------------------------------- the bundle
def train_steps(model, optimizer, scheduler, batches):
    for ids in batches:
        optimizer.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        optimizer.step()
        scheduler.step()


def test_sparse_step_changes_only_the_rows_read():
    model = memory_model()
    optimizer = build_optimizer(model, adamw)
    values = model.pools["shared"].values
    before = values.detach().clone()
    model(torch.randint(0, 40, (2, 5))).logsumexp(-1).mean().backward()
    used = values.grad.coalesce().indices()[0]
    assert 0 < used.numel() < values.shape[0]
    optimizer.step()
    changed = (values != before).any(1).nonzero().flatten()
    assert torch.equal(changed, used)


def test_build_optimizer_bundles_only_when_a_pool_is_sparse():
    assert isinstance(build_optimizer(memory_model("dense"), adamw), torch.optim.AdamW)
    bundle = build_optimizer(memory_model("sparse"), adamw)
    assert isinstance(bundle, OptimizerBundle)
    dense, sparse = bundle.optimizers
    assert isinstance(dense, torch.optim.AdamW) and isinstance(sparse, LazyAdam)
    assert sparse.param_groups[0]["lr"] == 2e-3  # pool lr None -> the dense optimizer's lr
    assert sparse.param_groups[0]["weight_decay"] == 0.05
    adagrad = build_optimizer(memory_model(), adamw, "rowwise_adagrad", {"lr": 0.05, "eps": 1e-6})
    assert isinstance(adagrad.optimizers[1], RowwiseAdagrad) and adagrad.optimizers[1].param_groups[0]["lr"] == 0.05


def test_build_optimizer_errors():
    with pytest.raises(ValueError, match=r"sparse_optimizer must be one of \['lazy_adam', 'rowwise_adagrad'\]"):
        build_optimizer(memory_model(), adamw, "sgd")
    with pytest.raises(TypeError, match=r"'lazy_adam' rejected sparse_kwargs \{'momentum': 0.9\}"):
        build_optimizer(memory_model(), adamw, sparse_kwargs={"momentum": 0.9})
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer, got list"):
        build_optimizer(memory_model(), lambda groups: list(groups))


def test_bundle_scheduler_closure_zero_grad_and_state_view():
    model = memory_model()
    bundle = build_optimizer(model, adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(bundle, lambda step: 0.25)
    # decay, no_decay, layer 1's private pool (lr 1e-3), the shared sparse pool (lr None -> 2e-3)
    assert [g["lr"] for g in bundle.param_groups] == [0.25 * 2e-3, 0.25 * 2e-3, 0.25 * 1e-3, 0.25 * 2e-3]
    assert bundle.optimizers[1].param_groups[0] is bundle.param_groups[-1]  # one dict, seen by both
    calls = []

    def closure():
        calls.append(1)
        loss = model(torch.randint(0, 40, (2, 5))).logsumexp(-1).mean()
        loss.backward()
        return loss

    loss = bundle.step(closure)
    scheduler.step()
    assert len(calls) == 1 and torch.is_tensor(loss)
    values = model.pools["shared"].values
    assert bundle.state[values] is bundle.optimizers[1].state[values]
    assert len(bundle.state) == len(list(model.parameters())) and values in bundle.state
    bundle.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(TypeError, match="cannot take new parameter groups"):
        bundle.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_bundle_state_dict_round_trip_gives_identical_next_steps():
    model = memory_model()
    optimizer = build_optimizer(model, adamw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    batches = [torch.randint(0, 40, (2, 6)) for _ in range(5)]
    train_steps(model, optimizer, scheduler, batches[:3])

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = memory_model()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = build_optimizer(resumed, adamw)
    resumed_scheduler = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda step: 1.0 / (1 + step))
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    assert [g["lr"] for g in resumed_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert resumed_optimizer.optimizers[1].param_groups[0] is resumed_optimizer.param_groups[-1]

    train_steps(model, optimizer, scheduler, batches[3:])
    train_steps(resumed, resumed_optimizer, resumed_scheduler, batches[3:])
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_bundle_rejects_a_state_dict_of_another_layout():
    bundle = build_optimizer(memory_model(), adamw)
    state = bundle.state_dict()
    state["param_groups"] = state["param_groups"][:2]
    with pytest.raises(ValueError, match=r"2 parameter groups but this bundle has 4 .*same pools and update modes"):
        bundle.load_state_dict(state)
    with pytest.raises(TypeError, match="needs one or more torch.optim.Optimizer"):
        OptimizerBundle([])


def test_clip_dense_grad_norm_skips_sparse_gradients():
    model = memory_model()
    optimizer = build_optimizer(model, adamw)
    model(torch.randint(0, 40, (2, 5))).logsumexp(-1).mean().backward()
    values = model.pools["shared"].values
    with pytest.raises(NotImplementedError):  # why the helper exists
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    sparse_before = values.grad.to_dense().clone()
    dense = [p for p in model.parameters() if p.grad is not None and not p.grad.is_sparse]
    expected_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dense]))
    norm = clip_dense_grad_norm_(optimizer, max_norm=1e-3)
    torch.testing.assert_close(norm, expected_norm)
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in dense]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-4, atol=0)
    assert torch.equal(values.grad.to_dense(), sparse_before)


# ---------------------------------------------------------------------------------------------- Lightning
class TinyLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = memory_model()

    def training_step(self, batch, batch_idx):
        return self.model(batch[0]).logsumexp(-1).mean()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if gradient_clip_val:
            clip_dense_grad_norm_(optimizer, gradient_clip_val)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, adamw)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def fit(module, steps, tmp_path, ckpt_path=None):
    # one batch per epoch: every step sees the same batch, whatever Lightning's mid-epoch resume policy
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        gradient_clip_val=1.0)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def test_lightning_trains_the_bundle_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    straight = TinyLM()
    torch.manual_seed(0)
    interrupted = TinyLM()
    start = copy.deepcopy(straight.model.pools["shared"].values.detach())
    fit(straight, 4, tmp_path)
    trainer = fit(interrupted, 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = TinyLM()
    fit(resumed, 4, tmp_path, ckpt_path=tmp_path / "half.ckpt")
    assert not torch.equal(straight.model.pools["shared"].values, start)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
