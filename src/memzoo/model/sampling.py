"""Next-token selection for generation: greedy, temperature and top-k sampling."""

from __future__ import annotations

import torch


def sample_next_token(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Picks one token per row of ``logits (B, V)`` → ``(B,)`` int64.

    ``temperature == 0``: argmax. Otherwise samples from ``softmax(logits / temperature)`` after keeping only the
    ``top_k`` largest logits (``None``: all).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or null, got {top_k}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
