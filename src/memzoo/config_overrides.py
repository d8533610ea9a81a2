"""Command-line overrides of one key inside the architecture's dict fields, merged into the configured dict.

jsonargparse assigns ``--model.init_args.architecture.pools.memory.lr 0.1`` by replacing the ``memory`` entry of the
``pools`` dict with ``{lr: 0.1}``: the pool's other settings from the YAML (``n_keys``, ``value_dim``...) are gone.
For the architecture's dict fields (``layers``, ``pools``, ``block_args``, ``rope_scaling``, ``attention_memory``)
memzoo instead reads such an override as "this one key": the command line is parsed once without them, each is
set in a copy of the parsed dict, and the merged dict is passed in their place, as if written out in full. Keys
that are integers in the parsed dict (``layers``' indices) are matched as integers.

    memzoo fit --config configs/facts-memoryplus.yaml --model.init_args.architecture.pools.shared.lr 0.01
    memzoo fit --config X.yaml --model.init_args.architecture.layers.1.knn 16
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from memzoo.model.config import ModelConfig

PREFIX = "--model.init_args.architecture."


def dict_fields() -> frozenset[str]:
    """The :class:`~memzoo.model.config.ModelConfig` fields typed as dicts (optional ones included)."""
    hints = typing.get_type_hints(ModelConfig)
    found = set()
    for field in dataclasses.fields(ModelConfig):
        hint = hints[field.name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(typing.get_origin(option) is dict for option in options):
            found.add(field.name)
    return frozenset(found)


def _split(args: list[str], fields: frozenset[str]) -> tuple[list[str], list[tuple[int, str, list[str], str]]]:
    """``args`` without the overrides inside dict fields, and those overrides as ``(position in the kept args,
    field, key path, value text)``."""
    kept: list[str] = []
    overrides = []
    i = 0
    while i < len(args):
        token = args[i]
        name, has_value, value = token.partition("=")
        if token.startswith(PREFIX) and "." in name[len(PREFIX):]:
            field, *path = name[len(PREFIX):].split(".")
            if field in fields and path and all(path):
                if not has_value:
                    if i + 1 >= len(args):
                        break  # no value: left to the parser's own error
                    value = args[i + 1]
                    i += 1
                overrides.append((len(kept), field, path, value))
                i += 1
                continue
        kept.append(token)
        i += 1
    return kept, overrides


#: options whose parse prints and exits (``--print_config[=flags]``, help): left out of the first parse
_EXITING = ("--print_config", "--help", "-h")
_PRINT_FLAGS = {"skip_null", "skip_default", "comments"}


def _without_exiting_actions(args: list[str]) -> list[str]:
    out: list[str] = []
    skip_value = False
    for token in args:
        if skip_value and set(token.split(",")) <= _PRINT_FLAGS:
            skip_value = False
            continue
        skip_value = token == "--print_config"
        if token in _EXITING or token.startswith("--print_config="):
            continue
        out.append(token)
    return out


def _set(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(path):
        key: Any = part
        if part.lstrip("-").isdigit() and (int(part) in node or not node or all(isinstance(k, int) for k in node)):
            key = int(part)
        if depth == len(path) - 1:
            node[key] = value
        else:
            child = node.get(key)
            if not isinstance(child, Mapping):
                child = node[key] = {}
            elif not isinstance(child, dict):
                child = node[key] = dict(child)
            node = child


def merge_dict_overrides(args: list[str], parse: Callable[[list[str]], Any]) -> list[str]:
    """``args`` with every ``--model.init_args.architecture.<dict field>.<key>[.<key>...] VALUE`` replaced by one
    ``--model.init_args.architecture.<dict field> <merged dict>`` (YAML flow), the dict being the one ``parse(args
    without those overrides)`` gives, with each override's key set to its value (read as YAML). ``args`` unchanged
    when there is no such override."""
    kept, overrides = _split(args, dict_fields())
    if not overrides:
        return args
    config = parse(_without_exiting_actions(kept))
    subcommand = config.get("subcommand") if hasattr(config, "get") else None
    node = config[subcommand] if subcommand else config
    architecture = node.get("model.init_args.architecture") if node.get("model") else None
    merged: dict[str, dict] = {}
    first_at: dict[str, int] = {}
    for position, field, path, text in overrides:
        if field not in merged:
            current = architecture.get(field) if architecture is not None else None
            merged[field] = copy.deepcopy(dict(current)) if isinstance(current, Mapping) else {}
            first_at[field] = position
        _set(merged[field], path, yaml.safe_load(text))
    out = list(kept)
    for field in sorted(merged, key=lambda f: first_at[f], reverse=True):  # later positions first: indices hold
        flow = yaml.safe_dump(merged[field], default_flow_style=True, width=1 << 30, sort_keys=False).strip()
        out[first_at[field]:first_at[field]] = [PREFIX + field, flow]
    return out
