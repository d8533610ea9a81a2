"""The one decode loop: :meth:`Transformer.generate <memzoo.model.transformer.Transformer.generate>` (whole batches)
and :func:`memzoo.export.streaming.generate_tokens` (one prompt, ids as they arrive) both step through
:func:`decode_steps`.

With the KV cache (default) the prompt is read in one forward and each later step reads one token; the caches give
each forward its start position, so blocks see the true positions (``BlockContext``) during decoding. Without it each
step recomputes the whole sequence (the reference the cache is tested against). Attention memory with
``documents`` chooses each row's documents from the prompt before the first step and keeps them to the end
(``Transformer.choose_memory_documents``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from memzoo.model.sampling import sample_next_token


@torch.no_grad()
def decode_steps(
    model: torch.nn.Module,  # a memzoo Transformer (this module sits below it: no import back up)
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yields the next token of each row of ``input_ids (B, P)``, ``(B,)`` int64 per step, at most
    ``max_new_tokens`` steps and never past the model's ``max_seq_len``. Greedy when ``temperature == 0``, else
    samples ``softmax(logits / temperature)`` over the ``top_k`` most likely tokens. With ``eos_id``: a row that
    produced it yields ``eos_id`` from then on, and the loop ends once every row has (after yielding that step).
    Cost: one forward over the prompt, then one single-token forward per step (``use_cache=False``: a forward over
    the whole sequence per step)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, P = input_ids.shape
    total = min(P + max_new_tokens, model.max_seq_len)
    model.choose_memory_documents(input_ids)
    try:
        yield from _steps(model, input_ids, total, temperature, top_k, eos_id, generator, use_cache)
    finally:
        model.release_memory_documents()


def _steps(model, input_ids, total, temperature, top_k, eos_id, generator, use_cache) -> Iterator[torch.Tensor]:
    B, P = input_ids.shape
    caches = model.new_caches(B, total) if use_cache else None
    sequence = input_ids
    step_input = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(total - P):
        logits = model(step_input, caches)[:, -1] if use_cache else model(sequence)[:, -1]
        nxt = sample_next_token(logits, temperature, top_k, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        yield nxt
        step_input = nxt[:, None]
        if not use_cache:
            sequence = torch.cat([sequence, step_input], dim=1)
        if eos_id is not None and bool(done.all()):
            return


__all__ = ["decode_steps"]
