"""Callbacks the ``memzoo`` command adds: predictions to a file and a progress bar in steps with tokens/s; and
:class:`WhitenMemoryQueries` for a retrofit's YAML."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

from memzoo.atomic import atomic_file


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict`` outputs as JSON lines ``{"prompt": str, "completion": str}`` to ``path``.

    A relative ``path`` lands in the run folder (``trainer.log_dir``). The file is written to a temporary name and
    renamed at the end, so an interrupted run never leaves a half-written file.
    """

    def __init__(self, path: str = "predictions.jsonl"):
        super().__init__(write_interval="epoch")
        self.path = path
        self.written_to: Path | None = None

    def _resolve(self, trainer: L.Trainer) -> Path:
        path = Path(self.path)
        if not path.is_absolute() and trainer.log_dir:
            path = Path(trainer.log_dir) / path
        return path

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        tokenizer = trainer.datamodule.tokenizer
        path = self._resolve(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, mode="w") as f:
            for batch in predictions:
                prompt_len = batch["prompt_ids"].shape[1]
                for row, prompt in zip(batch["output_ids"].tolist(), batch["prompt"] or [None] * len(batch["output_ids"])):
                    completion = tokenizer.decode(row[prompt_len:])
                    prompt_text = prompt if prompt is not None else tokenizer.decode(row[:prompt_len])
                    f.write(json.dumps({"prompt": prompt_text, "completion": completion}, ensure_ascii=False) + "\n")
        self.written_to = path
        print(f"memzoo predict: wrote {sum(len(b['output_ids']) for b in predictions)} completions to {path}")


class StepProgressBar(TQDMProgressBar):
    """A training bar that counts optimizer steps of ``max_steps`` (``step 740/2000``) across epochs, shows the
    throughput in tokens/s over the last ``window`` batches and the ``prog_bar`` metrics, without Lightning's
    ``v_num``. Without ``max_steps`` it counts the batches of each epoch, as Lightning's bar does."""

    def __init__(self, refresh_rate: int = 1, window: int = 20):
        super().__init__(refresh_rate=refresh_rate)
        self._times: collections.deque = collections.deque(maxlen=window + 1)
        self._tokens: collections.deque = collections.deque(maxlen=window)

    def tokens_per_second(self) -> float | None:
        """Input tokens per second over the recent batches (None until two batches have ended)."""
        if len(self._times) < 2:
            return None
        elapsed = self._times[-1] - self._times[0]
        tokens = sum(list(self._tokens)[-(len(self._times) - 1):])
        return tokens / elapsed if elapsed > 0 else None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        rate = self.tokens_per_second()
        if rate is not None:
            metrics["tok/s"] = f"{rate:,.0f}"
        return metrics

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._times.clear()
        self._tokens.clear()
        self._times.append(time.perf_counter())
        if trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = trainer.global_step
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description("step")

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._times.append(time.perf_counter())
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        self._tokens.append(int(ids.numel()) if ids is not None else 0)
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        super().on_validation_batch_start(*args, **kwargs)
        self._times.clear()  # validation time is not training throughput

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._times.append(time.perf_counter())
        self._tokens.clear()



class WhitenMemoryQueries(L.Callback):
    """Fits the query projections of product-key memories retrofitted ``beside`` pretrained FFNs to the inputs the
    pretrained model gives them (:func:`memzoo.model.retrofit.whiten_memory_queries`), on the first ``batches``
    training batches, when training starts on a freshly retrofitted model: every memory pool's values still zero,
    as ``beside``'s ``init: base_scale`` leaves them (so the model's function does not change). A run whose values
    are no longer zero (resumed, or from a trained checkpoint) is left as it is. With several processes, rank 0's
    projections are broadcast to all. In YAML::

        trainer:
          callbacks:
            - class_path: memzoo.training.callbacks.WhitenMemoryQueries
              init_args: {batches: 16}
    """

    def __init__(self, batches: int = 16):
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"WhitenMemoryQueries: batches must be a positive int, got {batches!r}")
        self.batches = batches
        self.whitened: dict[int, int] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import itertools

        from memzoo.blocks.pool import find_pools
        from memzoo.model.retrofit import whiten_memory_queries

        model = pl_module.model
        tables = [t for pool in find_pools(model).values() for t in pool.tables().values()]
        if not tables or any(bool(t.detach().any()) for t in tables):
            return
        loader = trainer.train_dataloader
        batches = [batch["input_ids"].to(pl_module.device) for batch in itertools.islice(iter(loader), self.batches)]
        self.whitened = whiten_memory_queries(model, batches)
        if trainer.world_size > 1:
            for i in self.whitened:
                weight = model.layers[i].ffn.add.router.query.weight
                weight.data.copy_(trainer.strategy.broadcast(weight.data, src=0))
