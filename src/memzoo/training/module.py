"""``LanguageModel``: the LightningModule that trains a :class:`~memzoo.model.transformer.Transformer`.

Loss: next-token cross-entropy over labelled positions (labels == -100 are ignored), plus any weighted auxiliary
losses the blocks report (MoE load balancing). Metrics (torchmetrics, one instance per stage): loss, perplexity,
token accuracy; on data modules with fact probes, fact recall (greedy exact match, computed teacher-forced); on models
with memory pools, per-pool memory usage during validation. Optimizer: a callable from YAML (AdamW by default) over
parameter groups that give memory pools their own learning rate and weight decay; sparse pools get a row-wise
optimizer. Schedule: linear warmup then cosine decay to ``min_lr_ratio`` of each group's learning rate.
Scaling out is applied from outside: :meth:`LanguageModel.configure_model` hands the Transformer to
:func:`memzoo.parallel.parallelize` (activation checkpointing, compile, sharding by the strategy's mesh), and the
strategies own their collectives (the row exchange of sparse pools: :class:`memzoo.parallel.SparseDDPStrategy`);
epoch metrics are global (reduced over ranks).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.plugins.precision import DoublePrecision
from torch.optim import Optimizer

from memzoo.blocks.pool import find_pools
from memzoo.model.config import ModelConfig
from memzoo.model.sampling import context_warning, default_max_new_tokens, prompt_tokens_to_keep
from memzoo.model.transformer import Transformer
from memzoo.nn.constants import IGNORE_INDEX
from memzoo.nn.cross_entropy import cross_entropy
from memzoo.parallel import parallelize
from memzoo.parallel.sparse_ddp import check_strategy
from memzoo.training import metrics as memzoo_metrics
from memzoo.training.freezing import apply_freezing
from memzoo.training.lora import apply_lora
from memzoo.training.optim import build_optimizer, clip_dense_grad_norm_, keep_host_state_on_host

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")
OptimizerFactory = Callable[[Iterable], Optimizer]


def default_optimizer(params: Iterable) -> Optimizer:
    """AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1) — per-group settings (pools, no-decay) still apply."""
    return torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at ``step``: linear warmup over ``warmup_steps``, cosine to ``min_lr_ratio`` at ``decay_steps``,
    constant after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StageMetrics(torch.nn.Module):
    """Loss, perplexity and token accuracy for one stage (train/val/test), plus fact recall."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.loss = torchmetrics.MeanMetric()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(
            num_classes=vocab_size, ignore_index=IGNORE_INDEX, average="micro"
        )
        self.fact_recall = memzoo_metrics.FactRecall()


class LanguageModel(L.LightningModule):
    """A decoder LM with per-layer FFN-slot blocks and model-owned memory pools, built from one architecture config.

    Args:
        architecture: the :class:`~memzoo.model.config.ModelConfig` (YAML ``architecture: {dim: ..., layers: ...}``;
            a plain dict is accepted, as checkpoints store it). ``vocab_size`` is linked from the data module's
            tokenizer by the ``memzoo`` CLI.
        optimizer: callable building the optimizer from parameter groups (YAML ``class_path``/``init_args``).
        sparse_optimizer: row-wise optimizer for pools with ``update: sparse`` (``lazy_adam`` | ``rowwise_adagrad``).
        warmup_steps: linear LR warmup steps.
        lr_decay_steps: step at which the cosine decay reaches ``min_lr_ratio`` (``None``: the whole run).
        min_lr_ratio: final LR as a fraction of each group's LR.
        max_new_tokens, temperature, top_k: generation settings of ``memzoo predict``. ``max_new_tokens=None``
            generates up to 64 tokens, as many as fit the context beside each prompt; a number that does not fit the
            context (``>= max_seq_len``) is refused naming ``--model.init_args.max_new_tokens``.
        compile: ``torch.compile`` each decoder layer in place when the trainer sets the model up
            (:meth:`configure_model`): ``true`` (inductor), ``false``, or a backend name (``aot_eager``, ...).
            Parameter names and checkpoints are the same with and without it.
        activation_checkpointing: recompute each decoder layer's activations in backward instead of storing them
            (less memory, one more forward per layer; same results).
        init_from: the weights this model starts from, recorded here only: a memzoo ``.ckpt``, a sharded checkpoint
            folder, a Hugging Face Llama / Qwen2 / Mistral folder or hub id, a Llama-family ``.gguf`` file or
            ``package:NAME`` (see :mod:`memzoo.loading`). ``LanguageModel(...)`` itself builds the ``architecture``
            it is given and reads no file: :func:`memzoo.build_model` and the ``memzoo`` CLI (through
            :func:`memzoo.loading.build_language_model`) build the source's architecture (plus this config's ``layers``
            / ``pools`` retrofits, its ``max_seq_len``, ``attention_backend``, ``dropout``, ``init_std``) and load
            the source's weights once. Rebuilding from a checkpoint's hyperparameters therefore never re-reads them.
        freeze, unfreeze: parameter-name patterns; a parameter matching ``freeze`` is frozen, one matching
            ``unfreeze`` trains (see :mod:`memzoo.training.freezing`). Frozen parameters get no optimizer state.
        lora: LoRA adapters through peft, ``{r, alpha, dropout, target_modules}`` (see :mod:`memzoo.training.lora`);
            only the adapters train (``unfreeze`` can add more). Applied before ``freeze``; ``init_from``'s weights load into
            the base linears.
        memory: a memory bank file (``memzoo memorize``) attached to the model's attention when a stage starts
            (after checkpoint weights are loaded): see :meth:`memzoo.model.transformer.Transformer.attach_memory`.
    """

    def __init__(
        self,
        architecture: ModelConfig | None = None,
        optimizer: OptimizerFactory = default_optimizer,
        sparse_optimizer: str = "lazy_adam",
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        compile: bool | str = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        freeze: list[str] | None = None,
        unfreeze: list[str] | None = None,
        lora: dict[str, Any] | None = None,
        memory: str | None = None,
    ):
        super().__init__()
        architecture = ModelConfig() if architecture is None else ModelConfig.from_dict(architecture)
        architecture = architecture.resolved()
        self.save_hyperparameters(ignore=["optimizer", "architecture"])
        self.hparams["architecture"] = architecture.to_dict()  # plain data: loads with weights_only=True
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps} and {min_lr_ratio}"
            )
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be true, false or a torch.compile backend name, got {compile!r}")
        self.optimizer_factory = optimizer
        self.model = Transformer(architecture)
        if lora is not None:
            apply_lora(self.model, **lora)
        if freeze or unfreeze:
            apply_freezing(self.model, freeze or [], unfreeze or [])
        vocab_size = architecture.vocab_size
        # keyed "<stage>_metrics": a ModuleDict key "train" would shadow nn.Module.train()
        self.stage_metrics = torch.nn.ModuleDict({f"{s}_metrics": StageMetrics(vocab_size) for s in STAGES})
        # one MemoryUsage per distinct pool (shared or private), filled during validation/test
        self.pools_by_name = {name.replace(".", "/"): pool for name, pool in find_pools(self.model).items()}
        self.usage_metrics = torch.nn.ModuleDict(
            {name.replace("/", "__"): memzoo_metrics.MemoryUsage(pool.num_rows) for name, pool in self.pools_by_name.items()}
        )

    @property
    def architecture(self) -> ModelConfig:
        """The architecture this model was built from."""
        return self.model.config

    def configure_model(self) -> None:
        """Applies :func:`memzoo.parallel.parallelize` to the Transformer: activation checkpointing, then compile
        (each decoder layer in place: parameter names, checkpoints and exports are the same as without it), then
        sharding over the strategy's device mesh (``self.device_mesh``: set by
        :class:`~memzoo.parallel.MemoryParallelStrategy`, ``None`` otherwise). Once per model.

        Under ``precision: 64-true`` the model becomes float64 here: Lightning restores a checkpoint's weights
        after this hook and converts the module to float64 only after that, so a float32 module would round the
        restored float64 weights to float32 and a resumed run would not continue the saved one exactly."""
        if self._trainer is not None and isinstance(self.trainer.precision_plugin, DoublePrecision):
            self.double()
        mesh = self.device_mesh if self._trainer is not None else None
        parallelize(self.model, mesh, compile=self.hparams.compile,
                    activation_checkpointing=self.hparams.activation_checkpointing)

    # ------------------------------------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids (B, T)`` → logits ``(B, T, vocab_size)``."""
        return self.model(input_ids)

    def _lm_step(self, batch: dict[str, torch.Tensor], stage: str) -> tuple[torch.Tensor, int]:
        """``(mean cross-entropy over the labelled tokens, their count)``; updates the stage's metrics."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        logits = self(input_ids)
        loss = cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        n_tokens = int((labels != IGNORE_INDEX).sum())
        m = self.stage_metrics[f"{stage}_metrics"]
        m.loss.update(loss.detach(), weight=n_tokens)
        if stage != "train":
            m.accuracy.update(logits.flatten(0, 1), labels.flatten())
        return loss, n_tokens

    def training_step(self, batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
                      batch_idx: int) -> torch.Tensor:
        """The step's loss: next-token cross-entropy (mean over labelled tokens) plus the blocks' auxiliary losses.

        ``batch``: ``{"input_ids": (B, T), "labels": (B, T)}``, or a list of such batches (sources mixed in one
        step at fixed weights, e.g. text windows and short fact sentences, each at its own length): the loss is
        then the sum of each part's mean loss, each part with its own forward (and auxiliary losses)."""
        parts = [batch] if isinstance(batch, Mapping) else list(batch)
        if not parts:
            raise ValueError("training_step got an empty list of batches")
        losses, totals = [], []
        aux_sums: dict[str, torch.Tensor] = {}
        n_tokens = batch_size = 0
        for part in parts:
            part_loss, part_tokens = self._lm_step(part, "train")
            losses.append(part_loss)
            aux = self.model.aux_losses()
            totals.append(losses[-1] + sum(aux.values()) if aux else losses[-1])
            for name, value in aux.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value
            n_tokens += part_tokens
            batch_size += part["input_ids"].shape[0]
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in aux_sums.items():
            self.log(f"train/aux/{name}", value, batch_size=batch_size)
        # the step's labelled tokens over all processes (under DDP each rank holds its share of the batch)
        self.log("train/tokens", float(n_tokens), reduce_fx="sum", sync_dist=True, batch_size=batch_size)
        return totals[0] if len(totals) == 1 else torch.stack(totals).sum()

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, dataloader_idx: int) -> None:
        self._mask_usage(batch["input_ids"])
        if dataloader_idx == 0:
            self._lm_step(batch, stage)
        else:  # fact probes: labels mark the answer tokens only
            self.stage_metrics[f"{stage}_metrics"].fact_recall.update(self(batch["input_ids"]), batch["labels"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", dataloader_idx)

    def _log_global(self, name: str, value: torch.Tensor | float, **kwargs) -> None:
        """Logs an epoch value that is already global: torchmetrics' ``compute()`` reduces the states of all ranks,
        so every rank holds the same number, and ``sync_dist`` (a mean of equal values) leaves it unchanged."""
        self.log(name, value, sync_dist=True, **kwargs)

    def _log_epoch(self, stage: str) -> None:
        m = self.stage_metrics[f"{stage}_metrics"]
        if m.loss.update_count == 0:
            return
        loss = m.loss.compute()
        self._log_global(f"{stage}/loss", loss, prog_bar=True)
        self._log_global(f"{stage}/ppl", torch.exp(loss))
        self._log_global(f"{stage}/accuracy", m.accuracy.compute())
        m.loss.reset()
        m.accuracy.reset()
        if m.fact_recall.update_count:
            self._log_global(f"{stage}/fact_recall", m.fact_recall.compute(), prog_bar=True)
            m.fact_recall.reset()
            chance = getattr(self.trainer.datamodule, "recall_chance", None) if self._trainer else None
            if chance is not None:
                self._log_global(f"{stage}/fact_recall_chance", float(chance))

    def _track_usage(self, on: bool) -> None:
        for name, pool in self.pools_by_name.items():
            metric = self.usage_metrics[name.replace("/", "__")]
            metric.set_position_mask(None)
            pool.track_usage(metric if on else None)

    def _mask_usage(self, input_ids: torch.Tensor) -> None:
        """Memory usage counts the lookups of real tokens only (padding depends on how samples were batched)."""
        tokenizer = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None) if self._trainer else None
        pad_id = getattr(tokenizer, "pad_id", None)
        if pad_id is not None and pad_id == getattr(tokenizer, "eos_id", None):
            pad_id = None  # padding indistinguishable from document ends: count every position
        mask = None if pad_id is None else input_ids != pad_id
        for metric in self.usage_metrics.values():
            metric.set_position_mask(mask)

    def _log_usage(self, stage: str) -> None:
        """Logs ``<stage>/memory/<pool>/<used_fraction|kl_uniform|rows_for_50pct|rows_for_90pct>``."""
        self._track_usage(False)
        for name in self.pools_by_name:
            metric = self.usage_metrics[name.replace("/", "__")]
            if metric.update_count:
                for key, value in metric.compute().items():
                    self._log_global(f"{stage}/memory/{name}/{key}", value.float())
            metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._track_usage(True)

    def on_test_epoch_start(self) -> None:
        self._track_usage(True)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        self._log_usage("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
        self._log_usage("test")

    def on_train_epoch_end(self) -> None:
        m = self.stage_metrics["train_metrics"]
        if m.loss.update_count:
            self._log_global("train/epoch_loss", m.loss.compute())
            m.loss.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Continues each prompt; returns ``{"prompt": [str], "prompt_ids": (B, P), "output_ids": (B, P + n)}``.

        A prompt longer than the context leaves room for ``max_new_tokens`` by keeping only its last tokens (a
        warning says so; ``prompt_ids`` are the tokens read); ``max_new_tokens >= max_seq_len`` is refused, naming
        the flag. ``max_new_tokens=None``: :func:`~memzoo.model.sampling.default_max_new_tokens` (fits)."""
        eos = getattr(getattr(self.trainer.datamodule, "tokenizer", None), "eos_id", None) if self._trainer else None
        prompt_ids = batch["input_ids"]
        max_new_tokens = self.hparams.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = default_max_new_tokens(prompt_ids.shape[1], self.model.max_seq_len)
        kept = prompt_tokens_to_keep(prompt_ids.shape[1], max_new_tokens, self.model.max_seq_len,
                                     flag="--model.init_args.max_new_tokens")
        if kept < prompt_ids.shape[1]:  # keep the prompt's end: the tokens the continuation depends on most
            log.warning("memzoo predict: %s", context_warning(prompt_ids.shape[1], kept, max_new_tokens,
                                                                self.model.max_seq_len))
            prompt_ids = prompt_ids[:, -kept:]
        out = self.model.generate(
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=self.hparams.temperature,
            top_k=self.hparams.top_k,
            eos_id=eos,
        )
        return {"prompt": batch.get("prompt"), "prompt_ids": prompt_ids, "output_ids": out}

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None and hasattr(datamodule, "check_vocab"):
            datamodule.check_vocab(self.architecture.vocab_size)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:  # blocks whose tables depend on the tokens' text (Engram) build them now
            self.model.bind_tokenizer(tokenizer)
        if self._trainer is not None:  # a strategy that cannot run the pools' update mode fails before training
            check_strategy(self, self.trainer.strategy)

    def on_fit_start(self) -> None:
        self._attach_memory_bank()

    def on_train_start(self) -> None:
        """Host tables' optimizer state back in host memory (Lightning moved a restored state to the device)."""
        for optimizer in self.trainer.optimizers:
            keep_host_state_on_host(optimizer, self.model)

    def on_validation_start(self) -> None:
        self._attach_memory_bank()

    def on_test_start(self) -> None:
        self._attach_memory_bank()

    def on_predict_start(self) -> None:
        self._attach_memory_bank()

    def _attach_memory_bank(self) -> None:
        """Attaches the ``memory`` bank once, to the weights the stage runs with."""
        path = self.hparams.get("memory")
        if path is None or getattr(self.model, "memory_bank", None) is not None:
            return
        from memzoo.model.memory_bank import MemoryBank

        self.model.attach_memory(MemoryBank.load(path))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clips dense gradients only (by norm): row-sparse pool gradients are left to their row-wise optimizer."""
        if gradient_clip_val is None or gradient_clip_val <= 0:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                f"memzoo clips gradients by norm only, got gradient_clip_algorithm={gradient_clip_algorithm!r}"
            )
        clip_dense_grad_norm_(optimizer, gradient_clip_val)

    def configure_optimizers(self):
        owners = [cb for cb in self.trainer.callbacks if hasattr(cb, "build_optimizer")] if self._trainer else []
        if len(owners) > 1:
            raise ValueError(f"several callbacks want to build the optimizer: {[type(c).__name__ for c in owners]}")
        if owners:  # e.g. SparseMemoryFinetuning: the callback that freezes the model owns its optimizer
            optimizer = owners[0].build_optimizer(self.model)
        else:
            optimizer = build_optimizer(
                self.model, self.optimizer_factory, sparse_optimizer=self.hparams.sparse_optimizer
            )
        decay_steps = self.hparams.lr_decay_steps
        if decay_steps is None:
            decay_steps = int(self.trainer.estimated_stepping_batches) if self._trainer else 1
        warmup, floor = self.hparams.warmup_steps, self.hparams.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, max(decay_steps, 1), floor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
