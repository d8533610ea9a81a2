"""Tokenizer files of an export, so ``AutoTokenizer.from_pretrained(folder)`` gives memzoo's token ids.

memzoo's :class:`~memzoo.data.tokenizers.ByteTokenizer` (ids 0–255 = UTF-8 bytes, 256 ``<|endoftext|>``, 257
``<|pad|>``) is written as a ``tokenizers`` byte-level BPE without merges:

- the ``ByteLevel`` pre-tokenizer (no regex split, no prefix space) turns text into its UTF-8 bytes, each shown as
  one printable character (bytes that are printable Latin-1 characters stand for themselves, the other 68 bytes
  take the characters U+0100 onwards, in byte order);
- the BPE vocabulary maps the character of byte ``b`` to id ``b``; with no merges every byte is one token;
- ``<|endoftext|>`` and ``<|pad|>`` are special tokens 256 and 257; ``split_special_tokens`` makes the *text*
  ``"<|endoftext|>"`` encode as its 13 bytes, as memzoo does;
- the ``ByteLevel`` decoder turns ids back into bytes, and invalid UTF-8 into U+FFFD.

A :class:`~memzoo.data.tokenizers.HFTokenizer`'s own ``tokenizer.json`` is copied as it is, with the chat template,
bos token and ``add_bos_token`` of a ``tokenizer_config.json`` beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from memzoo.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer
from memzoo.export.errors import ExportError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def byte_to_character() -> dict[int, str]:
    """The printable character standing for each byte value in a byte-level ``tokenizer.json``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def byte_level_tokenizer(tokenizer: ByteTokenizer):
    """A ``tokenizers.Tokenizer`` whose ids equal ``tokenizer``'s for every text (see the module docstring)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {character: byte for byte, character in byte_to_character().items()}
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rust.decoder = decoders.ByteLevel()
    specials = sorted([(tokenizer.eos_id, tokenizer.eos_token), (tokenizer.pad_id, tokenizer.pad_token)])
    for expected_id, text in specials:
        rust.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        if rust.token_to_id(text) != expected_id:
            raise ExportError(f"byte-level tokenizer: {text!r} got id {rust.token_to_id(text)}, not {expected_id}")
    return rust


#: settings of a source ``tokenizer_config.json`` an export keeps (a GGUF file's or Hugging Face folder's)
CARRIED_SETTINGS = ("chat_template", "bos_token", "add_bos_token", "unk_token")


def carried_tokenizer_settings(config: Path) -> dict[str, Any]:
    """The :data:`CARRIED_SETTINGS` of the ``tokenizer_config.json`` at ``config`` (none when there is none)."""
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{config} cannot be read as JSON ({err}); fix or remove it") from err
    return {k: data[k] for k in CARRIED_SETTINGS if isinstance(data, dict) and data.get(k) is not None}


def write_tokenizer_files(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> str:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``; returns the manifest's tokenizer
    entry (``"byte"``, or ``"tokenizer.json"`` for a copied Hugging Face tokenizer)."""
    if isinstance(tokenizer, ByteTokenizer):
        byte_level_tokenizer(tokenizer).save(str(folder / TOKENIZER_FILE))
        eos, pad, entry = tokenizer.eos_token, tokenizer.pad_token, "byte"
        extra: dict[str, Any] = {"split_special_tokens": True}
    elif isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, folder / TOKENIZER_FILE)
        eos, pad, entry = tokenizer.eos_token, tokenizer.pad_token, TOKENIZER_FILE
        extra = carried_tokenizer_settings(tokenizer.path.parent / TOKENIZER_CONFIG_FILE)
    else:
        raise ExportError(
            f"cannot export tokenizer {tokenizer!r}: only memzoo's ByteTokenizer and HFTokenizer are written as "
            f"Hugging Face files"
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **extra,
    }
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return entry
