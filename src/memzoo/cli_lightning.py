"""LightningCLI for ``memzoo fit|validate|test|predict``.

- Subclass mode: ``model`` is any :class:`~memzoo.training.module.LanguageModel` (sub)class, ``data`` any
  :class:`~memzoo.data.base.LMDataModule`; short class names work because memzoo imports them before parsing.
- The data module's vocabulary size is linked into ``model.init_args.architecture.vocab_size``: it is never typed twice.
- Trainer defaults: atomic checkpoint writes, progress bar, CSV logger under ``runs/<experiment>/version_<n>/`` (a new version per run, so runs
  never collide), ``config.yaml`` saved in that folder, checkpoints in its ``checkpoints/`` with ``last.ckpt``.
- ``--checkpoint.*`` configures the ModelCheckpoint callback; ``--predict_output`` the file ``predict`` writes.
- Bad input fails before training: model/blocks/pools are built at instantiation, data paths are checked by the
  data module's constructor, ``--ckpt_path`` is checked before the trainer starts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

import memzoo.blocks  # noqa: F401  (registers memzoo's blocks)
from memzoo.data import LMDataModule
from memzoo.export.checkpoint_check import check_checkpoint_file
from memzoo.training.callbacks import PredictionWriter
from memzoo.training.module import LanguageModel

DEFAULT_RUNS_DIR = "runs"

# memzoo's data modules resume mid-epoch exactly (an epoch's order depends only on seed and epoch, and the loader
# skips the batches Lightning's restored progress counts as done), so Lightning's generic warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# Lightning 2.6 calls a pytree API that torch >= 2.10 deprecates; nothing a memzoo user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class MemzooCLI(LightningCLI):
    """LightningCLI with memzoo's links, defaults and early checks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--plugins",
            type=list[str],
            default=[],
            help="Python files or module names to import before building the model (they register user blocks).",
        )
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="Run folder name under the logger's save_dir (default: the config file's stem, else 'memzoo').",
        )
        parser.add_argument(
            "--predict_output",
            type=str,
            default="predictions.jsonl",
            help="File `memzoo predict` writes (JSON lines: prompt, completion); relative paths go in the run folder.",
        )
        parser.link_arguments("data.vocab_size", "model.init_args.architecture.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses, then checks ``--ckpt_path`` before Lightning itself opens the file (to read its hparams)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("plugins"):
            from memzoo.registry import load_plugins

            load_plugins(config["plugins"])

    def instantiate_trainer(self, **kwargs: Any):
        """Adds the default CSV logger (``runs/<experiment>/version_<n>``) unless the config sets ``trainer.logger``."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config["trainer"].get("logger") in (None, True):
            name = config.get("experiment") or _config_stem(config) or "memzoo"
            kwargs["logger"] = CSVLogger(save_dir=DEFAULT_RUNS_DIR, name=name)
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.subcommand == "predict":
            output = self.config[self.subcommand].get("predict_output", "predictions.jsonl")
            self.trainer.callbacks.append(PredictionWriter(output))


def _config_stem(config: Any) -> str | None:
    paths = config.get("config") or []
    for path in reversed(paths):
        text = str(getattr(path, "relative", path) or "")
        if text:
            return Path(text).stem
    return None


def run_lightning_cli(args: list[str]) -> MemzooCLI:
    """Runs one LightningCLI verb (``args[0]``) in-process; returns the CLI object (its ``trainer``, ``model``...)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    return MemzooCLI(
        model_class=LanguageModel,
        datamodule_class=LMDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [LearningRateMonitor(logging_interval="step")],
            "log_every_n_steps": 10,
            # checkpoints are written to a temporary name and renamed: a crash never leaves a half-written file
            "plugins": [{"class_path": "memzoo.export.checkpoint_io.AtomicCheckpointIO"}],
        },
        parser_kwargs={"default_env": False},
        args=args,
        auto_configure_optimizers=False,
    )
