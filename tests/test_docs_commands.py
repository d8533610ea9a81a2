"""Every command shown in README.md and docs/*.md runs as written, on a tiny quickstart model trained once here.

What counts as a command: each line of a fenced ``bash``/``shell``/``sh``/unlabelled block that starts with
``memzoo``, ``python``, ``python3`` or ``pip``, and each inline code span that starts with ``memzoo `` or ``python ``
(a span may wrap over lines). Every ``python`` block is run too (one whose first line is ``# name.py`` is written to
that file instead, as the text says). A command no rule below covers fails :func:`test_every_documented_command_has_a_rule`
with its text, so a command added to the docs is either run or named.

How each kind runs (in a scratch folder holding ``configs/`` of this checkout, so ``runs/`` lands there):

- ``memzoo`` commands run in this process, as written, after the placeholders of :data:`PLACEHOLDERS` are
  replaced (``X.yaml`` -> the quickstart config, ``...`` -> the quickstart run's checkpoint, ``TEXT`` -> a prompt,
  ``[--option value]`` -> ``--option value``, ``a|b`` -> ``a``; slot-stats reads the Memory+ run of the DDP command);
- training commands get :data:`SHORT` appended (2 steps, 1 validation batch), and commands reading the data of
  another config than the quickstart's also :data:`SMALL_DATA` (50 people; training: batches of 2 x 64 tokens);
- commands launching several processes (``--trainer.devices 2``, the ``-mp2`` config) run in a subprocess, as
  ``memzoo`` would; those marked ``# N GPUs`` run on a machine with N GPUs and are parsed (``--print_config``)
  elsewhere;
- setup lines (``python3 -m venv ... && pip install ...``) are checked, not run: the torch pin names the installed
  torch's minor version, the extras exist in pyproject.toml, and the command after them is covered by its own rule;
- ``python -m pytest ...`` is the test suite itself: it is checked to be `.ci/run`'s command and its plugins to be
  installed; ``python tools/X.py ...`` (studies and benchmarks of minutes to hours) is parsed by the tool's own
  argument parser.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from memzoo.cli import LIGHTNING_VERBS, PLAIN_VERBS, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICKSTART_RUN = "runs/quickstart/version_0"
QUICKSTART_CKPT = f"{QUICKSTART_RUN}/checkpoints/last.ckpt"
PROMPT = "The birth year of"
SHORT = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
SMALL_DATA = ["--data.init_args.n_entities", "50", "--data.init_args.recall_samples", "8"]
SMALL_BATCHES = ["--data.init_args.batch_size", "2", "--data.init_args.block_size", "64"]  # training only
# placeholder as written -> what runs (applied in order, as plain text replacements)
PLACEHOLDERS = [
    ("runs/.../config.yaml", f"{QUICKSTART_RUN}/config.yaml"),
    (".../last.ckpt", QUICKSTART_CKPT),
    ("--ckpt_path ...", f"--ckpt_path {QUICKSTART_CKPT}"),
    ("configs/X.yaml", "configs/quickstart.yaml"),
    ("--config X.yaml", "--config configs/quickstart.yaml"),
    ("--config X ", "--config configs/quickstart.yaml "),
    ("--ckpt_path Y.ckpt", f"--ckpt_path {QUICKSTART_CKPT}"),
    ("--prompt TEXT", f"--prompt {shlex.quote(PROMPT)}"),
    ("--world-size W", "--world-size 2"),
    ("--memory-parallel M", "--memory-parallel 1"),  # the quickstart has no pool to shard
    ("blocks [FILTER]", "blocks memory"),
]
# placeholders of slot-stats, which needs a model with a memory pool: the Memory+ run of the DDP command
MEMORY_CONFIG, MEMORY_RUN = "configs/facts-memoryplus.yaml", "runs/facts-memoryplus/version_0"
MEMORIZE = "memzoo memorize --model my-model --docs ada.txt fox.txt --out facts.bank"
DDP_COMMAND = ("memzoo fit --config configs/facts-memoryplus.yaml --trainer.strategy ddp --trainer.devices 2 "
               "--trainer.accelerator cpu")
QUICKSTART_FIT = "memzoo fit --config configs/quickstart.yaml"
EXPORT = f"memzoo export --ckpt {QUICKSTART_CKPT} --out my-model"
# my.yaml of the plugin example: the quickstart model with the README's block in every layer
MY_YAML_BLOCK = "scaled_mlp"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMAND_LINE = re.compile(r"^(memzoo|python3?|pip)\s")


def documented_commands() -> dict[str, list[str]]:
    """``{command text: [files that show it]}`` over README.md and docs/*.md (see the module docstring)."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) in ("bash", "shell", "sh", ""):
                for line in match.group(2).splitlines():
                    if COMMAND_LINE.match(line.strip()):
                        found.setdefault(line.strip(), []).append(path.name)
        for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
            span = " ".join(span.split())
            if span.startswith(("memzoo ", "python ")):
                found.setdefault(span, []).append(path.name)
    return found


def documented_python_blocks() -> list[tuple[str, str]]:
    return [(path.name, block) for path in DOCS
            for lang, block in FENCE.findall(path.read_text(encoding="utf-8")) if lang == "python"]


def split_comment(command: str) -> tuple[str, str]:
    """``(command, trailing '# comment')``."""
    words, comment = command, ""
    if " #" in command:
        words, _, comment = command.partition(" #")
    return words.strip(), comment.strip()


def resolve(command: str) -> list[str]:
    """The argv (after ``memzoo``) that runs ``command`` as written: placeholders replaced, ``[--opt value]``
    expanded, ``a|b`` alternatives reduced to ``a``."""
    words, _ = split_comment(command)
    if " slot-stats " in f" {words} ":
        words = (words.replace("--config X.yaml", f"--config {MEMORY_CONFIG}")
                 .replace("--ckpt_path Y.ckpt", f"--ckpt_path {MEMORY_RUN}/checkpoints/last.ckpt"))
    for old, new in PLACEHOLDERS:
        words = words.replace(old, new)
    words = re.sub(r"\[(--[^\]]*)\]", r"\1", words)
    words = re.sub(r"(\S+)\|\S+", r"\1", words)
    argv = shlex.split(words)
    assert argv[0] == "memzoo", command
    return argv[1:]


def launches_processes(argv: list[str]) -> bool:
    text = " ".join(argv)
    return bool(re.search(r"--trainer\.devices [2-9]", text)) or "-mp2.yaml" in text


def gpus_needed(command: str) -> int:
    found = re.search(r"(\d+) GPUs?", split_comment(command)[1])
    return int(found.group(1)) if found else 0


def config_of(argv: list[str]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv else None


def short_argv(argv: list[str]) -> list[str]:
    """``argv`` with :data:`SHORT` appended for training, and :data:`SMALL_DATA` for verbs that read the data of
    a config other than the quickstart's (with :data:`SMALL_BATCHES` when training)."""
    extra = list(SHORT) if argv[0] == "fit" else []
    config = str(config_of(argv))
    if argv[0] in (*LIGHTNING_VERBS, "slot-stats") and config.startswith("configs/") and "quickstart" not in config:
        extra += SMALL_DATA + (SMALL_BATCHES if argv[0] == "fit" else [])
    return [*argv, *extra]


# ------------------------------------------------------------------------------------------------ rules
def _setup_line(command: str) -> bool:
    return command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")


def _tool(command: str) -> bool:
    return bool(re.match(r"^python tools/\w+\.py\b", command))


def _pytest(command: str) -> bool:
    return command.startswith("python -m pytest")


def _verb_reference(command: str) -> bool:
    """``memzoo <verb>`` alone, naming a verb in prose (``memzoo export writes ...``)."""
    parts = command.split()
    return len(parts) == 2 and parts[1] in (*LIGHTNING_VERBS, *PLAIN_VERBS) and parts[1] != "blocks"


def _memzoo(command: str) -> bool:
    return command.startswith("memzoo ")


RULES = [("setup line", _setup_line), ("tool", _tool), ("test suite", _pytest), ("verb named in prose", _verb_reference),
         ("memzoo command", _memzoo)]


def rule_of(command: str) -> str | None:
    return next((name for name, matches in RULES if matches(command)), None)


# ------------------------------------------------------------------------------------------------ workspace
def run_memzoo(argv: list[str]):
    """``memzoo ARGV`` in this process (the scratch folder is the working directory)."""
    saved = sys.argv
    sys.argv = ["memzoo"]
    try:
        return main(argv)
    finally:
        sys.argv = saved


def run_memzoo_processes(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for key in ("MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "memzoo", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch folder with ``configs/``, the quickstart model trained (2 steps) and exported to ``my-model`` by the
    README's own commands, ``my_blocks.py`` / ``my.yaml`` of the plugin example, a tiny random ``Qwen2.5-0.5B/``
    folder (for docs/pretrained.md's import example), the Memory+ run of the DDP command (slot-stats reads it) and the
    attention-memory example's bank (``memzoo memorize``, which ``generate --memory`` reads)."""
    folder = tmp_path_factory.mktemp("docs")
    (folder / "configs").symlink_to(ROOT / "configs")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        done = {}
        done[tuple(resolve(QUICKSTART_FIT))] = run_memzoo(short_argv(resolve(QUICKSTART_FIT)))
        assert Path(QUICKSTART_CKPT).is_file()
        done[tuple(resolve(EXPORT))] = run_memzoo(resolve(EXPORT))
        for _, block in documented_python_blocks():
            first = block.splitlines()[0]
            if re.match(r"^# [\w-]+\.py$", first):
                Path(first[2:]).write_text(block, encoding="utf-8")
        my_yaml = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
        my_yaml["model"]["init_args"]["architecture"]["block"] = MY_YAML_BLOCK
        Path("my.yaml").write_text(yaml.safe_dump(my_yaml), encoding="utf-8")
        sys.path.insert(0, str(ROOT / "tests"))
        from test_hf_import import save_hf

        save_hf(folder / "Qwen2.5-0.5B", "Qwen2")
        # the attention-memory example's documents; its memorize command runs as written (generate --memory reads it)
        Path("ada.txt").write_text("The birth year of Ada is 1815.", encoding="utf-8")
        Path("fox.txt").write_text("The quick brown fox jumps over the lazy dog.", encoding="utf-8")
        done[tuple(resolve(MEMORIZE))] = run_memzoo(resolve(MEMORIZE))
        assert Path("facts.bank").is_file()
        ddp = run_memzoo_processes(short_argv(resolve(DDP_COMMAND)), folder)
        assert ddp.returncode == 0, ddp.stderr[-3000:]
        assert Path(MEMORY_RUN, "checkpoints", "last.ckpt").is_file()
        done[tuple(resolve(DDP_COMMAND))] = ddp
        yield folder, done
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------------------------------ tests
COMMANDS = documented_commands()


def test_every_documented_command_has_a_rule():
    unknown = [f"{c!r} ({', '.join(files)})" for c, files in COMMANDS.items() if rule_of(c) is None]
    assert not unknown, "commands in the docs that no rule of tests/test_docs_commands.py runs: " + "; ".join(unknown)
    assert any(c.endswith(QUICKSTART_FIT) for c in COMMANDS) and EXPORT in COMMANDS and DDP_COMMAND in COMMANDS
    assert MEMORIZE in COMMANDS


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "setup line"))
def test_setup_lines_install_what_they_say(command):
    parts = command.split(" && ")
    assert parts[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"], command
    torch_pin = re.fullmatch(r'pip install "torch==(\d+)\.(\d+)\.\*"', parts[2])
    assert torch_pin, parts[2]
    assert tuple(map(int, torch_pin.groups())) == tuple(map(int, torch.__version__.split(".")[:2])), (
        f"{command}: the pin does not name the installed torch {torch.__version__}")
    editable = re.fullmatch(r'pip install -e (\.|"\.\[([\w,]+)\]")', parts[3])
    assert editable, parts[3]
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in (editable.group(2) or "").split(","):
        if extra:
            assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), f"extra {extra!r} is not in pyproject.toml"
    rest = " && ".join(parts[4:])  # the quickstart fit runs in the workspace fixture, pytest is checked below
    assert rest == QUICKSTART_FIT or rule_of(rest) == "test suite", rest


@pytest.mark.parametrize("command", sorted({*(c for c in COMMANDS if rule_of(c) == "test suite"),
                                            *(p.split(" && ")[-1] for p in COMMANDS if rule_of(p) == "setup line"
                                              and "pytest" in p)}))
def test_test_suite_commands_are_the_ci_command(command):
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci, f"{command!r} is not the command .ci/run runs"
    assert importlib.util.find_spec("pytest") is not None
    if " -n " in command:
        assert importlib.util.find_spec("xdist") is not None, "pytest-xdist (the dev extra) is not installed"


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "tool"))
def test_tool_commands_parse(command, monkeypatch):
    """Studies and benchmarks take minutes to hours: their arguments are parsed by the tool's own parser, which
    then stops the tool."""
    import argparse

    words, _ = split_comment(command)
    argv = shlex.split(words)[1:]
    path = ROOT / argv[0]
    assert path.is_file(), command
    spec = importlib.util.spec_from_file_location(f"doc_tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    parse = argparse.ArgumentParser.parse_args

    class Parsed(Exception):
        pass

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(Parsed):
        try:
            module.main(argv[1:])
        except TypeError:  # main() without an argv parameter reads sys.argv
            module.main()


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "verb named in prose"))
def test_verbs_named_in_prose_exist(command):
    assert command.split()[1] in (*LIGHTNING_VERBS, *PLAIN_VERBS)


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "memzoo command"))
def test_memzoo_command_runs_as_written(command, workspace, monkeypatch, capsys):
    folder, done = workspace
    monkeypatch.chdir(folder)
    argv = resolve(command)
    if tuple(argv) in done:  # run by the workspace fixture, as written
        return
    if gpus_needed(command) > torch.cuda.device_count():
        with pytest.raises(SystemExit) as parsed:  # parses on a machine without the GPUs it names
            run_memzoo([*argv, "--print_config"])
        assert parsed.value.code in (0, None)
        assert "trainer:" in capsys.readouterr().out
        return
    if argv[0] == "fit" and launches_processes(argv):
        ran = run_memzoo_processes(short_argv(argv), folder)
        assert ran.returncode == 0, ran.stderr[-3000:]
        return
    result = run_memzoo(short_argv(argv))
    out = capsys.readouterr()
    if argv[0] == "generate":
        assert out.out.startswith(PROMPT) and len(result) > 0, out
    if argv[0] == "predict":
        log_dir = Path(result.trainer.logger.log_dir)
        rows = (log_dir / "predictions.jsonl").read_text().splitlines()
        assert len(rows) == 1 and PROMPT in rows[0]
    if argv[0] == "export":
        assert (folder / argv[argv.index("--out") + 1] / "config.json").is_file()


@pytest.mark.parametrize("index", range(len(documented_python_blocks())))
def test_python_blocks_run(index, workspace, monkeypatch, capsys):
    folder, _ = workspace
    monkeypatch.chdir(folder)
    name, block = documented_python_blocks()[index]
    if re.match(r"^# [\w-]+\.py$", block.splitlines()[0]):  # a file the text tells the reader to write
        assert (folder / block.splitlines()[0][2:]).read_text() == block
        return
    exec(compile(block, f"{name} python block {index}", "exec"), {"__name__": "__doc_block__"})
