"""``TextDataModule``: language modelling on local text files or a Hugging Face dataset.

The data is tokenised once into one long array (documents separated by eos) and cached on disk
(:mod:`memzoo.data.token_cache`); later runs memory-map the cached array. Validation is the data's validation split
when it has one, else the last ``val_fraction`` of the tokens (as nanoGPT does). Training samples are either
``"chunks"``, consecutive windows covering every token exactly once per epoch, shuffled, or ``"random"``, windows
at pseudo-random starts, ``samples_per_epoch`` per epoch (see :mod:`memzoo.data.windows`).
"""

from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from memzoo.data.base import LMDataModule, _positive_int
from memzoo.data.text_sources import dataset_documents, file_documents, file_fingerprint, resolve_files
from memzoo.data.token_cache import TokenCache, default_cache_dir, token_dtype
from memzoo.data.windows import ChunkWindows, RandomWindows, TokenFile

log = logging.getLogger(__name__)

VALIDATION_SPLITS = ("validation", "valid", "val")


class TextDataModule(LMDataModule):
    """Text from ``path`` (local files) or ``dataset`` (``datasets.load_dataset``), exactly one of them.

    Args:
        path: a ``.txt``, ``.jsonl``/``.json`` or ``.parquet`` file, a folder of them (searched recursively), or a
            glob. A ``.txt`` file is one document, a jsonl/parquet row is one.
        dataset: a Hugging Face dataset name (hub names need network) or local dataset folder; its
            ``validation`` (or ``valid``/``val``) split, if any, is used for validation.
        dataset_config: the dataset's configuration name, if it has several.
        text_column: the column holding the text (jsonl, parquet, datasets).
        split: the dataset split to train on (``dataset`` only; local files are one split).
        val_fraction: share of the tokens, taken from the end, used for validation when there is no validation
            split; in (0, 1).
        sampling: ``"chunks"`` (every token once per epoch) or ``"random"`` (random windows).
        samples_per_epoch: windows per epoch for ``sampling="random"`` (default: tokens // block_size).
        cache_dir: where tokenised arrays are cached (default ``~/.cache/memzoo``).
        encoding: the text encoding of ``.txt`` files (any Python codec name: ``utf-8``, ``latin-1``, ``cp1252`` ...).
        errors: bytes of a ``.txt`` file that ``encoding`` cannot decode: ``"strict"`` fails naming the file and the
            byte offset, ``"replace"`` reads them as U+FFFD. jsonl/parquet files and datasets are always UTF-8.
        block_size, batch_size, num_workers, tokenizer, seed, predict_prompts, predict_file: see
            :class:`~memzoo.data.base.LMDataModule`.
    """

    def __init__(
        self,
        path: str | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        split: str = "train",
        val_fraction: float = 0.1,
        sampling: Literal["chunks", "random"] = "chunks",
        samples_per_epoch: int | None = None,
        cache_dir: str | None = None,
        encoding: str = "utf-8",
        errors: Literal["strict", "replace"] = "strict",
        block_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: str = "byte",
        seed: int = 0,
        predict_prompts: list[str] | None = None,
        predict_file: str | None = None,
    ):
        super().__init__(block_size, batch_size, num_workers, tokenizer, seed, predict_prompts, predict_file)
        if (path is None) == (dataset is None):
            raise ValueError("TextDataModule needs exactly one of path (local files) or dataset (a Hugging Face "
                             f"dataset), got path={path!r}, dataset={dataset!r}")
        self.files = resolve_files(path) if path is not None else None
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"encoding {encoding!r} is not a known text encoding; use e.g. utf-8, latin-1, cp1252") from None
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        if (codecs.lookup(encoding).name, errors) != ("utf-8", "strict") and (
            self.files is None or any(f.suffix != ".txt" for f in self.files)
        ):
            raise ValueError(
                f"encoding={encoding!r} / errors={errors!r} apply to .txt files only; jsonl, parquet and datasets are "
                f"read as UTF-8 (remove the option or convert the files)"
            )
        self.encoding, self.errors = encoding, errors
        self.path, self.dataset, self.dataset_config = path, dataset, dataset_config
        self.text_column, self.split = text_column, split
        if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        if sampling not in ("chunks", "random"):
            raise ValueError(f"sampling must be 'chunks' or 'random', got {sampling!r}")
        if samples_per_epoch is not None:
            if sampling != "random":
                raise ValueError(
                    "samples_per_epoch applies to sampling='random' only (an epoch of 'chunks' is every token once)"
                )
            _positive_int("samples_per_epoch", samples_per_epoch)
        self.sampling, self.samples_per_epoch = sampling, samples_per_epoch
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.cache = TokenCache(self.cache_dir)
        self.shuffle_train = sampling == "chunks"
        self._splits: dict[str, TokenFile] | None = None

    # ---------------------------------------------------------------------------------------- tokenising
    def _encode(self, pieces, source: str) -> np.ndarray:
        """Concatenated tokens of ``(text, ends_document)`` pieces, eos after every non-empty document."""
        dtype = token_dtype(self.tokenizer.vocab_size)
        arrays, document_has_text = [], False
        for text, ends_document in pieces:
            if text:
                arrays.append(np.asarray(self.tokenizer.encode(text), dtype=dtype))
                document_has_text = True
            if ends_document and document_has_text:
                arrays.append(np.asarray([self.tokenizer.eos_id], dtype=dtype))
                document_has_text = False
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        log.info("tokenised %s: %d tokens", source, len(tokens))
        return tokens

    def _cached(self, key: dict, pieces, source: str) -> Path:
        """The cached token file of ``key``, tokenising ``pieces()`` first if there is none."""
        target = self.cache.path(key)
        if not target.is_file():
            target = self.cache.store(key, self._encode(pieces(), source))
        return target

    def _file_tokens(self) -> Path:
        key = {"files": file_fingerprint(self.files), "text_column": self.text_column, "tokenizer": self.tokenizer.spec}
        if (codecs.lookup(self.encoding).name, self.errors) != ("utf-8", "strict"):
            key["decoding"] = [codecs.lookup(self.encoding).name, self.errors]
        hf_cache = self.cache_dir / "hf_datasets"

        def pieces():
            for file in self.files:
                yield from file_documents(file, self.text_column, hf_cache, self.encoding, self.errors)

        return self._cached(key, pieces, self.path)

    def _dataset_tokens(self) -> dict[str, Path]:
        from datasets import load_dataset

        splits = load_dataset(self.dataset, self.dataset_config)
        if self.split not in splits:
            raise ValueError(f"dataset {self.dataset!r} has no split {self.split!r}; its splits are {list(splits)}")
        wanted = {"train": self.split}
        val_split = next((s for s in VALIDATION_SPLITS if s in splits and s != self.split), None)
        if val_split is not None:
            wanted["val"] = val_split
        out = {}
        for role, name in wanted.items():
            data = splits[name]
            source = f"dataset {self.dataset!r} split {name!r}"
            key = {"dataset": self.dataset, "config": self.dataset_config, "split": name,
                   "fingerprint": data._fingerprint, "text_column": self.text_column, "tokenizer": self.tokenizer.spec}
            out[role] = self._cached(key, lambda d=data, s=source: dataset_documents(d, self.text_column, s), source)
        return out

    def prepare_data(self) -> None:
        """Tokenises into the cache (Lightning runs this once, before ``setup`` on every process)."""
        if self.files is not None:
            self._file_tokens()
        else:
            self._dataset_tokens()

    def token_splits(self) -> dict[str, TokenFile]:
        """``{"train": TokenFile, "val": TokenFile}`` of the cached tokens, tokenising on first use."""
        if self._splits is None:
            paths = {"train": self._file_tokens()} if self.files is not None else self._dataset_tokens()
            source = repr(self.path) if self.files is not None else f"dataset {self.dataset!r}"
            n_train = len(np.load(paths["train"], mmap_mode="r"))
            if n_train == 0:
                raise ValueError(f"{source} holds no text (0 tokens); check the files and text_column")
            if "val" in paths:
                splits = {"train": TokenFile(paths["train"]), "val": TokenFile(paths["val"])}
            else:  # the last val_fraction of the tokens
                cut = int(n_train * (1.0 - self.val_fraction))
                splits = {"train": TokenFile(paths["train"], 0, cut), "val": TokenFile(paths["train"], cut)}
            for role, tokens in splits.items():
                n = len(tokens.load())
                if n < self.block_size + 1:
                    hint = "raise val_fraction, " if role == "val" and "val" not in paths else ""
                    raise ValueError(
                        f"{source}: the {role} split has {n} tokens, fewer than one block (block_size + 1 = "
                        f"{self.block_size + 1}); lower block_size, {hint}or add data"
                    )
            self._splits = splits
        return self._splits

    # ---------------------------------------------------------------------------------------- datasets
    def build_train_dataset(self) -> ChunkWindows | RandomWindows:
        tokens = self.token_splits()["train"]
        if self.sampling == "chunks":
            return ChunkWindows(tokens, self.block_size, self.tokenizer.pad_id)
        samples = self.samples_per_epoch or max(1, (len(tokens.load()) - 1) // self.block_size)
        return RandomWindows(tokens, self.block_size, self.tokenizer.pad_id, samples, self.seed)

    def build_val_dataset(self) -> ChunkWindows:
        return ChunkWindows(self.token_splits()["val"], self.block_size, self.tokenizer.pad_id)
