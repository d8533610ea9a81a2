"""Data parallel (``trainer.strategy: ddp``) against one process on the same global batch, 2 gloo processes on CPU.

One spawn of 2 ranks runs every scenario (start-up is the slow part); each rank trains through
``memzoo.parallel.SparseDDPStrategy`` (Lightning's ``DDPStrategy`` plus the row exchange of sparse pools) with batch B, the reference trains in this process with batch 2B. The ranks' batches at step s are
together the reference's batch at step s (round-robin sampler), so weights must agree to fp32 tolerance.
"""

from __future__ import annotations

import os
import socket
import warnings

import lightning as L
import pytest
import torch
import torch.distributed as dist

from memzoo import LanguageModel
from memzoo.data import FactsDataModule
from memzoo.model.config import ModelConfig
from memzoo.parallel.sparse_ddp import (
    RowSparseSync,
    SparseDDPStrategy,
    check_strategy,
    sparse_ddp_for,
    sparse_tables,
)
from memzoo.parallel.sparse_grad_sync import (
    all_reduce_row_sparse_,
    dense_all_reduce_bytes_per_rank,
    exchange_bytes_per_rank,
)
from mp_workers import start_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
BATCH = 2  # per rank; the reference reads WORLD * BATCH
STEPS = 3
MEMORY = {"block": "memory_plus", "pool": "memory", "heads": 2, "knn": 4, "k_dim": 16}
SCENARIOS = {
    "dense": ({}, {}),
    "memoryplus_sparse": (
        {"layers": {0: MEMORY, 1: MEMORY},
         "pools": {"memory": {"n_keys": 8, "value_dim": 32, "update": "sparse", "lr": 0.01}}},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},  # no_sync micro-batches + clipping
    ),
    "memoryplus_dense": (
        {"layers": {0: MEMORY, 1: MEMORY},
         "pools": {"memory": {"n_keys": 8, "value_dim": 32, "update": "dense", "lr": 0.01}}},
        {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5},
    ),
    "peer": (
        {"layers": {1: {"block": "peer", "pool": "experts", "heads": 2, "knn": 4, "k_dim": 16,
                        "query_norm": "rmsnorm"}},
         "pools": {"experts": {"kind": "experts", "n_keys": 8, "value_dim": 32, "update": "sparse"}}},
        {},
    ),
    # Engram's private table pool: sparse rows exchanged; the data tokenizer bound on every rank by setup
    "engram_sparse": (
        {"layers": {1: {"block": "beside", "init": "none", "base": {"block": "dense", "hidden": 32},
                        "add": {"block": "engram", "ngram_dim": 8, "heads": 2, "table_rows": 31, "update": "sparse",
                                "lr": 0.01}}}},
        {},
    ),
    # the load-balancing loss is a product of batch means, computed per rank (as Switch Transformer does): a
    # different loss from one process's on 2B, so it is off here; the rest of MoE must match
    "moe": ({"block": "moe", "block_args": {"n_experts": 8, "top_k": 1, "aux_loss_weight": 0.0, "z_loss_weight": 1e-3}},
            {}),
}


def build(model_args: dict) -> tuple[LanguageModel, FactsDataModule]:
    torch.manual_seed(0)
    architecture = ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=64, **model_args)
    return LanguageModel(architecture, warmup_steps=1, optimizer=lambda groups: torch.optim.AdamW(groups, lr=0.01))


def data(batch_size: int) -> FactsDataModule:
    return FactsDataModule(n_entities=20, block_size=16, batch_size=batch_size, recall_samples=12)


def fit(model_args, trainer_args, batch_size, devices, tmp, ckpt_path=None, max_steps=STEPS, callbacks=(),
        precision="64-true"):
    """Trains ``build(model_args)`` on ``devices`` ranks of ``batch_size`` rows; float64 by default, so that two
    ranks and one process differ by summation order alone (~1e-14), far below any real difference (in float32,
    Adam turns the order noise of near-zero gradients into differences up to ~1e-4)."""
    model = build(model_args)
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=SparseDDPStrategy() if devices > 1 else "auto", max_steps=max_steps,
        logger=False, enable_checkpointing=bool(callbacks), callbacks=list(callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=max_steps,
        check_val_every_n_epoch=None, default_root_dir=tmp, precision=precision, **trainer_args,
    )
    exchanges = EXCHANGES["count"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data(batch_size), ckpt_path=ckpt_path)
    unsynced = [str(w.message) for w in caught if "sync_dist=True" in str(w.message)]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") or k == "train/tokens"}
    state = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    return state, metrics, unsynced, EXCHANGES["count"] - exchanges


#: Row exchanges run in this process (counted by the ranks: once per optimizer step, not per micro-batch).
EXCHANGES = {"count": 0}


def _counting_exchange(all_reduce_):
    def counted(self):
        EXCHANGES["count"] += 1
        return all_reduce_(self)

    return counted


# ----------------------------------------------------------------------------------------------- the ranks
def _exchange_case(rank: int) -> dict:
    """Row-sparse exchange vs the dense mean: overlapping rows, one table untouched on rank 1."""
    tables = [torch.nn.Parameter(torch.zeros(10, 3)), torch.nn.Parameter(torch.zeros(6, 2))]
    grads = []
    for r in range(WORLD):
        g = torch.Generator().manual_seed(r)
        rows = [torch.tensor([1, 4, 7]), torch.tensor([2, 3])] if r == 0 else [torch.tensor([7, 1, 9, 1]), None]
        grads.append([None if idx is None else torch.sparse_coo_tensor(
            idx[None], torch.randn(len(idx), t.shape[1], generator=g), t.shape) for idx, t in zip(rows, tables)])
    for table, grad in zip(tables, grads[rank]):
        table.grad = grad
    stats = all_reduce_row_sparse_(tables)
    expected = [sum(g[i].to_dense() for g in grads if g[i] is not None) / WORLD for i in range(2)]
    return {
        "max_error": max(float((t.grad.to_dense() - e).abs().max()) for t, e in zip(tables, expected)),
        "coalesced": all(t.grad.is_sparse and t.grad.is_coalesced() for t in tables),
        "stats": (stats.rows_local, stats.rows_max, stats.bytes_sent),
    }


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    RowSparseSync.all_reduce_ = _counting_exchange(RowSparseSync.all_reduce_)
    results = {}
    for name, (model_args, trainer_args) in SCENARIOS.items():
        results[name] = fit(model_args, trainer_args, BATCH, WORLD, tmp)
    # exact resume at 2 ranks: 2 + 2 steps from a mid-epoch checkpoint equal 4 uninterrupted steps (float32: the
    # bitwise claim is made for the precision memzoo trains in)
    model_args, trainer_args = SCENARIOS["memoryplus_sparse"]
    trainer_args = {"gradient_clip_val": 0.5}
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(tmp, "ckpt"), every_n_train_steps=2,
                                               save_top_k=-1, filename="{step}")
    results["uninterrupted"] = fit(model_args, trainer_args, BATCH, WORLD, tmp, max_steps=4, callbacks=[ckpt],
                                   precision="32-true")
    results["resumed"] = fit(model_args, trainer_args, BATCH, WORLD, tmp, max_steps=4,
                             ckpt_path=os.path.join(tmp, "ckpt", "step=2.ckpt"), precision="32-true")
    results["exchange"] = _exchange_case(rank)
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    start_ranks(_worker, WORLD, _free_port(), tmp)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_train_the_weights_of_one_process(scenario, ranks, tmp_path):
    torch.set_num_threads(1)
    model_args, trainer_args = SCENARIOS[scenario]
    reference, reference_metrics, *_ = fit(model_args, trainer_args, WORLD * BATCH, 1, str(tmp_path))
    start = build(model_args).model.state_dict()
    for rank in ranks:
        state, metrics, unsynced, exchanges = rank[scenario]
        # the row exchange runs once per optimizer step (3 steps of 2 micro-batches), only with sparse pools
        assert exchanges == (STEPS if scenario in ("memoryplus_sparse", "peer", "engram_sparse") else 0), (scenario, exchanges)
        assert not unsynced, unsynced
        moved = False
        for key, value in reference.items():  # float64: the ranks' summation order changes ~1e-14
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9,
                                       msg=lambda m, key=key: f"{scenario}: {key}: {m}")
            moved |= not torch.equal(value, start[key])
        assert moved
        # synced validation metrics (loss, ppl, accuracy, fact recall, memory usage) and the last step's tokens
        # (summed over ranks) equal one process's
        assert metrics.keys() == reference_metrics.keys()
        for key, value in reference_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    assert ranks[0][scenario][1] == ranks[1][scenario][1]
    assert reference_metrics["train/tokens"] > 0
    if scenario.startswith("memoryplus"):
        assert any(k.startswith("val/memory/") for k in reference_metrics)
        assert "val/fact_recall" in reference_metrics


def test_resume_at_two_ranks_is_exact(ranks):
    for rank in ranks:
        uninterrupted, resumed = rank["uninterrupted"][0], rank["resumed"][0]
        for key, value in uninterrupted.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_row_sparse_exchange_equals_the_dense_mean(ranks):
    for rank in ranks:
        result = rank["exchange"]
        assert result["max_error"] < 1e-6 and result["coalesced"]
    # rank 0 touched 3 and 2 rows, rank 1 four (with a duplicate: 3 distinct) and none
    assert ranks[0]["exchange"]["stats"][0] == [3, 2] and ranks[1]["exchange"]["stats"][0] == [3, 0]
    rows_max, sent = ranks[0]["exchange"]["stats"][1:]
    assert rows_max == [3, 2]
    assert sent == 2 * 8 + exchange_bytes_per_rank(3, 3, 2) + exchange_bytes_per_rank(2, 2, 2)


def test_communication_formulas():
    assert exchange_bytes_per_rank(rows_max=100, value_dim=4, world_size=3) == 2 * 100 * (8 + 16)
    assert dense_all_reduce_bytes_per_rank(num_rows=1000, value_dim=4, world_size=2) == 1000 * 16


def test_sparse_tables_are_named_as_ddp_sees_them():
    model = build(SCENARIOS["memoryplus_sparse"][0])
    assert list(sparse_tables(model)) == ["model.pools.memory.values"]
    assert sparse_tables(build(SCENARIOS["memoryplus_dense"][0])) == {}


def test_a_strategy_that_cannot_hold_row_sparse_gradients_fails_before_training():
    from lightning.pytorch.strategies import FSDPStrategy

    model = build(SCENARIOS["memoryplus_sparse"][0])
    with pytest.raises(ValueError, match=r"FSDPStrategy cannot train pools with update: sparse \(model.pools.memory\)"
                                         r".*--trainer.strategy ddp, memzoo.parallel.strategy.MemoryParallelStrategy .*"
                                         r"or set update: dense"):
        check_strategy(model, FSDPStrategy())
    check_strategy(build(SCENARIOS["memoryplus_dense"][0]), FSDPStrategy())  # dense pools: fine


def test_plain_ddp_never_meets_a_sparse_pool():
    """Lightning's own DDPStrategy with a sparse pool is refused before training (it would not reduce the rows);
    SparseDDPStrategy runs it, and the CLI's DDP names become SparseDDPStrategy with the same settings."""
    from lightning.pytorch.strategies import DDPStrategy

    sparse = build(SCENARIOS["memoryplus_sparse"][0])
    with pytest.raises(ValueError, match=r"DDPStrategy cannot train pools with update: sparse \(model.pools.memory\)"
                                         r".*memzoo.parallel.SparseDDPStrategy"):
        check_strategy(sparse, DDPStrategy())
    check_strategy(sparse, SparseDDPStrategy())
    check_strategy(build(SCENARIOS["memoryplus_dense"][0]), DDPStrategy())  # dense pools: DDP's buckets
    for name, find_unused, start in [("ddp", None, "popen"), ("ddp_spawn", None, "spawn"),
                                     ("ddp_find_unused_parameters_true", True, "popen")]:
        strategy = sparse_ddp_for(name)
        assert isinstance(strategy, SparseDDPStrategy) and strategy.find_unused_parameters is find_unused
        assert strategy._start_method == start
    assert sparse_ddp_for("auto") is None and sparse_ddp_for("fsdp") is None and sparse_ddp_for(None) is None


def test_moe_turns_on_find_unused_parameters(monkeypatch):
    """configure_ddp leaves sparse tables out of DDP and sets find_unused_parameters for MoE models (a fake DDP
    records what it was given; one process, no collectives)."""
    import lightning.pytorch.strategies.ddp as lightning_ddp

    seen = {}

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__()
            seen.update(kwargs, ignored=set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())))
            self.module = module

    monkeypatch.setattr(lightning_ddp, "DistributedDataParallel", FakeDDP)
    for scenario, find_unused, ignored in [("moe", True, set()), ("dense", None, set()),
                                           ("memoryplus_sparse", None, {"model.pools.memory.values"})]:
        seen.clear()
        strategy = SparseDDPStrategy(parallel_devices=[torch.device("cpu")])
        strategy.model = build(SCENARIOS[scenario][0])
        strategy.configure_ddp()
        assert seen.get("find_unused_parameters") is find_unused and seen["ignored"] == ignored, (scenario, seen)
        assert strategy.row_sparse_sync is None  # a world of one: nothing to exchange


@pytest.mark.cuda
def test_row_sparse_exchange_on_nccl():
    """The exchange's collectives on CUDA tensors through NCCL (one GPU: a world of 1, the mean is the gradient)."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        table = torch.nn.Parameter(torch.zeros(1000, 16, device="cuda"))
        rows = torch.tensor([[5, 1, 5, 999]], device="cuda")
        table.grad = torch.sparse_coo_tensor(rows, torch.randn(4, 16, device="cuda"), table.shape)
        expected = table.grad.to_dense()
        stats = all_reduce_row_sparse_([table])
        torch.testing.assert_close(table.grad.to_dense(), expected)
        assert table.grad.is_coalesced() and stats.rows_local == [3]
    finally:
        dist.destroy_process_group()


def test_batchnorm_queries_run_as_sync_batchnorm():
    """``trainer.sync_batchnorm: true`` swaps PEER's query BatchNorm1d for SyncBatchNorm (global statistics under
    DDP); in one process both give the same output and running statistics."""
    args = {"layers": {1: {"block": "peer", "pool": "experts", "heads": 2, "knn": 4, "k_dim": 16,
                           "query_norm": "batchnorm"}},
            "pools": {"experts": {"kind": "experts", "n_keys": 8, "value_dim": 32}}}
    plain = build(args).model
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build(args).model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    tokens = torch.randint(0, 250, (3, 10))
    torch.testing.assert_close(synced(tokens), plain(tokens))
    torch.testing.assert_close(synced.state_dict(), plain.state_dict())


def test_the_cli_runs_ddp_as_sparse_ddp(tmp_path, monkeypatch):
    """``--trainer.strategy ddp`` (and the other DDP names) in the memzoo CLI build SparseDDPStrategy, so a config
    with sparse pools never gets a plain DDP; other strategies are left as given."""
    from pathlib import Path

    from memzoo.cli_lightning import build_from_config

    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "facts-memoryplus.yaml")
    for name, expected in [("ddp", SparseDDPStrategy), ("ddp_find_unused_parameters_true", SparseDDPStrategy)]:
        cli = build_from_config(["--config", config, "--trainer.strategy", name, "--trainer.devices", "1",
                                 "--trainer.accelerator", "cpu"])
        assert type(cli.trainer.strategy) is expected, (name, cli.trainer.strategy)
    assert cli.trainer.strategy.find_unused_parameters is True
    cli = build_from_config(["--config", config, "--trainer.devices", "1", "--trainer.accelerator", "cpu"])
    assert not isinstance(cli.trainer.strategy, SparseDDPStrategy)
