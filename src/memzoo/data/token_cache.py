"""An on-disk cache of tokenised corpora: one ``.npy`` array per (data, tokenizer), written atomically.

The key is a JSON-able dict describing everything the tokens depend on (file paths, sizes and modification times,
or a dataset's fingerprint; the text column; the tokenizer spec); its SHA-256 names the file. A changed input
file changes its size or mtime and so the key: the stale entry is never read. Entries are written to a temporary
name in the same folder and renamed into place, so a crash never leaves a half-written array under a valid name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from memzoo.atomic import atomic_file

CACHE_FORMAT = 1  # bump when the tokenised layout changes


def default_cache_dir() -> Path:
    return Path("~/.cache/memzoo").expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenCache:
    """``cache.path(key)`` is where the tokens of ``key`` live; :meth:`store` writes them there atomically."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser() / "tokens"

    def path(self, key: dict) -> Path:
        text = json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True)
        return self.directory / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.npy"

    def store(self, key: dict, tokens: np.ndarray) -> Path:
        """Writes ``tokens`` (and a readable ``.json`` of the key beside it); returns the ``.npy`` path."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(target) as f:
            np.save(f, tokens, allow_pickle=False)
        manifest = json.dumps({"format": CACHE_FORMAT, **key, "n_tokens": len(tokens)}, indent=1)
        with atomic_file(target.with_suffix(".json")) as f:
            f.write(manifest.encode())
        return target
