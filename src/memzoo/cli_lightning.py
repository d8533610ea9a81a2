"""LightningCLI for ``memzoo fit|validate|test|predict``.

- Subclass mode: ``model`` is any :class:`~memzoo.training.module.LanguageModel` (sub)class, ``data`` any
  :class:`~memzoo.data.base.LMDataModule`; short class names work because memzoo imports them before parsing.
- The data module's vocabulary size is linked into ``model.init_args.vocab_size``: it is never typed twice.
- Trainer defaults: atomic checkpoint writes, progress bar, CSV logger under ``runs/<experiment>/version_<n>/`` (a new version per run, claimed
  atomically, so runs never collide, even when started together), ``config.yaml`` saved in that folder, checkpoints in its ``checkpoints/`` with ``last.ckpt``.
- ``--checkpoint.*`` configures the ModelCheckpoint callback; ``--predict_output`` the file ``predict`` writes.
- Bad input fails before training: model/blocks/pools are built at instantiation, data paths are checked by the
  data module's constructor, ``--ckpt_path`` is checked before the trainer starts.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import memzoo.blocks  # noqa: F401  (registers memzoo's blocks)
from memzoo.data import LMDataModule
from memzoo.export.atomic import remove_stale_partials
from memzoo.training.callbacks import PredictionWriter
from memzoo.training.checkpoint_check import check_checkpoint_file, check_same_architecture, find_last_checkpoint
from memzoo.training.module import LanguageModel
from memzoo.training.run_folder import RunFolderLogger
from memzoo.training.run_checkpoint import RunCheckpoint, StoppedBySignal

DEFAULT_RUNS_DIR = "runs"

# memzoo's data modules resume mid-epoch exactly (an epoch's order depends only on seed and epoch, and the loader
# skips the batches Lightning's restored progress counts as done), so Lightning's generic warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# A resumed run writes to its own new version folder, so the checkpoint callback's earlier folder is expected to differ.
warnings.filterwarnings("ignore", message="The dirpath has changed from")
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
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parses, resolves ``--ckpt_path last`` to the newest ``last.ckpt`` of the experiment (saying which on
        stderr), and checks the checkpoint file is complete."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            found = find_last_checkpoint(DEFAULT_RUNS_DIR, _experiment_name(config))
            print(f"memzoo: --ckpt_path last is {found}", file=sys.stderr)
            config["ckpt_path"] = ckpt_path = str(found)
        if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
            check_checkpoint_file(ckpt_path)

    def _parse_ckpt_path(self) -> None:
        """The config decides the model: Lightning's default (overwrite the model config with the checkpoint's
        hyperparameters) would silently train the checkpoint's architecture. :meth:`instantiate_classes` instead
        refuses a checkpoint whose architecture differs from the configured model's."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("plugins"):
            from memzoo.registry import load_plugins

            load_plugins(config["plugins"])

    def instantiate_trainer(self, **kwargs: Any):
        """Adds the default CSV logger (``runs/<experiment>/version_<n>``) unless the config sets ``trainer.logger``."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        if config["trainer"].get("logger") in (None, True):
            name = _experiment_name(config)
            kwargs["logger"] = RunFolderLogger(save_dir=DEFAULT_RUNS_DIR, name=name)
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
            check_same_architecture(ckpt_path, self.model.hparams)
        if self.subcommand == "fit":
            _remove_stale_partials(self.config[self.subcommand], ckpt_path)
        if self.subcommand == "predict":
            output = self.config[self.subcommand].get("predict_output", "predictions.jsonl")
            self.trainer.callbacks.append(PredictionWriter(output))


def _remove_stale_partials(config: Any, ckpt_path: str | None) -> None:
    """Deletes the partial checkpoint files killed runs of this experiment left (and those next to ``ckpt_path``);
    says so in one line."""
    folders = set(Path(DEFAULT_RUNS_DIR, _experiment_name(config)).glob("version_*/checkpoints"))
    if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
        folders.add(Path(ckpt_path).parent)
    removed = [path for folder in sorted(folders) for path in remove_stale_partials(folder)]
    if removed:
        print(f"memzoo: removed {len(removed)} partial checkpoint file(s) left by killed runs: "
              + ", ".join(str(p) for p in removed), file=sys.stderr)


def _experiment_name(config: Any) -> str:
    """``--experiment``, else the (last) config file's stem, else ``memzoo``."""
    return config.get("experiment") or _config_stem(config) or "memzoo"


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
    try:
        return _run(args)
    except StoppedBySignal as stop:
        hint = f"; resume with --ckpt_path {stop.checkpoint}" if stop.checkpoint else ""
        print(f"memzoo: {stop}{hint}", file=sys.stderr)
        raise SystemExit(stop.exit_status) from None


def _run(args: list[str]) -> MemzooCLI:
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
