"""What a user of the memzoo command sees: no warning they did not cause, a progress bar in steps with tokens/s and
memzoo's FLOPs, and mistakes reported as ``memzoo: error: <message>`` with exit status 2 (tracebacks only with
--debug / MEMZOO_DEBUG=1) for every verb; YAML errors name the file, duplicate keys are refused, block_size is
checked against the model's context before training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memzoo.cli import entry_point, main
from test_cli import write_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEMZOO_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["memzoo"])


def memzoo(*args, env=None, cwd=None):
    """The real console script (``python -m memzoo``) in a subprocess."""
    return subprocess.run([sys.executable, "-m", "memzoo", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=120)


def run_entry_point(monkeypatch, capsys, *args):
    """``memzoo ARGS`` in-process through the console script's entry point: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["memzoo", *args])
    status = entry_point()
    return status, capsys.readouterr().err


def test_a_fit_prints_steps_tokens_per_second_and_flops_without_lightning_noise(tmp_path):
    done = memzoo("fit", "--config", str(write_config(tmp_path, steps=4, val_every=4)),
                  "--trainer.enable_progress_bar", "true", "--trainer.enable_model_summary", "true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    for noise in ("args parameter", "litlogger", "v_num", "Epoch 0/-2", "Total FLOPs", "Traceback"):
        assert noise not in out, noise
    assert "step: 100%" in out and "4/4" in out and "tok/s=" in out
    assert "FLOPs/token" in out and "active/token" in out


def test_a_mistake_while_building_the_model_is_one_error_line_with_status_2(tmp_path):
    bad = ["fit", "--config", str(write_config(tmp_path)), "--model.init_args.architecture.layers", "{7: {hidden: 4}}"]
    done = memzoo(*bad, cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("memzoo:")]
    assert errors[0] == ("memzoo: error: layers: index 7 is out of range for n_layers=2 (use 0 .. 1, or negative "
                         "indices counting from the end)")
    assert "Traceback" not in done.stderr and "Namespace(" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 4, done.stderr  # "Seed set to 0", the error, the debug hint


def test_debug_switch_shows_the_traceback(tmp_path, monkeypatch, capsys):
    args = ["summary", "--config", str(tmp_path / "missing.yaml")]
    assert run_entry_point(monkeypatch, capsys, *args)[0] == 2
    with pytest.raises(FileNotFoundError):
        run_entry_point(monkeypatch, capsys, *args, "--debug")
    monkeypatch.setenv("MEMZOO_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_entry_point(monkeypatch, capsys, *args)


def test_every_verb_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    cases = [
        (["summary", "--config", "missing.yaml"], "missing.yaml"),
        (["export", "--ckpt", "nope.ckpt", "--out", "out"], "checkpoint 'nope.ckpt' does not exist"),
        (["generate", "--model", "nowhere", "--prompt", "x"], "nowhere is not a folder"),
        (["frobnicate"], "unknown verb 'frobnicate'"),
        (["export", "--ckpt", "nope.ckpt", "--out", "file/sub"], "'file' is a file, not a folder"),
        (["fit", "--config", str(write_config(tmp_path)), "--ckpt_path", "nope.ckpt"], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "--model", "nowhere", "--prompt", "x", "--device", "cuda"], "needs a CUDA GPU"))
    for args, message in cases:
        status, err = run_entry_point(monkeypatch, capsys, *args)
        assert status == 2, args
        first, *rest = err.strip().splitlines()
        assert first.startswith("memzoo: error: ") and message in first, (args, err)
        assert rest == ["memzoo: (run with --debug or MEMZOO_DEBUG=1 for the traceback)"], (args, err)


def test_yaml_syntax_errors_name_the_file_and_duplicate_keys_are_refused(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_steps: 3\n   oops: [\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(broken)])
    assert exit_info.value.code == 2
    assert "broken.yaml, line 3, column 8: mapping values are not allowed" in capsys.readouterr().err
    config = write_config(tmp_path)
    duplicated = tmp_path / "dup.yaml"
    text = config.read_text().replace("      n_layers: 2\n", "      n_layers: 2\n      layers: {1: {hidden: 8}, 1: {hidden: 16}}\n")
    assert text != config.read_text()
    duplicated.write_text(text)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(duplicated)])
    assert "found duplicate key 1" in capsys.readouterr().err
    from memzoo.config_yaml import load_yaml

    with pytest.raises(Exception, match="dup.yaml, line 2, column 1: found duplicate key 'a' .first given on line 1"):
        load_yaml("a: 1\na: 2\n", "dup.yaml")
    assert load_yaml("lr: 1e-3\nb: [1, {c: 2}]\n") == {"lr": 1e-3, "b": [1, {"c": 2}]}  # jsonargparse's floats
    with pytest.raises(ValueError, match="duplicate key 'dim'"):
        from memzoo.accounting import summarize_config

        summarize_config(str(_write(tmp_path / "s.yaml", "model:\n  init_args: {architecture: {dim: 8, dim: 16}}\n")))


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
