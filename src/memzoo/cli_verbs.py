"""The plain (non-Lightning) verbs of the ``memzoo`` command: ``blocks`` and ``summary``."""

from __future__ import annotations

import argparse
import inspect
from typing import Sequence


def _format_default(value: object) -> str:
    if value is inspect.Parameter.empty:
        return "(required)"
    return repr(value)


def blocks_command(args: Sequence[str]) -> list[str]:
    """``memzoo blocks [FILTER] [--verbose]``: a table of registered blocks and their hyperparameters."""
    from memzoo.registry import block_hyperparameters, get_block, list_blocks

    parser = argparse.ArgumentParser(prog="memzoo blocks", description="List the registered FFN-slot blocks.")
    parser.add_argument("filter", nargs="?", default=None, help="substring or glob of block names")
    options = parser.parse_args(list(args))
    names = list_blocks(options.filter)
    if not names:
        print(f"no registered block matches {options.filter!r}")
        return names
    for name in names:
        cls = get_block(name)
        doc = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        print(f"{name}  ({cls.__module__}.{cls.__qualname__})")
        if doc:
            print(f"    {doc}")
        for hp in block_hyperparameters(name):
            annotation = f": {hp.annotation}" if hp.annotation else ""
            print(f"    {hp.name}{annotation} = {_format_default(hp.default)}")
        print()
    return names


def summary_command(args: Sequence[str]) -> object:
    """``memzoo summary --config X.yaml``: parameters, active parameters and FLOPs per token of the config's model."""
    from memzoo.accounting import summarize_config

    parser = argparse.ArgumentParser(
        prog="memzoo summary",
        description="Per-layer parameters, active parameters per token and forward FLOPs per token of a model config.",
    )
    parser.add_argument("--config", required=True, help="a memzoo YAML config (as given to `memzoo fit`)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    options = parser.parse_args(list(args))
    summary = summarize_config(options.config)
    if options.json:
        import json

        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.table())
    return summary
