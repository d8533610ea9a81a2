"""Token-by-token generation with a KV cache, and text decoded as the tokens arrive (``memzoo generate``).

A byte-level model emits UTF-8 one byte at a time, so a token can end in the middle of a character. Decoding
each token alone would print U+FFFD for every piece of a multi-byte character; :class:`TextStream` instead decodes
all ids so far and releases only text that can no longer change: a trailing U+FFFD is held back until the next
token completes the character (or the stream ends, when it is released as it is).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from memzoo.data.tokenizers import Tokenizer
from memzoo.model.decoding import decode_steps
from memzoo.model.transformer import Transformer

REPLACEMENT_CHARACTER = "\ufffd"


class TextStream:
    """Turns a growing sequence of token ids into text pieces whose concatenation is ``tokenizer.decode(ids)``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text it completes (possibly ``""``)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip(REPLACEMENT_CHARACTER))
        return self._release(text, max(stable, self.released))

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end comes out as U+FFFD)."""
        return self._release(self.tokenizer.decode(self.ids), None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        piece = text[self.released : end]
        self.released = max(self.released, end)
        return piece


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yields up to ``max_new_tokens`` continuation ids of ``prompt_ids`` as they are made, one forward of one token
    per step after the prompt (KV cache; the loop is :func:`memzoo.model.decoding.decode_steps`). Stops after ``eos_id`` or at the model's ``max_seq_len``. Greedy when
    ``temperature == 0``; else samples ``softmax(logits / temperature)`` over the ``top_k`` best tokens."""
    if not prompt_ids:
        raise ValueError("generate_tokens: the prompt has no tokens; give at least one")
    if len(prompt_ids) >= model.max_seq_len:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens, but the model reads at most max_seq_len={model.max_seq_len}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.embed.weight.device)
    for next_id in decode_steps(model, prompt, max_new_tokens, temperature, top_k, eos_id, generator):
        yield int(next_id)
