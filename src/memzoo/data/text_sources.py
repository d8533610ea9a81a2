"""Where text comes from: local files (``.txt``, ``.jsonl``/``.json``, ``.parquet``; a file, a folder or a glob)
and Hugging Face datasets, as a sequence of documents.

A ``.txt`` file is one document; a ``.jsonl``/``.parquet`` row is one document (its ``text_column``), read through
``datasets.load_dataset`` (which works offline for local files).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_HF_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TXT_PIECE_CHARS = 1 << 20  # .txt files are read (and tokenised) in line-aligned pieces of about 1 MiB


def resolve_files(path: str) -> list[Path]:
    """The data files ``path`` names: itself, the supported files under a folder (recursively), or a glob's
    matches; sorted. Raises ``FileNotFoundError`` naming what was looked for."""
    wanted = ", ".join(SUFFIXES)
    if any(c in path for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(Path(path).expanduser()), recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise FileNotFoundError(f"data path glob {path!r} matches no files (looking for {wanted} files)")
    else:
        given = Path(path).expanduser()
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not files:
                raise FileNotFoundError(f"data folder {path!r} ({given.resolve()}) holds no {wanted} files")
        elif given.is_file():
            files = [given]
        else:
            raise FileNotFoundError(
                f"data path {path!r} does not exist (looked for {given.resolve()}): give a {wanted} file, "
                f"a folder of them, or a glob such as 'data/*.jsonl'"
            )
    unsupported = [str(p) for p in files if p.suffix not in SUFFIXES]
    if unsupported:
        raise ValueError(f"data files {unsupported} are not {wanted} files; narrow the glob or convert them")
    return [p.resolve() for p in files]


def file_fingerprint(files: list[Path]) -> list[list]:
    """``[path, size, mtime_ns]`` per file: what a token cache entry of these files depends on."""
    return [[str(p), (s := p.stat()).st_size, s.st_mtime_ns] for p in files]


def check_text_column(dataset, text_column: str, source: str) -> None:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no column {text_column!r}; its columns are {dataset.column_names}: set text_column"
        )


def dataset_documents(dataset, text_column: str, source: str) -> Iterator[tuple[str, bool]]:
    """``(text, True)`` for each non-empty text of a Hugging Face ``Dataset``'s ``text_column``."""
    check_text_column(dataset, text_column, source)
    for batch in dataset.select_columns([text_column]).iter(batch_size=1024):
        for text in batch[text_column]:
            if text:
                yield text, True


def file_documents(file: Path, text_column: str, hf_cache_dir: Path | None) -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` pieces of one data file: a row per document, or a ``.txt`` file as one document
    read in line-aligned pieces (only the last piece ends the document)."""
    if file.suffix == ".txt":
        with open(file, encoding="utf-8") as f:
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= _TXT_PIECE_CHARS:
                    yield "".join(piece), False
                    piece, size = [], 0
            yield "".join(piece), True
        return
    from datasets import load_dataset

    dataset = load_dataset(
        _HF_BUILDER[file.suffix], data_files=str(file), split="train",
        cache_dir=str(hf_cache_dir) if hf_cache_dir else None,
    )  # fmt: skip
    yield from dataset_documents(dataset, text_column, str(file))
