"""The memzoo command in-process: a tiny fit lowers the loss, exact resume, --print_config round trip, configs parse,
plugins from YAML and the command line, predict writes completions, and bad input fails before training."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from memzoo.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/study/ is tested by test_study.py

TINY = textwrap.dedent(
    """
    seed_everything: 0
    trainer:
      max_steps: {steps}
      accelerator: cpu
      devices: 1
      enable_progress_bar: false
      enable_model_summary: false
      log_every_n_steps: 1
      val_check_interval: {val_every}
      check_val_every_n_epoch: null
      limit_val_batches: 2
    model:
      class_path: memzoo.LanguageModel
      init_args:
        architecture:
          dim: 32
          n_layers: 2
          n_heads: 2
          max_seq_len: 64{architecture_extra}
        warmup_steps: 2
        optimizer:
          class_path: torch.optim.AdamW
          init_args: {{lr: 0.01}}
    data:
      class_path: memzoo.data.FactsDataModule
      init_args:
        n_entities: 20
        block_size: 32
        batch_size: 8
        recall_samples: 8
    """
)


def write_config(tmp_path, steps=12, val_every=6, architecture_extra="", prefix=""):
    """A tiny facts config; ``architecture_extra`` lines go under model.init_args.architecture, ``prefix`` at the
    top."""
    path = tmp_path / "tiny.yaml"
    extra = "".join(f"\n      {line}" for line in architecture_extra.splitlines() if line)
    path.write_text(prefix + TINY.format(steps=steps, val_every=val_every, architecture_extra=extra))
    return path


def step_losses(cli):
    rows = list(csv_rows(Path(cli.trainer.logger.log_dir) / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memzoo"])


def test_help_is_fast_and_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "memzoo", "--help"], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout and "blocks" in out.stdout
    probe = "import sys, memzoo.cli; memzoo.cli.main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")  # no torch import for --help


def test_a_verbs_help_lists_its_options(capsys):
    """A run builds only its verb's parser; that parser's help is complete."""
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt_path" in out and "--trainer.max_steps" in out and "--predict_output" in out


def test_tiny_fit_lowers_loss_and_writes_run_folder(tmp_path):
    cli = main(["fit", "--config", str(write_config(tmp_path, steps=30, val_every=30))])
    assert list(cli.subcommands()) == ["fit"]  # only the verb run gets a parser
    losses = step_losses(cli)
    first, last = [losses[k] for k in sorted(losses)[:3]], [losses[k] for k in sorted(losses)[-3:]]
    assert sum(last) / 3 < sum(first) / 3 - 0.5
    run_dir = Path(cli.trainer.logger.log_dir)
    assert run_dir.parts[-3:] == ("runs", "tiny", "version_0")
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    metrics = list(csv_rows(run_dir / "metrics.csv"))
    assert any(r.get("val/fact_recall") for r in metrics) and any(r.get("val/ppl") for r in metrics)
    # a second run gets its own folder
    cli2 = main(["fit", "--config", str(write_config(tmp_path, steps=1, val_every=1))])
    assert Path(cli2.trainer.logger.log_dir).name == "version_1"


def test_checkpoint_hparams_are_plain_data(tmp_path):
    cli = main(["fit", "--config", str(write_config(tmp_path, steps=2, val_every=2))])
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    architecture = state["hyper_parameters"]["architecture"]
    assert architecture["dim"] == 32 and architecture["vocab_size"] == 258


@pytest.mark.parametrize("config", ["configs/facts-memoryplus.yaml", "configs/text-engram.yaml"])
def test_recorded_hyperparameters_equal_lightnings_dump_of_the_config(config, tmp_path):
    """MemzooCLI._dump_config dumps without re-validating (the parse validated): the config it records equals
    Lightning's own validated dump, integer layer keys included."""
    from lightning.pytorch.cli import LightningCLI

    from memzoo.cli_lightning import build_from_config

    text_file = tmp_path / "corpus.txt"
    text_file.write_text("hello world\n" * 200)
    cli = build_from_config(["--config", str(ROOT / config), f"--data.init_args.path={text_file}"]
                            if "text" in config else ["--config", str(ROOT / config)])
    recorded = cli.config_dump
    assert cli.model.hparams["_class_path"] == recorded["model"]["class_path"]  # the instantiator recorded it
    dumps = []
    for dump in (type(cli)._dump_config, LightningCLI._dump_config):  # both of the same (final) config
        del cli.config_dump
        dump(cli)
        dumps.append(cli.config_dump)
    assert dumps[0] == dumps[1] and dumps[0]["model"]["init_args"]["architecture"]["layers"]


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    """Stop at step 8 of a 16-step schedule (mid-epoch), resume from last.ckpt: steps 8..15 match exactly."""
    schedule = ["--model.init_args.lr_decay_steps", "16"]
    full = step_losses(main(["fit", "--config", str(write_config(tmp_path, steps=16, val_every=8)), *schedule]))
    first = main(["fit", "--config", str(write_config(tmp_path, steps=8, val_every=8)), *schedule])
    assert first.trainer.num_training_batches > 8  # the checkpoint is mid-epoch
    ckpt = Path(first.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    resumed = step_losses(
        main(["fit", "--config", str(write_config(tmp_path, steps=16, val_every=8)), *schedule, "--ckpt_path", str(ckpt)])
    )
    later = {k: v for k, v in full.items() if k >= 8}
    assert sorted(later) == sorted(resumed) == list(range(8, 16))
    for step, loss in later.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step


def test_print_config_round_trips(tmp_path, capsys):
    config = write_config(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.init_args.architecture.dim", "48", "--print_config"])
    printed = capsys.readouterr().out
    parsed = yaml.safe_load(printed)
    assert parsed["model"]["init_args"]["architecture"]["dim"] == 48
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(again), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == parsed


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(ROOT)) for c in CONFIGS])
def test_every_shipped_config_parses(config, capsys, tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("hello world\n" * 200)
    args = ["fit", "--config", str(config), "--print_config"]
    if "text" in config.name:
        args.insert(3, f"--data.init_args.path={text_file}")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"]


PLUGIN = textwrap.dedent(
    '''
    import torch.nn as nn
    from memzoo import Block, register_block

    @register_block("user_mlp")
    class UserMLP(Block):
        def __init__(self, dim: int, hidden: int = 16):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, x, ctx=None):
            return self.net(x)
    '''
)


@pytest.mark.parametrize("route", ["command_line", "yaml"])
def test_user_block_from_own_file_used_by_short_name(tmp_path, route):
    from memzoo import registry

    registry._REGISTRY.pop("user_mlp", None)
    plugin = tmp_path / f"blocks_{route}.py"
    plugin.write_text(PLUGIN)
    prefix = f"plugins: [{plugin}]\n" if route == "yaml" else ""
    config = write_config(tmp_path, steps=2, val_every=2, architecture_extra="block: user_mlp\nblock_args: {hidden: 24}",
                          prefix=prefix)
    args = ["fit", "--config", str(config)] + (["--plugins", str(plugin)] if route == "command_line" else [])
    cli = main(args)
    ffn = cli.model.model.layers[0].ffn
    assert type(ffn).__name__ == "UserMLP" and ffn.net[0].out_features == 24
    registry._REGISTRY.pop("user_mlp", None)


def test_predict_writes_completions(tmp_path):
    cli = main(["fit", "--config", str(write_config(tmp_path, steps=2, val_every=2))])
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    pred = main(
        ["predict", "--config", str(write_config(tmp_path)), "--ckpt_path", str(ckpt),
         "--data.init_args.predict_prompts", '["Hello", "The birth year of"]', "--model.init_args.max_new_tokens", "5"]
    )
    path = Path(pred.trainer.logger.log_dir) / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "The birth year of"]
    assert all(isinstance(r["completion"], str) for r in rows)
    # no max_new_tokens: as many as fit the context (max_seq_len 64) beside the prompt; an empty prompt too
    args = ["predict", "--config", str(write_config(tmp_path)), "--ckpt_path", str(ckpt),
            "--data.init_args.predict_prompts", '["", "The birth year of"]']
    main(args)
    with pytest.raises(ValueError, match="--model.init_args.max_new_tokens=64 does not fit the model's context of "
                                         "max_seq_len=64"):
        main([*args, "--model.init_args.max_new_tokens", "64"])


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.architecture.block", "dnse"], "Did you mean 'dense'"),
        (["--model.init_args.architecture.n_heads", "3"], "not divisible by n_heads=3"),
        (["--model.init_args.architecture.block_args", "{hiden: 4}"], "did you mean 'hidden'"),
        (["--model.init_args.architecture.attention_backend", "xformers"], "xformers"),
        (["--model.init_args.architecture.dimm", "3"], "dimm"),
        (["--model.init_args.architecture.dim", "abc"], "dim"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, override, message, capsys):
    if "xformers" in override and torch.cuda.is_available():
        pytest.skip("xformers may run on this machine")
    with pytest.raises((SystemExit, ValueError, RuntimeError)) as err:
        main(["fit", "--config", str(write_config(tmp_path)), *override])
    text = str(err.value) + capsys.readouterr().err
    assert message in text
    assert not list(Path(tmp_path).rglob("*.ckpt"))


def test_missing_and_corrupt_checkpoints_fail_clearly(tmp_path):
    from memzoo.export.checkpoint_check import CheckpointError

    config = str(write_config(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["fit", "--config", config, "--ckpt_path", str(tmp_path / "nope.ckpt")])
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        main(["fit", "--config", config, "--ckpt_path", str(bad)])
    cli = main(["fit", "--config", str(write_config(tmp_path, steps=1, val_every=1))])
    good = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        main(["fit", "--config", config, "--ckpt_path", str(truncated)])


def test_blocks_verb_lists_hyperparameters(capsys):
    names = main(["blocks"])
    assert "dense" in names
    out = capsys.readouterr().out
    assert "hidden: int | None = None" in out and "dropout: float = 0.0" in out


def test_blocks_verb_lists_presets_with_their_settings_and_papers(capsys):
    assert main(["blocks", "memory_plus"]) == ["memory_plus"]
    out = capsys.readouterr().out
    assert "memory_plus  (preset of product_key_memory)" in out and "Berges et al. 2024" in out
    assert "settings: heads=4, knn=32, query_norm='none', qk_norm=True, gate='silu'" in out
    assert "gate: Gate = 'silu'" in out  # the preset's setting is the listed default
    assert "gate: none trains faster on text and stores less at capacity" in out  # its paper note names the study


def test_text_config_without_or_with_a_missing_path_fails_clearly(capsys):
    config = str(ROOT / "configs" / "text-dense.yaml")
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["fit", "--config", config, "--trainer.max_steps", "1"])
    assert "needs exactly one of path" in str(err.value) + capsys.readouterr().err
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as err:
        main(["fit", "--config", config, "--data.init_args.path", "no/such/corpus.txt", "--trainer.max_steps", "1"])
    assert "no/such/corpus.txt" in str(err.value) + capsys.readouterr().err


def test_text_config_trains_on_a_local_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 300)
    cli = main(
        ["fit", "--config", str(ROOT / "configs" / "text-dense.yaml"), "--data.init_args.path", str(corpus),
         "--data.init_args.cache_dir", str(tmp_path / "cache"), "--trainer.max_steps", "2",
         "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2", "--model.init_args.architecture.n_layers", "1",
         "--trainer.enable_progress_bar", "false"]
    )
    assert cli.trainer.global_step == 2


def test_console_script_exits_zero_and_survives_a_closed_pipe(monkeypatch, capsys):
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "memzoo", "blocks"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader_gone.stdout.close()  # the reader stops before memzoo writes: every write meets a closed pipe
    stderr = reader_gone.stderr.read().decode()
    assert reader_gone.wait() == 0 and "Traceback" not in stderr, stderr
    from memzoo.cli import entry_point  # the console script's function, in this process (a process: ~3 s CPU)

    monkeypatch.setattr(sys, "argv", ["memzoo", "blocks", "dense"])
    assert entry_point() == 0
    out = capsys.readouterr().out
    assert out.startswith("dense") and "MemzooCLI" not in out
