"""Reading a ``torch.save`` file a user hands memzoo as data, never as code.

Every ``torch.load`` in memzoo goes through :func:`load_data` (``weights_only=True``: tensors, dtypes, plain
containers, numbers and strings; ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it off because the argument is
given). A file whose pickle names anything else (a function, a class with a custom ``__reduce__``) is refused before
anything in it runs, with :class:`RefusedPickleError`: one line naming the file and the object that was refused.

``tests/test_untrusted_checkpoints.py`` fails on any ``torch.load(`` in ``src/memzoo`` without ``weights_only=True``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

__all__ = ["RefusedPickleError", "load_data", "refusal_message"]


class RefusedPickleError(ValueError):
    """A file whose pickle holds an object outside the allowlist; nothing in it was run."""


def refusal_message(what: str, err: BaseException) -> str:
    """One line saying why a weights-only load refused ``what`` (``err``: the ``UnpicklingError`` torch raised)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"[Uu]nsupported operand ([^\s.,]+)", text)
    detail = f"it names {found.group(1)}" if found else "it is not plain data"
    return (
        f"{what} is refused: its pickle holds an object outside the allowed data types ({detail}); memzoo reads "
        f"checkpoints as data only (torch.load weights_only=True) -- use a file written by memzoo, never one from an "
        f"untrusted source"
    )


def load_data(path: str | Path, what: str | None = None, **kwargs: Any) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True, **kwargs)``.

    Raises :class:`RefusedPickleError` (one line, naming ``what``, default ``file 'path'``) when the pickle names
    anything outside torch's weights-only allowlist. Other read errors (missing file, damaged zip) propagate as
    torch raises them, for the caller to word.
    """
    import torch

    if kwargs.get("weights_only", True) is not True:
        raise ValueError("load_data always loads with weights_only=True; do not pass weights_only")
    kwargs.pop("weights_only", None)
    kwargs.setdefault("map_location", "cpu")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise RefusedPickleError(refusal_message(what or f"file {str(path)!r}", err)) from err
