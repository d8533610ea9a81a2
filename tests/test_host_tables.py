"""Host tables (``MemoryPool(table_device="host")``): the host read against the plain on-device read (outputs and
gradients, duplicates, empty batches), prefetch staging and its matching rules, a token-indexed block on a host
pool inside a Transformer (training with LazyAdam, state dict, KV-cache decode, compile, export), placement under
``.to()`` and the strategies refused. On CPU the host path runs as a separate path (host == device); the tests marked
``cuda`` check the table stays in host memory while the model is on the GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from memzoo.blocks.base import Block
from memzoo.blocks.pool import MemoryPool
from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.transformer import Transformer
from memzoo.ops import weighted_gather
from memzoo.ops.host_read import host_weighted_gather, stage_rows
from memzoo.registry import register_block
from memzoo.training.optim import build_optimizer, keep_host_state_on_host

VOCAB, DIM = 40, 16


def _register_token_table():
    """A test-only token-indexed block: K heads hash the (previous, current) token pair into a private pool's rows;
    a gate from the hidden state weights them. The previous token of a decode step comes from ``ctx.state``."""

    @register_block("host_test_table")
    class HostTestTable(Block):
        needs_vocab_size = True

        def __init__(self, dim: int, vocab_size: int, rows: int = 23, heads: int = 3,
                     table_device: str = "accelerator", update: str = "sparse"):
            super().__init__()
            self.vocab_size, self.heads = vocab_size, heads
            self.table = MemoryPool(None, dim, num_rows=rows, update=update, lr=None, table_device=table_device)
            self.gate = nn.Linear(dim, heads)

        @property
        def pool(self) -> MemoryPool:
            return self.table

        def table_indices(self, ctx) -> torch.Tensor:
            ids = ctx.token_ids
            first = torch.full_like(ids[:, :1], self.vocab_size)
            if ctx.state is not None:
                first = ctx.state.get("last", first)
            prev = torch.cat([first, ids[:, :-1]], dim=1)
            salt = torch.arange(1, self.heads + 1, device=ids.device)
            return (prev[..., None] * 31 + ids[..., None] * 7 * salt) % self.pool.num_rows  # (B, T, K)

        def prefetch(self, ctx) -> None:
            self.pool.prefetch(self.table_indices(ctx))

        def forward(self, x, ctx=None):
            indices = self.table_indices(ctx)
            if ctx.state is not None:
                ctx.state["last"] = ctx.token_ids[:, -1:]
            weights = torch.softmax(self.gate(x), dim=-1).to(self.pool.values.dtype)
            return self.pool.read(indices, weights).to(x.dtype)

    return HostTestTable


def _models(update: str = "sparse", n_layers: int = 2, **block_args):
    """The same weights twice: the table on the accelerator, and in host memory."""
    _register_token_table()
    models = []
    for device in ("accelerator", "host"):
        torch.manual_seed(0)
        models.append(Transformer(ModelConfig(
            vocab_size=VOCAB, dim=DIM, n_layers=n_layers, n_heads=2, max_seq_len=32, block="host_test_table",
            block_args={"table_device": device, "update": update, **block_args})))
    models[1].load_state_dict(models[0].state_dict())
    return models


def _ids(batch=2, length=7, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


# ----------------------------------------------------------------------------------------------- the read


@pytest.mark.parametrize("update", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_read_equals_device_read_with_duplicates(update, dtype):
    device_pool = MemoryPool(None, 8, num_rows=11, update=update).to(dtype)
    host_pool = MemoryPool(None, 8, num_rows=11, update=update, table_device="host").to(dtype)
    host_pool.load_state_dict(device_pool.state_dict())
    indices = torch.randint(0, 11, (3, 5, 4))
    indices[0, 0] = torch.tensor([2, 2, 2, 7])  # duplicates inside a bag and across bags
    weights = torch.randn(3, 5, 4, dtype=dtype, requires_grad=True)
    host_weights = weights.detach().clone().requires_grad_()
    expected, got = device_pool.read(indices, weights), host_pool.read(indices, host_weights)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(host_weights.grad, weights.grad)
    assert host_pool.values.grad.is_sparse == (update == "sparse")
    torch.testing.assert_close(_dense(host_pool.values.grad), _dense(device_pool.values.grad))
    assert host_pool.prefetch_stats == {"staged": 0, "synchronous": 1, "dropped": 0}


@pytest.mark.parametrize("shape", [(0, 5, 2), (2, 0, 2)])
@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_host_read_of_an_empty_batch(shape, update):
    pool = MemoryPool(None, 8, num_rows=11, update=update, table_device="host")
    weights = torch.randn(shape, requires_grad=True)
    out = pool.read(torch.zeros(shape, dtype=torch.long), weights)
    assert out.shape == (*shape[:-1], 8)
    out.sum().backward()
    assert weights.grad.shape == shape and _dense(pool.values.grad).abs().sum() == 0


def test_host_read_names_an_index_out_of_range():
    pool = MemoryPool(None, 4, num_rows=5, table_device="host")
    with pytest.raises(IndexError, match="row index 5 is out of range for a table of 5 rows"):
        pool.read(torch.tensor([[1, 5]]), torch.ones(1, 2))


def test_host_weighted_gather_double_call_shares_no_graph():
    """Two reads of one table add their gradients (AccumulateGrad) as two reads of an on-device table do."""
    table = torch.randn(9, 4, requires_grad=True)
    reference = table.detach().clone().requires_grad_()
    i1, i2 = torch.tensor([[0, 3], [3, 8]]), torch.tensor([[3, 3]])
    w1, w2 = torch.randn(2, 2), torch.randn(1, 2)
    (host_weighted_gather(table, i1, w1, sparse_grad=True).sum()
     + host_weighted_gather(table, i2, w2, sparse_grad=True).sum()).backward()
    (weighted_gather(reference, i1, w1).sum() + weighted_gather(reference, i2, w2).sum()).backward()
    torch.testing.assert_close(_dense(table.grad), reference.grad)


def test_dense_host_gradient_accumulates_rows_into_an_existing_grad_in_place():
    """``update: dense`` with gradient accumulation: the second micro-batch adds only its rows into the table's dense
    ``.grad`` (same buffer), with the values of an on-device table's accumulated gradient."""
    host = MemoryPool(None, 8, num_rows=11, update="dense", table_device="host")
    device = MemoryPool(None, 8, num_rows=11, update="dense")
    device.load_state_dict(host.state_dict())
    batches = [(torch.randint(0, 11, (2, 3, 2)), torch.randn(2, 3, 2)) for _ in range(2)]
    layouts, buffers = [], []
    host.values.register_hook(lambda grad: layouts.append(grad.layout))  # what the read's backward hands autograd
    for pool in (host, device):
        for indices, weights in batches:
            pool.read(indices, weights).square().sum().backward()
            buffers.append(pool.values.grad.data_ptr())
    assert layouts == [torch.strided, torch.sparse_coo]  # no (N, D) gradient built for the second micro-batch
    assert not host.values.grad.is_sparse and buffers[0] == buffers[1]
    torch.testing.assert_close(host.values.grad, device.values.grad)


def test_host_read_refuses_create_graph():
    pool = MemoryPool(None, 4, num_rows=5, table_device="host")
    out = pool.read(torch.tensor([[1, 2]]), torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out.sum(), pool.values, create_graph=True)


# ----------------------------------------------------------------------------------------------- prefetch


def test_threaded_staging_equals_and_reports_errors_on_read(monkeypatch):
    """The worker-thread staging (CUDA's path) run on CPU: the same rows, and an index error raised by the worker
    surfaces at the read that consumes it."""
    from memzoo.ops import host_read

    monkeypatch.setattr(host_read, "THREADED_ON_CPU", True)
    pool = MemoryPool(None, 8, num_rows=11, table_device="host")
    indices, weights = torch.randint(0, 11, (2, 3, 2)), torch.randn(2, 3, 2)
    pool.prefetch(indices)
    assert pool._staged and hasattr(pool._staged[0]._result, "result")  # a Future: staged by the worker
    torch.testing.assert_close(pool.read(indices, weights), weighted_gather(pool.values.detach(), indices, weights))
    assert pool.prefetch_stats["staged"] == 1
    bad = torch.tensor([[0, 11]])
    pool.prefetch(bad)
    with pytest.raises(IndexError, match="row index 11 is out of range"):
        pool.read(bad, torch.ones(1, 2))


def test_threaded_staging_in_a_model_equals_the_device_table(clean_registry, monkeypatch):
    from memzoo.ops import host_read

    monkeypatch.setattr(host_read, "THREADED_ON_CPU", True)
    device_model, host_model = _models("sparse")
    torch.testing.assert_close(host_model(_ids()), device_model(_ids()))
    assert host_model.layers[1].ffn.pool.prefetch_stats == {"staged": 1, "synchronous": 0, "dropped": 0}



def test_prefetch_is_consumed_by_the_same_or_equal_indices_only():
    pool = MemoryPool(None, 8, num_rows=11, table_device="host")
    indices, weights = torch.randint(0, 11, (2, 3, 2)), torch.randn(2, 3, 2)
    expected = weighted_gather(pool.values.detach(), indices, weights)
    pool.prefetch(indices)
    torch.testing.assert_close(pool.read(indices, weights), expected)  # the same tensor
    pool.prefetch(indices)
    torch.testing.assert_close(pool.read(indices.clone(), weights), expected)  # equal values
    assert pool.prefetch_stats == {"staged": 2, "synchronous": 0, "dropped": 0}
    pool.prefetch(indices)
    other = (indices + 1) % 11
    torch.testing.assert_close(pool.read(other, weights), weighted_gather(pool.values.detach(), other, weights))
    assert pool.prefetch_stats["synchronous"] == 1 and len(pool._staged) == 1  # the unmatched entry waits
    pool.discard_staged()
    assert not pool._staged and pool.prefetch_stats["dropped"] == 1


def test_prefetched_rows_of_a_changed_table_are_not_used():
    pool = MemoryPool(None, 8, num_rows=11, table_device="host")
    indices, weights = torch.randint(0, 11, (2, 3, 2)), torch.randn(2, 3, 2)
    pool.prefetch(indices)
    with torch.no_grad():
        pool.values.add_(1.0)  # an optimizer step between prefetch and read
    torch.testing.assert_close(pool.read(indices, weights), weighted_gather(pool.values.detach(), indices, weights))
    assert pool.prefetch_stats == {"staged": 0, "synchronous": 1, "dropped": 1}


def test_prefetch_of_an_accelerator_pool_does_nothing():
    pool = MemoryPool(None, 8, num_rows=11)
    pool.prefetch(torch.zeros(1, 2, dtype=torch.long))
    assert not pool._staged


def test_stage_rows_keeps_distinct_sorted_rows():
    table = torch.arange(24.0).view(6, 4)
    staged = stage_rows(table, torch.tensor([[5, 1], [1, 5]]), torch.device("cpu")).wait()
    assert staged.rows.tolist() == [1, 5] and staged.inverse.tolist() == [[1, 0], [0, 1]]
    torch.testing.assert_close(staged.staged, table[[1, 5]])


# ----------------------------------------------------------------------------------------------- in a model


@pytest.mark.parametrize("update", ["dense", "sparse"])
def test_model_with_a_host_table_equals_the_device_table_and_prefetches(clean_registry, update):
    device_model, host_model = _models(update)
    ids = _ids()
    expected, got = device_model(ids), host_model(ids)
    torch.testing.assert_close(got, expected)
    for layer in host_model.layers:  # every layer's read used the rows its block prefetched
        assert layer.ffn.pool.prefetch_stats == {"staged": 1, "synchronous": 0, "dropped": 0}
    expected.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(device_model.named_parameters(), host_model.parameters()):
        torch.testing.assert_close(_dense(q.grad), _dense(p.grad), msg=name)
    assert host_model.host_pools and not device_model.host_pools


def test_training_steps_with_lazy_adam_equal(clean_registry):
    device_model, host_model = _models("sparse")
    optimizers = [build_optimizer(m, lambda groups: torch.optim.AdamW(groups, lr=1e-2)) for m in (device_model,
                                                                                                   host_model)]
    for step in range(3):
        for model, optimizer in zip((device_model, host_model), optimizers):
            optimizer.zero_grad()
            model(_ids(seed=step)).logsumexp(-1).mean().backward()
            optimizer.step()
    for (name, p), q in zip(device_model.named_parameters(), host_model.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    assert host_model.layers[0].ffn.pool.values.device.type == "cpu"
    assert keep_host_state_on_host(optimizers[1], host_model) == 0  # already next to its table


def test_state_dict_round_trip_and_dtype_casts(clean_registry, tmp_path):
    device_model, host_model = _models()
    assert list(host_model.state_dict()) == list(device_model.state_dict())
    torch.save(host_model.state_dict(), tmp_path / "weights.pt")
    _, fresh = _models()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    torch.testing.assert_close(fresh(_ids()), device_model(_ids()))
    fresh.to(torch.float64)  # a dtype cast reaches the host table
    assert fresh.layers[0].ffn.pool.values.dtype == torch.float64
    torch.testing.assert_close(fresh(_ids()), device_model.to(torch.float64)(_ids()))


def test_meta_built_host_table_materialises_in_host_memory(clean_registry):
    _register_token_table()
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=2, max_seq_len=16,
                                        block="host_test_table", block_args={"table_device": "host"}))
    assert model.layers[0].ffn.pool.values.device.type == "meta"
    model.to_empty(device="cpu")
    assert model.layers[0].ffn.pool.values.device.type == "cpu"


def test_kv_cache_decode_with_a_host_table_equals_recomputation(clean_registry):
    _, model = _models()
    model.eval()
    prompt = _ids(length=4)
    cached = model.generate(prompt, max_new_tokens=5, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=5, use_cache=False))
    with torch.no_grad():
        full = model(cached)
        caches = model.new_caches(2, cached.shape[1])
        steps = [model(cached[:, :4], caches)] + [model(cached[:, i : i + 1], caches) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert model.layers[0].ffn.pool.prefetch_stats["synchronous"] == 0


def test_compile_aot_eager_equals_eager(clean_registry):
    _, model = _models(n_layers=1)
    compiled = torch.compile(model, backend="aot_eager")
    ids = _ids()
    expected = model(ids)
    expected.sum().backward()
    grads = {n: _dense(p.grad).clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = compiled(ids)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(_dense(p.grad), grads[name], msg=name)
    assert model.layers[0].ffn.pool.prefetch_stats["synchronous"] == 0


def test_beside_forwards_prefetch_to_its_children(clean_registry):
    _register_token_table()
    model = Transformer(ModelConfig(
        vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=2, max_seq_len=16, block="beside",
        block_args={"base": "dense", "add": {"block": "host_test_table", "vocab_size": VOCAB,
                                             "table_device": "host"}, "init": "gate"}))
    model(_ids())
    assert model.layers[0].ffn.add.pool.prefetch_stats == {"staged": 1, "synchronous": 0, "dropped": 0}


def test_export_of_a_host_pool_loads_in_plain_transformers(tmp_path):
    """A built-in block (memory_plus) on a shared host pool: the shipped code reads it the host way."""
    transformers = pytest.importorskip("transformers")
    from memzoo.export.hf import export_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig(
        vocab_size=258, dim=16, n_layers=2, n_heads=2, max_seq_len=24, block="dense", block_args={"hidden": 16},
        layers={1: {"block": "memory_plus", "pool": "shared", "heads": 2, "knn": 2, "k_dim": 8}},
        pools={"shared": {"n_keys": 4, "value_dim": 8, "table_device": "host"}})).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        export_model(model, tmp_path / "export", tokenizer="byte"), trust_remote_code=True)
    pool = hf.pools["shared"]
    assert pool.on_host and pool.values.device.type == "cpu"
    ids = torch.randint(0, 258, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    assert pool.prefetch_stats["synchronous"] >= 1  # the host read ran in the shipped code


def test_table_device_is_not_part_of_the_architecture_a_checkpoint_is_checked_against():
    from memzoo.export.checkpoint_check import architecture_differences

    def hparams(table_device):
        return {"architecture": {"dim": 16, "pools": {"m": {"n_keys": 4, "value_dim": 8, "table_device": table_device}}}}

    assert architecture_differences(hparams("accelerator"), hparams("host")) == []
    assert architecture_differences(hparams("host"), {"architecture": {"dim": 16, "pools": {"m": {
        "n_keys": 8, "value_dim": 8}}}})


# ----------------------------------------------------------------------------------------------- refusals


def test_bad_table_device_and_unsupported_combinations_are_named(clean_registry):
    with pytest.raises(ValueError, match="table_device must be 'accelerator'.*or 'host'.*got 'gpu'"):
        MemoryPool(None, 8, num_rows=4, table_device="gpu")
    with pytest.raises(ValueError, match="table_device: host needs kind: memory.*'experts'"):
        MemoryPool(2, 8, kind="experts", table_device="host")
    with pytest.raises(ModelConfigError, match="pools.shared: pool table_device"):
        Transformer(ModelConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=2, max_seq_len=16,
                                layers={0: {"block": "memory_plus", "pool": "shared", "heads": 2, "knn": 2,
                                            "k_dim": 8}},
                                pools={"shared": {"n_keys": 4, "value_dim": 8, "table_device": "cpu"}}))
    pool = MemoryPool(None, 8, num_rows=4, table_device="host")
    with pytest.raises(ValueError, match="table_device: host cannot be memory-parallel"):
        pool.shard_reads(lambda values, indices, weights: values)


def test_strategies_other_than_one_device_are_refused(clean_registry):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from memzoo.parallel.memory_parallel import MemoryParallelError, check_memory_parallel
    from memzoo.parallel.sparse_ddp import SparseDDPStrategy, check_strategy

    _, model = _models()
    check_strategy(model, SingleDeviceStrategy(torch.device("cpu")))
    for strategy in (DDPStrategy(), SparseDDPStrategy()):
        with pytest.raises(ValueError, match="table_device: host .*single device"):
            check_strategy(model, strategy)
    with pytest.raises(MemoryParallelError, match="table_device: host"):
        check_memory_parallel(model, 1, 1)


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_model_keeps_the_table_in_host_memory(clean_registry):
    device_model, host_model = _models("sparse")
    device_model.cuda()
    host_model.cuda()
    table = host_model.layers[0].ffn.pool.values
    assert table.device.type == "cpu" and host_model.embed.weight.device.type == "cuda"
    assert device_model.layers[0].ffn.pool.values.device.type == "cuda"
    ids = _ids().cuda()
    expected, got = device_model(ids), host_model(ids)
    torch.testing.assert_close(got, expected)
    assert host_model.layers[0].ffn.pool.prefetch_stats == {"staged": 1, "synchronous": 0, "dropped": 0}
    expected.square().sum().backward()
    got.square().sum().backward()
    assert table.grad.device.type == "cpu" and table.grad.is_sparse
    torch.testing.assert_close(table.grad.to_dense(), device_model.layers[0].ffn.pool.values.grad.to_dense().cpu())
    optimizer = build_optimizer(host_model, lambda groups: torch.optim.AdamW(groups, lr=1e-2))
    before = table.detach().clone()
    optimizer.step()
    assert table.device.type == "cpu" and not torch.equal(table.detach(), before)
    # Lightning moves a restored optimizer state to the device; the state of host tables is moved back
    state = optimizer.state[table]
    state["exp_avg"] = state["exp_avg"].cuda()
    assert keep_host_state_on_host(optimizer, host_model) == 1 and state["exp_avg"].device.type == "cpu"
    host_model.half()
    assert table.dtype == torch.float16 and table.device.type == "cpu"


@pytest.mark.cuda
def test_cuda_kv_cache_decode_with_a_host_table(clean_registry):
    device_model, host_model = _models()
    device_model.cuda().eval()
    host_model.cuda().eval()
    prompt = _ids(length=4).cuda()
    assert torch.equal(host_model.generate(prompt, max_new_tokens=5), device_model.generate(prompt, max_new_tokens=5))


@pytest.mark.slow
def test_lightning_fit_and_resume_with_a_host_pool_equals_the_device_pool(tmp_path):
    """memory_plus on a shared sparse pool: 1 step, a checkpoint, 1 resumed step give the same weights with the pool
    in host memory as with it on the device (single-device strategy, LazyAdam on the host table)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from memzoo.training.module import LanguageModel

    ids = torch.randint(0, 256, (4, 13), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i, :-1], "labels": ids[i, 1:]} for i in range(4)]

    def fit(table_device, steps, ckpt_path=None, module=None):
        torch.manual_seed(0)
        module = module or LanguageModel(ModelConfig(
            vocab_size=258, dim=16, n_layers=2, n_heads=2, max_seq_len=16,
            layers={1: {"block": "memory_plus", "pool": "memory", "heads": 2, "knn": 2, "k_dim": 8}},
            pools={"memory": {"n_keys": 4, "value_dim": 16, "update": "sparse", "table_device": table_device}},
        ), warmup_steps=0, lr_decay_steps=4)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=2), ckpt_path=ckpt_path)
        return trainer, module

    def two_plus_two(table_device):
        trainer, _ = fit(table_device, 1)
        trainer.save_checkpoint(tmp_path / f"{table_device}.ckpt")
        return fit(table_device, 2, ckpt_path=tmp_path / f"{table_device}.ckpt")[1]

    reference, resumed = two_plus_two("accelerator"), two_plus_two("host")
    assert resumed.model.pools["memory"].on_host
    for (name, p), q in zip(reference.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, msg=name)


def test_activation_checkpointing_recomputes_host_reads(clean_registry):
    """A checkpointed layer's recomputation in backward reads the host table again (synchronously): same gradients."""
    from memzoo.parallel.parallelize import parallelize

    device_model, host_model = _models("sparse")
    parallelize(host_model, activation_checkpointing=True)
    expected, got = device_model(_ids()), host_model(_ids())
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    for (name, p), q in zip(device_model.named_parameters(), host_model.parameters()):
        torch.testing.assert_close(_dense(q.grad), _dense(p.grad), msg=name)
    assert host_model.layers[0].ffn.pool.prefetch_stats == {"staged": 1, "synchronous": 1, "dropped": 0}


# ----------------------------------------------------------------------------------------------- memzoo's token tables


@pytest.mark.parametrize("block, args", [("stem", {"hidden": 24, "update": "sparse"}),
                                         ("lookup_experts", {"n_experts": 2, "hidden": 16, "mode": "lookup"}),
                                         ("engram", {"ngram_dim": 8, "heads": 2, "table_rows": 31, "update": "sparse"})])
def test_memzoos_token_indexed_blocks_on_host_tables_equal_the_device_ones(block, args):
    """STEM's table, MoLE's lookup table and Engram's n-gram tables with ``table_device: host``: the prefetch pass stages every layer's
    rows (the very tensor the read then uses: no synchronous gather), and logits, gradients and a cached decode
    equal the on-device model's."""
    def build(table_device):
        torch.manual_seed(0)
        return Transformer(ModelConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, max_seq_len=16, block=block,
                                       block_args={**args, "table_device": table_device}))

    device_model, host_model = build("accelerator"), build("host")
    host_model.load_state_dict(device_model.state_dict())
    ids = _ids() % 40
    out_device, out_host = device_model(ids), host_model(ids)
    torch.testing.assert_close(out_host, out_device)
    out_device.square().mean().backward()
    out_host.square().mean().backward()
    for (name, p_device), p_host in zip(device_model.named_parameters(), host_model.parameters(), strict=True):
        torch.testing.assert_close(_dense(p_host.grad), _dense(p_device.grad), msg=name)
    for layer in host_model.layers:
        assert layer.ffn.pool.on_host
        assert layer.ffn.pool.prefetch_stats == {"staged": 1, "synchronous": 0, "dropped": 0}
    prompt = ids[:, :4]
    assert torch.equal(host_model.generate(prompt, 5), device_model.generate(prompt, 5))
    from memzoo.export.checkpoint_check import architecture_differences

    assert architecture_differences({"block": block, "block_args": {**args, "table_device": "host"}},
                                    {"block": block, "block_args": args}) == []
