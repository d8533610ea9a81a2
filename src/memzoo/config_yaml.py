"""Strict YAML for memzoo configs: a key given twice in one mapping is an error, and errors name the file.

PyYAML keeps the last of two equal keys without a word (a layer index written twice under ``layers:`` silently
drops the first), and its syntax errors name ``"<unicode string>"`` when the text came from a file.
:func:`load_yaml` rejects duplicates and names the file, line and column; :func:`install` makes jsonargparse (and so
LightningCLI's ``--config`` files and YAML values on the command line) load through it. The loader is jsonargparse's
default one (its float rule: ``1e-3`` is a float) plus the duplicate check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigYAMLError(yaml.YAMLError, ValueError):
    """Invalid YAML (syntax, or a key given twice), with file, line and column in the message."""


def _base_loader() -> type:
    try:
        from jsonargparse._loaders_dumpers import get_yaml_default_loader

        return get_yaml_default_loader()
    except ImportError:  # a jsonargparse without it: PyYAML's own safe loader
        return yaml.SafeLoader


class _StrictMappings:
    """Loader mix-in: a mapping with a key twice raises a ``ConstructorError`` naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: PyYAML's own error follows
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first given on line {first.start_mark.line + 1}); "
                    f"each key may appear once in a mapping",
                    key_node.start_mark,
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_loader_class: type | None = None


def strict_loader() -> type:
    """The loader class: jsonargparse's default YAML loader that rejects duplicate keys."""
    global _loader_class
    if _loader_class is None:
        _loader_class = type("StrictLoader", (_StrictMappings, _base_loader()), {})
    return _loader_class


def _describe(error: yaml.YAMLError, source: str) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return f"{where}: {problem}" + (f" ({context})" if context and "duplicate" not in problem else "")


def load_yaml(text: str, path: str | Path = "") -> Any:
    """Parses YAML ``text`` (read from file ``path``, if any) with :func:`strict_loader`.

    Raises :class:`ConfigYAMLError` (a ``yaml.YAMLError`` and ``ValueError``) whose message is ``"<path>, line L, column C: <problem>"``. A one-line value with no
    ``:`` that YAML reads as a mapping of nulls (``{a, b}``) stays the string it was, as jsonargparse keeps it."""
    source = str(path) if path else "YAML value"
    try:
        value = yaml.load(text, Loader=strict_loader())  # noqa: S506 - a safe loader subclass
    except yaml.YAMLError as error:
        raise ConfigYAMLError(_describe(error, source)) from None
    if isinstance(value, dict) and value and all(v is None for v in value.values()) and ":" not in text:
        return text
    return value


def load_yaml_file(path: str | Path) -> Any:
    """:func:`load_yaml` of a file's text (UTF-8)."""
    return load_yaml(Path(path).read_text(encoding="utf-8"), path)


def install() -> None:
    """Makes jsonargparse load YAML (config files and command-line values) with :func:`load_yaml`."""
    from jsonargparse import set_loader

    set_loader("yaml", load_yaml, exceptions=(yaml.YAMLError,))
