"""torchmetrics metrics of memzoo's language models (states are sum-reduced, so they sync across processes)."""

from __future__ import annotations

import torch
import torchmetrics

from memzoo.nn.constants import IGNORE_INDEX


class FactRecall(torchmetrics.Metric):
    """Greedy exact-match recall of fact probes, read off one teacher-forced forward pass.

    A probe row's labels are ``ignore_index`` except on its answer tokens (value and terminator). The row *counts*
    when it has at least one labelled position, and is a *hit* when ``argmax(logits)`` equals the label at every
    labelled position, which is what greedy decoding from the prompt would produce. ``compute()`` = hits / rows
    (0.0 before any counted row).

    ``update(logits (B, T, V), labels (B, T))``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("rows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if logits.ndim != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"FactRecall.update expects logits (B, T, V) and labels (B, T), got logits {tuple(logits.shape)} "
                f"and labels {tuple(labels.shape)}"
            )
        labelled = labels != self.ignore_index
        correct = (logits.argmax(dim=-1) == labels) | ~labelled
        counted = labelled.any(dim=-1)
        self.hits += (correct.all(dim=-1) & counted).sum()
        self.rows += counted.sum()

    def compute(self) -> torch.Tensor:
        return self.hits.float() / self.rows.clamp(min=1).float()


# ----------------------------------------------------------------------------------------------- memory usage

#: Keys of :meth:`MemoryUsage.compute`.
USAGE_KEYS = ("used_fraction", "kl_uniform", "rows_for_50pct", "rows_for_90pct")


class MemoryUsage(torchmetrics.Metric):
    """How much of one memory pool's ``num_rows``-row table the model uses (one metric per pool).

    Memory layers can collapse onto a small part of their table; Lample et al. (2019) report the fraction of rows
    used and the KL divergence of the row weights to uniform (PEER does the same for experts). Over every lookup
    it sees, the metric accumulates each row's total weight ``mass[r] = Σ w`` and hit count, and ``compute()``
    returns ``{key: 0-d float64 tensor}``:

    - ``used_fraction``: fraction of the ``N`` rows read at least once (a zero-weight hit counts);
    - ``kl_uniform``: ``KL(z ‖ uniform) = log N + Σ_r z_r log z_r`` for ``z = mass / Σ mass`` (0: every row
      carries the same weight; ``log N``: all weight on one row);
    - ``rows_for_50pct`` / ``rows_for_90pct``: the fewest rows holding 50% / 90% of the weight, as a FRACTION of
      ``N`` (times ``N`` for a count; 0.5 / 0.9 for perfectly uniform use).

    Before any lookup: ``used_fraction = 0`` and NaN for the others. ``update(indices, weights)``: ``indices
    (..., K)`` integer rows in ``[0, num_rows)``, ``weights (..., K)`` non-negative (the lookup's softmax weights).
    States: ``(N,)`` float64 mass and int64 hits, sum-reduced across processes (16 bytes per row). Feed it by
    attaching it to a pool, ``pool.track_usage(metric)`` (see :mod:`memzoo.blocks.pool`).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_rows: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
            raise ValueError(f"MemoryUsage: num_rows must be a positive int (the pool's n_keys²), got {num_rows!r}")
        self.num_rows = num_rows
        self.add_state("mass", torch.zeros(num_rows, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros(num_rows, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        if indices.shape != weights.shape:
            raise ValueError(
                f"MemoryUsage: indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must have one shape"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"MemoryUsage: indices must be an integer tensor, got {indices.dtype}")
        rows = indices.reshape(-1).long()
        if rows.numel() == 0:
            return
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= self.num_rows:
            raise IndexError(
                f"MemoryUsage: row {low if low < 0 else high} is outside [0, {self.num_rows}); is this metric "
                f"attached to the pool the indices come from?"
            )
        self.mass.index_add_(0, rows, weights.reshape(-1).to(self.mass.dtype))
        self.hits += torch.bincount(rows, minlength=self.num_rows)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.num_rows
        used_fraction = (self.hits > 0).sum().double() / n
        total = self.mass.sum()
        if not total > 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.mass.device)
            return {"used_fraction": used_fraction, "kl_uniform": nan, "rows_for_50pct": nan, "rows_for_90pct": nan}
        z = self.mass / total
        log_n = torch.tensor(float(n), dtype=torch.float64, device=z.device).log()
        cumulative = torch.sort(z, descending=True).values.cumsum(0)
        return {
            "used_fraction": used_fraction,
            "kl_uniform": log_n + torch.special.xlogy(z, z).sum(),
            "rows_for_50pct": _rows_for_share(cumulative, 0.5) / n,
            "rows_for_90pct": _rows_for_share(cumulative, 0.9) / n,
        }


def _rows_for_share(cumulative: torch.Tensor, share: float) -> torch.Tensor:
    """Fewest rows whose sorted cumulative weight reaches ``share`` (a count, float64)."""
    # a tiny slack, so a share reached exactly (half of two equal rows) is not lost to rounding in the cumsum
    target = torch.tensor(share - 1e-12, dtype=cumulative.dtype, device=cumulative.device)
    position = torch.searchsorted(cumulative, target)
    return (position + 1).clamp(max=cumulative.numel()).double()
