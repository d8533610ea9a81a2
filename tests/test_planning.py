"""Planning past this machine: per-rank bytes and communication per step, on hand-computed cases and the paper's
settings in configs/scale/ (parsed and planned on the meta device, never trained)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memzoo.accounting import plan_config
from memzoo.cli import CommandError, main
from memzoo.model.config import ModelConfig
from memzoo.model.transformer import Transformer
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


def test_hand_computed_sparse_pool_on_two_by_two_mesh():
    model = tiny("sparse")
    plan = plan_parallel(model, world_size=4, memory_parallel=2, tokens_per_rank_step=1)
    (pool,) = plan.pools
    assert plan.data_parallel == 2 and pool.value_dim_per_rank == 4
    assert pool.rows_touched_per_step == 8  # 1 token x 2 layers x 2 heads x knn 2
    assert pool.parameter_bytes == 16 * 4 * 4  # all 16 rows, 4 of 8 columns, fp32
    assert pool.gradient_bytes == 16 * (4 * 4 + 8)  # min(16, 2 replicas x 8) rows with their int64 index
    assert pool.optimizer_bytes == 2 * 16 * 4 * 4 + 16 * 8  # LazyAdam moments + per-row step
    assert pool.row_exchange_bytes == 1 * 8 * (8 + 4 * 4)  # (D - 1) x U x (index + row)
    assert pool.dense_all_reduce_bytes == 2 * 1 * 16 * 4 * 4 // 2  # 2 (D - 1) / D x table shard
    assert pool.communication_bytes == pool.row_exchange_bytes
    dense = sum(p.numel() for p in model.parameters()) - 16 * 8
    assert plan.dense_parameters == dense
    assert (plan.dense_parameter_bytes, plan.dense_optimizer_bytes) == (4 * dense, 8 * dense)
    assert plan.dense_all_reduce_bytes == 4 * dense  # 2 (D - 1) / D = 1 at D = 2
    assert plan.total_bytes == 4 * dense * 4 + 256 + 384 + 640


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


def test_bad_mesh_sizes_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"memory_parallel=3 does not divide world_size=4.*divisor of 4"):
        plan_parallel(tiny("sparse"), world_size=4, memory_parallel=3)
    with pytest.raises(ValueError, match=r"does not divide value_dim=8 of pool 'pools.memory'.*\[1, 2\]"):
        plan_parallel(tiny("sparse"), world_size=6, memory_parallel=3)
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        plan_parallel(tiny("sparse"), world_size=0)


@pytest.mark.parametrize("config", SCALE, ids=[c.name for c in SCALE])
def test_scale_configs_parse_and_plan_without_allocating(config):
    plan = plan_config(str(config), world_size=64, memory_parallel=64)
    (pool,) = plan.pools
    if "1.3b" in config.name:  # 1024² values of width 2048, 3 layers x 4 heads x knn 32 per token
        assert (pool.rows, pool.value_dim) == (1024**2, 2048)
        assert pool.rows_touched_per_step == min(1024**2, 4 * 2048 * 3 * 4 * 32)
        assert 1.5e9 < plan.dense_parameters < 1.8e9
    else:  # 64M values of width 4096: 1 TiB in fp32, 16 GiB per rank over 64
        assert (pool.rows, pool.value_dim) == (8192**2, 4096)
        assert pool.parameter_bytes == 16 * GIB
        assert 7.5e9 < plan.dense_parameters < 8.6e9  # multi-head attention (no GQA): a little over 8B
    assert pool.parameter_bytes == pool.rows * pool.value_dim * 4 // 64


def test_summary_verb_prints_the_plan(capsys):
    config = str(ROOT / "configs" / "scale" / "memoryplus-1.3b.yaml")
    main(["summary", "--config", config, "--world-size", "8", "--memory-parallel", "4"])
    out = capsys.readouterr().out
    assert "8 ranks = 2 data-parallel x 4 memory-parallel" in out
    assert "sparse, value_dim/4 = 512" in out and "1,048,576" in out
    with pytest.raises(CommandError, match="summary: .*does not divide world_size=8"):
        main(["summary", "--config", config, "--world-size", "8", "--memory-parallel", "3"])

