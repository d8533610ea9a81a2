"""One loader for every place a model's weights can come from: ``init_from``, :func:`memzoo.load_pretrained`,
``memzoo export`` and ``memzoo summary`` all read their sources here.

:func:`open_source` names the source once (a hub id or ``package:NAME`` is resolved to its local path here, and
that path is what every later step reads: no cache outlives the :class:`ModelSource`):

==============  ====================================================================================================
kind            what it is
==============  ====================================================================================================
``checkpoint``  a memzoo Lightning ``.ckpt`` (``weights_only=True``, memory-mapped)
``sharded``     the folder of a sharded (memory-parallel) checkpoint, its shards joined into full tensors
``hf``          a Hugging Face Llama / Qwen2 / Mistral folder (``config.json`` + safetensors), or a hub id
``gguf``        a Llama-family ``.gguf`` file (dequantised), or ``package:NAME``
==============  ====================================================================================================

A :class:`ModelSource` gives the three things a model built from it needs: :meth:`ModelSource.architecture` (the
source's, with a config's retrofits merged over it), :meth:`ModelSource.load_into` (its weights copied into a built
Transformer, retrofits keeping their init) and :attr:`ModelSource.tokenizer` (the tokenizer spec its data used, or
``None``). A checkpoint trained with ``lora`` gives its adapters merged into the base weights
(:func:`checkpoint_decoder_weights`), as ``memzoo export`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn as nn

from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.model.gguf import imported_gguf_architecture, is_gguf_file, load_gguf_weights, read_gguf_config
from memzoo.model.hf_llama import imported_architecture, is_hf_llama_folder, load_hf_weights
from memzoo.model.hub import resolve_model_source
from memzoo.model.retrofit import InitFromError, load_initial_weights
from memzoo.model.transformer import Transformer

if TYPE_CHECKING:  # imported where a model is built: reading a source (load_pretrained) needs no Lightning
    from memzoo.training.module import LanguageModel

#: LanguageModel attribute holding the Transformer: its state-dict keys start with this prefix.
MODEL_PREFIX = "model."
#: Where ``memzoo fit`` saves a run's resolved config, relative to a checkpoint in the run's ``checkpoints/``.
RUN_CONFIG = Path("..") / "config.yaml"

KINDS = ("checkpoint", "sharded", "hf", "gguf")


@dataclass
class ModelSource:
    """A model source, resolved to a local ``path`` once (see the module docstring for the ``kind`` values)."""

    name: str  # as the user gave it (a path, hub id or package:NAME)
    path: Path  # the local file or folder read
    kind: str
    where: str = "init_from"  # the setting that named it, prefixing every error message
    _checkpoint: dict[str, Any] | None = field(default=None, repr=False)

    # ------------------------------------------------------------------------------------------- metadata
    @property
    def checkpoint(self) -> dict[str, Any]:
        """The raw checkpoint dict (``checkpoint`` and ``sharded`` kinds), read once."""
        if self.kind not in ("checkpoint", "sharded"):
            raise TypeError(f"{self.where}: {self.name!r} is a {self.kind} source, not a memzoo checkpoint")
        if self._checkpoint is None:
            self._checkpoint = _read_checkpoint(self.path, self.kind, self.where)
        return self._checkpoint

    def saved_architecture(self) -> dict[str, Any] | None:
        """The architecture dict a memzoo checkpoint records (``None``: none recorded)."""
        saved = (self.checkpoint.get("hyper_parameters") or {}).get("architecture")
        if saved is None:
            return None
        if not isinstance(saved, Mapping):
            raise InitFromError(f"{self.where}: {self.name!r} records an architecture that is not a mapping: {saved!r}")
        return dict(saved)

    def architecture(self, requested: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The architecture a model built from this source has: the source's, with ``requested``'s ``layers`` /
        ``pools`` retrofits and context settings merged over it (see
        :func:`memzoo.training.init_from.checkpoint_architecture` and
        :func:`memzoo.model.hf_llama.imported_architecture`). ``None``: a checkpoint that records none (the
        requested architecture is then built as given)."""
        requested = dict(requested or {})
        if self.kind == "hf":
            return imported_architecture(self.path, requested)
        if self.kind == "gguf":
            return imported_gguf_architecture(self.path, requested)
        saved = self.saved_architecture()
        if saved is None:
            return None
        from memzoo.training.init_from import checkpoint_architecture

        return checkpoint_architecture(saved, requested, source=f"{self.where} {self.name!r}")

    @property
    def tokenizer(self) -> str | None:
        """The tokenizer spec (``"byte"``, a ``tokenizer.json`` folder/file) of this source, ``None`` if unknown:
        a folder's ``tokenizer.json``, a GGUF file's own tokenizer (written once into memzoo's cache), a
        checkpoint's recorded data tokenizer (:func:`recorded_tokenizer`)."""
        if self.kind == "gguf":
            from memzoo.model.gguf import gguf_tokenizer_folder

            return str(gguf_tokenizer_folder(self.path))
        if self.kind == "hf":
            return str(self.path) if (self.path / "tokenizer.json").is_file() else None
        return recorded_tokenizer(self.path, self.checkpoint)

    # ------------------------------------------------------------------------------------------- weights
    def weights(self) -> dict[str, torch.Tensor]:
        """A memzoo checkpoint's decoder state dict (keys without ``model.``; LoRA adapters merged)."""
        return checkpoint_decoder_weights(self.checkpoint, where=f"{self.where} {self.name!r}")

    def load_into(self, model: nn.Module, requested_layers: Mapping[Any, Any] | None = None) -> None:
        """Copies this source's weights into ``model`` (a Transformer built from :meth:`architecture`, possibly
        with LoRA adapters applied: the source's plain linear weights go to their ``base_layer``). Retrofitted
        parts keep their init; anything else missing or left over raises :class:`InitFromError`.

        ``requested_layers``: the ``layers:`` the run's architecture gave (as to :meth:`architecture`). A memzoo
        checkpoint's layer counts as retrofitted only where that spec differs from the one the checkpoint records,
        so a layer whose recorded settings now build another block (a preset's default changed) is refused, not
        re-initialised."""
        if self.kind == "hf":
            with _lora_unwrapped(model):
                load_hf_weights(model, self.path)
        elif self.kind == "gguf":
            with _lora_unwrapped(model):
                load_gguf_weights(model, self.path, read_gguf_config(self.path))
        else:
            retrofitted = self._retrofitted_layers(requested_layers or {}, len(model.layers))
            with _lora_unwrapped(model):
                load_initial_weights(model, self.weights(), where=f"{self.where} {self.name!r}",
                                     retrofitted=retrofitted)

    def _retrofitted_layers(self, requested_layers: Mapping[Any, Any], n_layers: int) -> set[int]:
        """The layers (indices in ``[0, n_layers)``) whose spec in ``requested_layers`` differs from this
        checkpoint's recorded one."""
        def by_index(layers: Mapping[Any, Any] | None) -> dict[int, Any]:
            return {int(key) % n_layers: spec for key, spec in (layers or {}).items()}

        saved = by_index((self.saved_architecture() or {}).get("layers"))
        return {i for i, spec in by_index(requested_layers).items() if spec != saved.get(i)}


def open_source(name: str | Path, where: str = "init_from") -> ModelSource:
    """The :class:`ModelSource` ``name`` names (a path, a hub id ``org/name[@revision]``, or ``package:NAME``).
    Raises :class:`InitFromError` naming ``name`` and the fix for a missing path, an unreachable hub id or a
    folder that is neither a sharded checkpoint nor a supported Hugging Face folder."""
    path = resolve_model_source(name, where=where)
    if is_gguf_file(path):
        kind = "gguf"
    elif path.is_dir():
        from memzoo.parallel.checkpoint import META_FILE

        if is_hf_llama_folder(path):
            kind = "hf"
        elif (path / META_FILE).is_file():
            kind = "sharded"
        else:
            raise InitFromError(
                f"{where}: {str(path)!r} is a folder but neither a Hugging Face Llama / Qwen2 / Mistral folder (its "
                f"config.json names another architecture, or it has none) nor a sharded memzoo checkpoint (no "
                f"{META_FILE}); give such a folder or a memzoo .ckpt"
            )
    elif path.is_file():
        kind = "checkpoint"
    else:
        raise InitFromError(f"{where}: {str(path)!r} does not exist; give a memzoo fit checkpoint (.ckpt), a sharded "
                            f"checkpoint folder, a Hugging Face Llama / Qwen2 / Mistral folder or a .gguf file")
    return ModelSource(str(name), path, kind, where)


def _read_checkpoint(path: Path, kind: str, where: str) -> dict[str, Any]:
    if kind == "sharded":
        from memzoo.parallel.checkpoint import ShardedCheckpointError, read_sharded_weights

        try:
            checkpoint = read_sharded_weights(path)
        except ShardedCheckpointError as err:
            raise InitFromError(f"{where}: {err}") from err
        if not isinstance(checkpoint.get("state_dict"), dict):
            raise InitFromError(f"{where}: sharded checkpoint {str(path)!r} holds no weights")
        return checkpoint
    from memzoo.training.init_from import read_checkpoint

    return read_checkpoint(path)


def recorded_tokenizer(path: Path, checkpoint: dict[str, Any]) -> str | None:
    """The tokenizer spec of the data a checkpoint was trained on: its data module's saved hyperparameters, else
    ``data.init_args.tokenizer`` of the run's ``config.yaml`` (``runs/X/version_n/config.yaml`` for a checkpoint
    in ``runs/X/version_n/checkpoints/``); ``None`` when neither records it."""
    spec = (checkpoint.get("datamodule_hyper_parameters") or {}).get("tokenizer")
    if isinstance(spec, str):
        return spec
    run_config = path.parent / RUN_CONFIG
    if not run_config.is_file():
        return None
    import yaml

    try:
        config = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    data = config.get("data") if isinstance(config, dict) else None
    init_args = data.get("init_args", data) if isinstance(data, dict) else None
    spec = init_args.get("tokenizer") if isinstance(init_args, dict) else None
    return spec if isinstance(spec, str) else None


def checkpoint_decoder_weights(checkpoint: Mapping[str, Any], where: str = "init_from") -> dict[str, torch.Tensor]:
    """The decoder state dict of a LanguageModel checkpoint dict (keys without ``model.``). A model trained with
    ``lora`` (recorded in its hyperparameters) is rebuilt with its adapters, loaded strictly and merged, so the
    result holds plain linear weights (as an export)."""
    weights = {key[len(MODEL_PREFIX):]: value for key, value in checkpoint["state_dict"].items()
               if key.startswith(MODEL_PREFIX)}
    if not weights:
        raise InitFromError(f"{where}: holds no decoder weights (no 'model.*' keys)")
    hyperparameters = checkpoint.get("hyper_parameters") or {}
    lora = hyperparameters.get("lora")
    if not lora:
        return weights
    from memzoo.training.lora import apply_lora, merge_lora

    try:
        config = ModelConfig.from_dict(hyperparameters["architecture"]).replace(attention_backend="auto")
        model = Transformer(config)
    except (ModelConfigError, KeyError, TypeError, ValueError) as err:
        raise InitFromError(f"{where}: its architecture does not build a model: {err}") from err
    apply_lora(model, **lora)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise InitFromError(f"{where}: its weights do not fit the architecture in its hyper_parameters: {err}") from err
    merge_lora(model)
    return {key: value.detach() for key, value in model.state_dict().items()}


class _lora_unwrapped:
    """Within the block, the peft LoRA layers of ``model`` (if any) are swapped for their base linears, so plain
    weights load by their plain names; the adapters are put back on exit (their own weights untouched)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.swapped: list[tuple[nn.Module, str, nn.Module]] = []

    def __enter__(self) -> None:
        for name, module in list(self.model.named_modules()):
            if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, module.get_base_layer())
                self.swapped.append((parent, child, module))

    def __exit__(self, *exc) -> None:
        for parent, child, module in reversed(self.swapped):
            setattr(parent, child, module)


__all__ = ["KINDS", "MODEL_PREFIX", "RUN_CONFIG", "ModelSource", "checkpoint_decoder_weights", "open_source",
           "recorded_tokenizer"]


def build_language_model(model_class: type[LanguageModel] | None = None, /, *, source: ModelSource | None = None,
                         load_weights: bool = True, **init_args: Any) -> LanguageModel:
    """``model_class(**init_args)`` (default :class:`~memzoo.training.module.LanguageModel`, imported here: reading a
    source needs no Lightning) with ``init_args["init_from"]`` resolved: the model is built with the source's
    architecture (plus the requested retrofits and context: :meth:`memzoo.loading.ModelSource.architecture`) and
    the source's weights are loaded into it once (after LoRA adapters are added; retrofits keep their init).

    ``source``: the already opened source of ``init_from`` (a hub id is then not resolved again).
    ``load_weights=False`` builds the architecture only (e.g. on the ``meta`` device, for accounting)."""
    if model_class is None:
        from memzoo.training.module import LanguageModel as model_class
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
        source.load_into(module.model, requested.to_dict(resolve_layers=False).get("layers"))
    return module
