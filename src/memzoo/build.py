"""From a config to a model: :func:`build_model` (what ``memzoo fit --config`` builds) and
:func:`~memzoo.loading.build_language_model` (one LanguageModel from its init arguments, ``init_from`` resolved;
it lives in :mod:`memzoo.loading`, which the CLI imports, so that this module may build through the CLI's parser).

    model = memzoo.build_model("configs/quickstart.yaml")            # a LanguageModel, weights initialised
    model = memzoo.build_model({"model": {...}, "data": {...}})       # a dict as the CLI parses it

Both the ``memzoo`` CLI and :func:`build_model` construct the model through :func:`build_language_model`, so the
model is the same: ``init_from`` is read once here (:mod:`memzoo.loading`), never by ``LanguageModel.__init__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from memzoo.loading import build_language_model  # noqa: F401  (memzoo.build.build_language_model, as before)
from memzoo.training.module import LanguageModel


def build_model(config: str | Path | Mapping[str, Any] | Any, *, vocab_size: int | None = None,
                load_weights: bool = True) -> LanguageModel:
    """The LanguageModel ``memzoo fit --config config`` builds, parsed by the CLI's own parser (same defaults, same
    vocabulary link, same ``init_from`` handling).

    Args:
        config: a YAML file path, a dict as the CLI parses it (``{"model": ..., "data": ..., "trainer": ...}``),
            a parsed ``jsonargparse.Namespace``, or the command line of ``memzoo fit`` without its verb
            (``["--config", "X.yaml", "--model.init_args.architecture.dim", "96"]``).
        vocab_size: link this vocabulary size into the architecture instead of the data module's (the data module
            is then not built, so its files need not exist).
        load_weights: ``False``: do not read ``init_from``'s weights (its architecture is still read).
    """
    from memzoo.cli_lightning import build_model_from_config

    return build_model_from_config(config, vocab_size=vocab_size, load_weights=load_weights)


__all__ = ["build_language_model", "build_model"]
