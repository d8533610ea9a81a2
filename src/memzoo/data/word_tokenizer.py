"""A closed word-level tokenizer: a fixed list of words, text split on single spaces (synthetic corpora only)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from memzoo.data.tokenizers import _check_ids, _SpecEquality


class WordTokenizer(_SpecEquality):
    """Token ``i`` is ``words[i]``; ``words[0]`` is eos and ``words[1]`` pad. ``encode`` splits on ``" "`` and
    raises on a word outside the vocabulary (a closed corpus never produces one); ``decode`` joins with spaces.

    Its ``spec`` (``"words:<count>:<digest>"``) identifies the vocabulary but cannot rebuild it: the corpus that
    owns the word list builds the tokenizer.
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if len(words) < 2 or len(set(words)) != len(words) or any(not w or " " in w for w in words):
            raise ValueError("WordTokenizer needs >= 2 distinct, non-empty words without spaces (eos, pad first)")
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}
        self.vocab_size = len(words)
        self.eos_id, self.pad_id = 0, 1
        self._spec = f"words:{len(words)}:{hashlib.blake2b(chr(0).join(words).encode(), digest_size=6).hexdigest()}"

    @property
    def spec(self) -> str:
        return self._spec

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[w] for w in text.split(" ") if w]
        except KeyError as err:
            raise ValueError(f"word {err.args[0]!r} is not in this WordTokenizer's {self.vocab_size} words") from None

    def decode(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self.vocab_size, "WordTokenizer")
        return " ".join(self.words[i] for i in ids if i > 1)

    def id_texts(self) -> list[tuple[str, str]]:
        """Per id: its text decoded alone and its own token string, both the word (eos and pad included), as
        Engram's compressed vocabulary reads them (:func:`memzoo.blocks.engram_vocab.tokenizer_id_texts`)."""
        return [(word, word) for word in self.words]
