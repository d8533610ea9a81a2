"""Slot statistics of memory pools and the slot rankings of sparse memory finetuning (Lin et al., 2025).

Background statistics (``memzoo slot-stats``) count, for every row ("slot") of every pool, over a background
corpus: ``counts[s]`` (lookups that read slot s: every token, head and layer reading it adds 1) and
``doc_freq[s]`` (documents, i.e. sequences of a batch, in which any lookup read s), with ``n_docs`` documents in
all. They are collected through the pools' usage hook (:meth:`MemoryPool.observe`) by a :class:`SlotCounter`.

Rankings of the slots one finetuning batch read, given its per-slot lookup counts ``tf`` (``(N,)``, int):

- ``tfidf``: ``score[s] = tf[s] · idf[s]^p`` with ``idf[s] = log((n_docs + 1) / (doc_freq[s] + 1))``: slots read
  often now and in few background documents first (the smoothed IDF is > 0 for every slot, and largest for slots
  background data never read). ``p`` (``idf_power``, default 1: Lin et al.'s TF-IDF) > 1 weighs rarity more
  against frequency: a batch of many facts reads the slots its template shares with every fact most often, and
  updating those is what makes other facts forgotten (``tools/continual.py`` measures it).
- ``kl``: ``score[s] = p[s] · log(p[s] / q[s])``, slot s's term of KL(p ‖ q) between the batch's access
  distribution ``p = tf / Σ tf`` and the background's ``q = (counts + 1) / (Σ counts + N)`` (add-one smoothed).

:func:`top_slots` keeps the ``t`` best-scoring slots among those the batch read (all of them when fewer than t;
ties go to the lower slot index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from memzoo.safe_load import RefusedPickleError, load_data

Ranking = Literal["tfidf", "kl"]
RANKINGS = ("tfidf", "kl")
STATS_FORMAT = "memzoo-slot-stats"
STATS_VERSION = 1


class SlotStatsError(ValueError):
    """Slot statistics that do not fit the model or the request (names the pool, sizes and fix)."""


@dataclass
class PoolSlotStats:
    """Background statistics of one pool: ``counts``, ``doc_freq`` ``(num_rows,)`` int64."""

    counts: torch.Tensor
    doc_freq: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.counts.numel())


@dataclass
class SlotStats:
    """Per-pool background statistics, ``n_docs`` documents and ``n_tokens`` tokens seen."""

    pools: dict[str, PoolSlotStats]
    n_docs: int
    n_tokens: int
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain data (tensors, ints, strings) for ``torch.save``; loads with ``weights_only=True``."""
        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "source": dict(self.source),
            "pools": {name: {"num_rows": s.num_rows, "counts": s.counts, "doc_freq": s.doc_freq}
                      for name, s in self.pools.items()},
        }

    @classmethod
    def load(cls, path: str | Path) -> SlotStats:
        """Reads a file ``memzoo slot-stats`` wrote; a wrong or damaged file raises :class:`SlotStatsError`."""
        path = Path(path)
        if not path.is_file():
            raise SlotStatsError(f"slot statistics {str(path)!r} do not exist; write them with `memzoo slot-stats`")
        try:
            data = load_data(path, f"slot statistics {str(path)!r}")
        except RefusedPickleError as err:
            raise SlotStatsError(str(err)) from err
        except Exception as err:
            raise SlotStatsError(f"slot statistics {str(path)!r} cannot be read ({err})") from err
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise SlotStatsError(f"{str(path)!r} is not a memzoo slot-statistics file (format {STATS_FORMAT!r})")
        if data.get("version") != STATS_VERSION:
            raise SlotStatsError(f"{str(path)!r} has version {data.get('version')!r}; this memzoo reads {STATS_VERSION}")
        pools = {name: PoolSlotStats(entry["counts"].long(), entry["doc_freq"].long())
                 for name, entry in data["pools"].items()}
        return cls(pools, int(data["n_docs"]), int(data["n_tokens"]), dict(data.get("source") or {}))

    def for_pool(self, name: str, num_rows: int) -> PoolSlotStats:
        """The statistics of pool ``name``, checked to have ``num_rows`` slots."""
        if name not in self.pools:
            raise SlotStatsError(
                f"the slot statistics have no pool {name!r} (they have {sorted(self.pools)}); collect them with "
                f"`memzoo slot-stats` on this model"
            )
        stats = self.pools[name]
        if stats.num_rows != num_rows:
            raise SlotStatsError(
                f"the slot statistics of pool {name!r} have {stats.num_rows} slots but the model's pool has "
                f"{num_rows}; collect them again on this model (`memzoo slot-stats`)"
            )
        return stats


class SlotCounter:
    """A usage observer (:meth:`MemoryPool.track_usage`) counting lookups per slot, and documents per slot.

    ``update(indices (B, ..., K), weights)``: every index adds 1 to ``counts``; the rows of dim 0 are documents,
    whose hits are held until :meth:`end_batch` (so a document read by several layers counts once in
    ``doc_freq``). Memory: ``(N,)`` counts plus a ``(B, N)`` bool hit mask during a batch. With ``position_mask``
    set (``(B, T)`` bool), only lookups at those positions are counted (documents are not tracked then).
    """

    def __init__(self, num_rows: int, device: torch.device | str = "cpu", track_docs: bool = True):
        self.num_rows = num_rows
        #: optional ``(B, T)`` bool: count only lookups at these positions (e.g. the positions a loss covers)
        self.position_mask: torch.Tensor | None = None
        self.counts = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self.doc_freq = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self.track_docs = track_docs
        self.n_docs = 0
        self._hits: torch.Tensor | None = None

    def update(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        mask = self.position_mask
        if mask is not None:
            if tuple(mask.shape) != tuple(indices.shape[: mask.dim()]):
                raise ValueError(f"position_mask {tuple(mask.shape)} does not match lookups {tuple(indices.shape)}")
            indices = torch.where(mask.to(indices.device).reshape(*mask.shape, *[1] * (indices.dim() - mask.dim())),
                                  indices, torch.full_like(indices, -1))
            flat = indices.reshape(-1)
            self.counts += torch.bincount(flat[flat >= 0].to(self.counts.device), minlength=self.num_rows)
            return
        flat = indices.reshape(-1).to(self.counts.device)
        self.counts += torch.bincount(flat, minlength=self.num_rows)
        if self.track_docs:
            rows = indices.reshape(indices.shape[0], -1).to(self.counts.device)
            if self._hits is None or self._hits.shape[0] != rows.shape[0]:
                self._flush()
                self._hits = torch.zeros(rows.shape[0], self.num_rows, dtype=torch.bool, device=self.counts.device)
            self._hits.scatter_(1, rows, True)

    def end_batch(self) -> None:
        """Closes the current batch's documents (adds them to ``doc_freq`` and ``n_docs``)."""
        self._flush()

    def _flush(self) -> None:
        if self._hits is not None:
            self.doc_freq += self._hits.sum(0)
            self.n_docs += self._hits.shape[0]
            self._hits = None

    def reset(self) -> None:
        self.counts.zero_()
        self.doc_freq.zero_()
        self.n_docs = 0
        self._hits = None


def slot_scores(tf: torch.Tensor, background: PoolSlotStats, n_docs: int, rank: Ranking,
                idf_power: float = 1.0) -> torch.Tensor:
    """Scores ``(N,)`` float64 of every slot for the batch counts ``tf (N,)`` (module docstring; ``idf_power``
    applies to ``tfidf``)."""
    tf = tf.to(torch.float64)
    if rank == "tfidf":
        idf = torch.log((n_docs + 1.0) / (background.doc_freq.to(torch.float64) + 1.0))
        return tf * idf.to(tf.device) ** idf_power
    if rank == "kl":
        total = tf.sum()
        p = tf / total if total > 0 else tf
        counts = background.counts.to(torch.float64).to(tf.device)
        q = (counts + 1.0) / (counts.sum() + counts.numel())
        return torch.where(p > 0, p * torch.log(p.clamp_min(1e-300) / q), torch.zeros_like(p))
    raise SlotStatsError(f"slot ranking must be one of {RANKINGS}, got {rank!r}")


def top_slots(tf: torch.Tensor, scores: torch.Tensor, t: int) -> torch.Tensor:
    """The ``t`` best-scoring slots among those read (``tf > 0``), ascending slot order, int64 ``(<= t,)``."""
    read = torch.nonzero(tf > 0).squeeze(1)  # ascending
    if read.numel() <= t:
        return read
    order = torch.sort(scores[read], descending=True, stable=True).indices[:t]  # stable: ties -> lower index
    return torch.sort(read[order]).values


def check_top_t(t: int, pool: str, num_rows: int) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise SlotStatsError(f"top_t must be a positive int, got {t!r}")
    if t > num_rows:
        raise SlotStatsError(
            f"top_t={t} is larger than pool {pool!r} ({num_rows} slots); choose top_t <= {num_rows}"
        )


__all__ = [
    "RANKINGS", "PoolSlotStats", "SlotCounter", "SlotStats", "SlotStatsError", "check_top_t", "slot_scores",
    "top_slots",
]


@torch.no_grad()
def collect_slot_stats(model: torch.nn.Module, batches, max_batches: int | None = None) -> SlotStats:
    """Runs ``model`` (a Transformer, put in eval mode) over ``batches`` (dicts with ``input_ids (B, T)``) and
    returns every pool's slot statistics; pools are named as :func:`~memzoo.blocks.pool.find_pools` names them."""
    from memzoo.blocks.pool import find_pools

    pools = find_pools(model)
    if not pools:
        raise SlotStatsError("the model has no memory pools; slot statistics need product-key memory or PEER layers")
    device = next(model.parameters()).device
    counters = {name: SlotCounter(pool.num_rows, device=device) for name, pool in pools.items()}
    was_training = model.training
    model.eval()
    n_tokens = 0
    try:
        for name, pool in pools.items():
            pool.track_usage(counters[name])
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            ids = batch["input_ids"].to(device)
            model(ids)
            n_tokens += ids.numel()
            for counter in counters.values():
                counter.end_batch()
    finally:
        for pool in pools.values():
            pool.track_usage(None)
        model.train(was_training)
    n_docs = next(iter(counters.values())).n_docs
    if n_docs == 0:
        raise SlotStatsError("no batches were read; the background data is empty (or max_batches is 0)")
    stats = {name: PoolSlotStats(c.counts.cpu(), c.doc_freq.cpu()) for name, c in counters.items()}
    return SlotStats(stats, n_docs, n_tokens)
