"""Public names of a package imported on first use (PEP 562), so importing the package does not import their
modules (e.g. Lightning, for classes that subclass it)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(namespace: dict[str, Any], sources: Mapping[str, str],
                 public: Iterable[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of the package whose globals are ``namespace``: a name in
    ``sources`` (name -> defining module) is imported when first read and then kept in ``namespace``; ``public``
    (the package's ``__all__``) is listed by ``dir``."""
    public = list(public)

    def __getattr__(name: str) -> Any:
        if name in sources:
            value = getattr(importlib.import_module(sources[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *public})

    return __getattr__, __dir__


__all__ = ["lazy_exports"]
