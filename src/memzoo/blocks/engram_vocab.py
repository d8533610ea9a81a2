"""Engram's compressed vocabulary and n-gram hashing parameters (pure Python: no tokenizer library, no numpy).

Compression (Engram, arXiv 2601.07372, §2.2): token ids whose text is equal after normalisation share one id. A
token's text is normalised as the authors' ``tokenizers`` normalizer sequence does, here in plain Python:

    NFKC → NFD → drop combining marks → lowercase → runs of [ \\t\\r\\n] → " " → a text that is exactly " " stays " "
    → strip Unicode white space at both ends → U+E000 (the authors' sentinel) → " "

(identical to the ``tokenizers`` library's sequence on every character of Unicode 3.2; characters added to Unicode
later may normalise differently, as Python's ``unicodedata`` and the library's tables are of different versions)

and its key is the normalised text, or the text itself when that is empty, or the token's own string (e.g. a
byte-level BPE piece) when the text decoded alone has a U+FFFD replacement character (an incomplete UTF-8
sequence). Ids with equal keys share the compressed id given to the first of them (ids in increasing order).

Hashing parameters: per (n-gram order, head) a distinct prime table size (the next primes above a start), and per
layer odd multipliers drawn from a generator seeded ``seed + 10007 · layer_id`` below a bound that keeps every
product ``id · multiplier`` inside int64.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import torch

#: Unicode White_Space characters (what the ``tokenizers`` Strip normalizer removes).
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_SPACE_RUNS = re.compile(r"[ \t\r\n]+")
_SENTINEL = "\ue000"
_INT64_MAX = 2**63 - 1
#: The layer stride of the multipliers' seed (the authors': seed + 10007 · layer_id).
LAYER_SEED_STRIDE = 10007


def normalize_token_text(text: str) -> str:
    """The text of one token, normalised as the module docstring says (may be empty)."""
    text = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if not unicodedata.category(c).startswith("M")).lower()
    text = _SPACE_RUNS.sub(" ", text)
    if text == " ":  # a whitespace-only token stays one space (through the authors' sentinel, U+E000)
        text = _SENTINEL
    return text.strip(WHITE_SPACE).replace(_SENTINEL, " ")


def token_key(text: str, token: str) -> str:
    """The key that decides which ids merge: ``token`` (the token's own string) when ``text`` (the id decoded
    alone) holds U+FFFD, else the normalised text, or ``text`` itself when that normalises to nothing."""
    if "\ufffd" in text:
        return token
    return normalize_token_text(text) or text


def compressed_vocabulary(id_texts: Sequence[tuple[str, str]]) -> tuple[list[int], int]:
    """``(lookup, size)``: ``lookup[id]`` the compressed id of each token id, from ``id_texts[id] = (text of the id
    decoded alone, special tokens kept; the token's own string)``; ``size`` the number of compressed ids."""
    key_to_new: dict[str, int] = {}
    lookup = []
    for text, token in id_texts:
        lookup.append(key_to_new.setdefault(token_key(text, token), len(key_to_new)))
    return lookup, len(key_to_new)


def tokenizer_id_texts(tokenizer) -> list[tuple[str, str]]:
    """``tokenizer.id_texts()`` (memzoo's byte and Hugging Face tokenizers have it), or a clear error."""
    id_texts = getattr(tokenizer, "id_texts", None)
    if not callable(id_texts):
        raise TypeError(
            f"engram: tokenizer {type(tokenizer).__name__} has no id_texts() (each id's text decoded alone and its "
            f"own token string), which the compressed vocabulary is built from; use memzoo's tokenizers "
            f"(memzoo.data.tokenizers.build_tokenizer) or add id_texts() to yours"
        )
    return list(id_texts())


def is_prime(n: int) -> bool:
    """Deterministic Miller–Rabin, exact for every ``n < 3.3·10²⁴``."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def table_primes(starts: Sequence[int], heads: int) -> list[list[int]]:
    """Per n-gram order, ``heads`` distinct primes: order ``i``'s heads take the next primes above ``starts[i] - 1``
    (each head searching on from the previous head's prime), none reused across orders."""
    seen: set[int] = set()
    primes = []
    for start in starts:
        candidate, order = start - 1, []
        for _ in range(heads):
            candidate += 1
            while not is_prime(candidate) or candidate in seen:
                candidate += 1
            seen.add(candidate)
            order.append(candidate)
        primes.append(order)
    return primes


def hash_multipliers(max_ngram: int, max_id: int, seed: int, layer_id: int) -> torch.Tensor:
    """``(max_ngram,)`` int64 odd multipliers ``2r + 1``, ``r`` uniform below ``(int64_max // (max_id + 1)) // 2``
    from a generator seeded ``seed + 10007 · layer_id``, so ``id · multiplier`` fits int64 for ids ``<= max_id``."""
    half_bound = max(1, (_INT64_MAX // (max_id + 1)) // 2)
    generator = torch.Generator().manual_seed(seed + LAYER_SEED_STRIDE * layer_id)
    r = torch.randint(0, half_bound, (max_ngram,), generator=generator, dtype=torch.int64)
    return 2 * r + 1
