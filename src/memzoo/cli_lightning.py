"""LightningCLI for ``memzoo fit|validate|test|predict``.

- Subclass mode: ``model`` is any :class:`~memzoo.training.module.LanguageModel` (sub)class, ``data`` any
  :class:`~memzoo.data.base.LMDataModule`; short class names work because memzoo imports them before parsing.
- The data module's vocabulary size is linked into ``model.init_args.architecture.vocab_size``: it is never typed twice.
- Trainer defaults: atomic checkpoint writes; a progress bar in steps of ``max_steps`` with tokens/s; memzoo's model
  summary (parameters, active parameters and FLOPs per token); a CSV logger under ``runs/<experiment>/version_<n>/``
  (a new version per run, claimed atomically, so runs never collide, even when started together); ``config.yaml``
  saved in that folder; checkpoints in its ``checkpoints/``, ``last.ckpt`` holding the final step.
- ``--checkpoint.*`` configures the checkpoint callback (:class:`~memzoo.training.run_checkpoint.RunCheckpoint`:
  Lightning's ``ModelCheckpoint`` that also saves on SIGTERM/SIGINT); ``--predict_output`` the file ``predict``
  writes; ``--ckpt_path last`` is the newest ``last.ckpt`` of the experiment.
- Bad input fails before training: model/blocks/pools are built at instantiation, data paths are checked by the
  data module's constructor, ``block_size`` against the model's ``max_seq_len``, ``--ckpt_path`` (complete file, same
  architecture) before the trainer starts. YAML keys given twice are errors (:mod:`memzoo.config_yaml`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn

# Imported for their effects: memzoo.blocks registers memzoo's blocks; short class names (`class_path:
# TextDataModule`, `strategy: MemoryParallelStrategy`) resolve among the imported subclasses, which memzoo.data and
# memzoo.parallel import only on first use.
import memzoo.blocks  # noqa: F401
import memzoo.data.biographies  # noqa: F401
import memzoo.data.facts  # noqa: F401
import memzoo.data.text  # noqa: F401
import memzoo.parallel.sparse_ddp  # noqa: F401
import memzoo.parallel.strategy  # noqa: F401
from memzoo import config_yaml
from memzoo.accounting import summarize
from memzoo.atomic import STALE_AFTER_S, remove_stale_partials
from memzoo.cli_base import ConfigError
from memzoo.config_errors import describe_parse_error
from memzoo.config_overrides import merge_dict_overrides
from memzoo.data import LMDataModule
from memzoo.export.checkpoint_check import (
    check_checkpoint_file,
    check_same_architecture,
    find_last_checkpoint,
)
from memzoo.loading import ModelSource, build_language_model, open_source
from memzoo.parallel.checkpoint import (
    check_sharded_checkpoint,
    check_strategy_reads_sharded,
    is_sharded_checkpoint,
    sharded_meta_file,
)
from memzoo.parallel.sparse_ddp import sparse_ddp_for
from memzoo.training.callbacks import PredictionWriter, StepProgressBar
from memzoo.training.module import LanguageModel
from memzoo.training.run_checkpoint import RunCheckpoint, StoppedBySignal
from memzoo.training.run_folder import RunFolderLogger, claimed_run_folders, remove_unused_run_folders

DEFAULT_RUNS_DIR = "runs"

# memzoo's data modules resume mid-epoch exactly (an epoch's order depends only on seed and epoch, and the loader
# skips the batches Lightning's restored progress counts as done), so Lightning's generic warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# A resumed run writes to its own new version folder, so the checkpoint callback's earlier folder is expected to differ.
warnings.filterwarnings("ignore", message="The dirpath has changed from")


class _DropNoise(logging.Filter):
    """Drops Lightning's lines that say nothing about the user's run: the "Tip: try installing litlogger"
    advertisement, and the note that memzoo's own model summary replaces Lightning's."""

    NOISE = ("💡 Tip", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropNoise())
# Lightning 2.6 calls a pytree API that torch >= 2.10 deprecates; nothing a memzoo user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class MemzooCLI(LightningCLI):
    """LightningCLI with memzoo's links, defaults and early checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        command_line = kwargs.get("args")
        every = LightningCLI.subcommands()
        self._verb = command_line[0] if isinstance(command_line, list) and command_line and \
            command_line[0] in every and kwargs.get("run", True) else None
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """Lightning's verbs, or only the one the command line runs: each verb's parser costs ~0.12 s of signature
        parsing to build, and a run reads one (``memzoo fit --help`` still prints all of fit's options)."""
        every = LightningCLI.subcommands()
        return {self._verb: every[self._verb]} if self._verb else every

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
        try:  # LightningCLI's own version warns whenever sys.argv has arguments
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args)
            else:  # `--model.init_args.architecture.pools.P.lr X` sets one key of pool P, not the whole entry
                self.config = parser.parse_args(merge_dict_overrides(list(args), parser.parse_args))
        except ArgumentError as error:  # the parser raises (exit_on_error=False): one line, no usage dump
            command_line = () if isinstance(args, (dict, Namespace)) else args  # a parsed object has no tokens
            raise ConfigError(describe_parse_error(error, parser, command_line)) from error
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            found = find_last_checkpoint(DEFAULT_RUNS_DIR, _experiment_name(config))
            print(f"memzoo: --ckpt_path last is {found}", file=sys.stderr)
            config["ckpt_path"] = ckpt_path = str(found)
        if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
            if is_sharded_checkpoint(ckpt_path):
                check_sharded_checkpoint(ckpt_path)
                check_strategy_reads_sharded(ckpt_path, (config.get("trainer") or {}).get("strategy"))
            else:
                check_checkpoint_file(ckpt_path)

    def _dump_config(self) -> None:
        """The parsed config as plain data (``self.config_dump``), which Lightning's model instantiator records as
        the model's hyperparameters. Lightning's version dumps with validation, a second full check of a config
        :meth:`parse_arguments` has just validated (~45 ms of jsonargparse per build, two thirds of the dump); this
        one dumps the same values without it (YAML, as Lightning: it keeps the integer keys of ``layers``).
        tests/test_cli.py checks the result equals Lightning's."""
        if hasattr(self, "config_dump"):
            return
        dumped = self.parser.dump(self.config, skip_link_targets=False, skip_none=False, format="yaml",
                                  skip_validation=True)
        self.config_dump = yaml.safe_load(dumped)
        if "subcommand" in self.config:
            self.config_dump = self.config_dump[self.config.subcommand]

    def _parse_ckpt_path(self) -> None:
        """The config decides the model: Lightning's default (overwrite the model config with the checkpoint's
        hyperparameters) would silently train the checkpoint's architecture. :meth:`instantiate_classes` instead
        refuses a checkpoint whose architecture differs from the configured model's."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("plugins"):
            from memzoo.registry import load_plugins

            load_plugins(config["plugins"])
        self.init_source = _open_init_from(config)
        _use_init_from_tokenizer(config, self.init_source)
        model_args = config.get("model.init_args") if config.get("model") else None
        if model_args is not None and "architecture" in model_args and model_args.architecture is None:
            model_args.architecture = Namespace()  # none given (init_from names it): the data's vocab_size needs a place

    #: ``init_from``'s source, opened once per build (:meth:`before_instantiate_classes`): the tokenizer and the
    #: model read the same resolved path
    init_source: ModelSource | None = None
    #: whether the model built reads ``init_from``'s weights (``False``: its architecture only)
    load_init_weights: bool = True

    def _add_instantiators(self) -> None:
        """The model is built by :func:`memzoo.loading.build_language_model` (``init_from`` resolved once), inside
        Lightning's own instantiator (which records the configured hyperparameters)."""
        super()._add_instantiators()
        lightning_instantiator = _InstantiatorFn(cli=self, key="model")

        def instantiate(class_type, *args, applied_instantiation_links: dict, **kwargs):
            def construct(**init_args):
                return lightning_instantiator(class_type, *args, applied_instantiation_links=applied_instantiation_links,
                                              **init_args)

            return build_language_model(construct, source=self.init_source, load_weights=self.load_init_weights,
                                        **kwargs)

        self.parser.add_instantiator(instantiate, LanguageModel, subclasses=True, prepend=True)

    def instantiate_trainer(self, **kwargs: Any):
        """Adds memzoo's progress bar and model summary (unless disabled or configured) and the run-folder CSV logger
        (``runs/<experiment>/version_<n>``, unless the config sets ``trainer.logger``); runs a DDP strategy name
        (``ddp``, ``ddp_spawn``, ...) as :class:`memzoo.parallel.SparseDDPStrategy` with the same settings."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config["trainer"]
        extra = []
        if trainer_config.get("enable_progress_bar") is not False and not _has(trainer_config, "ProgressBar"):
            extra.append(StepProgressBar())
        if trainer_config.get("enable_model_summary") is not False and not _has(trainer_config, "ModelSummary"):
            extra.append(FlopsModelSummary())
        if extra:
            kwargs["callbacks"] = [*(trainer_config.get("callbacks") or []), *extra]
        sparse_ddp = sparse_ddp_for(trainer_config.get("strategy"))
        if sparse_ddp is not None:  # DDP with the row exchange of sparse pools (plain DDP would refuse them)
            kwargs["strategy"] = sparse_ddp
        if config["trainer"].get("logger") in (None, True):
            name = _experiment_name(config)
            kwargs["logger"] = RunFolderLogger(save_dir=DEFAULT_RUNS_DIR, name=name)
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
            if is_sharded_checkpoint(ckpt_path):  # the shards' tensors are checked by their loader
                check_same_architecture(sharded_meta_file(ckpt_path), self.model.hparams)
            else:
                check_same_architecture(ckpt_path, self.model.hparams, self.model.state_dict())
        if self.subcommand:
            _record_built_architecture(self.config[self.subcommand], self.model)
        if self.subcommand in ("fit", "validate", "test"):
            _check_block_size(self.datamodule, self.model)
        if self.subcommand == "fit":
            _remove_stale_partials(self.config[self.subcommand], ckpt_path)
        if self.subcommand == "predict":
            output = self.config[self.subcommand].get("predict_output", "predictions.jsonl")
            self.trainer.callbacks.append(PredictionWriter(output))


class FlopsModelSummary(ModelSummary):
    """Prints memzoo's summary at the start of ``fit``: per-layer parameters, active parameters per token and
    forward FLOPs per token at the data's ``block_size`` (:func:`memzoo.accounting.summarize`), in place of
    Lightning's table (whose FLOPs column needs an ``example_input_array`` and reads 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        context = getattr(trainer.datamodule, "block_size", None) if trainer.datamodule is not None else None
        try:
            summary = summarize(pl_module, context_length=context)
        except (TypeError, ValueError, AttributeError):  # not a memzoo Transformer inside: Lightning's summary
            super().on_fit_start(trainer, pl_module)
            return
        print(summary.table())


def _has(trainer_config: Any, kind: str) -> bool:
    """Whether the configured callbacks hold one whose class name contains ``kind``."""
    return any(kind in type(callback).__name__ for callback in trainer_config.get("callbacks") or [])


def _check_block_size(datamodule: Any, model: Any) -> None:
    """Fails at configuration time if the data's samples are longer than the model's context."""
    block_size = getattr(datamodule, "block_size", None)
    max_seq_len = getattr(getattr(model, "model", None), "max_seq_len", None)
    if block_size is not None and max_seq_len is not None and block_size > max_seq_len:
        raise ValueError(
            f"data block_size={block_size} is longer than the model's max_seq_len={max_seq_len}: lower "
            f"data.init_args.block_size or raise the model's max_seq_len to at least {block_size}"
        )


def _remove_stale_partials(config: Any, ckpt_path: str | None) -> None:
    """Deletes the partial checkpoint files killed runs of this experiment left (and those next to ``ckpt_path``);
    says so in one line. Partial files younger than 30 s are kept (a run may be writing them) and named in a
    warning line."""
    folders = set(Path(DEFAULT_RUNS_DIR, _experiment_name(config)).glob("version_*/checkpoints"))
    if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
        folders.add(Path(ckpt_path).parent)
    young: list[Path] = []
    removed = [path for folder in sorted(folders) for path in remove_stale_partials(folder, young)]
    if removed:
        print(f"memzoo: removed {len(removed)} partial checkpoint file(s) left by killed runs: "
              + ", ".join(str(p) for p in removed), file=sys.stderr)
    if young:
        print(f"memzoo: warning: kept {len(young)} partial checkpoint file(s) younger than {STALE_AFTER_S:.0f} s "
              f"(another run may be writing them; a later run removes them once older): "
              + ", ".join(str(p) for p in young), file=sys.stderr)


def _experiment_name(config: Any) -> str:
    """``--experiment``, else the (last) config file's stem, else ``memzoo``."""
    return config.get("experiment") or _config_stem(config) or "memzoo"


def _open_init_from(config: Any) -> ModelSource | None:
    """The source ``model.init_args.init_from`` names (a hub id resolved once, here), ``None`` without one."""
    model_args = config.get("model.init_args") if config.get("model") else None
    init_from = getattr(model_args, "init_from", None) if model_args is not None else None
    return open_source(init_from, where="model.init_args.init_from") if init_from else None


def _use_init_from_tokenizer(config: Any, source: ModelSource | None) -> None:
    """``model.init_args.init_from`` names the data tokenizer unless the config names one other than the default
    ``byte``: a folder (or a hub id, resolved to its snapshot folder) with a ``tokenizer.json`` gives that file; a
    ``.gguf`` file gives its own tokenizer (written once into memzoo's cache); a memzoo ``.ckpt`` gives the tokenizer
    its run's data module read."""
    if source is None:
        return
    data_args = config.get("data.init_args") if config.get("data") else None
    if data_args is None or getattr(data_args, "tokenizer", None) != "byte":
        return
    tokenizer = source.tokenizer
    if tokenizer not in (None, "byte"):
        data_args.tokenizer = tokenizer


def _record_built_architecture(config: Any, model: Any) -> None:
    """Writes the architecture ``model`` was built from into the run's config (what ``config.yaml`` saves), so the
    file names the model built (``init_from`` replaces the configured architecture) and reruns it. ``vocab_size``
    stays linked from the data module."""
    architecture = getattr(model, "architecture", None)
    if not hasattr(architecture, "to_dict"):
        return
    for key, value in architecture.to_dict().items():
        if key != "vocab_size":
            config[f"model.init_args.architecture.{key}"] = value


def _config_stem(config: Any) -> str | None:
    paths = config.get("config") or []
    for path in reversed(paths):
        text = str(getattr(path, "relative", path) or "")
        if text:
            return Path(text).stem
    return None


def _cli_kwargs() -> dict[str, Any]:
    return dict(
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
        # errors raise (reported in one line by memzoo.cli.entry_point); abbreviated options are refused
        parser_kwargs={"default_env": False, "exit_on_error": False, "allow_abbrev": False},
        auto_configure_optimizers=False,
    )


def run_lightning_cli(args: list[str]) -> MemzooCLI:
    """Runs one LightningCLI verb (``args[0]``) in-process; returns the CLI object (its ``trainer``, ``model``...)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    config_yaml.install()
    claimed_before = len(claimed_run_folders())
    try:
        return MemzooCLI(**_cli_kwargs(), args=args)
    except StoppedBySignal as stop:
        hint = f"; resume with --ckpt_path {stop.checkpoint}" if stop.checkpoint else ""
        if stop.rank == 0:  # every DDP process stops; one line says so
            print(f"memzoo: {stop}{hint}", file=sys.stderr)
        raise SystemExit(stop.exit_status) from None
    finally:  # a run that wrote nothing (max_steps 0, failed while starting) leaves no version folder
        for folder in remove_unused_run_folders(since=claimed_before):
            print(f"memzoo: the run wrote no metrics, checkpoints or predictions; removed its folder {folder}",
                  file=sys.stderr)


class _ModelBuilder(MemzooCLI):
    """The CLI's parsing and model construction without a trainer (:func:`build_model_from_config`)."""

    def __init__(self, *args: Any, vocab_size: int | None = None, load_weights: bool = True, **kwargs: Any):
        self.vocab_size = vocab_size
        self.load_init_weights = load_weights
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        if self.vocab_size is not None:  # the data module is not built (below), so a config may leave it out
            parser.set_defaults({"data": {"class_path": "memzoo.data.facts.FactsDataModule"}})

    def instantiate_classes(self) -> None:
        config = self.config
        if self.vocab_size is not None:  # linked from here, not from a data module (which is not built)
            config = config.clone()
            config["data"] = None
            if config.get("model.init_args.architecture") is None:
                config["model.init_args.architecture"] = Namespace()
            config["model.init_args.architecture.vocab_size"] = self.vocab_size
        self.config_init = self.parser.instantiate_classes(config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")


def build_model_from_config(config: Any, vocab_size: int | None = None, load_weights: bool = True) -> LanguageModel:
    """:func:`memzoo.build.build_model`: ``config`` (a YAML path, a dict as the CLI parses it, a parsed
    ``Namespace``, or a list of command-line arguments) parsed by :class:`MemzooCLI`'s parser and its model built as
    ``memzoo fit`` builds it."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    config_yaml.install()
    args = ["--config", str(config)] if isinstance(config, (str, Path)) else config
    if isinstance(args, (list, tuple)):
        args = [str(arg) for arg in args]
    if isinstance(args, dict):
        args = {key: value for key, value in args.items() if key != "subcommand"}
    builder = _ModelBuilder(**_cli_kwargs(), args=args, run=False, vocab_size=vocab_size, load_weights=load_weights)
    tokenizer = getattr(builder.datamodule, "tokenizer", None)
    if tokenizer is not None:  # as LanguageModel.setup does when training starts
        builder.model.model.bind_tokenizer(tokenizer)
    return builder.model


def build_from_config(args: list[str]) -> MemzooCLI:
    """Parses ``args`` (``--config X.yaml``, overrides) as ``memzoo fit`` would and builds model, data module and
    trainer without running anything; returns the CLI object (``.model``, ``.datamodule``)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    config_yaml.install()
    return MemzooCLI(**_cli_kwargs(), args=args, run=False)
