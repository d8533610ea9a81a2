"""Attention over an external memory of keys and values: Extended Mind Transformers (Klett & Ahle, arXiv 2406.02332)
and Memorizing Transformers' gated variant (Wu et al., ICLR 2022).

A layer with attention memory holds a bank of ``N`` (key, value) pairs per key/value head, computed by the model
itself over external documents (:class:`memzoo.model.memory_bank.MemoryBank`). Each query ``q`` (rotated for its
position ``p``, as local attention uses it) retrieves the ``topk`` entries of its key/value head's bank with the
largest cosine similarity ``q·k / (|q||k|)``: an exact matmul + top-k over the whole bank. Then, with ``s = 1/sqrt(hd)``:

- ``joint`` (Extended Mind, no training needed): one softmax over the retrieved and the local (causal) keys,
  ``y = softmax([q·K_M s ; q·K_L s]) · [V_M ; V_L]``.
- ``gated`` (Memorizing Transformers): separate softmaxes joined by a trainable per-head gate ``g = sigmoid(b_h)``,
  ``y = g · softmax(q·K_M s) V_M + (1 − g) · softmax(q·K_L s) V_L``.

Positions (the Extended Mind treatment for rotary models): bank keys are stored *before* rotation and used as they are,
i.e. rotated for position 0, while the query keeps its own rotation; a query at position ``p`` sees every memory at
relative distance ``p``, before its whole context. This is what the authors' Llama code computes (keys cached before
RoPE, only queries and local keys rotated) and needs no finetuning. ``distance: D`` moves the memories further back:
bank keys are rotated for position ``−D`` (for retrieval and attention alike), so a query at position ``p`` sees them
at relative distance ``p + D`` (``D = 0``: the authors' treatment). With short prompts ``p`` is small and memories look
like recent tokens; on SmolLM2-135M, ``D = 0`` lets two retrieved memories per head take most of the attention and
breaks the model, a few thousand keeps what it knew (``docs/results/extended-mind.md``). ``similarity_threshold``
(the authors' ``mask_by_sim``) drops retrieved entries whose cosine similarity is below it. ``sink_positions: S``:
queries at positions ``0 .. S−1`` read no memory. Those first positions are the model's attention sinks (every later
query puts much of its attention there); when the sink's own query also attends to memories its hidden state
changes in every layer and with it what every later token reads (on SmolLM2-135M: held-out loss 3.19 plain,
4.1–6.3 with a bank attached, 3.16–3.74 with ``sink_positions: 1``; ``docs/results/extended-mind.md``).

``documents: D`` restricts retrieval to the ``D`` memorised documents that best match the sequence so far, chosen per
position by the layer's own keys (``min_document_score``: the least match; a query with no document chosen reads no
memory): see :mod:`memzoo.model.memory_documents`. Documents are what a bank is made of, so this is retrieval in two
stages, document then token, as the Extended Mind authors pair their memories with a document retriever; on
SmolLM2-135M it is what makes memorised facts recallable (``docs/results/extended-mind.md``).

Retrieval is exact by default. ``index: faiss_ivf`` (needs the optional ``faiss-cpu`` package) searches an inverted
file index per key/value head instead (``IndexIVFFlat`` over the unit keys, ``nlist = min(√N, N/39)`` lists,
``nprobe = min(16, nlist)`` of them searched per query): approximate, cost ``≈ N · nprobe / nlist`` per query.

An empty (or no) bank leaves the layer exactly the plain attention. Memory entries are external, so causality is that
of the local attention. Cost per query: ``N · hd`` multiply-adds for retrieval plus a top-k over ``N``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from memzoo.model.memory_documents import centred_unit_keys, chosen_documents, position_scores
from memzoo.model.rope import rotate_for_position

MEMORY_MODES = ("joint", "gated")
MEMORY_INDEXES = ("exact", "faiss_ivf")
#: Query chunks are sized so that one chunk's similarity matrix holds at most this many elements.
_SIMILARITY_CHUNK = 1 << 24


class AttentionMemoryError(ValueError):
    """An attention-memory setting or bank that does not fit the model (names the value and the fix)."""


@dataclass(frozen=True)
class AttentionMemoryConfig:
    """The ``attention_memory`` entry of a model config.

    Args:
        layers: layer indices with memory (negative ones count from the end), or ``"all"``.
        topk: entries each query retrieves from its key/value head's bank.
        mode: ``joint`` (Extended Mind: one softmax, no trained parameters) or ``gated`` (Memorizing Transformers:
            a trainable per-head gate ``gate`` between memory and local attention, logit initialised at 0).
        similarity_threshold: retrieved entries with cosine similarity below this are not attended (``None``: all
            ``topk`` are; the authors use 0.25).
        index: ``exact`` (matmul + top-k over the bank) or ``faiss_ivf`` (approximate; module docstring).
        distance: memories are rotated for position ``-distance``: a query at position ``p`` sees them at relative
            distance ``p + distance`` (0: the Extended Mind authors' treatment; module docstring).
        sink_positions: queries at the sequence's first ``sink_positions`` positions read no memory (0: every
            query does, as the authors' code; module docstring).
        documents: each query retrieves only from the ``documents`` bank documents that best match the sequence so
            far (0: from the whole bank, as the authors' code; :mod:`memzoo.model.memory_documents`).
        min_document_score: with ``documents``, a document is chosen only when its match reaches this (a mean
            centred cosine in [-1, 1]; ``None``: the best ``documents`` always are).
    """

    layers: tuple[int, ...]
    topk: int = 8
    mode: str = "joint"
    similarity_threshold: float | None = None
    index: str = "exact"
    distance: int = 0
    sink_positions: int = 0
    documents: int = 0
    min_document_score: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], n_layers: int) -> AttentionMemoryConfig:
        """Checks ``data`` (YAML/JSON form) for a model of ``n_layers`` layers; every bad key or value raises
        :class:`AttentionMemoryError` naming it."""
        if isinstance(data, AttentionMemoryConfig):
            data = data.to_dict()
        if not isinstance(data, Mapping):
            raise AttentionMemoryError(
                f"attention_memory must be a mapping like {{layers: all, topk: 8, mode: joint}}, got {data!r}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            hints = [repr(k) + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), known, 1))
                                else "") for k in unknown]
            raise AttentionMemoryError(f"attention_memory: unknown key(s) {', '.join(hints)}; known keys: {known}")
        if "layers" not in data:
            raise AttentionMemoryError("attention_memory needs `layers`: a list of layer indices, or `all`")
        layers = _layer_list(data["layers"], n_layers)
        topk = data.get("topk", cls.topk)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise AttentionMemoryError(f"attention_memory.topk must be a positive integer, got {topk!r}")
        mode = data.get("mode", cls.mode)
        if mode not in MEMORY_MODES:
            raise AttentionMemoryError(f"attention_memory.mode must be one of {MEMORY_MODES}, got {mode!r}")
        threshold = data.get("similarity_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not -1.0 <= threshold <= 1.0):
            raise AttentionMemoryError(
                f"attention_memory.similarity_threshold must be a cosine similarity in [-1, 1] or null, got "
                f"{threshold!r}"
            )
        index = data.get("index", cls.index)
        if index not in MEMORY_INDEXES:
            raise AttentionMemoryError(f"attention_memory.index must be one of {MEMORY_INDEXES}, got {index!r}")
        distance = data.get("distance", cls.distance)
        if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
            raise AttentionMemoryError(
                f"attention_memory.distance must be a non-negative integer (positions between the memories and the "
                f"context), got {distance!r}"
            )
        sinks = data.get("sink_positions", cls.sink_positions)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise AttentionMemoryError(
                f"attention_memory.sink_positions must be a non-negative integer (the first positions, whose queries "
                f"read no memory), got {sinks!r}"
            )
        documents = data.get("documents", cls.documents)
        if isinstance(documents, bool) or not isinstance(documents, int) or documents < 0:
            raise AttentionMemoryError(
                f"attention_memory.documents must be a non-negative integer (the documents each query may retrieve "
                f"from; 0: the whole bank), got {documents!r}"
            )
        min_doc = data.get("min_document_score")
        if min_doc is not None and (isinstance(min_doc, bool) or not isinstance(min_doc, (int, float))
                                    or not -1.0 <= min_doc <= 1.0):
            raise AttentionMemoryError(
                f"attention_memory.min_document_score must be a mean cosine in [-1, 1] or null, got {min_doc!r}"
            )
        if min_doc is not None and not documents:
            raise AttentionMemoryError(
                f"attention_memory.min_document_score {min_doc} needs documents >= 1 (it is the least match of a "
                f"chosen document); set documents, or remove min_document_score"
            )
        if documents and index != "exact":
            raise AttentionMemoryError(
                f"attention_memory.documents {documents} needs index: exact (the {index} index searches the whole "
                f"bank); use index: exact, or documents: 0"
            )
        return cls(layers, topk, mode, None if threshold is None else float(threshold), index, distance, sinks,
                   documents, None if min_doc is None else float(min_doc))

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as model configs store it."""
        return {"layers": list(self.layers), "topk": self.topk, "mode": self.mode,
                "similarity_threshold": self.similarity_threshold, "index": self.index, "distance": self.distance,
                "sink_positions": self.sink_positions, "documents": self.documents,
                "min_document_score": self.min_document_score}


def _layer_list(value: Any, n_layers: int) -> tuple[int, ...]:
    if value == "all":
        return tuple(range(n_layers))
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise AttentionMemoryError(
            f"attention_memory.layers must be `all` or a non-empty list of layer indices, got {value!r}"
        )
    out = []
    for raw in value:
        if isinstance(raw, bool) or not isinstance(raw, int) or not -n_layers <= raw < n_layers:
            raise AttentionMemoryError(
                f"attention_memory.layers: {raw!r} is not a layer index of this {n_layers}-layer model (use 0 .. "
                f"{n_layers - 1}, or negative indices counting from the end)"
            )
        index = raw % n_layers
        if index in out:
            raise AttentionMemoryError(f"attention_memory.layers names layer {index} twice; give each layer once")
        out.append(index)
    return tuple(sorted(out))


def retrieve(queries: torch.Tensor, unit_keys: torch.Tensor, topk: int,
             allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k retrieval by cosine similarity.

    ``queries (B, H_kv, G, T, hd)`` (any scale), ``unit_keys (H_kv, N, hd)`` (rows of norm 1) → ``similarity,
    indices (B, H_kv, G, T, k)`` with ``k = min(topk, N)``, best first. ``allowed (B, T, N)`` bool: the entries
    each position may retrieve; the others score ``-inf`` (so a position with fewer than ``k`` allowed entries gets
    ``-inf`` similarities in its last places). Positions are processed in chunks so that no similarity matrix
    exceeds ``2^24`` elements. No gradient flows through the selection."""
    B, C, G, T, hd = queries.shape
    N = unit_keys.shape[1]
    k = min(topk, N)
    q = queries.detach().float()
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    keys = unit_keys.float().transpose(-1, -2).unsqueeze(1)  # (C, 1, hd, N)
    rows = max(1, _SIMILARITY_CHUNK // max(1, B * C * G * N))
    sims, idx = [], []
    for start in range(0, T, rows):
        scores = torch.matmul(q[:, :, :, start : start + rows], keys)  # (B, C, G, rows, N)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None, None, start : start + rows], float("-inf"))
        top = scores.topk(k, dim=-1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims, 3), torch.cat(idx, 3)


def build_faiss_index(unit_keys: torch.Tensor) -> list:
    """One ``faiss.IndexIVFFlat`` (inner product) per key/value head over ``unit_keys (H_kv, N, hd)``, trained on
    the keys themselves. Raises :class:`AttentionMemoryError` when faiss is not installed."""
    try:
        import faiss
    except ImportError:
        raise AttentionMemoryError(
            "attention_memory.index: faiss_ivf needs the faiss-cpu package (pip install faiss-cpu); or use index: exact"
        ) from None
    C, N, hd = unit_keys.shape
    nlist = max(1, min(int(math.sqrt(N)), N // 39))
    indexes = []
    for head in range(C):
        keys = unit_keys[head].detach().float().cpu().contiguous().numpy()
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(hd), hd, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
        index.add(keys)
        index.nprobe = min(16, nlist)
        indexes.append(index)
    return indexes


def retrieve_faiss(queries: torch.Tensor, indexes: list, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`retrieve` through per-head faiss indexes (approximate); entries not found have index ``-1``."""
    B, C, G, T, hd = queries.shape
    k = min(topk, indexes[0].ntotal)
    q = queries.detach().float()
    q = (q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)).transpose(0, 1).reshape(C, B * G * T, hd).cpu()
    found = [index.search(q[head].contiguous().numpy(), k) for head, index in enumerate(indexes)]
    sims = torch.stack([torch.from_numpy(s) for s, _ in found]).view(C, B, G, T, k).transpose(0, 1)
    idx = torch.stack([torch.from_numpy(i) for _, i in found]).view(C, B, G, T, k).transpose(0, 1)
    return sims.to(queries.device), idx.long().to(queries.device)


class CitationRecorder:
    """Collects, per forward of each memory layer, the memory entries the *last* query position retrieved and the
    attention weight it gave them: ``records[layer] = [(indices (B, H, k), weights (B, H, k)), ...]``."""

    def __init__(self):
        self.records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, layer: int, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.records.setdefault(layer, []).append((indices.detach().cpu(), weights.detach().float().cpu()))

    def entry_weights(self, n_entries: int, row: int = 0) -> torch.Tensor:
        """Attention weight on each bank entry ``(n_entries,)`` for batch row ``row``, summed over layers, heads and
        recorded steps."""
        total = torch.zeros(n_entries, dtype=torch.float64)
        for steps in self.records.values():
            for indices, weights in steps:
                total.index_add_(0, indices[row].reshape(-1), weights[row].reshape(-1).double())
        return total


class AttentionMemory(nn.Module):
    """The memory of one attention layer: settings, the gate (``gated`` mode) and the attached bank.

    The bank is held in non-persistent buffers (never in checkpoints): ``keys, values (H_kv, N, hd)`` and
    ``unit_keys`` (keys scaled to norm 1, for retrieval). ``forward`` computes the attention output for rotated
    queries and the local keys/values (module docstring)."""

    def __init__(self, layer: int, n_heads: int, n_kv_heads: int, head_dim: int, config: AttentionMemoryConfig):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.topk = config.topk
        self.mode = config.mode
        self.similarity_threshold = config.similarity_threshold
        self.index = config.index
        self.distance = config.distance
        self.sink_positions = config.sink_positions
        self.documents = config.documents
        self.min_document_score = config.min_document_score
        self.faiss_indexes: list | None = None
        self.gate = nn.Parameter(torch.zeros(n_heads)) if config.mode == "gated" else None
        empty = torch.zeros(n_kv_heads, 0, head_dim)
        self.register_buffer("keys", empty, persistent=False)
        self.register_buffer("values", empty.clone(), persistent=False)
        self.register_buffer("unit_keys", empty.clone(), persistent=False)
        # document selection (memzoo.model.memory_documents): the entries' documents, their centred unit keys
        self.register_buffer("entry_doc", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("doc_keys", empty.clone(), persistent=False)
        self.register_buffer("key_mean", torch.zeros(n_kv_heads, 1, head_dim), persistent=False)
        self.n_docs = 0
        #: ``(B, n_docs)`` bool: the documents each batch row reads at every position, chosen from a prompt
        #: (:meth:`Transformer.choose_memory_documents`); ``None``: chosen per position.
        self.prompt_documents: torch.Tensor | None = None
        self.recorder: CitationRecorder | None = None
        self.enabled = True

    @property
    def n_entries(self) -> int:
        return self.keys.shape[1]

    @property
    def active(self) -> bool:
        """Whether this layer attends to memory now (a non-empty bank is attached and memory is not suspended)."""
        return self.enabled and self.n_entries > 0

    def set_bank(self, keys: torch.Tensor, values: torch.Tensor, inv_freq: torch.Tensor | None = None,
                 entry_doc: torch.Tensor | None = None, n_docs: int | None = None) -> None:
        """Attaches ``keys, values (H_kv, N, hd)`` (pre-rotation keys), on this module's device, in the given dtype.
        With ``distance > 0`` the keys are rotated for position ``-distance`` with the layer's rotary inverse
        frequencies ``inv_freq (hd/2,)`` (required then). ``entry_doc (N,)`` (documents ``0 .. n_docs - 1``): the
        document of each entry, required with ``documents``."""
        expected = (self.n_kv_heads, keys.shape[1] if keys.dim() == 3 else -1, self.head_dim)
        if keys.dim() != 3 or tuple(keys.shape) != expected or keys.shape != values.shape:
            raise AttentionMemoryError(
                f"layer {self.layer}: bank keys {tuple(keys.shape)} / values {tuple(values.shape)} must both be "
                f"(n_kv_heads={self.n_kv_heads}, N, head_dim={self.head_dim})"
            )
        if self.documents:
            if entry_doc is None or entry_doc.shape != (keys.shape[1],):
                raise AttentionMemoryError(
                    f"layer {self.layer}: attention_memory.documents {self.documents} needs the document of every "
                    f"bank entry; attach banks with Transformer.attach_memory"
                )
            doc_keys, key_mean = centred_unit_keys(keys.to(self.keys.device))
            self.entry_doc = entry_doc.to(device=self.keys.device, dtype=torch.long)
            self.n_docs = int(n_docs if n_docs is not None else (int(entry_doc.max()) + 1 if entry_doc.numel() else 0))
            self.doc_keys, self.key_mean = doc_keys, key_mean
        if self.distance:
            if inv_freq is None:
                raise AttentionMemoryError(
                    f"layer {self.layer}: attention_memory.distance {self.distance} needs the layer's rotary "
                    f"frequencies; attach banks with Transformer.attach_memory"
                )
            keys = rotate_for_position(keys, inv_freq, -self.distance)
        device = self.keys.device
        self.keys = keys.to(device)
        self.values = values.to(device)
        unit = keys.to(device=device, dtype=torch.float32)
        self.unit_keys = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.faiss_indexes = build_faiss_index(self.unit_keys) if self.index == "faiss_ivf" and unit.shape[1] else None

    def clear_bank(self) -> None:
        empty = self.keys.new_zeros(self.n_kv_heads, 0, self.head_dim)
        self.keys, self.values, self.unit_keys = empty, empty.clone(), empty.float()
        self.entry_doc, self.doc_keys, self.n_docs = self.entry_doc[:0], empty.float(), 0
        self.prompt_documents = None
        self.faiss_indexes = None

    def forward(self, q: torch.Tensor, k_local: torch.Tensor, v_local: torch.Tensor, q_offset: int,
                dropout_p: float = 0.0, new_keys: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor:
        """``q (B, T, H, hd)`` rotated for positions ``q_offset ..``; ``k_local, v_local (B, H_kv, Tk, hd)`` the
        visible local keys (rotated) and values, key ``j`` at position ``j``; query ``i`` sees local keys
        ``0 .. q_offset + i``. With ``documents``: ``new_keys (B, T, H_kv, hd)`` the new positions' pre-rotation
        keys and ``state`` the decode state of the document choice (a KV cache's ``memory_state``; ``None`` when
        ``q_offset == 0``). Returns ``y (B, T, H, hd)`` in ``q.dtype``."""
        B, T, H, hd = q.shape
        C, G = self.n_kv_heads, H // self.n_kv_heads
        Tk = k_local.shape[2]
        scale = 1.0 / math.sqrt(hd)
        compute = torch.promote_types(q.dtype, torch.float32)
        qh = q.reshape(B, T, C, G, hd).permute(0, 2, 3, 1, 4).to(compute)  # (B, C, G, T, hd)

        allowed = None
        if self.documents and self.prompt_documents is not None:
            if self.prompt_documents.shape != (B, self.n_docs):
                raise AttentionMemoryError(
                    f"layer {self.layer}: documents were chosen for {self.prompt_documents.shape[0]} prompt row(s), "
                    f"this forward has {B}; choose them again for this batch"
                )
            allowed = self.prompt_documents[:, None, self.entry_doc].expand(B, T, -1)
        elif self.documents:
            if new_keys is None or (q_offset and state is None):
                raise AttentionMemoryError(
                    f"layer {self.layer}: attention_memory.documents needs the new positions' keys, and a KV "
                    f"cache's memory_state after the first positions"
                )
            scores = position_scores(new_keys, self.doc_keys, self.key_mean, self.entry_doc, self.n_docs)
            chosen = chosen_documents(scores, q_offset, self.sink_positions, self.documents,
                                      self.min_document_score, state)  # (B, T, n_docs)
            allowed = chosen[:, :, self.entry_doc]  # (B, T, N)
        if self.faiss_indexes is not None:
            sims, idx = retrieve_faiss(qh, self.faiss_indexes, self.topk)
        else:
            sims, idx = retrieve(qh, self.unit_keys, self.topk, allowed)  # (B, C, G, T, k)
        missing = (idx < 0) | sims.isneginf()  # an approximate index may find fewer than k; entries not allowed
        idx = idx.clamp_min(0)
        heads = torch.arange(C, device=q.device).view(1, C, 1, 1, 1)
        k_mem = self.keys[heads, idx].to(compute)  # (B, C, G, T, k, hd)
        v_mem = self.values[heads, idx].to(compute)
        mem_logits = torch.einsum("bcgtd,bcgtkd->bcgtk", qh, k_mem) * scale
        if self.similarity_threshold is not None:
            missing = missing | (sims < self.similarity_threshold)
        if self.sink_positions:
            missing = missing | ((q_offset + torch.arange(T, device=q.device)) < self.sink_positions)[:, None]
        mem_logits = mem_logits.masked_fill(missing, float("-inf"))

        local_logits = torch.matmul(qh, k_local.to(compute).unsqueeze(2).transpose(-1, -2)) * scale  # (B,C,G,T,Tk)
        visible = torch.arange(Tk, device=q.device)[None, :] <= (q_offset + torch.arange(T, device=q.device))[:, None]
        local_logits = local_logits.masked_fill(~visible, float("-inf"))
        v_loc = v_local.to(compute).unsqueeze(2)  # (B, C, 1, Tk, hd)

        k = idx.shape[-1]
        if self.mode == "joint":
            probs = torch.cat([mem_logits, local_logits], dim=-1).softmax(dim=-1)
            probs = torch.nn.functional.dropout(probs, dropout_p) if dropout_p > 0 else probs
            p_mem, p_loc = probs.split([k, Tk], dim=-1)
            y = torch.einsum("bcgtk,bcgtkd->bcgtd", p_mem, v_mem) + torch.matmul(p_loc, v_loc)
            recorded = p_mem
        else:
            # a query whose retrieved entries are all below the threshold reads nothing from memory
            p_mem = torch.nan_to_num(mem_logits.softmax(dim=-1), nan=0.0)
            p_loc = local_logits.softmax(dim=-1)
            if dropout_p > 0:
                p_mem = torch.nn.functional.dropout(p_mem, dropout_p)
                p_loc = torch.nn.functional.dropout(p_loc, dropout_p)
            g = torch.sigmoid(self.gate.to(compute)).view(1, C, G, 1, 1)
            y = g * torch.einsum("bcgtk,bcgtkd->bcgtd", p_mem, v_mem) + (1 - g) * torch.matmul(p_loc, v_loc)
            recorded = g * p_mem
        if self.recorder is not None:
            self.recorder.add(self.layer, idx[:, :, :, -1].reshape(B, H, k), recorded[:, :, :, -1].reshape(B, H, k))
        return y.permute(0, 3, 1, 2, 4).reshape(B, T, H, hd).to(q.dtype)
