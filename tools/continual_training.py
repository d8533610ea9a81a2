"""How the continual-learning studies (``tools/continual.py``, ``tools/continual_smollm2.py``) train: memzoo's
:class:`~memzoo.training.module.LanguageModel` (its loss, optimizer groups and warmup-cosine schedule) under
Lightning's ``Trainer``, for a fixed number of optimizer steps, on batches drawn by a seeded generator, with
measurements at chosen step counts. Methods differ only in what they hand the model (``lora:``, ``freeze:``) and
the trainer (the :class:`~memzoo.training.sparse_finetune.SparseMemoryFinetuning` callback).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset

#: ``make(rng) -> batch``: a batch dict ``{"input_ids", "labels"}`` or a list of them (one loss term each)
MakeBatch = Callable[[np.random.Generator], Any]


class Batches(IterableDataset):
    """Endless training batches, each ``make(rng)`` with one generator seeded ``seed`` (a DataLoader with
    ``batch_size=None`` passes them through as they are)."""

    def __init__(self, make: MakeBatch, seed: int):
        self.make, self.seed = make, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        while True:
            yield self.make(rng)


class MeasureAt(L.Callback):
    """After each optimizer step count in ``steps``: ``evaluate(decoder)`` (the Transformer) with ``steps`` (and
    with ``timed``, ``train_seconds``: training time since the fit started, measurements excluded), appended to
    ``points``."""

    def __init__(self, steps: Sequence[int], evaluate: Callable[[Any], dict], timed: bool = False):
        self.steps, self.evaluate, self.timed, self.points = set(steps), evaluate, timed, []
        self.started, self.measuring = 0.0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.measuring = time.time(), 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and not any(p["steps"] == step for p in self.points):
            begin = time.time()
            timing = {"train_seconds": round(begin - self.started - self.measuring, 1)} if self.timed else {}
            self.points.append({"steps": step, **timing, **self.evaluate(pl_module.model)})
            self.measuring += time.time() - begin


class PrintLoss(L.Callback):
    """Prints the training loss every ``every`` steps and at the last one, through ``log(text)``."""

    def __init__(self, every: int, log: Callable[[str], None], name: str = "train"):
        self.every, self.write, self.name = every, log, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        if step % self.every == 0 or trainer.global_step == trainer.max_steps:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.write(f"  {self.name} step {step:5d}  loss {float(loss):.3f}")


def fit(module: L.LightningModule, make_batch: MakeBatch, steps: int, *, seed: int = 0,
        callbacks: Sequence[L.Callback] = (), gradient_clip_val: float | None = None,
        accelerator: str = "cpu") -> L.Trainer:
    """Trains ``module`` (a LanguageModel) for ``steps`` optimizer steps on ``make_batch``'s batches, on one device
    of ``accelerator`` (``cpu`` or ``cuda``; the module stays there), with Lightning's ``Trainer`` (no logger,
    checkpoints, progress bar or validation); returns the trainer (its ``global_step`` is ``steps``).
    ``gradient_clip_val``: clip dense gradients by norm (LanguageModel's clipping)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    trainer = L.Trainer(accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, gradient_clip_val=gradient_clip_val, callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=DataLoader(Batches(make_batch, seed), batch_size=None))
    module.eval()
    return trainer


def save_weights(trainer: L.Trainer, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """The trainer's model as a memzoo checkpoint (weights and hyperparameters, no optimizer state), readable by
    ``init_from`` and :func:`memzoo.load_pretrained`; ``extra`` (plain data) is stored beside them. Written to a
    temporary name and renamed, so an interrupted run leaves no half-written file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    trainer.save_checkpoint(partial, weights_only=True)
    if extra:
        import torch

        checkpoint = torch.load(partial, weights_only=True)
        checkpoint.update(extra)
        torch.save(checkpoint, partial)
    os.replace(partial, path)
    return path


__all__ = ["Batches", "MeasureAt", "PrintLoss", "fit", "save_weights"]
