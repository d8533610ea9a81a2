"""tools/gpu_check.sh, the one prepared run on a lent GPU machine (minutes of device time a session, no second try to
spare), checked here without a GPU: every step's command is one its tool accepts (the tool's own parser, then the
names it checks after parsing: models, sections), the step limits fit the device tool's 600 s per command with room
for the install, and the tests it selects exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tool_parsing import joined_lines, parse_tool_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
DEVICE_LIMIT_S = 600  # the device tool's limit on one command
INSTALL_AND_PACK_S = 100  # left beside the steps for the wheel install, the import check and the packing


def steps() -> list[tuple[str, int, list[str]]]:
    """``(name, limit in seconds, argv)`` of every ``step NAME SECONDS COMMAND...`` line of the script (continuation
    lines joined), in order."""
    found = []
    for line in joined_lines(SCRIPT.read_text(encoding="utf-8")):
        if line.startswith("step "):
            _, name, limit, *argv = shlex.split(line)
            found.append((name, int(limit), argv))
    return found


def tool_steps() -> list[tuple[str, list[str]]]:
    return [(name, argv[1:]) for name, _, argv in steps() if argv[:1] == ["python3"] and argv[1].startswith("tools/")]


def test_the_script_is_valid_bash_and_has_its_steps():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    names = [name for name, _, _ in steps()]
    assert names[0] == "pytest_cuda", "the tests marked cuda run first: they say whether the rest means anything"
    assert {"bench_blocks", "capacity"} <= set(names), names
    assert len(set(names)) == len(names), f"two steps share a log name: {names}"


def test_the_step_limits_leave_room_under_the_device_limit():
    total = sum(limit for _, limit, _ in steps())
    assert total + INSTALL_AND_PACK_S <= DEVICE_LIMIT_S, (
        f"the steps' limits add up to {total} s: with {INSTALL_AND_PACK_S} s for the install and the packing that "
        f"passes the device tool's {DEVICE_LIMIT_S} s, and the machine would be cut before it packs the results")
    stated = re.search(r"limits add up to (\d+) s", SCRIPT.read_text(encoding="utf-8"))
    assert stated and int(stated.group(1)) == total, "the header's sum of the step limits is not what the steps say"


def test_the_pytest_step_selects_the_cuda_tests():
    (argv,) = [argv for name, _, argv in steps() if name == "pytest_cuda"]
    assert argv[:4] == ["python3", "-m", "pytest", "-q"] and argv[4:6] == ["-m", "cuda"] and argv[6:] == ["tests"], argv
    assert re.search(r'"cuda: ', (ROOT / "pyproject.toml").read_text(encoding="utf-8")), "the cuda marker is not registered"
    marked = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if "mark.cuda" in p.read_text(encoding="utf-8"))
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                             "no:cacheprovider", *marked], cwd=ROOT, capture_output=True, text=True, timeout=300)
    selected = [line for line in listed.stdout.splitlines() if "::" in line]
    assert len(selected) >= 10, f"`-m cuda` selects {len(selected)} tests:\n{listed.stdout[-2000:]}{listed.stderr}"


@pytest.mark.parametrize("name,argv", tool_steps(), ids=[name for name, _ in tool_steps()])
def test_every_tool_step_is_a_command_its_tool_accepts(name, argv, monkeypatch):
    module, args = parse_tool_args(argv, monkeypatch)
    if hasattr(args, "models") and hasattr(module, "ALL_MODELS"):  # capacity.py checks its models after parsing
        unknown = [m for m in args.models if m not in module.ALL_MODELS]
        assert not unknown, f"step {name}: unknown model(s) {unknown}"
    if isinstance(getattr(args, "models", None), str) and hasattr(module, "BLOCK_MODELS"):  # bench_blocks.py
        unknown = [m for m in args.models.split(",") if m and m not in module.BLOCK_MODELS]
        assert not unknown, f"step {name}: unknown model(s) {unknown}"
    if isinstance(getattr(args, "sections", None), str) and hasattr(module, "SECTIONS"):  # bench_memory.py
        unknown = [s for s in args.sections.split(",") if s and s not in module.SECTIONS]
        assert not unknown, f"step {name}: unknown section(s) {unknown}"
    if getattr(args, "overrides", None):  # capacity.py's --set: a variant needs its own --name
        module.study.variant_args(args.overrides, args.name)
