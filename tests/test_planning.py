"""Planning past this machine: per-rank bytes and communication per step, on hand-computed cases and the paper's
settings in configs/scale/ (parsed and planned on the meta device, never trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memzoo.cli import CommandError, main
from memzoo.config_accounting import plan_config
from memzoo.model.config import ModelConfig
from memzoo.model.transformer import Transformer
from memzoo.parallel.memory_parallel import MemoryParallelError, read_bytes_per_step
from memzoo.parallel.planning import plan_parallel

ROOT = Path(__file__).resolve().parents[1]
SCALE = sorted((ROOT / "configs" / "scale").glob("*.yaml"))
GIB = 2**30


def tiny(update: str) -> Transformer:
    """Two memory layers (2 heads × knn 2 each: 8 rows read per token) sharing a 16-row, width-8 pool."""
    memory = {"block": "product_key_memory", "pool": "memory", "heads": 2, "knn": 2, "k_dim": 4}
    return Transformer(ModelConfig(vocab_size=16, dim=8, n_layers=2, n_heads=2, max_seq_len=8,
                                   layers={0: memory, 1: memory},
                                   pools={"memory": {"n_keys": 4, "value_dim": 8, "update": update}}))


def test_hand_computed_sparse_pool_under_ddp():
    model = tiny("sparse")
    plan = plan_parallel(model, world_size=2, tokens_per_rank_step=1)
    (pool,) = plan.pools
    assert plan.strategy == "ddp" and plan.data_parallel == 2 and pool.value_dim_per_rank == 8
    assert pool.rows_touched_per_step == 8  # 1 token x 2 layers x 2 heads x knn 2
    assert pool.parameter_bytes == 16 * 8 * 4  # all 16 rows, all 8 columns, fp32
    assert pool.gradient_bytes == 16 * (8 * 4 + 8)  # min(16, 2 replicas x 8) rows with their int64 index
    assert pool.optimizer_bytes == 2 * 16 * 8 * 4 + 16 * 8  # LazyAdam moments + per-row step
    assert pool.row_exchange_bytes == 1 * 8 * (8 + 8 * 4)  # (W - 1) x U x (index + row)
    assert pool.dense_all_reduce_bytes == 2 * 1 * 16 * 8 * 4 // 2  # 2 (W - 1) / W x table
    assert pool.communication_bytes == pool.row_exchange_bytes
    dense = sum(p.numel() for p in model.parameters()) - 16 * 8
    assert plan.dense_parameters == plan.dense_parameter_elements == dense
    assert (plan.dense_parameter_bytes, plan.dense_optimizer_bytes) == (4 * dense, 8 * dense)
    assert plan.dense_all_reduce_bytes == 4 * dense and plan.dense_gather_scatter_bytes == 0
    assert plan.total_bytes == 4 * dense * 4 + 512 + 640 + 1152
    assert plan.rank_parameter_elements == [dense + 128] * 2


def test_hand_computed_memory_parallel_layout_on_two_by_two_mesh():
    """MemoryParallelStrategy on 4 ranks, pools 2 ways: dense weights FSDP2-sharded over all 4 ranks (torch.chunk
    rows, the root's all-gathered once and each layer's twice per micro-batch, all reduce-scattered), the table's
    columns split in 2, its gradient all-reduced over the 2 replicas once per step (not per read or micro-batch),
    and the lookups' collectives."""
    model = tiny("dense")
    plan = plan_parallel(model, world_size=4, memory_parallel=2, tokens_per_rank_step=1, micro_batches=1)
    (pool,) = plan.pools
    assert plan.strategy == "memory_parallel" and plan.data_parallel == 2
    dense = {name: p for name, p in model.named_parameters() if name != "pools.memory.values"}
    chunks = [torch.chunk(torch.empty(p.shape), 4, 0) for p in dense.values()]  # FSDP2's dim-0 split
    on_rank = [sum(c[r].numel() for c in chunks if r < len(c)) for r in range(4)]
    assert plan.dense_parameter_elements == on_rank[0] and plan.dense_parameter_bytes == 4 * on_rank[0]
    assert plan.rank_parameter_elements == [n + 16 * 4 for n in on_rank]
    padded = {name: -(-p.shape[0] // 4) * p[0].numel() for name, p in dense.items()}
    layers = sum(v for k, v in padded.items() if k.startswith("layers."))
    root = sum(v for k, v in padded.items() if not k.startswith("layers."))
    # layers: 2 all-gathers + 1 reduce-scatter, root: 1 + 1; each rank sends (W - 1) = 3 padded shards per collective
    assert plan.dense_gather_scatter_bytes == (3 * layers + 2 * root) * 3 * 4
    assert (pool.parameter_bytes, pool.gradient_bytes, pool.optimizer_bytes) == (256, 256, 512)
    assert pool.dense_all_reduce_bytes == 2 * 1 * 16 * 4 * 4 // 2  # one ring all-reduce over 2 replicas (2 reads)
    assert pool.lookup_bytes == 2 * read_bytes_per_step(1, 4, 8, 2) == 2 * (4 * (8 + 8) + 2 * 4 * 4)
    assert pool.communication_bytes == pool.dense_all_reduce_bytes + pool.lookup_bytes
    assert plan.communication_bytes == plan.dense_gather_scatter_bytes + pool.communication_bytes
    accumulated = plan_parallel(model, world_size=4, memory_parallel=2, tokens_per_rank_step=2, micro_batches=2)
    assert accumulated.dense_gather_scatter_bytes == 2 * plan.dense_gather_scatter_bytes
    assert accumulated.pools[0].lookup_bytes == 2 * pool.lookup_bytes
    assert accumulated.pools[0].dense_all_reduce_bytes == pool.dense_all_reduce_bytes  # once per step


def test_hand_computed_sparse_pool_under_memory_parallel():
    """4 ranks = 2 replicas x 2 shards, update: sparse: the shard (all 16 rows, 4 columns) has a row-sparse
    gradient of the rows its group read, exchanged over the 2 replicas once per step; LazyAdam's moments are
    sharded with the table, its per-row step is whole on every rank; RowwiseAdagrad adds the all-reduce of the
    row sums within the group."""
    plan = plan_parallel(tiny("sparse"), world_size=4, memory_parallel=2, tokens_per_rank_step=1)
    (pool,) = plan.pools
    assert pool.layout == "sparse, value_dim/2 = 4" and pool.rows_touched_per_step == 8
    assert pool.parameter_bytes == 16 * 4 * 4
    assert pool.gradient_bytes == 16 * (4 * 4 + 8)  # min(16, 4 ranks x 8) rows of 4 columns + their index
    assert pool.optimizer_bytes == 2 * 16 * 4 * 4 + 16 * 8
    assert pool.row_exchange_bytes == 1 * 16 * (8 + 4 * 4)  # (dp - 1) x min(16, M x U) x (index + shard row)
    assert pool.communication_bytes == pool.row_exchange_bytes + pool.lookup_bytes
    adagrad = plan_parallel(tiny("sparse"), world_size=4, memory_parallel=2, tokens_per_rank_step=1,
                            sparse_optimizer="rowwise_adagrad").pools[0]
    assert adagrad.optimizer_bytes == 16 * 4
    assert adagrad.row_exchange_bytes == pool.row_exchange_bytes + 2 * 1 * 16 * 4 // 2  # + ring all-reduce (U,)
    one_group = plan_parallel(tiny("sparse"), world_size=2, memory_parallel=2, tokens_per_rank_step=1).pools[0]
    assert one_group.row_exchange_bytes == 0  # no replicas: nothing to exchange


def test_the_planner_refuses_what_the_strategy_refuses():
    peer = Transformer(ModelConfig(
        vocab_size=16, dim=8, n_layers=1, n_heads=2, max_seq_len=8, block="peer",
        block_args={"pool": "experts", "heads": 2, "knn": 2, "k_dim": 4, "query_norm": "none"},
        pools={"experts": {"kind": "experts", "n_keys": 4, "value_dim": 8}},
    ))
    for memory_parallel in (1, 2):
        with pytest.raises(MemoryParallelError, match=r"pool 'pools.experts' has kind 'experts'.*ddp strategy"):
            plan_parallel(peer, world_size=2, memory_parallel=memory_parallel, strategy="memory_parallel")
    with pytest.raises(ValueError, match=r"ddp strategy replicates every pool; memory_parallel=2 needs"):
        plan_parallel(tiny("dense"), world_size=2, memory_parallel=2, strategy="ddp")


def test_hand_computed_dense_pool_and_rowwise_adagrad():
    plan = plan_parallel(tiny("dense"), world_size=2, tokens_per_rank_step=1)
    (pool,) = plan.pools
    assert (pool.parameter_bytes, pool.gradient_bytes, pool.optimizer_bytes) == (512, 512, 1024)
    assert pool.communication_bytes == pool.dense_all_reduce_bytes == 512
    sparse = plan_parallel(tiny("sparse"), world_size=2, tokens_per_rank_step=1, sparse_optimizer="rowwise_adagrad")
    assert sparse.pools[0].optimizer_bytes == 16 * 4  # one accumulator per row
    # sharding halves a pool's table, gradient and optimizer state per rank at M = 2
    half = plan_parallel(tiny("dense"), world_size=2, memory_parallel=2, tokens_per_rank_step=1).pools[0]
    assert (half.parameter_bytes, half.gradient_bytes, half.optimizer_bytes) == (256, 256, 512)
    assert half.layout == "dense, value_dim/2 = 4"


def test_bad_mesh_sizes_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"memory_parallel=3 does not divide world_size=4.*divisor of 4"):
        plan_parallel(tiny("sparse"), world_size=4, memory_parallel=3)
    with pytest.raises(ValueError, match=r"does not divide value_dim=8 of pool 'pools.memory'.*\[1, 2\]"):
        plan_parallel(tiny("sparse"), world_size=6, memory_parallel=3)
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        plan_parallel(tiny("sparse"), world_size=0)


@pytest.mark.parametrize("config", SCALE, ids=[c.name for c in SCALE])
def test_scale_configs_parse_and_plan_without_allocating(config):
    if "1.3b" in config.name:  # 1024² values of width 2048, 3 layers x 4 heads x knn 32 per token, sparse: ddp
        plan = plan_config(str(config), world_size=8)
        (pool,) = plan.pools
        assert plan.strategy == "ddp" and (pool.rows, pool.value_dim, pool.update) == (1024**2, 2048, "sparse")
        assert pool.rows_touched_per_step == min(1024**2, 4 * 2048 * 3 * 4 * 32)
        assert pool.parameter_bytes == pool.rows * pool.value_dim * 4
        assert 1.5e9 < plan.dense_parameters < 1.8e9
        sharded = plan_config(str(config), world_size=8, memory_parallel=4).pools[0]
        assert sharded.layout == "sparse, value_dim/4 = 512" and sharded.parameter_bytes == pool.parameter_bytes // 4
    else:  # 64M values of width 4096: 1 TiB in fp32, 16 GiB per rank over 64; dense weights FSDP2 over 64
        plan = plan_config(str(config), world_size=64, memory_parallel=64)
        (pool,) = plan.pools
        assert plan.strategy == "memory_parallel" and (pool.rows, pool.value_dim) == (8192**2, 4096)
        assert pool.parameter_bytes == 16 * GIB == pool.rows * pool.value_dim * 4 // 64
        assert 7.5e9 < plan.dense_parameters < 8.6e9  # multi-head attention (no GQA): a little over 8B
        # FSDP2 splits dim 0: each memory layer's router.sub_keys (4, 2, 8192, 256) lands on ranks 0-3 only, one
        # (2, 8192, 256) row each, so rank 0 holds 3 such rows more than rank 63
        sub_keys_row = 2 * 8192 * 256
        assert plan.dense_parameter_bytes == plan.rank_parameter_elements[0] * 4 - pool.parameter_bytes
        assert plan.dense_parameter_bytes - 3 * sub_keys_row * 4 < plan.dense_parameters * 4 / 64
        assert plan.rank_parameter_elements[0] - plan.rank_parameter_elements[-1] >= 3 * sub_keys_row
        assert plan.dense_gather_scatter_bytes > 3 * plan.dense_parameters * 4 * 63 / 64 * 0.95


def test_summary_verb_prints_the_plan(capsys):
    config = str(ROOT / "configs" / "scale" / "memoryplus-8b-64m.yaml")
    main(["summary", "--config", config, "--world-size", "8", "--memory-parallel", "4"])
    out = capsys.readouterr().out
    assert "8 ranks = 2 data-parallel x 4 memory-parallel, MemoryParallelStrategy" in out
    assert "dense, value_dim/4 = 1024" in out and "FSDP2 over 8 ranks" in out
    main(["summary", "--config", config, "--world-size", "8", "--strategy", "ddp"])
    assert "8 ranks, ddp strategy" in capsys.readouterr().out
    with pytest.raises(CommandError, match="summary: --memory-parallel 3 does not divide --world-size 8"):
        main(["summary", "--config", config, "--world-size", "8", "--memory-parallel", "3"])
    sparse = str(ROOT / "configs" / "scale" / "memoryplus-1.3b.yaml")
    main(["summary", "--config", sparse, "--world-size", "8", "--memory-parallel", "4"])
    assert "sparse, value_dim/4 = 512" in capsys.readouterr().out


def test_a_configured_memory_parallel_strategy_is_planned(tmp_path):
    config = ROOT / "configs" / "facts-memoryplus-mp2.yaml"
    plan = plan_config(str(config), world_size=2)
    assert plan.strategy == "memory_parallel" and plan.memory_parallel == 2
    with pytest.raises(ValueError, match="memory_parallel must be a positive int, got 0"):  # not read as 1
        plan_config(str(config), world_size=2, memory_parallel=0)
