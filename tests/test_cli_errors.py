"""What a user of the memzoo command sees: no warning they did not cause, a progress bar in steps with tokens/s and
memzoo's FLOPs, and mistakes reported as exactly one line ``memzoo: error: <message>`` with exit status 2 (tracebacks
only with --debug / MEMZOO_DEBUG=1) for every verb: a misspelled config key names the key, where it is written and the
closest accepted key; a wrong value its key, value and expected type; YAML errors the file, line and column; abbreviated
options are refused; block_size is checked against the model's context before training."""

import os
import sys
from pathlib import Path

import lightning  # noqa: F401  (imported while pytest collects, as a whole-suite run does: see below)
import pytest
import torch

from memzoo.cli import entry_point, main
from test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]
# Lightning's loggers get a handler on the sys.stderr of the moment they are imported. Imported during collection it
# is pytest's session stream, as in a whole-suite run (other files import Lightning at the top); imported first by
# a test here it would be that test's capsys stream, and a later test's log lines would land in its own captured
# stderr or fail on the closed stream. What a fresh process prints is checked by the `memzoo` fixture's processes.


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMZOO_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["memzoo"])


@pytest.fixture(scope="module")
def zygote():
    """Fresh memzoo processes without ~7 s of imports each (tests/forked_command.py)."""
    from forked_command import MemzooZygote

    server = MemzooZygote()
    yield server
    server.close()


@pytest.fixture
def memzoo(zygote):
    """``memzoo(*args, cwd=..., env=...)``: the console script as a fresh process runs it, a ``CompletedProcess``."""
    def run(*args, env=None, cwd=None):
        return zygote.run(*args, cwd=cwd, env={**os.environ, "COLUMNS": "200", **(env or {})})

    return run


def run_entry_point(monkeypatch, capsys, *args):
    """``memzoo ARGS`` in-process through the console script's entry point: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["memzoo", *args])
    status = entry_point()
    return status, capsys.readouterr().err


def one_error_line(stderr):
    """The message of ``stderr`` that is exactly one line ``memzoo: error: <message>`` (fails otherwise)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("memzoo: error: "), stderr
    return lines[0].removeprefix("memzoo: error: ")


def with_line(path, old, new):
    """``path``'s text with ``old`` replaced by ``new``, written next to it as ``bad.yaml``; (path, line of new)."""
    text = path.read_text()
    assert old in text
    text = text.replace(old, new, 1)
    bad = path.with_name("bad.yaml")
    bad.write_text(text)
    return bad, text[: text.index(new)].count("\n") + 1


def test_a_fit_prints_steps_tokens_per_second_and_flops_without_lightning_noise(tmp_path, memzoo):
    done = memzoo("fit", "--config", str(write_config(tmp_path, steps=4, val_every=4)),
                  "--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    for noise in ("args parameter", "litlogger", "v_num", "Epoch 0/-2", "Total FLOPs", "Traceback"):
        assert noise not in out, noise
    assert "step: 100%" in out and "4/4" in out and "tok/s=" in out
    assert "FLOPs/token" in out and "active/token" in out


def test_a_mistake_while_building_the_model_is_one_error_line_with_status_2(tmp_path, memzoo):
    bad = ["fit", "--config", str(write_config(tmp_path)), "--model.init_args.architecture.layers", "{7: {hidden: 4}}"]
    done = memzoo(*bad, cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("memzoo:")]
    assert errors[0] == ("memzoo: error: layers: index 7 is out of range for n_layers=2 (use 0 .. 1, or negative "
                         "indices counting from the end)")
    assert "Traceback" not in done.stderr and "Namespace(" not in done.stderr
    assert [line for line in done.stderr.splitlines() if not line.startswith("Seed set to")] == errors, done.stderr


def test_debug_switch_shows_the_traceback(tmp_path, monkeypatch, capsys):
    from memzoo.cli import CommandError, ConfigError

    args = ["summary", "--config", str(tmp_path / "missing.yaml")]
    assert run_entry_point(monkeypatch, capsys, *args)[0] == 2
    with pytest.raises(CommandError, match="missing.yaml"):
        run_entry_point(monkeypatch, capsys, *args, "--debug")
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    with pytest.raises(CommandError):
        run_entry_point(monkeypatch, capsys, *args)
    monkeypatch.delenv("MEMZOO_DEBUG")
    bad, _ = with_line(write_config(tmp_path), "n_heads: 2", "n_head: 2")
    with pytest.raises(ConfigError, match="did you mean 'n_heads'") as error:
        run_entry_point(monkeypatch, capsys, "fit", "--config", str(bad), "--debug")
    assert "Option 'n_head' is not accepted" in str(error.value.__cause__)  # jsonargparse's own error is kept


def test_every_verb_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    config = str(write_config(tmp_path))
    cases = [
        (["summary", "--config", "missing.yaml"], "summary: --config: file 'missing.yaml' does not exist"),
        (["summary", "--config", config, "--world-size", "0"], "summary: --world-size must be >= 1, got 0"),
        (["summary", "--config", config, "--memory-parallel", "2"], "summary: --memory-parallel and --strategy need --world-size"),
        (["summary"], "summary: the following arguments are required: --config"),
        (["blocks", "--all"], "blocks: unknown option --all"),
        (["export", "--ckpt", "nope.ckpt", "--out", "out"], "checkpoint 'nope.ckpt' does not exist"),
        (["export", "--ckpt", "nope.ckpt"], "export: the following arguments are required: --out"),
        (["generate", "--model", "nowhere", "--prompt", "x"], "nowhere is not a folder"),
        (["frobnicate"], "unknown verb 'frobnicate'"),
        (["export", "--ckpt", "nope.ckpt", "--out", "file/sub"], "'file' is a file, not a folder"),
        (["fit", "--config", config, "--ckpt_path", "nope.ckpt"], "does not exist"),
        (["slot-stats", "--config", config, "--out", "x.pt", "--max_batches", "0"],
         "slot-stats: --max_batches must be >= 1, got 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--model", "nowhere", "--prompt", "x", "--device", "cuda"], "needs a CUDA GPU"))
    for args, message in cases:
        status, err = run_entry_point(monkeypatch, capsys, *args)
        assert status == 2, args
        assert message in one_error_line(err), (args, err)


def test_slot_stats_out_in_a_missing_folder_names_the_folder_and_the_fix(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing-dir"
    args = ["slot-stats", "--config", str(write_config(tmp_path)), "--out", str(missing / "x.pt")]
    status, err = run_entry_point(monkeypatch, capsys, *args)
    assert status == 2
    assert one_error_line(err) == (f"slot-stats: --out {missing}/x.pt: the folder '{missing}' does not exist; "
                                   f"create it (mkdir -p {missing}) or choose another --out")
    from memzoo.atomic import atomic_file  # any atomic write names the folder, not its hidden temporary file

    with pytest.raises(FileNotFoundError, match=f"its folder '{missing}' does not exist") as error:
        with atomic_file(missing / "x.pt"):
            pass
    assert ".partial" not in str(error.value) and not missing.exists()


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    "old, new, message",
    [
        ("n_heads: 2", "n_head: 2", "unknown key 'n_head' in model.init_args.architecture (memzoo.model.ModelConfig); "
         "did you mean 'n_heads'?"),
        ("warmup_steps: 2", "warmup_step: 2", "unknown key 'warmup_step' in model.init_args (memzoo.LanguageModel); "
         "did you mean 'warmup_steps'?"),
        ("batch_size: 8", "batch_sise: 8", "unknown key 'batch_sise' in data.init_args (memzoo.data.FactsDataModule); "
         "did you mean 'batch_size'?"),
        ("{lr: 0.01}", "{lrr: 0.01}", "unknown key 'lrr' in model.init_args.optimizer.init_args (torch.optim.AdamW); "
         "did you mean 'lr'?"),
        ("trainer:", "trainr:", "unknown key 'trainr' at the top level; did you mean 'trainer'?"),
        ("max_steps: 12", "max_step: 12", "unknown key 'max_step' in trainer; did you mean 'max_steps'?"),
        ("n_layers: 2", "n_layers: two", "model.init_args.architecture.n_layers: got 'two', expected int"),
        ("enable_progress_bar: false", "enable_progress_bar: maybe",
         "trainer.enable_progress_bar: got 'maybe', expected bool or null"),
        ("memzoo.data.FactsDataModule", "memzoo.data.FactDataModule",
         "data.class_path: no class 'FactDataModule' in module 'memzoo.data'; did you mean "
         "'memzoo.data.FactsDataModule'?"),
        ("torch.optim.AdamW", "torch.optim.Adamw", "model.init_args.optimizer.class_path: no class 'Adamw' in module "
         "'torch.optim'; did you mean 'torch.optim.AdamW'?"),
    ],
)
def test_a_config_mistake_is_one_line_naming_the_key_its_line_and_the_fix(tmp_path, monkeypatch, capsys, old, new,
                                                                           message):
    bad, line = with_line(write_config(tmp_path), old, new)
    status, err = run_entry_point(monkeypatch, capsys, "fit", "--config", str(bad))
    assert status == 2
    assert one_error_line(err) == f"{bad}, line {line}: {message}"


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.architecture.n_head", "2"], "--model.init_args.architecture.n_head: unknown key 'n_head' "
         "in model.init_args.architecture (memzoo.model.ModelConfig); did you mean 'n_heads'?"),
        (["--data.init_args.batch", "3"], "--data.init_args.batch: unknown key 'batch' in data.init_args "
         "(memzoo.data.FactsDataModule); did you mean 'batch_size'?"),
        (["--model.init_args.architecture.n_layers", "two"],
         "--model.init_args.architecture.n_layers: got 'two', expected int"),
        (["--trainer.max_steps=x"], "--trainer.max_steps: got 'x', expected int"),
        (["--seed_everything", "x"], "--seed_everything: got 'x', expected bool or int"),
        (["--trainer.max_step", "5"], "unknown option --trainer.max_step (options are never abbreviated); "
         "did you mean --trainer.max_steps?"),
        (["--ckpt_pat", "x.ckpt"], "unknown option --ckpt_pat (options are never abbreviated); did you mean "
         "--ckpt_path?"),
        (["--model.class_path", "memzoo.LanguageModl"], "--model.class_path: no class 'LanguageModl' in module "
         "'memzoo'; did you mean 'memzoo.LanguageModel'?"),
        (["--model.init_args.architecture.dim"], "--model.init_args.architecture.dim: expected a value after it"),
        (["--model.init_args.architecture", "3"], "--model.init_args.architecture: got '3', expected a class "
         "(module.Class) or a mapping of the keys of memzoo.model.config.ModelConfig"),
    ],
)
def test_a_command_line_mistake_is_one_line_naming_the_flag_and_the_fix(tmp_path, monkeypatch, capsys, override,
                                                                         message):
    status, err = run_entry_point(monkeypatch, capsys, "fit", "--config", str(write_config(tmp_path)), *override)
    assert status == 2
    assert one_error_line(err) == message
    assert not (tmp_path / "runs").exists()  # nothing started


def test_missing_sections_are_named(tmp_path, monkeypatch, capsys):
    status, err = run_entry_point(monkeypatch, capsys, "fit")
    assert status == 2
    assert one_error_line(err) == ("no config given: no data and no model sections; give them in a --config file "
                                   "(e.g. configs/quickstart.yaml) or as --data.class_path ...")
    model_only = _write(tmp_path / "model.yaml", "model:\n  class_path: memzoo.LanguageModel\n")
    status, err = run_entry_point(monkeypatch, capsys, "fit", "--config", str(model_only))
    assert status == 2 and one_error_line(err).startswith("this config has no data section; give it in a --config")


def test_abbreviated_options_of_the_plain_verbs_are_refused(tmp_path, monkeypatch, capsys):
    config = str(write_config(tmp_path))
    cases = [
        (["summary", "--confi", config], "summary: unknown option --confi (options are never abbreviated); "
         "did you mean --config?"),
        (["summary", "--config", config, "--world", "2"], "summary: unknown option --world (options are never "
         "abbreviated); did you mean --world-size?"),
        (["generate", "--model", "m", "--prompt", "x", "--max-new", "3"], "generate: unknown option --max-new "
         "(options are never abbreviated); did you mean --max-new-tokens?"),
        (["slot-stats", "--config", config, "--out", "x.pt", "--max_batch", "1"], "slot-stats: unknown option "
         "--max_batch (options are never abbreviated); did you mean --max_batches?"),
    ]
    for args, message in cases:
        status, err = run_entry_point(monkeypatch, capsys, *args)
        assert status == 2 and one_error_line(err) == message, (args, err)


def test_summary_reports_config_mistakes_as_fit_does(tmp_path, monkeypatch, capsys):
    bad, line = with_line(write_config(tmp_path), "n_heads: 2", "n_head: 2")
    status, err = run_entry_point(monkeypatch, capsys, "summary", "--config", str(bad))
    assert status == 2
    assert one_error_line(err) == (f"{bad}, line {line}: unknown key 'n_head' in model.init_args.architecture "
                                   f"(memzoo.model.ModelConfig); did you mean 'n_heads'?")


def test_yaml_syntax_errors_name_the_file_and_duplicate_keys_are_refused(tmp_path, monkeypatch, capsys):
    broken = _write(tmp_path / "broken.yaml", "trainer:\n  max_steps: 3\n   oops: [\n")
    status, err = run_entry_point(monkeypatch, capsys, "fit", "--config", str(broken))
    assert status == 2
    assert one_error_line(err) == f"{broken}, line 3, column 8: mapping values are not allowed in this context"
    config = write_config(tmp_path)
    duplicated = tmp_path / "dup.yaml"
    text = config.read_text().replace("      n_layers: 2\n", "      n_layers: 2\n      layers: {1: {hidden: 8}, 1: {hidden: 16}}\n")
    assert text != config.read_text()
    duplicated.write_text(text)
    status, err = run_entry_point(monkeypatch, capsys, "fit", "--config", str(duplicated))
    assert status == 2
    assert one_error_line(err) == (f"{duplicated}, line 19, column 32: found duplicate key 1 (first given on line "
                                   f"19); each key may appear once in a mapping")
    status, err = run_entry_point(monkeypatch, capsys, "fit", "--config", str(tmp_path / "missing.yaml"))
    assert status == 2
    assert one_error_line(err) == f"--config: file '{tmp_path / 'missing.yaml'}' does not exist"
    from memzoo.config_yaml import load_yaml

    with pytest.raises(Exception, match="dup.yaml, line 2, column 1: found duplicate key 'a' .first given on line 1"):
        load_yaml("a: 1\na: 2\n", "dup.yaml")
    assert load_yaml("lr: 1e-3\nb: [1, {c: 2}]\n") == {"lr": 1e-3, "b": [1, {"c": 2}]}  # jsonargparse's floats
    with pytest.raises(ValueError, match="duplicate key 'dim'"):
        from memzoo.config_accounting import summarize_config

        summarize_config(str(_write(tmp_path / "s.yaml", "model:\n  init_args: {architecture: {dim: 8, dim: 16}}\n")))


# Each kind of mistake gives one line on stderr, nothing else (no usage, no warnings, no logs): in-process through the
# console script's entry point, and in fresh processes.
CONSOLE_CASES = {  # kind: (line replaced in the config, its replacement, extra arguments, part of the message)
    "unknown key": ("n_heads: 2", "n_head: 2", [], "line 19: unknown key 'n_head' in model.init_args.architecture"),
    "wrong type": (None, None, ["--model.init_args.architecture.n_layers", "two"], "got 'two', expected int"),
    "yaml syntax": ("  max_steps: 12", "  max_steps: 12\n   oops: [", [], "bad.yaml, line 5, column 8: mapping"),
    "duplicate key": ("  max_steps: 12", "  max_steps: 12\n  max_steps: 3", [], "line 5, column 3: found duplicate "
                      "key 'max_steps' (first given on line 4)"),
    "missing file": (None, None, ["--config", "missing.yaml"], "--config: file"),
    "abbreviation": (None, None, ["--trainer.max_step", "5"], "did you mean --trainer.max_steps?"),
}


def _console_command(tmp_path, kind):
    old, new, extra, _ = CONSOLE_CASES[kind]
    folder = tmp_path / kind.replace(" ", "_")
    folder.mkdir()
    config = write_config(folder)
    if old is not None:
        config, _ = with_line(config, old, new)
    return ["fit", "--config", str(config), *extra], folder


def test_the_entry_point_prints_one_error_line_for_each_kind_of_mistake(tmp_path, monkeypatch, capsys):
    for kind, (_, _, _, message) in CONSOLE_CASES.items():
        args, folder = _console_command(tmp_path, kind)
        monkeypatch.chdir(folder)
        monkeypatch.setattr(sys, "argv", ["memzoo", *args])
        status = entry_point()
        captured = capsys.readouterr()
        assert status == 2, (kind, captured.err)
        assert message in one_error_line(captured.err), kind
        assert captured.out == "", kind


def test_the_console_script_prints_one_error_line_and_the_traceback_with_debug(tmp_path, memzoo):
    """Fresh processes: nothing but the one line reaches stderr; with --debug the traceback instead."""
    commands = {kind: _console_command(tmp_path, kind) for kind in CONSOLE_CASES}
    typo, _ = with_line(write_config(tmp_path), "n_heads: 2", "n_head: 2")
    commands["debug"] = (["fit", "--config", str(typo), "--debug"], tmp_path)
    done = {name: memzoo(*args, cwd=cwd) for name, (args, cwd) in commands.items()}
    for kind in CONSOLE_CASES:
        assert done[kind].returncode == 2, (kind, done[kind].stderr)
        assert CONSOLE_CASES[kind][3] in one_error_line(done[kind].stderr), kind
        assert done[kind].stdout == "", kind
    assert done["debug"].returncode != 0
    assert "Traceback (most recent call last)" in done["debug"].stderr and "ConfigError" in done["debug"].stderr
    assert "Option 'n_head' is not accepted" in done["debug"].stderr  # jsonargparse's own error, as the cause


def test_the_console_script_prints_one_error_line_for_the_plain_verbs(tmp_path, memzoo):
    done = memzoo("slot-stats", "--config", str(write_config(tmp_path)), "--out", "missing/x.pt", cwd=tmp_path)
    assert done.returncode == 2
    assert one_error_line(done.stderr).startswith("slot-stats: --out missing/x.pt: the folder 'missing' does not")
    done = memzoo("generate", "--model", "m", "--prompt", "x", "--max-new", "3", cwd=tmp_path)
    assert done.returncode == 2
    assert "did you mean --max-new-tokens?" in one_error_line(done.stderr)


def _write(path, text):
    path.write_text(text)
    return path


def test_block_size_longer_than_the_context_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="block_size=32 is longer than the model's max_seq_len=16"):
        main(["fit", "--config", str(write_config(tmp_path)), "--model.init_args.architecture.max_seq_len", "16"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_predict_with_a_prompt_longer_than_the_context_warns_and_continues_its_end(tmp_path, caplog):
    import json

    cli = main(["fit", "--config", str(write_config(tmp_path, steps=1, val_every=1))])
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    long_prompt = "The birth year of " * 6  # 108 bytes + eos, the model reads 64 tokens
    pred = main(["predict", "--config", str(write_config(tmp_path)), "--ckpt_path", str(ckpt),
                 "--data.init_args.predict_prompts", json.dumps([long_prompt]), "--model.init_args.max_new_tokens", "5"])
    assert "the prompt has 109 tokens; with max_new_tokens=5 only its last 59 fit" in caplog.text
    (row,) = [json.loads(line) for line in (Path(pred.trainer.logger.log_dir) / "predictions.jsonl").open()]
    assert row["prompt"] == long_prompt
    output = pred.trainer.predict_loop.predictions if hasattr(pred.trainer.predict_loop, "predictions") else None
    if output:
        assert output[0]["prompt_ids"].shape[1] == 59 and output[0]["output_ids"].shape[1] > 59


def test_the_memoryplus_smoke_command_in_the_config_header_parses_to_the_small_model(tmp_path, capsys):
    """The laptop smoke command of configs/text-memoryplus.yaml's header gives the width-128 model (parsed only:
    a step of it takes over a minute on the shared test CPU)."""
    import shlex

    import yaml

    header = (ROOT / "configs" / "text-memoryplus.yaml").read_text(encoding="utf-8").split("seed_everything", 1)[0]
    (command,) = [line.strip("# ").strip() for line in header.splitlines() if "configs/smoke/" in line]
    args = shlex.split(command)
    assert args[:2] == ["memzoo", "fit"]
    (tmp_path / "notes.txt").write_text("To be, or not to be, that is the question. " * 400)
    args = [a.replace("configs/", f"{ROOT}/configs/") if a.startswith("configs/") else a for a in args[1:]]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    architecture = config["model"]["init_args"]["architecture"]
    assert (architecture["dim"], architecture["n_layers"], sorted(map(int, architecture["layers"]))) == (128, 12, [3, 6, 9])
    assert architecture["pools"]["memory"]["n_keys"] == 32 and config["data"]["init_args"]["block_size"] == 64


@pytest.mark.parametrize("args, message", [
    (["--world-size", "0"], "summary: --world-size must be >= 1, got 0"),
    (["--world-size", "2", "--memory-parallel", "0"], "summary: --memory-parallel must be >= 1, got 0"),
    (["--world-size", "4", "--memory-parallel", "3"], "summary: --memory-parallel 3 does not divide --world-size 4"),
    (["--world-size", "4", "--memory-parallel", "2", "--strategy", "ddp"],
     "summary: --strategy ddp replicates every pool; --memory-parallel 2 needs --strategy memory_parallel"),
])
def test_summary_checks_its_arguments_before_building_anything(memzoo, tmp_path, args, message):
    """A fresh process (the in-process capture misses Lightning's "Seed set to" lines): the error is all it prints."""
    done = memzoo("summary", "--config", str(write_config(tmp_path)), *args, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "", done
    assert message in one_error_line(done.stderr)


def test_summary_with_a_plan_builds_the_model_once(memzoo, tmp_path):
    """A fresh process: the summary and the plan share one build, so Lightning's seed line is printed once."""
    done = memzoo("summary", "--config", str(write_config(tmp_path)), "--world-size", "2", cwd=tmp_path)
    assert done.returncode == 0, done
    assert (done.stdout + done.stderr).count("Seed set to") == 1, done
    assert "2 ranks, ddp strategy" in done.stdout and "total per rank" in done.stdout
