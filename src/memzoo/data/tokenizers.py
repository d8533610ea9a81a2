"""Tokenizers: the byte-level default and Hugging Face ``tokenizer.json`` files, behind one small protocol.

A tokenizer is named by a *spec* string, which is all a config or a checkpoint has to store:
``"byte"`` for :class:`ByteTokenizer`, or a path to a ``tokenizer.json`` (or to a folder holding one) for
:class:`HFTokenizer`; ``build_tokenizer(spec)`` rebuilds it, and two tokenizers are equal when their specs are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, quote

BYTE_SPEC = "byte"


@runtime_checkable
class Tokenizer(Protocol):
    """What memzoo needs of a tokenizer. ``encode`` adds no special tokens; ``decode`` drops them. memzoo's
    tokenizers also give ``id_texts()`` (each id's text and token string), which token-indexed blocks that merge
    ids by their text (Engram) read."""

    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def spec(self) -> str: ...


def _check_ids(ids: Sequence[int], vocab_size: int, name: str) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} cannot decode id {bad[0]}: its ids are 0..{vocab_size - 1}")
    return ids


class _SpecEquality:
    """Equality and hashing by ``spec``: the same spec builds the same tokenizer."""

    spec: str

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.spec == other.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(_SpecEquality):
    """UTF-8 bytes: ids 0–255 are the byte values, then ``<|endoftext|>`` (eos, 256) and ``<|pad|>`` (257)."""

    eos_token, pad_token = "<|endoftext|>", "<|pad|>"
    eos_id, pad_id = 256, 257
    vocab_size = 258

    @property
    def spec(self) -> str:
        return BYTE_SPEC

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are skipped, an invalid UTF-8 sequence becomes U+FFFD."""
        ids = _check_ids(ids, self.vocab_size, "ByteTokenizer")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def id_texts(self) -> list[tuple[str, str]]:
        """Per id: its text decoded alone (special tokens kept; a byte >= 0x80 alone is U+FFFD) and its own token
        string (``<0xNN>`` for a byte, the special token's text)."""
        texts = [(bytes([i]).decode("utf-8", errors="replace"), f"<0x{i:02X}>") for i in range(256)]
        return texts + [(self.eos_token, self.eos_token), (self.pad_token, self.pad_token)]


# Special tokens tried, in order, when a tokenizer.json does not say which is which.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def _token_content(entry: object) -> str | None:
    """A token as written in ``tokenizer_config.json``: a string or ``{"content": str, ...}``."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


class HFTokenizer(_SpecEquality):
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library.

    Args:
        path: the ``tokenizer.json`` file, or a folder holding one.
        eos_token: the end-of-document token; default: ``eos_token`` of a ``tokenizer_config.json`` beside the
            file, else the first of :data:`EOS_CANDIDATES` the vocabulary has.
        pad_token: the padding token, found the same way (:data:`PAD_CANDIDATES`); default the eos token.

    ``spec`` is the absolute path, with ``?eos=…&pad=…`` appended when the tokens were given explicitly.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, pad_token: str | None = None):
        from tokenizers import Tokenizer as _RustTokenizer

        given = Path(path).expanduser()
        file = given / "tokenizer.json" if given.is_dir() else given
        file = file.resolve()
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer file not found: {str(path)!r} (looked for {file}); pass 'byte' or the path of a "
                f"Hugging Face tokenizer.json (or of a folder holding one)"
            )
        try:
            self._tokenizer = _RustTokenizer.from_file(str(file))
        except Exception as err:  # the Rust library raises plain Exception for unreadable files
            raise ValueError(
                f"could not read {file} as a Hugging Face tokenizer.json ({err}); save one with "
                f"tokenizers.Tokenizer.save(path) or transformers' tokenizer.save_pretrained(folder)"
            ) from err
        self.path = file
        self._explicit = {"eos": eos_token, "pad": pad_token}
        vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        configured = self._configured_tokens(file.parent / "tokenizer_config.json")
        self.eos_token = self._resolve("eos", eos_token, configured.get("eos_token"), EOS_CANDIDATES, vocab)
        found_pad = self._resolve("pad", pad_token, configured.get("pad_token"), PAD_CANDIDATES, vocab,
                                  required=False)
        self.pad_token = found_pad or self.eos_token
        self.eos_id, self.pad_id = vocab[self.eos_token], vocab[self.pad_token]

    @staticmethod
    def _configured_tokens(config: Path) -> dict[str, str]:
        if not config.is_file():
            return {}
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"could not read {config} ({err}); fix or remove it") from err
        return {k: c for k in ("eos_token", "pad_token") if (c := _token_content(data.get(k))) is not None}

    def _resolve(self, role: str, explicit: str | None, configured: str | None, candidates: Sequence[str],
                 vocab: dict[str, int], required: bool = True) -> str | None:
        if explicit is not None:
            if explicit not in vocab:
                raise ValueError(f"{role}_token {explicit!r} is not in the vocabulary of {self.path}")
            return explicit
        if configured is not None and configured in vocab:
            return configured
        for token in candidates:
            if token in vocab:
                return token
        if not required:
            return None
        specials = sorted(t.content for t in self._tokenizer.get_added_tokens_decoder().values())
        raise ValueError(
            f"could not tell which token of {self.path} ends a document: none of {list(candidates)} is in its "
            f"vocabulary (its added tokens: {specials}); pass eos_token=..., or use the spec "
            f"'{self.path}?eos=<token>'"
        )

    @property
    def spec(self) -> str:
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in self._explicit.items() if v is not None)
        return f"{self.path}?{query}" if query else str(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text, special tokens skipped; invalid byte sequences become U+FFFD."""
        ids = _check_ids(ids, self.vocab_size, f"tokenizer {self.path}")
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def id_texts(self) -> list[tuple[str, str]]:
        """Per id: its text decoded alone (special tokens kept; an incomplete byte sequence holds U+FFFD) and its
        own token string (``""`` for an id the vocabulary skips)."""
        ids = range(self.vocab_size)
        texts = self._tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        return [(text, self._tokenizer.id_to_token(i) or "") for i, text in zip(ids, texts)]


def build_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` → :class:`ByteTokenizer`; a path (``tokenizer.json`` or its folder, optionally
    ``?eos=<token>&pad=<token>``) → :class:`HFTokenizer`."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be 'byte' or a path to a tokenizer.json, got {spec!r}")
    if spec == BYTE_SPEC:
        return ByteTokenizer()
    path, query = spec, ""
    if "?" in spec and not Path(spec).expanduser().exists():  # "<path>?eos=<token>&pad=<token>"
        path, _, query = spec.rpartition("?")
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - {"eos", "pad"})
    if unknown:
        raise ValueError(f"tokenizer spec {spec!r} has unknown options {unknown}; known: eos, pad")
    if not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"tokenizer spec {spec!r} is neither 'byte' nor an existing path (looked for "
            f"{Path(path).expanduser().resolve()}); pass 'byte' or the path of a Hugging Face tokenizer.json"
        )
    return HFTokenizer(path, eos_token=options.get("eos"), pad_token=options.get("pad"))
