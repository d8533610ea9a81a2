"""Constants shared by model loading, data, training and export."""

#: Label of positions that carry no target (padding, prompts): ``F.cross_entropy(..., ignore_index=IGNORE_INDEX)``.
IGNORE_INDEX = -100

#: ``package:NAME`` as a model source: the one ``.gguf`` file installed Python distribution NAME ships
#: (:func:`memzoo.model.gguf.package_gguf`; resolved by :func:`memzoo.model.hub.resolve_model_source`).
PACKAGE_PREFIX = "package:"
