"""Which samples an epoch reads, and how samples become batches.

memzoo's training datasets are *streams*: ``dataset[j]`` is defined for every ``j ≥ 0``, and sample ``j`` belongs to
epoch ``j // len(dataset)``. :class:`EpochSampler` hands the data loader the ids of the current epoch, so each epoch
reads new samples of an on-the-fly corpus (a new pass of the facts, new random windows) while ``len(dataset)`` stays
the number of samples per epoch that Lightning counts batches with. A dataset that is a finite list maps ``j`` to
``j mod len``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from memzoo.data.keyed_random import derive_key
from memzoo.nn.constants import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "EpochSampler", "collate_lm"]


class EpochSampler(DistributedSampler):
    """Yields ``epoch · num_samples + i`` for ``i`` in ``range(num_samples)``, in a per-epoch shuffled order if
    ``shuffle``, else in order.

    Under ``torch.distributed`` the ``num_replicas`` processes read the epoch's order round-robin: rank ``r`` reads
    positions ``r, r + W, r + 2W, ...`` (padded to equal shares by repeating the first ids, as ``DistributedSampler``
    does). So the ``W`` batches of ``B`` samples that the ranks read at step ``s`` are together the positions
    ``[s·W·B, (s+1)·W·B)`` of the order: the global batch one process with batch ``W·B`` reads at step ``s``. An
    on-the-fly stream read in order stays in increasing order on every rank. Being a ``DistributedSampler``,
    Lightning uses it as is, and calls :meth:`set_epoch` before each epoch; without that call each ``iter()`` moves
    on to the next epoch.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool, num_replicas: int | None = None,
                 rank: int | None = None):
        if num_samples < 1:
            raise ValueError(f"an epoch needs at least one sample, got num_samples={num_samples}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.samples_per_epoch = num_samples
        self._skip = 0

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Makes the next epoch start after its first ``batches`` batches (resuming from a mid-epoch checkpoint).

        ``len()`` keeps counting the whole epoch, as Lightning's restored batch counter does."""
        self._skip = batches * batch_size

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        n = self.samples_per_epoch
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_key(self.seed, "epoch order", epoch) >> 1)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        order = order.repeat(-(-self.total_size // n))[: self.total_size]  # pad to equal shares
        share = order[self.rank :: self.num_replicas]
        share, self._skip = share[self._skip :], 0
        return iter((share + epoch * n).tolist())


class ShardSampler(DistributedSampler):
    """Evaluation order under ``torch.distributed``: rank ``r`` reads samples ``r, r + W, r + 2W, ...`` of a finite
    dataset, each sample exactly once over all ranks (no padding, so sum-reduced metrics count every sample once;
    ranks may read one sample fewer than others). Lightning keeps it as is (it is a ``DistributedSampler``)."""

    def __init__(self, num_samples: int, num_replicas: int, rank: int):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, num_samples, num_replicas))
        self.total_size = num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def collate_lm(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stacks ``{"input_ids": (T_i,), "labels": (T_i,)}`` samples into ``(B, max T_i)``, padding at the end:
    ``input_ids`` with ``pad_id``, ``labels`` with :data:`IGNORE_INDEX`. Causal models never look ahead, so padding
    at the end changes no prediction at a real position."""
    lengths = {len(s["input_ids"]) for s in samples}
    if len(lengths) == 1:  # one length (fixed-size windows): nothing to pad
        return {"input_ids": torch.stack([s["input_ids"] for s in samples]).long(),
                "labels": torch.stack([s["labels"] for s in samples]).long()}
    length = max(lengths)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
    return {"input_ids": input_ids, "labels": labels}
