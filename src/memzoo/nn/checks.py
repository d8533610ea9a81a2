"""Argument checks shared by blocks: each raises an error naming the block, the argument and the bad value."""

from __future__ import annotations

from typing import Any, Iterable


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """``value`` is an int >= 1 (not a bool), else ``ValueError("<owner>: <name> must be a positive int, ...")``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``, else ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {list(choices)}")


def check_bool(owner: str, name: str, value: Any) -> None:
    """``value`` is ``True`` or ``False``, else ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be true or false, got {value!r}")
