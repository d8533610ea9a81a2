"""Sparse memory finetuning: slot statistics, TF-IDF / KL rankings against hand-computed values, a step that leaves
every row outside the top t bit-identical, the slot-stats verb and the YAML callback end to end, bad input."""

import math
import sys
from pathlib import Path

import pytest
import torch

from memzoo.cli import main
from memzoo.model.transformer import Transformer
from memzoo.training.slot_stats import (
    PoolSlotStats,
    SlotCounter,
    SlotStats,
    SlotStatsError,
    collect_slot_stats,
    slot_scores,
    top_slots,
)
from memzoo.training.sparse_finetune import SparseMemoryFinetuning

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import write_config  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memzoo"])


MEMORY = {"block": "memory_plus", "pool": "mem", "heads": 2, "knn": 3}


def memory_model(n_keys=6):
    torch.manual_seed(0)
    return Transformer(vocab_size=30, dim=16, n_layers=2, n_heads=2, max_seq_len=16, block_args={"hidden": 16},
                       layers={0: MEMORY, 1: MEMORY}, pools={"mem": {"n_keys": n_keys, "value_dim": 16}})


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 30, (4, 10), generator=g)} for _ in range(n)]


def save_stats(path, model, data=None):
    torch.save(collect_slot_stats(model, data or batches()).to_dict(), path)
    return str(path)


def test_tfidf_and_kl_rankings_match_hand_computed_values():
    tf = torch.tensor([0, 3, 1, 2, 2])
    background = PoolSlotStats(counts=torch.tensor([5, 9, 0, 1, 0]), doc_freq=torch.tensor([4, 3, 0, 1, 0]))
    scores = slot_scores(tf, background, n_docs=4, rank="tfidf")
    expected = [0.0, 3 * math.log(5 / 4), 1 * math.log(5 / 1), 2 * math.log(5 / 2), 2 * math.log(5 / 1)]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    # slot 4 (2·ln5 = 3.22) > slot 3 (2·ln2.5 = 1.83) > slot 2 (ln5 = 1.61) > slot 1 (3·ln1.25 = 0.67)
    assert top_slots(tf, scores, 2).tolist() == [3, 4]
    assert top_slots(tf, scores, 3).tolist() == [2, 3, 4]
    assert top_slots(tf, scores, 10).tolist() == [1, 2, 3, 4]  # fewer read than t: all read slots
    # idf_power 2: tf · idf²; slot 2 (read once, never in the background: ln²5 = 2.59) now beats slot 3 (2·ln²2.5 = 1.68)
    squared = slot_scores(tf, background, n_docs=4, rank="tfidf", idf_power=2.0)
    torch.testing.assert_close(squared, torch.tensor([0.0, 3 * math.log(5 / 4) ** 2, math.log(5) ** 2,
                                                      2 * math.log(5 / 2) ** 2, 2 * math.log(5) ** 2],
                                                     dtype=torch.float64))
    assert top_slots(tf, squared, 2).tolist() == [2, 4]
    kl = slot_scores(tf, background, n_docs=4, rank="kl")
    q = [(c + 1) / (15 + 5) for c in (5, 9, 0, 1, 0)]
    p = [t / 8 for t in (0, 3, 1, 2, 2)]
    torch.testing.assert_close(kl, torch.tensor([pi * math.log(pi / qi) if pi else 0.0 for pi, qi in zip(p, q)],
                                                dtype=torch.float64))
    assert top_slots(tf, kl, 1).tolist() == [4]
    # ties go to the lower slot index
    assert top_slots(torch.tensor([1, 1, 1]), torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64), 2).tolist() == [0, 1]


def test_slot_counter_counts_lookups_and_documents_once_per_document():
    counter = SlotCounter(5)
    counter.update(torch.tensor([[[0, 1], [1, 1]], [[2, 2], [2, 2]]]), None)  # layer 1: doc 0 reads 0,1; doc 1: 2
    counter.update(torch.tensor([[[1, 3]], [[4, 4]]]), None)  # layer 2, same batch
    counter.end_batch()
    assert counter.counts.tolist() == [1, 4, 4, 1, 2]
    assert counter.doc_freq.tolist() == [1, 1, 1, 1, 1] and counter.n_docs == 2


def test_counting_only_loss_positions():
    counter = SlotCounter(5, track_docs=False)
    counter.position_mask = torch.tensor([[True, False], [False, True]])
    counter.update(torch.tensor([[[0, 1], [2, 2]], [[3, 3], [4, 1]]]), None)  # (B=2, T=2, K=2)
    assert counter.counts.tolist() == [1, 2, 0, 0, 1]
    counter.position_mask = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not match"):
        counter.update(torch.zeros(2, 2, 2, dtype=torch.long), None)
    model = memory_model()
    smf = SparseMemoryFinetuning("unused.pt", top_t=4, count_loss_positions_only=True)
    smf.pools, smf.counters = {"pools.mem": model.pools["mem"]}, {"pools.mem": SlotCounter(36, track_docs=False)}
    with pytest.raises(ValueError, match="needs the batch's labels"):
        smf.attach()
    smf.attach(torch.tensor([[-100, 5]]))
    assert smf.counters["pools.mem"].position_mask.tolist() == [[False, True]]
    smf.detach()


def test_collect_slot_stats_counts_every_lookup():
    model = memory_model()
    stats = collect_slot_stats(model, batches(3))
    pool = stats.pools["pools.mem"]
    assert stats.n_docs == 12 and stats.n_tokens == 120
    assert int(pool.counts.sum()) == 120 * 2 * 2 * 3  # tokens × layers × heads × knn
    assert bool((pool.doc_freq <= 12).all()) and bool(((pool.counts > 0) == (pool.doc_freq > 0)).all())


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_step_changes_only_the_top_t_rows(tmp_path, optimizer):
    model = memory_model()
    smf = SparseMemoryFinetuning(save_stats(tmp_path / "s.pt", model), top_t=5, rank="tfidf", optimizer=optimizer,
                                 lr=0.1)
    smf.prepare(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["pools.mem.values"]
    opt = smf.build_optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(2):  # the second step runs with optimizer state from the first
        smf.attach()
        model(batches(1, seed=10 + step)[0]["input_ids"]).logsumexp(-1).mean().backward()
        smf.detach()
        read = smf.counters["pools.mem"].counts > 0
        selected = smf.select_and_mask()["pools.mem"]
        assert selected.numel() == 5 and bool(read[selected].all()) and int(read.sum()) > 5
        prev = model.pools["mem"].values.detach().clone()
        grad = model.pools["mem"].values.grad.to_dense()
        opt.step()
        if optimizer == "sgd":  # plain reference: p - lr * g on the selected rows
            torch.testing.assert_close(model.pools["mem"].values.detach()[selected],
                                       prev[selected] - 0.1 * grad[selected], rtol=0, atol=1e-7)
        opt.zero_grad()
        values = model.pools["mem"].values.detach()
        outside = torch.ones(values.shape[0], dtype=torch.bool)
        outside[selected] = False
        assert torch.equal(values[outside], prev[outside])  # bit-identical
        assert not torch.equal(values[selected], prev[selected])
    for key, value in model.state_dict().items():
        if key != "pools.mem.values":
            assert torch.equal(value, before[key]), key


def test_bad_stats_and_top_t_fail_clearly(tmp_path):
    small, big = memory_model(n_keys=4), memory_model(n_keys=6)
    stats = save_stats(tmp_path / "small.pt", small)
    with pytest.raises(SlotStatsError, match="have 16 slots but the model's pool has 36"):
        SparseMemoryFinetuning(stats, top_t=4).prepare(big)
    with pytest.raises(SlotStatsError, match="top_t=17 is larger than pool 'pools.mem' \\(16 slots\\)"):
        SparseMemoryFinetuning(stats, top_t=17).prepare(small)
    with pytest.raises(SlotStatsError, match="top_t must be a positive int"):
        SparseMemoryFinetuning(stats, top_t=0)
    with pytest.raises(SlotStatsError, match="rank must be one of"):
        SparseMemoryFinetuning(stats, rank="bm25")
    with pytest.raises(SlotStatsError, match="idf_power must be > 0, got 0"):
        SparseMemoryFinetuning(str(tmp_path / "s.pt"), idf_power=0)
    with pytest.raises(SlotStatsError, match="idf_power applies to rank: tfidf only"):
        SparseMemoryFinetuning(str(tmp_path / "s.pt"), rank="kl", idf_power=2.0)
    with pytest.raises(SlotStatsError, match="do not exist"):
        SparseMemoryFinetuning(str(tmp_path / "none.pt")).prepare(small)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(SlotStatsError, match="not a memzoo slot-statistics file"):
        SlotStats.load(tmp_path / "other.pt")
    with pytest.raises(SlotStatsError, match="pools \\['pools.nope'\\] are not in the model"):
        SparseMemoryFinetuning(stats, pools=["pools.nope"]).prepare(small)


MEMORY_YAML = """layers:
  1: {block: memory_plus, pool: mem, heads: 2, knn: 4}
pools:
  mem: {n_keys: 8, value_dim: 32}"""


def test_slot_stats_verb_and_yaml_finetuning_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ lands here
    base = main(["fit", "--config", str(write_config(tmp_path, steps=4, val_every=4, architecture_extra=MEMORY_YAML))])
    ckpt = Path(base.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    config = str(write_config(tmp_path, steps=3, val_every=3, architecture_extra=MEMORY_YAML))
    stats = main(["slot-stats", "--config", config, "--ckpt_path", str(ckpt), "--out", str(tmp_path / "bg.pt"),
                  "--max_batches", "3"])
    assert stats.n_docs == 24 and (tmp_path / "bg.pt").is_file()
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    callback = ("--trainer.callbacks+=memzoo.training.sparse_finetune.SparseMemoryFinetuning "
                f"--trainer.callbacks.stats={tmp_path / 'bg.pt'} --trainer.callbacks.top_t=6 "
                "--trainer.callbacks.lr=0.5").split()
    tuned = main(["fit", "--config", config, "--model.init_args.init_from", str(ckpt),
                  "--model.init_args.warmup_steps", "0", *callback])
    after = {f"model.{k}": v for k, v in tuned.model.model.state_dict().items()}
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed == ["model.pools.mem.values"]
    rows_changed = int((after["model.pools.mem.values"] != before["model.pools.mem.values"]).any(1).sum())
    assert 0 < rows_changed <= 3 * 6
