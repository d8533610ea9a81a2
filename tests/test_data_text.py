"""TextDataModule: sources (txt, jsonl, parquet, folders, globs, datasets), packing, splits, the token cache."""

import json
import os

import numpy as np
import pytest
import torch

from memzoo.data import ByteTokenizer, TextDataModule
from memzoo.data.sampling import IGNORE_INDEX

EOS = ByteTokenizer.eos_id


def _expected_tokens(*documents: str) -> list[int]:
    out = []
    for doc in documents:
        out += [*doc.encode("utf-8"), EOS]
    return out


def _reconstruct(dataset) -> list[int]:
    """First input token, then every label, of every window in order: the tokens the windows cover."""
    tokens = [dataset[0]["input_ids"][0].item()]
    for i in range(len(dataset)):
        labels = dataset[i]["labels"]
        tokens += labels[labels != IGNORE_INDEX].tolist()
    return tokens


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def _module(path, cache, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("batch_size", 2)
    return TextDataModule(path=str(path), cache_dir=cache, **kw)


def test_txt_chunks_cover_every_token_once(tmp_path, cache):
    text = "".join(f"line {i}: the quick brown fox, ünïcödé\n" for i in range(30))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    dm = _module(tmp_path / "a.txt", cache, block_size=7, val_fraction=0.25)
    dm.setup()
    everything = _expected_tokens(text)
    cut = int(len(everything) * 0.75)
    assert _reconstruct(dm._train) == everything[:cut]  # nothing dropped, nothing twice
    assert _reconstruct(dm._val) == everything[cut:]  # validation = the last quarter of the tokens
    sample = dm._train[1]
    assert sample["input_ids"].shape == (7,) and torch.equal(sample["input_ids"][1:], sample["labels"][:-1])


def test_chunk_epochs_are_shuffled_deterministically(tmp_path, cache):
    (tmp_path / "a.txt").write_text("abcdefghij" * 40)
    first = [b["input_ids"] for b in _module(tmp_path / "a.txt", cache, seed=3).train_dataloader()]
    again = [b["input_ids"] for b in _module(tmp_path / "a.txt", cache, seed=3).train_dataloader()]
    other = [b["input_ids"] for b in _module(tmp_path / "a.txt", cache, seed=4).train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_random_windows(tmp_path, cache):
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    (tmp_path / "a.txt").write_text(text)
    dm = _module(tmp_path / "a.txt", cache, sampling="random", samples_per_epoch=20, block_size=16)
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 20
    batches = [b for b in loader]
    starts = set()
    train = _expected_tokens(text)[: int(501 * 0.9)]
    for batch in batches:
        for row, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            start = next(i for i in range(len(train)) if train[i : i + 16] == row)
            assert labels == train[start + 1 : start + 17]
            starts.add(start)
    assert len(starts) > 10
    epoch1 = next(iter(loader))["input_ids"]
    assert not torch.equal(epoch1, batches[0]["input_ids"])  # a new epoch draws new windows
    default = _module(tmp_path / "a.txt", cache, sampling="random", block_size=16)
    assert len(default.build_train_dataset()) == (len(train) - 1) // 16


def test_jsonl_parquet_and_folders(tmp_path, cache):
    rows = [{"text": f"document number {i} " * 3, "id": i} for i in range(12)]
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "a.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows[:6])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[6:]), tmp_path / "data" / "b.parquet")
    everything = _expected_tokens(*[r["text"] for r in rows])
    for path in (tmp_path / "data", tmp_path / "data" / "*"):
        dm = _module(path, cache, val_fraction=0.5)
        dm.setup()
        cut = int(len(everything) * 0.5)
        assert _reconstruct(dm._train) == everything[:cut]
        assert _reconstruct(dm._val) == everything[cut:]
    single = _module(tmp_path / "data" / "b.parquet", cache)
    single.setup()
    assert _reconstruct(single._train) == _expected_tokens(*[r["text"] for r in rows[6:]])[: _cut(rows[6:], 0.1)]


def _cut(rows, val_fraction):
    return int(len(_expected_tokens(*[r["text"] for r in rows])) * (1 - val_fraction))


def test_unknown_text_column_lists_the_columns(tmp_path, cache):
    with open(tmp_path / "a.jsonl", "w") as f:
        f.write(json.dumps({"body": "x" * 50, "id": 1}) + "\n")
    dm = _module(tmp_path / "a.jsonl", cache)
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['body', 'id'\]"):
        dm.setup()
    dm = _module(tmp_path / "a.jsonl", cache, text_column="body", block_size=4)
    dm.setup()
    assert _reconstruct(dm._train) + _reconstruct(dm._val) == _expected_tokens("x" * 50)


def test_cache_hit_does_not_retokenise_and_changes_invalidate(tmp_path, cache, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("hello world " * 20)
    first = _module(path, cache)
    first.setup()
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 1

    def refuse(self, text):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(ByteTokenizer, "encode", refuse)
    again = _module(path, cache)
    again.setup()  # served from the cache
    assert _reconstruct(again._train) == _reconstruct(first._train)
    monkeypatch.undo()

    path.write_text("changed text " * 20)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = _module(path, cache)
    changed.setup()
    assert bytes(_reconstruct(changed._train)[:12]).decode() == "changed text"
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2
    assert not list((tmp_path / "cache" / "tokens").glob(".*.tmp"))  # no temporary files left behind


def test_hf_dataset_with_validation_split(tmp_path, cache, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    for split, n in (("train", 8), ("validation", 3)):
        with open(folder / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": f"{split} row {i} with some words"}) + "\n" for i in range(n))
    dm = TextDataModule(dataset=str(folder), cache_dir=cache, block_size=8, batch_size=2)
    dm.setup()
    val_rows = [f"validation row {i} with some words" for i in range(3)]
    assert _reconstruct(dm._val) == _expected_tokens(*val_rows)  # the split, not a fraction
    assert _reconstruct(dm._train) == _expected_tokens(*[f"train row {i} with some words" for i in range(8)])
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        TextDataModule(dataset=str(folder), split="test", cache_dir=cache, block_size=8, batch_size=2).setup()


def test_missing_paths_name_what_was_looked_for(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match=r"data path '.*nowhere.txt' does not exist \(looked for .*"
                                                 r"nowhere.txt\).*\.txt, \.jsonl"):
        _module(tmp_path / "nowhere.txt", cache)
    with pytest.raises(FileNotFoundError, match="glob '.*' matches no files"):
        _module(tmp_path / "*.jsonl", cache)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no .txt, .jsonl, .json, .parquet files"):
        _module(tmp_path / "empty_dir", cache)
    with pytest.raises(ValueError, match="not .txt, .jsonl, .json, .parquet files"):
        _module(tmp_path / "empty_dir" / "*", cache)


def test_too_little_data(tmp_path, cache):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text \\(0 tokens\\)"):
        _module(tmp_path / "empty.txt", cache).setup()
    (tmp_path / "small.txt").write_text("x" * 40)  # 41 tokens with eos
    with pytest.raises(ValueError, match="the train split has 36 tokens, fewer than one block \\(block_size \\+ 1 "
                                         "= 65\\)"):
        _module(tmp_path / "small.txt", cache, block_size=64).setup()
    with pytest.raises(ValueError, match="the val split has 5 tokens.*= 9\\); lower block_size, raise val_fraction"):
        _module(tmp_path / "small.txt", cache, block_size=8).setup()


@pytest.mark.parametrize("kwargs, message", [
    ({"val_fraction": 0.0}, "val_fraction must be in \\(0, 1\\), got 0.0"),
    ({"val_fraction": 1.0}, "val_fraction must be in \\(0, 1\\), got 1.0"),
    ({"val_fraction": -0.5}, "val_fraction must be in \\(0, 1\\)"),
    ({"sampling": "strided"}, "sampling must be 'chunks' or 'random', got 'strided'"),
    ({"samples_per_epoch": 10}, "samples_per_epoch applies to sampling='random' only"),
    ({"sampling": "random", "samples_per_epoch": 0}, "samples_per_epoch must be a positive int"),
    ({"block_size": 0}, "block_size must be a positive int, got 0"),
])
def test_bad_arguments(tmp_path, cache, kwargs, message):
    (tmp_path / "a.txt").write_text("x" * 100)
    with pytest.raises(ValueError, match=message):
        _module(tmp_path / "a.txt", cache, **kwargs)


def test_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one of path .* or dataset"):
        TextDataModule()
    with pytest.raises(ValueError, match="exactly one of path"):
        TextDataModule(path=str(tmp_path), dataset="x")


def test_workers_get_the_file_not_the_array(tmp_path, cache):
    import pickle

    (tmp_path / "a.txt").write_text("y" * 5000)
    dm = _module(tmp_path / "a.txt", cache)
    dm.setup()
    clone = pickle.loads(pickle.dumps(dm._train))
    assert len(pickle.dumps(dm._train)) < 2000  # the memory-mapped tokens travel as their file and range
    assert torch.equal(clone[3]["input_ids"], dm._train[3]["input_ids"])
    assert isinstance(dm._train.tokens, np.memmap)


def test_undecodable_text_names_the_file_and_byte_offset(tmp_path, cache):
    """One bad byte at the end of a file larger than a read piece (1 MiB), a Latin-1 file, a binary file."""
    from memzoo.data.text_sources import TextDecodeError

    big = tmp_path / "big.txt"
    body = ("naïve café line\n" * 70_000).encode("utf-8")  # 1.2 MB, multi-byte characters across block edges
    big.write_bytes(body + b"end \xff\n")
    with pytest.raises(TextDecodeError, match=rf"big.txt: byte {len(body) + 4} \(b'\\xff'.*not valid utf-8.*encoding"):
        _module(big, cache).setup("fit")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Größe über alles, ".encode("latin-1") * 4)
    with pytest.raises(TextDecodeError, match=r"latin.txt: byte 2 \(b'\\xf6"):
        _module(latin, cache).setup("fit")
    module = _module(latin, cache, encoding="latin-1")  # the right encoding reads it
    assert bytes(module.token_splits()["train"].load()[:7].tolist()) == "Größe".encode()
    replaced = _module(big, cache, errors="replace")
    tokens = replaced.token_splits()["val"].load().tolist()
    assert bytes(tokens[-8:-1]).endswith("\ufffd\n".encode("utf-8"))  # U+FFFD, newline, then eos


@pytest.mark.parametrize("kwargs, message", [({"encoding": "utf-9"}, "not a known text encoding"),
                                             ({"errors": "ignore"}, "errors must be 'strict' or 'replace'")])
def test_bad_decoding_options(tmp_path, cache, kwargs, message):
    (tmp_path / "a.txt").write_text("hello world " * 10)
    with pytest.raises(ValueError, match=message):
        _module(tmp_path / "a.txt", cache, **kwargs)
