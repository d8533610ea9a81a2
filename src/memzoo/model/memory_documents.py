"""Document selection for attention memory: which memorised documents each query may retrieve from.

With ``attention_memory.documents: D`` a memory layer first chooses, for every query position ``t``, the ``D``
documents of the bank whose entries best match the sequence so far, and then retrieves (top-k by cosine, exactly as
without selection) among their entries only. The match is a late interaction (ColBERT's MaxSim) over the layer's own
*pre-rotation keys*, centred by the bank's mean key ``μ_c`` of each key/value head ``c`` (a model's keys share a large
common component that would make every document look alike):

    m_u(d) = mean_c  max_{e ∈ d} cos(k_{u,c} − μ_c, k_{e,c} − μ_c)          (position u against document d)
    s_t(d) = mean_{S ≤ u ≤ t} m_u(d)                                        (``S = sink_positions``)

Document ``d`` is chosen at ``t`` when it is among the ``D`` best ``s_t`` and ``s_t(d) ≥ min_document_score``
(``None``: no threshold). A query with no chosen document reads no memory (in ``joint`` mode its output is then the
plain attention's).
Keys, unlike queries, describe the tokens themselves: the same text in the same context gives the same key, so a
prompt that names what a document is about matches it (and a paraphrase still matches its shared words).

Two ways to choose:

- **per position** (any forward: training, evaluation, scoring): as above, causal: ``s_t`` uses positions ``≤ t``;
  while decoding with a KV cache the running sums live in the cache's ``memory_state``.
- **per prompt** (generation: :meth:`Transformer.generate <memzoo.model.transformer.Transformer.generate>`,
  ``memzoo generate`` / ``predict``): before the prompt is read, one plain forward over it gives every memory layer's
  keys, and each row chooses its documents once, by ``s(d)`` averaged over the prompt's positions from
  ``max(1, sink_positions)`` on (position 0 holds the document-start token, the same in every prompt) *and* over the
  memory layers; every position then reads those documents, the prompt's first (its attention sink) included. This
  is how a retriever hands documents to the model, and it lets the sink read them, which is what SmolLM2-135M needs
  to recall a memorised fact (``docs/results/extended-mind.md``). Costs one extra forward over the prompt.

Cost per scored position: ``N · hd`` multiply-adds per key/value head (as much as retrieval) and a max per document.
No gradient flows through the choice.
"""

from __future__ import annotations

import torch

#: Positions are scored in chunks so that one chunk's similarity matrix holds at most this many elements.
_SCORE_CHUNK = 1 << 24


def centred_unit_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys (H_kv, N, hd)`` → ``(unit, mean)``: the keys minus their mean ``mean (H_kv, 1, hd)``, scaled to norm 1
    (float32)."""
    keys = keys.float()
    mean = keys.mean(dim=1, keepdim=True) if keys.shape[1] else keys.new_zeros(keys.shape[0], 1, keys.shape[2])
    centred = keys - mean
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12), mean


def position_scores(new_keys: torch.Tensor, doc_keys: torch.Tensor, key_mean: torch.Tensor, entry_doc: torch.Tensor,
                    n_docs: int) -> torch.Tensor:
    """``m_u(d)`` of the module docstring, ``(B, T, n_docs)`` float32: ``new_keys (B, T, H_kv, hd)`` (pre-rotation
    keys of the new positions) against ``doc_keys (H_kv, N, hd)`` and ``key_mean (H_kv, 1, hd)`` of
    :func:`centred_unit_keys`; ``entry_doc (N,)`` the document of each entry. A document with no entries scores
    ``-1``."""
    B, T, C, hd = new_keys.shape
    N = doc_keys.shape[1]
    k = new_keys.detach().float().permute(0, 2, 1, 3) - key_mean.unsqueeze(0)  # (B, C, T, hd)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = max(1, _SCORE_CHUNK // max(1, B * C * N))
    out = []
    for start in range(0, T, rows):
        sims = torch.matmul(k[:, :, start : start + rows], doc_keys.float().transpose(-1, -2))  # (B, C, rows, N)
        best = sims.new_full((*sims.shape[:-1], n_docs), -1.0)
        best = best.scatter_reduce(-1, entry_doc.expand_as(sims), sims, "amax")
        out.append(best.mean(dim=1))  # (B, rows, n_docs)
    return torch.cat(out, dim=1)


def chosen_documents(scores: torch.Tensor, q_offset: int, sink_positions: int, documents: int,
                     min_score: float | None, state: dict | None = None) -> torch.Tensor:
    """Which documents each new position may read, ``(B, T, n_docs)`` bool, from ``scores (B, T, n_docs)`` of
    :func:`position_scores` for positions ``q_offset ..``: the ``documents`` best running means ``s_t`` (module
    docstring) with ``s_t ≥ min_score``; positions before ``sink_positions`` choose none and are not scored.
    ``state``: the running sum of earlier positions (a KV cache's ``memory_state``), read and updated; ``None``
    when the positions start the sequence (``q_offset == 0``)."""
    B, T, D = scores.shape
    positions = q_offset + torch.arange(T, device=scores.device)
    scored = positions >= sink_positions  # (T,)
    previous = state.get("sum") if state else None
    running = torch.cumsum(scores.double() * scored[None, :, None], dim=1)
    if previous is not None:
        running = running + previous[:, None]
    if state is not None:
        state["sum"] = running[:, -1].clone()
    counts = (positions - sink_positions + 1).clamp_min(1).to(torch.float64)
    means = running / counts[None, :, None]
    top = means.topk(min(documents, D), dim=-1)
    keep = torch.ones_like(top.values, dtype=torch.bool) if min_score is None else top.values >= min_score
    allowed = torch.zeros(B, T, D, dtype=torch.bool, device=scores.device)
    allowed.scatter_(-1, top.indices, keep)
    return allowed & scored[None, :, None]


def best_documents(scores: torch.Tensor, documents: int, min_score: float | None) -> torch.Tensor:
    """``(B, n_docs)`` bool: the ``documents`` best of ``scores (B, n_docs)`` that reach ``min_score``."""
    top = scores.topk(min(documents, scores.shape[-1]), dim=-1)
    keep = torch.ones_like(top.values, dtype=torch.bool) if min_score is None else top.values >= min_score
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top.indices, keep)


@torch.no_grad()
def prompt_document_scores(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The per-prompt ``s(d)`` (module docstring) of every row of ``input_ids (B, P)``, ``(B, n_docs)`` float64,
    from one plain forward of ``model`` (a memzoo ``Transformer``; memory suspended); ``None`` when no layer has a
    bank attached with ``documents``."""
    memories = [layer.attn for layer in model.layers
                if layer.attn.memory is not None and layer.attn.memory.active and layer.attn.memory.documents]
    if not memories:
        return None
    keys: dict[int, torch.Tensor] = {}

    def hook_for(index: int, attn):
        q_width, kv_width = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim

        def hook(module, inputs, output):
            B, T = output.shape[:2]
            keys[index] = output[..., q_width : q_width + kv_width].reshape(B, T, attn.n_kv_heads, attn.head_dim)

        return hook

    handles = [attn.qkv.register_forward_hook(hook_for(i, attn)) for i, attn in enumerate(memories)]
    enabled = [attn.memory.enabled for attn in memories]
    try:
        for attn in memories:
            attn.memory.enabled = False
        model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
        for attn, state in zip(memories, enabled):
            attn.memory.enabled = state
    first = min(max(1, memories[0].memory.sink_positions), input_ids.shape[1] - 1)
    per_layer = [position_scores(keys[i][:, first:], attn.memory.doc_keys, attn.memory.key_mean,
                                 attn.memory.entry_doc, attn.memory.n_docs).double().mean(dim=1)
                 for i, attn in enumerate(memories)]
    return torch.stack(per_layer).mean(dim=0)


__all__ = ["best_documents", "centred_unit_keys", "chosen_documents", "position_scores", "prompt_document_scores"]
