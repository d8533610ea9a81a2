"""The base of every memzoo data module: a tokenizer, token batches, and the loaders Lightning asks for.

Batches are dicts of LongTensors ``input_ids (B, T)`` and ``labels (B, T)``; ``labels[b, t]`` is the token that
should follow ``input_ids[b, :t + 1]``, and ``-100`` marks positions without a target.

``val_dataloader()`` returns a list: index 0 holds language-model batches; a module with fact probes
(:attr:`LMDataModule.has_recall`) adds index 1, *recall* batches whose labels are ``-100`` everywhere except on the
answer tokens, so greedy exact-match recall is "every labelled position's argmax is right", read off one
teacher-forced forward pass (:class:`memzoo.training.metrics.FactRecall`).

``predict_dataloader()`` yields one prompt at a time, ``{"input_ids": (1, P), "prompt": [str]}``. A prompt starts
as documents do, after an eos token, so ``input_ids[0, 0]`` is eos and an empty prompt asks for a new document.
"""

from __future__ import annotations

import abc
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from memzoo.data.sampling import EpochSampler, ShardSampler, collate_lm
from memzoo.data.tokenizers import Tokenizer, build_tokenizer


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PromptDataset(Dataset):
    """Prompts as ``{"input_ids": (P,), "prompt": str}`` with ``input_ids = [eos] + encode(prompt)``."""

    def __init__(self, prompts: list[str], tokenizer: Tokenizer):
        self.prompts, self.tokenizer = prompts, tokenizer

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        ids = [self.tokenizer.eos_id, *self.tokenizer.encode(self.prompts[index])]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "prompt": self.prompts[index]}


def _collate_prompt(samples: list[dict]) -> dict:
    (sample,) = samples
    return {"input_ids": sample["input_ids"][None], "prompt": [sample["prompt"]]}


class LMDataModule(L.LightningDataModule, abc.ABC):
    """Tokenizer, loaders and checks shared by memzoo's data modules.

    Args:
        block_size: tokens per training sample (``T``).
        batch_size: samples per batch (``B``), for training, validation and recall probes.
        num_workers: data-loader worker processes.
        tokenizer: ``"byte"`` or the path of a Hugging Face ``tokenizer.json`` (see :func:`build_tokenizer`).
        seed: drives every random choice of the data (corpus, order); same seed, same batches.
        predict_prompts: prompts for ``predict``.
        predict_file: a text file with one prompt per line (blank lines skipped), used when ``predict_prompts`` is
            not given.

    Subclasses build their datasets in :meth:`build_train_dataset` (a stream, see :mod:`memzoo.data.sampling`),
    :meth:`build_val_dataset` and optionally :meth:`build_recall_dataset`.
    """

    shuffle_train: bool = True  # whether an epoch's samples are read in a shuffled order

    def __init__(
        self,
        block_size: int,
        batch_size: int,
        num_workers: int = 0,
        tokenizer: str = "byte",
        seed: int = 0,
        predict_prompts: list[str] | None = None,
        predict_file: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # every init argument of the concrete module (plain data) goes in checkpoints
        self.block_size = _positive_int("block_size", block_size)
        self.batch_size = _positive_int("batch_size", batch_size)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.num_workers = num_workers
        self.seed = int(seed)
        self.tokenizer: Tokenizer = build_tokenizer(tokenizer)
        self.predict_prompts = list(predict_prompts) if predict_prompts is not None else None
        self.predict_file = predict_file
        self._train: Dataset | None = None
        self._val: Dataset | None = None
        self._recall: Dataset | None = None

    # ---------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Token ids the model must embed (the tokenizer's, specials included)."""
        return self.tokenizer.vocab_size

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raises if the tokenizer's ids do not fit a model with ``model_vocab_size`` embeddings."""
        if self.tokenizer.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size is {model_vocab_size}; "
                f"set model vocab_size >= {self.tokenizer.vocab_size} (the memzoo CLI links it from the data module)"
            )

    # ---------------------------------------------------------------------------------------- fact probes
    @property
    def has_recall(self) -> bool:
        """Whether :meth:`val_dataloader` has recall batches at index 1."""
        return False

    @property
    def recall_chance(self) -> float | None:
        """Expected recall of guessing each probed value uniformly from its value set (fact probes only)."""
        return None

    # ---------------------------------------------------------------------------------------- datasets
    @abc.abstractmethod
    def build_train_dataset(self) -> Dataset:
        """Training samples ``{"input_ids": (T,), "labels": (T,)}``, a stream (``dataset[j]`` for every j ≥ 0)."""

    @abc.abstractmethod
    def build_val_dataset(self) -> Dataset:
        """Language-model validation samples."""

    def build_recall_dataset(self) -> Dataset | None:
        """Recall probes (labels on answer tokens only), or None."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._train is None:
            self._train = self.build_train_dataset()
        if stage in (None, "fit", "validate", "test") and self._val is None:
            self._val = self.build_val_dataset()
            self._recall = self.build_recall_dataset()

    # ---------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=partial(collate_lm, pad_id=self.tokenizer.pad_id),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        sampler = EpochSampler(len(self._train), self.seed, shuffle=self.shuffle_train)
        done = self._batches_done_in_epoch()
        if done >= self._batches_per_epoch(sampler):
            done = 0  # the checkpoint ended its epoch: Lightning goes on with the next one, read from its start
        sampler.skip_batches(done, self.batch_size)
        return self._loader(self._train, sampler)

    def _batches_per_epoch(self, sampler: EpochSampler) -> int:
        """Batches Lightning trains per epoch: the loader's length, cut by ``trainer.limit_train_batches``."""
        batches = -(-len(sampler) // self.batch_size)
        trainer = getattr(self, "trainer", None)
        limit = getattr(trainer, "limit_train_batches", None) if trainer is not None else None
        if isinstance(limit, int) and not isinstance(limit, bool):
            return min(batches, limit)
        if isinstance(limit, float) and limit < 1.0:
            return max(1, int(batches * limit))
        return batches

    def _batches_done_in_epoch(self) -> int:
        """Batches of the current epoch already trained, when Lightning resumes from a mid-epoch checkpoint.

        The order of an epoch depends only on (seed, epoch), so skipping these makes the resumed run read exactly
        the batches the uninterrupted run would have read next. Counted as *processed* batches: a checkpoint saved in
        a batch's ``on_train_batch_end`` (``checkpoint.every_n_train_steps``, memzoo's signal handler) records that
        batch as processed but not yet completed, and the loader is built before Lightning's loop counts it done.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> list[DataLoader]:
        """Validation loaders; under ``torch.distributed`` each rank reads a share (:class:`ShardSampler`), every
        sample once over all ranks, so the synced metrics equal one process's on the whole set."""
        self.setup("validate")
        datasets = [self._val] if self._recall is None else [self._val, self._recall]
        return [self._loader(dataset, self._eval_sampler(dataset)) for dataset in datasets]

    @staticmethod
    def _eval_sampler(dataset: Dataset) -> ShardSampler | None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return ShardSampler(len(dataset), dist.get_world_size(), dist.get_rank())

    def test_dataloader(self) -> list[DataLoader]:
        """The validation loaders: memzoo's corpora have no separate test split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        prompts = self.predict_prompts
        if prompts is None:
            if self.predict_file is None:
                raise ValueError(
                    "predict needs prompts: set data.predict_prompts (a list of strings) or data.predict_file "
                    "(a text file, one prompt per line)"
                )
            path = Path(self.predict_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"predict_file {self.predict_file!r} not found (looked for {path.resolve()})")
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError("predict has no prompts: predict_prompts / predict_file is empty")
        return DataLoader(PromptDataset(prompts, self.tokenizer), batch_size=1, collate_fn=_collate_prompt)
