"""Memory parallelism and sharded checkpoints, with 2 gloo processes on the CPU against one process.

- a pool sharded 2 ways along value_dim (+ FSDP2 for the rest) gives the one-process logits, gradients and AdamW
  steps on the same global batch, and each rank holds half the table and half its optimizer state;
- through Lightning (MemoryParallelStrategy): 4 steps on 2 ranks end on one process's weights; a sharded checkpoint
  resumes exactly at the same world size, and reshards 2 → 1 and 1 → 2; ``memzoo export`` of the sharded folder
  writes the HF folder (same logits) of the one-process run; an incomplete folder fails naming the file;
- ``update: sparse`` pools: 4 Lightning steps (LazyAdam on the table shard, clipping) on 2 ranks sharded 2 ways,
  and on 2 replicas (memory_parallel 1, rows exchanged), end on one process's weights; a sharded checkpoint resumes
  exactly (weights and LazyAdam state), and reshards 2 → 1 and 1 → 2;
- bad sizes fail before any process group exists, naming the value and the fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import mp_workers
from memzoo.model.transformer import Transformer
from memzoo.parallel.checkpoint import ShardedCheckpointError, check_reshardable, check_sharded_checkpoint
from memzoo.parallel.memory_parallel import MemoryParallelError, check_memory_parallel, read_bytes_per_step

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process 4 steps; 2 ranks: 4 steps (+ exact resume, + 1 → 2 resume), then the sharded pool against one
    process without Lightning (asserted in the ranks); 2 → 1 resume here (see mp_workers)."""
    out = tmp_path_factory.mktemp("memory_parallel")
    mp_workers.one_process_reference(str(out))
    mp_workers.launch(mp_workers.two_rank_runs, 2, str(out), lightning=True)
    mp_workers.in_this_process(mp_workers.one_rank_from_sharded, str(out))
    return out


@pytest.mark.distributed
def test_sharded_pool_matches_one_process_and_halves_table_bytes(runs):
    """Asserted inside the 2 ranks (mp_workers.sharded_equals_unsharded, sharded_read_equals_weighted_gather):
    logits, every gradient, the clipped norm and 2 AdamW steps equal one process's on the whole batch; table +
    optimizer-state bytes per rank are half of one process's (also with activation checkpointing through
    memzoo.parallel.parallelize, which recomputes the sharded reads' collectives in backward; and, with
    memory_parallel 1, the replicated tables'
    gradients are summed over the data_parallel axis to the same result); the sharded read with unequal bag counts per rank
    equals weighted_gather of the whole table (outputs and both gradients, float64)."""
    assert (runs / "mp_step4.pt").is_file()  # the ranks got past their assertions


@pytest.mark.distributed
def test_planned_elements_equal_the_strategys_shards(runs):
    """Asserted inside the 2 ranks (mp_workers.planner_counts_equal_local_shards): the parameter elements
    memzoo.parallel.planning.plan_parallel reports per rank (total, dense weights, pool table) equal the local shards
    apply_memory_parallel makes, at memory_parallel 2 and 1, with an embedding that splits unevenly."""
    assert (runs / "mp_step4.pt").is_file()  # the ranks got past their assertions


@pytest.mark.distributed
def test_two_ranks_and_resharded_resumes_equal_one_process(runs):
    reference = torch.load(runs / "single_step4.pt")
    for name in ("mp_step4", "mp_from_single_step4", "single_from_mp_step4", "mp1_step4"):
        weights = torch.load(runs / f"{name}.pt")
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert sorted(p.name for p in (runs / "mp").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]  # no staging left
    shards = sorted(p.name for p in (runs / "mp" / "step=2.ckpt").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


@pytest.mark.distributed
def test_export_of_a_sharded_checkpoint_matches_the_one_process_export(runs, tmp_path):
    from memzoo.export.hf import export_checkpoint
    from memzoo.pretrained import load_pretrained

    sharded = export_checkpoint(runs / "mp" / "step=4.ckpt", tmp_path / "sharded", tokenizer="byte")
    single = export_checkpoint(runs / "single" / "step=4.ckpt", tmp_path / "single", tokenizer="byte")
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in single.iterdir())
    assert (sharded / "config.json").read_text() == (single / "config.json").read_text()
    tokens = torch.randint(0, 258, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            load_pretrained(sharded)(tokens), load_pretrained(single)(tokens), rtol=1e-5, atol=1e-5
        )


@pytest.mark.distributed
def test_incomplete_or_foreign_sharded_checkpoint_fails_naming_the_file(runs, tmp_path):
    import shutil

    folder = tmp_path / "step=2.ckpt"
    shutil.copytree(runs / "mp" / "step=2.ckpt", folder)
    check_sharded_checkpoint(folder)
    shard = folder / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ShardedCheckpointError, match=r"__1_0\.distcp.*truncated"):
        check_sharded_checkpoint(folder)
    shard.unlink()
    with pytest.raises(ShardedCheckpointError, match=r"shard .*__1_0\.distcp.* is missing"):
        check_sharded_checkpoint(folder)
    (folder / "meta.pt").unlink()
    with pytest.raises(ShardedCheckpointError, match=r"meta\.pt.* is missing"):
        check_sharded_checkpoint(folder)
    values = "model.pools.memory.values"
    check_reshardable(runs / "mp" / "step=2.ckpt", {values: (torch.Size([64, 12]), torch.float32)})
    with pytest.raises(ShardedCheckpointError, match=r"cannot be resharded.*'model.pools.memory.values'.*\(64, 12\).*\(64, 16\)"):
        check_reshardable(runs / "mp" / "step=2.ckpt", {values: (torch.Size([64, 16]), torch.float32)})


@pytest.fixture(scope="module")
def sparse_runs(tmp_path_factory):
    """update: sparse: one process 4 steps; 2 ranks: memory_parallel 2 (+ exact resume), memory_parallel 1, 1 → 2,
    and the Lightning-less checks asserted in the ranks (see mp_workers.sparse_two_rank_runs); 2 → 1 here."""
    out = tmp_path_factory.mktemp("memory_parallel_sparse")
    mp_workers.sparse_one_process_reference(str(out))
    mp_workers.launch(mp_workers.sparse_two_rank_runs, 2, str(out), lightning=True)
    mp_workers.in_this_process(mp_workers.sparse_one_rank_from_sharded, str(out))
    return out


@pytest.mark.distributed
def test_sparse_pool_two_ranks_and_resharded_resumes_equal_one_process(sparse_runs):
    """Asserted inside the ranks: the resumed run ends on the straight run's weights and LazyAdam state, bit for
    bit; the table shard is a (64, 6) DTensor with DTensor moments and a whole per-row step; Lightning-less, the
    shard gradients are row-sparse with the reference's rows and columns, clipping leaves them alone, and LazyAdam
    and RowwiseAdagrad steps equal one process's; the sparse sharded read touches no padding row. Here: both
    2-rank runs and the resharded resumes (2 → 1 and 1 → 2, LazyAdam state included) end on one process's
    weights, and the table did train."""
    reference = torch.load(sparse_runs / "sparse_single_step4.pt")
    initial = torch.load(sparse_runs / "sparse_init.pt")
    values = "model.pools.memory.values"
    moved = (reference[values] - initial[values]).abs().sum(dim=1)
    assert 0 < int((moved > 0).sum()) < 64  # some rows trained, the unread ones untouched
    for name in ("sparse_mp_step4", "sparse_mp1_step4", "sparse_single_from_mp_step4", "sparse_mp_from_single_step4"):
        weights = torch.load(sparse_runs / f"{name}.pt")
        assert weights.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    shards = sorted(p.name for p in (sparse_runs / "sparse_mp" / "step=2.ckpt").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]


# ----------------------------------------------------------------------------------------------- bad input


def _model(**pool):
    config = {**mp_workers.MODEL, "pools": {"memory": {**mp_workers.MODEL["pools"]["memory"], **pool}}}
    return Transformer(**config)


@pytest.mark.parametrize(
    ("memory_parallel", "world_size", "pool", "message"),
    [
        (5, 10, {}, r"memory_parallel=5 does not divide value_dim=12 of pool 'pools.memory'.*\[1, 2\]"),
        (3, 4, {}, r"memory_parallel=3 does not divide the world size 4.*\[1, 2, 4\]"),
        (5, 10, {"update": "sparse"}, r"memory_parallel=5 does not divide value_dim=12 of pool 'pools.memory'"),
        (0, 2, {}, r"memory_parallel must be a positive int, got 0"),
    ],
)
def test_bad_memory_parallel_sizes_fail_with_value_and_fix(memory_parallel, world_size, pool, message):
    with pytest.raises(MemoryParallelError, match=message):
        check_memory_parallel(_model(**pool), memory_parallel, world_size)


def test_expert_pools_and_strategy_argument_are_checked():
    from memzoo.parallel.strategy import MemoryParallelStrategy

    peer = Transformer(
        vocab_size=32, dim=16, n_layers=1, n_heads=2, block="peer",
        block_args={"pool": "experts", "heads": 2, "knn": 2, "k_dim": 8, "query_norm": "none"},
        pools={"experts": {"kind": "experts", "n_keys": 4, "value_dim": 16}},
    )
    for memory_parallel in (1, 2):  # tables become DTensors at 1 too, which PEER's reads cannot take
        with pytest.raises(MemoryParallelError, match=r"pool 'pools.experts' has kind 'experts'.*ddp strategy"):
            check_memory_parallel(peer, memory_parallel, 2)
    with pytest.raises(MemoryParallelError, match=r"memory_parallel must be a positive int, got True"):
        MemoryParallelStrategy(True)


def test_shipped_memory_parallel_config_builds_its_strategy():
    from memzoo.parallel.strategy import MemoryParallelStrategy

    config = yaml.safe_load((ROOT / "configs" / "facts-memoryplus-mp2.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "memzoo.parallel.strategy.MemoryParallelStrategy"
    built = MemoryParallelStrategy(**strategy["init_args"])
    assert built.memory_parallel == 2 and config["trainer"]["devices"] % 2 == 0
    architecture = config["model"]["init_args"]["architecture"]
    check_memory_parallel(Transformer(**architecture), built.memory_parallel, config["trainer"]["devices"])
    one_process = yaml.safe_load((ROOT / "configs" / "facts-memoryplus.yaml").read_text())
    assert architecture["pools"] == one_process["model"]["init_args"]["architecture"]["pools"]  # same optimizer
    assert architecture["pools"]["memory"]["update"] == "sparse"


def test_bytes_per_read_follow_the_formula():
    # 2 ranks, 1024 bags of 4·32 rows, value_dim 1024, fp32: (M-1)·B·(K·(8+2·4) + 2·(D/M)·4)
    assert read_bytes_per_step(1024, 128, 1024, 2) == 1024 * (128 * 16 + 2 * 512 * 4)
    assert read_bytes_per_step(1024, 128, 1024, 1) == 0


def test_a_sharded_folder_needs_the_memory_parallel_strategy(tmp_path):
    from memzoo.parallel.checkpoint import check_strategy_reads_sharded

    folder = tmp_path / "last.ckpt"
    with pytest.raises(ShardedCheckpointError, match=r"sharded .* strategy 'ddp' cannot read.*MemoryParallelStrategy"):
        check_strategy_reads_sharded(folder, "ddp")
    with pytest.raises(ShardedCheckpointError, match=r"strategy 'auto' cannot read.*memzoo export --ckpt"):
        check_strategy_reads_sharded(folder, "auto")
    check_strategy_reads_sharded(folder, {"class_path": "memzoo.parallel.strategy.MemoryParallelStrategy"})


def test_fit_with_a_memory_parallel_size_above_the_world_size_fails_before_training(tmp_path):
    """Trainer.fit on 1 device with memory_parallel 2: the strategy's size check fails before any process group
    exists or any step runs."""
    trainer = mp_workers.trainer(4, 2, devices=1)
    model = mp_workers.language_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(MemoryParallelError, match=r"memory_parallel=2 does not divide the world size 1.*\[1\]"):
        trainer.fit(model, datamodule=mp_workers.token_data(4))
    assert trainer.global_step == 0 and not torch.distributed.is_initialized()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
