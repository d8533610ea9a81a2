"""LMDataModule: batch format, epoch sampling, predict prompts, vocabulary check and argument errors."""

import lightning as L
import pytest
import torch

from memzoo.data import FactsDataModule, LMDataModule
from memzoo.data.sampling import IGNORE_INDEX, EpochSampler, ShardSampler, collate_lm
from memzoo.data.windows import ChunkWindows, RandomWindows, lm_sample


def test_lm_data_module_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        LMDataModule(block_size=8, batch_size=2)


@pytest.mark.parametrize("name, value", [("block_size", 0), ("block_size", -3), ("batch_size", 0),
                                         ("block_size", 2.5), ("num_workers", -1)])
def test_bad_common_arguments(name, value):
    with pytest.raises(ValueError, match=f"{name} must be .*got {value}"):
        FactsDataModule(n_entities=10, **{name: value})


def test_hyperparameters_are_the_concrete_modules_arguments():
    dm = FactsDataModule(n_entities=12, block_size=16, recall_phrasing="held_out")
    assert dm.hparams["n_entities"] == 12 and dm.hparams["block_size"] == 16
    assert dm.hparams["recall_phrasing"] == "held_out" and dm.hparams["tokenizer"] == "byte"


def test_vocab_size_and_check_vocab():
    dm = FactsDataModule(n_entities=10)
    assert dm.vocab_size == 258
    dm.check_vocab(258)
    dm.check_vocab(512)
    with pytest.raises(ValueError, match="tokenizer has 258 ids but the model's vocab_size is 100"):
        dm.check_vocab(100)


def test_bad_tokenizer_spec_fails_at_construction():
    with pytest.raises(FileNotFoundError, match="tokenizer spec 'missing.json'"):
        FactsDataModule(n_entities=10, tokenizer="missing.json")


def test_collate_pads_inputs_with_pad_and_labels_with_ignore():
    samples = [
        {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([2, 3, 4])},
        {"input_ids": torch.tensor([5]), "labels": torch.tensor([IGNORE_INDEX])},
    ]
    batch = collate_lm(samples, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 9, 9]]
    assert batch["labels"].tolist() == [[2, 3, 4], [IGNORE_INDEX] * 3]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collate_of_equal_lengths_stacks_them_as_long():
    samples = [{"input_ids": torch.tensor([1, 2], dtype=torch.int32), "labels": torch.tensor([2, IGNORE_INDEX])},
               {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([6, 7])}]
    batch = collate_lm(samples, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2], [5, 6]]
    assert batch["labels"].tolist() == [[2, IGNORE_INDEX], [6, 7]]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_lm_sample_shifts_by_one_and_pads():
    sample = lm_sample(torch.tensor([10, 11, 12]).numpy(), block_size=4, pad_id=0)
    assert sample["input_ids"].tolist() == [10, 11, 0, 0]
    assert sample["labels"].tolist() == [11, 12, IGNORE_INDEX, IGNORE_INDEX]


def test_epoch_sampler_yields_each_epochs_ids():
    sampler = EpochSampler(5, seed=0, shuffle=False)
    assert list(sampler) == [0, 1, 2, 3, 4]
    assert list(sampler) == [5, 6, 7, 8, 9]  # a second iter() is the next epoch
    sampler.set_epoch(3)
    assert list(sampler) == [15, 16, 17, 18, 19]
    shuffled = EpochSampler(50, seed=0, shuffle=True)
    shuffled.set_epoch(2)
    epoch2 = list(shuffled)
    assert sorted(epoch2) == list(range(100, 150)) and epoch2 != sorted(epoch2)
    shuffled.set_epoch(2)
    assert list(shuffled) == epoch2  # deterministic per (seed, epoch)
    shuffled.set_epoch(3)
    assert [i - 150 for i in shuffled] != [i - 100 for i in epoch2]
    with pytest.raises(ValueError, match="at least one sample"):
        EpochSampler(0, seed=0, shuffle=True)


def test_epoch_sampler_deals_the_epoch_round_robin_over_ranks():
    shares = [EpochSampler(10, seed=0, shuffle=False, num_replicas=3, rank=r) for r in range(3)]
    for share in shares:
        share.set_epoch(1)
    assert [list(s) for s in shares] == [[10, 13, 16, 19], [11, 14, 17, 10], [12, 15, 18, 11]]
    assert len(shares[0]) == 4
    shuffled = [EpochSampler(10, seed=0, shuffle=True, num_replicas=2, rank=r) for r in range(2)]
    assert sorted(list(shuffled[0]) + list(shuffled[1])) == list(range(10))
    # the ranks' batches of B at step s are the global batch of W·B one process reads at step s
    single = EpochSampler(12, seed=3, shuffle=True)
    ranks = [EpochSampler(12, seed=3, shuffle=True, num_replicas=2, rank=r) for r in range(2)]
    order, per_rank = list(single), [list(r) for r in ranks]
    for step in range(3):
        together = per_rank[0][2 * step : 2 * step + 2] + per_rank[1][2 * step : 2 * step + 2]
        assert sorted(together) == sorted(order[4 * step : 4 * step + 4])


def test_shard_sampler_reads_every_sample_once_over_ranks():
    shares = [list(ShardSampler(7, num_replicas=3, rank=r)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(ShardSampler(7, 3, r)) for r in range(3)] == [3, 2, 2]


def test_window_datasets_errors():
    with pytest.raises(ValueError, match="at least 2 tokens, got 1"):
        ChunkWindows(torch.tensor([1]).numpy(), 4, 0)
    with pytest.raises(ValueError, match="block_size \\+ 1 = 5 tokens, got 4"):
        RandomWindows(torch.arange(4).numpy(), 4, 0, samples_per_epoch=3, seed=0)


def test_predict_prompts_start_after_eos():
    dm = FactsDataModule(n_entities=10, predict_prompts=["Hi", ""])
    batches = list(dm.predict_dataloader())
    assert [b["prompt"] for b in batches] == [["Hi"], [""]]
    assert batches[0]["input_ids"].tolist() == [[256, ord("H"), ord("i")]]
    assert batches[1]["input_ids"].shape == (1, 1)


def test_predict_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond\n", encoding="utf-8")
    dm = FactsDataModule(n_entities=10, predict_file=str(path))
    assert [b["prompt"][0] for b in dm.predict_dataloader()] == ["first prompt", "second"]


def test_predict_errors(tmp_path):
    with pytest.raises(ValueError, match="predict_prompts .* or data.predict_file"):
        FactsDataModule(n_entities=10).predict_dataloader()
    with pytest.raises(FileNotFoundError, match="predict_file 'nope.txt' not found"):
        FactsDataModule(n_entities=10, predict_file="nope.txt").predict_dataloader()
    with pytest.raises(ValueError, match="no prompts"):
        FactsDataModule(n_entities=10, predict_prompts=[]).predict_dataloader()


class _BigramLM(L.LightningModule):
    """The smallest language model: logits = table[input_id]; records what Lightning feeds it."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)
        self.seen = {"train": [], "val": []}

    def _loss(self, batch):
        logits = self.table(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch["input_ids"].clone())
        return self._loss(batch)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen["val"].append(dataloader_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trains_and_validates_on_both_loaders():
    dm = FactsDataModule(n_entities=20, block_size=16, batch_size=4, recall_samples=8, samples_per_epoch=8)
    model = _BigramLM(dm.vocab_size)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(model, dm)
    assert len(model.seen["train"]) == 4  # 2 epochs of 8 samples / 4
    epoch0, epoch1 = torch.cat(model.seen["train"][:2]), torch.cat(model.seen["train"][2:])
    stream = dm._train
    assert torch.equal(epoch0, torch.stack([stream[j]["input_ids"] for j in range(8)]))
    assert torch.equal(epoch1, torch.stack([stream[j]["input_ids"] for j in range(8, 16)]))  # epoch 1 moved on
    assert sorted(set(model.seen["val"])) == [0, 1]
