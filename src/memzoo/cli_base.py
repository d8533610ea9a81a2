"""What the ``memzoo`` command's modules share: its error types and the ``argparse`` parser of the plain verbs.

:mod:`memzoo.cli` (the entry point), :mod:`memzoo.cli_verbs` and :mod:`memzoo.cli_lightning` import these from here,
so none of them imports another's module back (``memzoo.cli`` re-exports them under their old names).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["CommandError", "ConfigError", "VerbParser"]


class CommandError(Exception):
    """A mistake on the command line that the ``memzoo`` command reports as ``memzoo: error: <message>``."""


class ConfigError(CommandError, ValueError):
    """A config (file or command-line override) the parser refuses; the message is one line that names the key,
    where it is written and the fix (see :mod:`memzoo.config_errors`)."""


class VerbParser(argparse.ArgumentParser):
    """``argparse`` for the plain verbs: a usage mistake raises :class:`CommandError` (one line, exit status 2 through
    :func:`entry_point`) instead of printing the usage; options are never abbreviated, an unknown one gets the
    closest options as a suggestion."""

    def __init__(self, *args, allow_unknown: bool = False, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.allow_unknown = allow_unknown  # unknown options are passed on (slot-stats' config overrides)

    def parse_known_args(self, args=None, namespace=None):
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        # an unknown option first: argparse reports a missing required one before it ("--confi" for "--config")
        self.refuse_unknown_options(getattr(self, "_given", []))
        verb = self.prog.removeprefix("memzoo ")
        raise CommandError(f"{verb}: {message} ({self.prog} --help lists the options)")

    def refuse_unknown_options(self, args: Sequence[str]) -> None:
        """Raises :class:`CommandError` naming the first option in ``args`` this parser does not know, with the
        closest known ones; with ``allow_unknown`` only for options close to known ones (typos, abbreviations)."""
        import difflib

        options = [s for s in self._option_string_actions if s.startswith("--")]
        for arg in args:
            name = arg.split("=", 1)[0]
            if not name.startswith("--") or name in options:
                continue
            close = [o for o in options if o.startswith(name)][:3] or difflib.get_close_matches(
                name, options, n=3, cutoff=0.75 if self.allow_unknown else 0.6)
            if self.allow_unknown and not close:
                continue
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; the options are {', '.join(options)}"
            verb = self.prog.removeprefix("memzoo ")
            raise CommandError(f"{verb}: unknown option {name} (options are never abbreviated){hint}")
