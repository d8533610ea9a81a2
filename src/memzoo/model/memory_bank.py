"""A bank of attention memories: the keys and values a model computes over external documents, per layer and
key/value head, with the origin (document, token offset) of every entry; built by ``memzoo memorize``, attached with
:meth:`memzoo.model.transformer.Transformer.attach_memory`.

    bank = MemoryBank.build(model, tokenizer, {"ada.txt": text_a, "fox.txt": text_b})
    bank.save("facts.bank")
    model.attach_memory(MemoryBank.load("facts.bank"))      # attention memory (Extended Mind) in the bank's layers

Building: each document is read as ``[eos] + prefix + tokens`` in windows of ``window`` tokens advancing by ``stride``
(every token after the first window keeps at least ``window − stride`` tokens of context); each document token's
pre-rotation key and its value in every bank layer become one entry (the ``eos`` and the ``prefix`` tokens are not
stored). A ``prefix`` (default none) gives the attention-sink role of a sequence's first positions to tokens that
are not memories, so a document's own first tokens are not stored as sinks.

File (safetensors; format ``memzoo-memory-bank``, version 1): tensors ``layers.{l}.keys`` / ``layers.{l}.values``
``(n_kv_heads, N, head_dim)``, ``entry_doc`` / ``entry_offset`` ``(N,)`` int64, the documents' tokens
``doc_tokens`` with ``doc_starts (D + 1,)``, and ``probe.{l}.keys`` (the keys of a fixed probe sequence, so a bank is
refused by a model whose weights differ); metadata: the model's dimensions, layers, document names, build settings.
Loading checks every field and shape; a mismatch raises :class:`MemoryBankError` naming the file and the field.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from memzoo.atomic import write_bytes_atomic
from memzoo.model.attention_memory import AttentionMemoryConfig, AttentionMemoryError, CitationRecorder
from memzoo.model.rope import rope_inv_freq

#: The model a bank belongs to: a :class:`~memzoo.model.transformer.Transformer` (typed as a module here, since the
#: Transformer's ``attach_memory`` imports this file).
Transformer = torch.nn.Module

FORMAT = "memzoo-memory-bank"
FORMAT_VERSION = 1
PROBE_LENGTH = 8
#: Relative difference of the probe keys above which a bank is taken to come from another model.
PROBE_TOLERANCE = 0.05
DIMENSIONS = ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size")


class MemoryBankError(AttentionMemoryError):
    """A bank file that cannot be read, or a bank that does not fit the model (names the file and the mismatch)."""


@dataclass
class Citation:
    """A span of a memorised document and the share of the memory attention its entries received."""

    doc: int
    name: str
    start: int  # first token offset in the document
    end: int  # one past the last
    text: str
    share: float


@dataclass
class MemoryBank:
    """Keys/values ``(n_kv_heads, N, head_dim)`` per layer in ``keys``/``values``; ``entry_doc``/``entry_offset``
    ``(N,)`` the document and token offset of each entry; ``doc_names`` and ``doc_tokens`` the documents;
    ``model`` the dimensions of the model that built it; ``probe`` its keys of the probe sequence per layer;
    ``build_settings`` how it was built (window, stride, tokenizer, model)."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    entry_doc: torch.Tensor
    entry_offset: torch.Tensor
    doc_names: list[str]
    doc_tokens: list[list[int]]
    model: dict[str, int]
    probe: dict[int, torch.Tensor]
    build_settings: dict[str, Any] = field(default_factory=dict)
    source: str = "memory bank"

    @property
    def layers(self) -> list[int]:
        return sorted(self.keys)

    @property
    def n_entries(self) -> int:
        return int(self.entry_doc.numel())

    # ------------------------------------------------------------------------------------------------- building
    @classmethod
    @torch.no_grad()
    def build(cls, model: Transformer, tokenizer: Any, docs: Mapping[str, str] | Sequence[str],
              layers: Sequence[int] | str = "all", window: int | None = None, stride: int | None = None,
              dtype: torch.dtype = torch.float32, prefix: str = "") -> MemoryBank:
        """Runs ``model`` over ``docs`` (``{name: text}`` or texts, named ``doc0, doc1, ...``) and keeps the keys and
        values of ``layers`` (``"all"`` or indices). ``tokenizer`` needs ``encode`` and ``eos_id``. ``window``
        (default ``min(max_seq_len, 1024)``), ``stride`` (default ``window // 2``) and ``prefix`` (text read before
        every document, not stored) as in the module docstring."""
        named = dict(docs) if isinstance(docs, Mapping) else {f"doc{i}": text for i, text in enumerate(docs)}
        try:
            layer_list = list(AttentionMemoryConfig.from_dict({"layers": layers}, model.n_layers).layers)
        except AttentionMemoryError as err:
            raise MemoryBankError(str(err).replace("attention_memory.layers", "layers")) from None
        window = window or min(model.max_seq_len, 1024)
        stride = stride or max(1, window // 2)
        if not 1 <= stride <= window <= model.max_seq_len:
            raise MemoryBankError(f"need 1 <= stride ({stride}) <= window ({window}) <= the model's max_seq_len "
                                  f"({model.max_seq_len})")
        lead = [tokenizer.eos_id, *(int(t) for t in tokenizer.encode(prefix))] if prefix else [tokenizer.eos_id]
        if len(lead) >= window:
            raise MemoryBankError(f"the prefix is {len(lead) - 1} tokens, which leaves no room in a window of {window}; "
                                  f"use a shorter prefix or a larger window")
        keys = {layer: [] for layer in layer_list}
        values = {layer: [] for layer in layer_list}
        entry_doc, entry_offset, doc_tokens = [], [], []
        device = model.embed.weight.device
        with suspended_memory(model), _captured_kv(model, layer_list) as captured:
            was_training = model.training
            model.eval()
            for doc_index, text in enumerate(named.values()):
                tokens = [int(t) for t in tokenizer.encode(text)]
                doc_tokens.append(tokens)
                ids = [*lead, *tokens]
                prev_end = 0
                for begin in range(0, len(ids), stride):
                    end = min(begin + window, len(ids))
                    captured.clear()
                    model(torch.tensor([ids[begin:end]], device=device))
                    keep = slice(prev_end - begin, end - begin)
                    first = max(0, min(end, len(lead)) - prev_end)  # the eos and prefix before a document: no memories
                    for layer in layer_list:
                        k, v = captured[layer]
                        keys[layer].append(k[:, keep][:, first:].to("cpu", dtype))
                        values[layer].append(v[:, keep][:, first:].to("cpu", dtype))
                    offsets = range(max(prev_end, len(lead)) - len(lead), end - len(lead))
                    entry_doc.extend([doc_index] * len(offsets))
                    entry_offset.extend(offsets)
                    prev_end = end
                    if end == len(ids):
                        break
            model.train(was_training)
        C, hd = model.layers[0].attn.n_kv_heads, model.layers[0].attn.head_dim
        return cls(
            keys={layer: torch.cat(keys[layer], 1) if keys[layer] else torch.zeros(C, 0, hd, dtype=dtype)
                  for layer in layer_list},
            values={layer: torch.cat(values[layer], 1) if values[layer] else torch.zeros(C, 0, hd, dtype=dtype)
                    for layer in layer_list},
            entry_doc=torch.tensor(entry_doc, dtype=torch.long),
            entry_offset=torch.tensor(entry_offset, dtype=torch.long),
            doc_names=list(named),
            doc_tokens=doc_tokens,
            model=model_dimensions(model),
            probe=probe_keys(model, layer_list),
            build_settings={"window": window, "stride": stride, "tokenizer": getattr(tokenizer, "spec", None),
                            "prefix": prefix},
        )

    # ------------------------------------------------------------------------------------------------- checking
    def check_fits(self, model: Transformer, check_weights: bool = True) -> None:
        """Raises :class:`MemoryBankError` if the bank was built for other dimensions or (``check_weights``) by a
        model whose keys of the probe sequence differ by more than :data:`PROBE_TOLERANCE` (relative)."""
        mine = model_dimensions(model)
        differ = [f"{key} {self.model.get(key)} vs {mine[key]}" for key in DIMENSIONS if self.model.get(key) != mine[key]]
        if differ:
            raise MemoryBankError(
                f"{self.source} was built for another model ({'; '.join(differ)}: bank vs this model); rebuild it "
                f"with `memzoo memorize --model <this model>`"
            )
        if check_weights:
            current = probe_keys(model, self.layers)
            for layer in self.layers:
                stored = self.probe[layer].double()
                error = float((current[layer].double() - stored).norm() / stored.norm().clamp_min(1e-12))
                if error > PROBE_TOLERANCE:
                    raise MemoryBankError(
                        f"{self.source} was built by a model with other weights: layer {layer}'s keys of the probe "
                        f"sequence differ by {error:.1%} (tolerance {PROBE_TOLERANCE:.0%}); rebuild it with "
                        f"`memzoo memorize --model <this model>`"
                    )

    # ------------------------------------------------------------------------------------------------- citations
    def citations(self, weights: torch.Tensor, tokenizer: Any, top: int = 3, radius: int = 8) -> list[Citation]:
        """The ``top`` spans with the most memory attention. ``weights (N,)``: attention per entry (e.g.
        :meth:`CitationRecorder.entry_weights`). Each strong entry opens a span of ``radius`` tokens either side;
        overlapping spans of a document merge; a span's share is the summed weight of its entries over all."""
        weights = weights.double().cpu()
        total = float(weights.sum())
        if total <= 0:
            return []
        strongest = weights.argsort(descending=True)[: 4 * top]
        spans: dict[int, list[list[int]]] = {}
        for entry in strongest.tolist():
            if weights[entry] <= 0:
                break
            doc, offset = int(self.entry_doc[entry]), int(self.entry_offset[entry])
            spans.setdefault(doc, []).append([max(0, offset - radius), min(len(self.doc_tokens[doc]), offset + radius + 1)])
        found = []
        for doc, ranges in spans.items():
            ranges.sort()
            merged = [ranges[0]]
            for start, end in ranges[1:]:
                if start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            in_doc = self.entry_doc == doc
            for start, end in merged:
                inside = in_doc & (self.entry_offset >= start) & (self.entry_offset < end)
                found.append(Citation(doc, self.doc_names[doc], start, end,
                                      tokenizer.decode(self.doc_tokens[doc][start:end]),
                                      float(weights[inside].sum()) / total))
        return sorted(found, key=lambda c: -c.share)[:top]

    def doc_shares(self, weights: torch.Tensor) -> torch.Tensor:
        """Share of the memory attention per document ``(D,)``."""
        per_doc = torch.zeros(len(self.doc_names), dtype=torch.float64)
        per_doc.index_add_(0, self.entry_doc, weights.double().cpu())
        return per_doc / per_doc.sum().clamp_min(1e-300)

    # ------------------------------------------------------------------------------------------------- file
    def save(self, path: str | Path) -> Path:
        """Writes the bank to ``path`` (safetensors, atomically)."""
        from safetensors.torch import save

        tensors = {"entry_doc": self.entry_doc, "entry_offset": self.entry_offset,
                   "doc_tokens": torch.tensor([t for doc in self.doc_tokens for t in doc], dtype=torch.long),
                   "doc_starts": torch.tensor(_starts(self.doc_tokens), dtype=torch.long)}
        for layer in self.layers:
            tensors[f"layers.{layer}.keys"] = self.keys[layer]
            tensors[f"layers.{layer}.values"] = self.values[layer]
            tensors[f"probe.{layer}.keys"] = self.probe[layer]
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model": json.dumps(self.model),
                    "layers": json.dumps(self.layers), "docs": json.dumps(self.doc_names),
                    "build": json.dumps(self.build_settings)}
        path = Path(path)
        write_bytes_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MemoryBank:
        """Reads and checks a bank written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MemoryBankError(f"memory bank {path} does not exist; build one with `memzoo memorize`")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise MemoryBankError(f"{path} cannot be read as a safetensors memory bank ({err})") from err
        if metadata.get("format") != FORMAT:
            raise MemoryBankError(f"{path} is not a memzoo memory bank (format {metadata.get('format')!r}, expected "
                                  f"{FORMAT!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise MemoryBankError(f"{path} has bank format version {metadata.get('format_version')!r}; this memzoo "
                                  f"reads version {FORMAT_VERSION}: rebuild it with `memzoo memorize`")
        try:
            model, layers = json.loads(metadata["model"]), json.loads(metadata["layers"])
            names, build = json.loads(metadata["docs"]), json.loads(metadata.get("build", "{}"))
            bank = cls(keys={int(lay): tensors[f"layers.{lay}.keys"] for lay in layers},
                       values={int(lay): tensors[f"layers.{lay}.values"] for lay in layers},
                       entry_doc=tensors["entry_doc"], entry_offset=tensors["entry_offset"], doc_names=list(names),
                       doc_tokens=_split(tensors["doc_tokens"], tensors["doc_starts"]), model=dict(model),
                       probe={int(lay): tensors[f"probe.{lay}.keys"] for lay in layers}, build_settings=dict(build),
                       source=str(path))
        except KeyError as err:
            raise MemoryBankError(f"{path} lacks {err.args[0]!r}; rebuild it with `memzoo memorize`") from None
        except (ValueError, TypeError, AttributeError) as err:
            raise MemoryBankError(f"{path} has malformed metadata ({err}); rebuild it with `memzoo memorize`") from None
        bank._check_shapes()
        return bank

    def _check_shapes(self) -> None:
        n, where = self.n_entries, self.source
        C, hd = self.model.get("n_kv_heads"), self.model.get("head_dim")
        if any(not isinstance(self.model.get(key), int) for key in DIMENSIONS):
            raise MemoryBankError(f"{where}: model dimensions {self.model} lack one of {DIMENSIONS}")
        if not self.layers or any(not 0 <= layer < self.model["n_layers"] for layer in self.layers):
            raise MemoryBankError(f"{where}: layers {self.layers} are not layers of a {self.model['n_layers']}-layer model")
        for layer in self.layers:
            for kind, t in (("keys", self.keys[layer]), ("values", self.values[layer])):
                if tuple(t.shape) != (C, n, hd) or not t.is_floating_point():
                    raise MemoryBankError(f"{where}: layers.{layer}.{kind} has shape {tuple(t.shape)} ({t.dtype}); "
                                          f"expected floating (n_kv_heads={C}, entries={n}, head_dim={hd})")
            if tuple(self.probe[layer].shape) != (C, PROBE_LENGTH, hd):
                raise MemoryBankError(f"{where}: probe.{layer}.keys has shape {tuple(self.probe[layer].shape)}")
        if self.entry_offset.shape != (n,) or self.entry_doc.dtype != torch.long or self.entry_offset.dtype != torch.long:
            raise MemoryBankError(f"{where}: entry_doc/entry_offset must be int64 vectors of the same length")
        if n and not (0 <= int(self.entry_doc.min()) and int(self.entry_doc.max()) < len(self.doc_names)):
            raise MemoryBankError(f"{where}: entry_doc names documents outside 0 .. {len(self.doc_names) - 1}")
        lengths = torch.tensor([len(t) for t in self.doc_tokens], dtype=torch.long)
        if n and not ((self.entry_offset >= 0) & (self.entry_offset < lengths[self.entry_doc])).all():
            raise MemoryBankError(f"{where}: an entry_offset lies outside its document's tokens")


def model_dimensions(model: Transformer) -> dict[str, int]:
    attn = model.layers[0].attn
    return {"n_layers": model.n_layers, "dim": model.dim, "n_heads": attn.n_heads, "n_kv_heads": attn.n_kv_heads,
            "head_dim": attn.head_dim, "vocab_size": model.vocab_size}


@torch.no_grad()
def probe_keys(model: Transformer, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Pre-rotation keys ``(n_kv_heads, PROBE_LENGTH, head_dim)`` float32 of a fixed token sequence, per layer."""
    ids = [(1 + 7919 * i) % model.vocab_size for i in range(PROBE_LENGTH)]
    with suspended_memory(model), _captured_kv(model, layers) as captured:
        was_training = model.training
        model.eval()
        model(torch.tensor([ids], device=model.embed.weight.device))
        model.train(was_training)
    return {layer: captured[layer][0].float().cpu() for layer in layers}


@contextmanager
def _captured_kv(model: Transformer, layers: Sequence[int]) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """While open, ``captured[l] = (k, v)``, each ``(n_kv_heads, T, head_dim)``, of the last forward of layer
    ``l`` (batch row 0; keys before rotation), read from the output of its ``qkv`` projection."""
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook_for(layer: int, attn):
        q_width, kv_width = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim

        def hook(module, inputs, output):
            k = output[0, :, q_width : q_width + kv_width].reshape(-1, attn.n_kv_heads, attn.head_dim)
            v = output[0, :, q_width + kv_width :].reshape(-1, attn.n_kv_heads, attn.head_dim)
            captured[layer] = (k.transpose(0, 1).detach(), v.transpose(0, 1).detach())

        return hook

    try:
        for layer in layers:
            attn = model.layers[layer].attn
            handles.append(attn.qkv.register_forward_hook(hook_for(layer, attn)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def suspended_memory(model: Transformer) -> Iterator[None]:
    """Plain attention in every layer while open (an attached bank stays attached)."""
    modules = [layer.attn.memory for layer in model.layers if layer.attn.memory is not None]
    states = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, states):
            m.enabled = state


@contextmanager
def recording_memory_attention(model: Transformer) -> Iterator[CitationRecorder]:
    """While open, every memory layer records what its last query position attended to (see
    :class:`~memzoo.model.attention_memory.CitationRecorder`)."""
    recorder = CitationRecorder()
    modules = [layer.attn.memory for layer in model.layers if layer.attn.memory is not None]
    for m in modules:
        m.recorder = recorder
    try:
        yield recorder
    finally:
        for m in modules:
            m.recorder = None


def _starts(docs: list[list[int]]) -> list[int]:
    starts = [0]
    for doc in docs:
        starts.append(starts[-1] + len(doc))
    return starts


def _split(tokens: torch.Tensor, starts: torch.Tensor) -> list[list[int]]:
    bounds = starts.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != tokens.numel() or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError("doc_starts does not partition doc_tokens")
    flat = tokens.tolist()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def attach_memory(model: Transformer, bank: MemoryBank, topk: int | None = None,
                  similarity_threshold: float | None = None, check_weights: bool = True,
                  index: str | None = None, distance: int | None = None, sink_positions: int | None = None,
                  documents: int | None = None, min_document_score: float | None = None) -> None:
    """Gives ``model``'s attention the entries of ``bank`` (see :meth:`Transformer.attach_memory`)."""
    bank.check_fits(model, check_weights)
    config = model.config.memory_config()
    changes = {k: v for k, v in (("topk", topk), ("similarity_threshold", similarity_threshold), ("index", index),
                                 ("distance", distance), ("sink_positions", sink_positions), ("documents", documents),
                                 ("min_document_score", min_document_score)) if v is not None}
    if config is None:
        settings = AttentionMemoryConfig.from_dict({"layers": bank.layers, **changes}, model.n_layers)
        _install(model, settings)
        model.memory_enabled_by_attach = True
    else:
        if set(bank.layers) != set(config.layers):
            raise MemoryBankError(
                f"{bank.source} holds layers {bank.layers} but the model's attention_memory has layers "
                f"{list(config.layers)}; build the bank with `memzoo memorize --layers "
                f"{','.join(map(str, config.layers))}`"
            )
        settings = AttentionMemoryConfig.from_dict({**config.to_dict(), **changes}, model.n_layers)
        for layer in settings.layers:
            memory = model.layers[layer].attn.memory
            memory.topk, memory.similarity_threshold = settings.topk, settings.similarity_threshold
            memory.index, memory.distance = settings.index, settings.distance
            memory.sink_positions = settings.sink_positions
            memory.documents, memory.min_document_score = settings.documents, settings.min_document_score
    model.config = model.config.replace(attention_memory=settings.to_dict())
    dtype = model.embed.weight.dtype
    for layer in bank.layers:
        attn = model.layers[layer].attn
        inv_freq = rope_inv_freq(attn.head_dim, attn.rope.base, attn.rope.scaling)
        attn.memory.set_bank(bank.keys[layer].to(dtype), bank.values[layer].to(dtype), inv_freq, bank.entry_doc,
                             len(bank.doc_names))
    model.memory_bank = bank


def detach_memory(model: Transformer) -> None:
    """Removes the attached bank; attention memory that :func:`attach_memory` switched on is switched off again."""
    for layer in model.layers:
        if layer.attn.memory is not None:
            layer.attn.memory.clear_bank()
    if getattr(model, "memory_enabled_by_attach", False):
        for layer in model.layers:
            layer.attn.memory = None
        model.config = model.config.replace(attention_memory=None)
        model.memory_enabled_by_attach = False
    model.memory_bank = None


def _install(model: Transformer, settings: AttentionMemoryConfig) -> None:
    from memzoo.model.attention_memory import AttentionMemory

    p = model.embed.weight
    for layer in settings.layers:
        attn = model.layers[layer].attn
        attn.memory = AttentionMemory(layer, attn.n_heads, attn.n_kv_heads, attn.head_dim, settings).to(p.device)
