"""From a config to a model: :func:`build_model` (what ``memzoo fit --config`` builds) and
:func:`build_language_model` (one LanguageModel from its init arguments, ``init_from`` resolved).

    model = memzoo.build_model("configs/quickstart.yaml")            # a LanguageModel, weights initialised
    model = memzoo.build_model({"model": {...}, "data": {...}})       # a dict as the CLI parses it

Both the ``memzoo`` CLI and :func:`build_model` construct the model through :func:`build_language_model`, so the
model is the same: ``init_from`` is read once here (:mod:`memzoo.loading`), never by ``LanguageModel.__init__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from memzoo.loading import ModelSource, open_source
from memzoo.model.config import ModelConfig
from memzoo.training.module import LanguageModel


def build_language_model(model_class: type[LanguageModel] = LanguageModel, /, *, source: ModelSource | None = None,
                         load_weights: bool = True, **init_args: Any) -> LanguageModel:
    """``model_class(**init_args)`` with ``init_args["init_from"]`` resolved: the model is built with the source's
    architecture (plus the requested retrofits and context: :meth:`memzoo.loading.ModelSource.architecture`) and
    the source's weights are loaded into it once (after LoRA adapters are added; retrofits keep their init).

    ``source``: the already opened source of ``init_from`` (a hub id is then not resolved again).
    ``load_weights=False`` builds the architecture only (e.g. on the ``meta`` device, for accounting)."""
    init_from = init_args.get("init_from")
    if init_from is None:
        return model_class(**init_args)
    if source is None:
        source = open_source(init_from, where="init_from")
    requested = init_args.get("architecture")
    requested = ModelConfig() if requested is None else ModelConfig.from_dict(requested)
    architecture = source.architecture(requested.to_dict(resolve_layers=False))  # indices resolve on the depth built
    if architecture is not None:
        init_args["architecture"] = requested.replace(**architecture)
    module = model_class(**init_args)
    if load_weights:
        source.load_into(module.model)
    return module


def build_model(config: str | Path | Mapping[str, Any] | Any, *, vocab_size: int | None = None,
                load_weights: bool = True) -> LanguageModel:
    """The LanguageModel ``memzoo fit --config config`` builds, parsed by the CLI's own parser (same defaults, same
    vocabulary link, same ``init_from`` handling).

    Args:
        config: a YAML file path, a dict as the CLI parses it (``{"model": ..., "data": ..., "trainer": ...}``),
            or a parsed ``jsonargparse.Namespace``.
        vocab_size: link this vocabulary size into the architecture instead of the data module's (the data module
            is then not built, so its files need not exist).
        load_weights: ``False``: do not read ``init_from``'s weights (its architecture is still read).
    """
    from memzoo.cli_lightning import build_model_from_config

    return build_model_from_config(config, vocab_size=vocab_size, load_weights=load_weights)


__all__ = ["build_language_model", "build_model"]
