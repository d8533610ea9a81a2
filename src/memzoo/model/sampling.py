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


DEFAULT_MAX_NEW_TOKENS = 64


def default_max_new_tokens(prompt_len: int, max_seq_len: int, configured: int = DEFAULT_MAX_NEW_TOKENS) -> int:
    """New tokens to generate when the user asked for no number: ``configured``, lowered to what fits the context
    beside the prompt (``max_seq_len - prompt_len``), but not below ``min(configured, max_seq_len // 2)`` (a prompt
    that fills the context is then cut to its end, see :func:`prompt_tokens_to_keep`). Always below
    ``max_seq_len``, so it never fails for the model it runs on."""
    floor = min(configured, max_seq_len // 2)
    return max(0, min(max(min(configured, max_seq_len - prompt_len), floor), max_seq_len - 1))


def prompt_tokens_to_keep(prompt_len: int, max_new_tokens: int, max_seq_len: int, flag: str = "max_new_tokens") -> int:
    """How many of a prompt's last tokens fit a model that reads ``max_seq_len`` tokens, leaving room for
    ``max_new_tokens``: ``min(prompt_len, max_seq_len - max_new_tokens)`` (at least one token of the prompt stays,
    and at most ``max_seq_len - 1``). Raises ``ValueError`` naming ``flag`` (the option that set the number) if
    ``max_new_tokens`` alone fills the context."""
    if max_new_tokens < 0:
        raise ValueError(f"{flag} must be >= 0, got {max_new_tokens}")
    if max_new_tokens >= max_seq_len:
        raise ValueError(
            f"{flag}={max_new_tokens} does not fit the model's context of max_seq_len={max_seq_len} tokens "
            f"(the prompt needs at least one): ask for at most {max_seq_len - 1} new tokens with {flag}, or leave it "
            f"unset to generate as many as fit"
        )
    return min(prompt_len, max_seq_len - max(max_new_tokens, 1))


def context_warning(prompt_len: int, kept: int, max_new_tokens: int, max_seq_len: int) -> str:
    """The line that says a prompt was cut to its last ``kept`` tokens to fit the context."""
    return (
        f"the prompt has {prompt_len} tokens; with max_new_tokens={max_new_tokens} only its last {kept} fit the "
        f"model's context of max_seq_len={max_seq_len} tokens, so the first {prompt_len - kept} are not read"
    )
