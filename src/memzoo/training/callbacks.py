"""Callbacks the ``memzoo`` command adds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

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
