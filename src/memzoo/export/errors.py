"""The errors of exporting a model and of loading an export; each message names the file and the fix."""

from __future__ import annotations


class ExportError(ValueError):
    """A model or checkpoint that cannot be exported as asked (unexportable block, bad input, occupied folder)."""


class PretrainedFormatError(ValueError):
    """An export folder that cannot be loaded: missing, truncated or corrupted files, an unknown format version, or
    weights that do not fit the architecture in ``config.json``."""
