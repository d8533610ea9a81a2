"""Where text comes from: local files (``.txt``, ``.jsonl``/``.json``, ``.parquet``; a file, a folder or a glob)
and Hugging Face datasets, as a sequence of documents.

A ``.txt`` file is one document, decoded with a chosen encoding (UTF-8 by default; undecodable bytes are an error
naming the file and byte offset, or U+FFFD with ``errors="replace"``); a ``.jsonl``/``.parquet`` row is one
document (its ``text_column``), read through ``datasets.load_dataset`` (which works offline for local files).
"""

from __future__ import annotations

import codecs
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


class TextDecodeError(ValueError):
    """A text file that is not valid in the encoding it is read with; names the file and the byte offset."""


def first_undecodable_byte(file: Path, encoding: str) -> tuple[int, bytes, str] | None:
    """``(byte offset, the offending bytes, reason)`` of the first bytes of ``file`` that ``encoding`` cannot
    decode, or None. Reads the file in 1 MiB blocks through an incremental decoder."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset = 0
    with open(file, "rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character carried from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                return offset - pending + err.start, err.object[err.start:err.end], err.reason
            if not block:
                return None
            offset += len(block)


def file_documents(file: Path, text_column: str, hf_cache_dir: Path | None, encoding: str = "utf-8",
                   errors: str = "strict") -> Iterator[tuple[str, bool]]:
    """``(text, ends_document)`` pieces of one data file: a row per document, or a ``.txt`` file as one document
    read in line-aligned pieces (only the last piece ends the document).

    ``.txt`` files are decoded with ``encoding``; bytes it cannot decode raise :class:`TextDecodeError` naming the
    file and byte offset (``errors="strict"``) or read as U+FFFD (``errors="replace"``)."""
    if file.suffix == ".txt":
        try:
            yield from _txt_pieces(file, encoding, errors)
        except UnicodeDecodeError as err:
            found = first_undecodable_byte(file, encoding)
            where = f"byte {found[0]} ({found[1]!r}: {found[2]})" if found else f"{err.reason}"
            raise TextDecodeError(
                f"{file}: {where} is not valid {encoding}. If the file uses another encoding, set "
                f"data.init_args.encoding (e.g. latin-1, cp1252); to read undecodable bytes as U+FFFD, set "
                f"data.init_args.errors: replace"
            ) from None
        return
    from datasets import load_dataset

    dataset = load_dataset(
        _HF_BUILDER[file.suffix], data_files=str(file), split="train",
        cache_dir=str(hf_cache_dir) if hf_cache_dir else None,
    )  # fmt: skip
    yield from dataset_documents(dataset, text_column, str(file))


def _txt_pieces(file: Path, encoding: str, errors: str) -> Iterator[tuple[str, bool]]:
    with open(file, encoding=encoding, errors=errors) as f:
        piece: list[str] = []
        size = 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= _TXT_PIECE_CHARS:
                yield "".join(piece), False
                piece, size = [], 0
        yield "".join(piece), True
