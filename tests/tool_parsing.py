"""Command lines checked without running them: shell text split into commands (:func:`joined_lines`), and a tool of
``tools/`` (a study or benchmark of minutes to hours) whose ``main`` is given an argv and stops as soon as its own
argument parser has parsed it (:func:`parse_tool_args`), so a test learns whether a documented or scripted command
line is one the tool accepts, in milliseconds."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def joined_lines(block: str) -> list[str]:
    """The stripped lines of a shell block, a line ending in ``\\`` joined with the next (one space between)."""
    lines, pending = [], ""
    for line in block.splitlines():
        line = line.strip()
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [*lines, pending.strip()] if pending else lines


def load_tool(path: Path, monkeypatch) -> ModuleType:
    """``tools/<name>.py`` imported as a module of its own (registered in ``sys.modules`` for the test's lifetime:
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(f"tool_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def parse_tool_args(argv: list[str], monkeypatch) -> tuple[ModuleType, argparse.Namespace]:
    """``argv = ["tools/X.py", *args]``: the tool's module and the namespace its parser makes of ``args`` (an argument
    it rejects fails the test with the parser's message). Nothing after the parse runs."""
    path = ROOT / argv[0]
    assert path.is_file(), f"{argv[0]}: no such tool"
    module = load_tool(path, monkeypatch)
    parse = argparse.ArgumentParser.parse_args

    class Parsed(Exception):
        pass

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(Parsed) as parsed:
        try:
            module.main(argv[1:])
        except TypeError:  # main() without an argv parameter reads sys.argv
            module.main()
    return module, parsed.value.args[0]
