"""Loading a ``memzoo export`` folder, a Hugging Face Llama-family folder, a GGUF file or a memzoo checkpoint into
memzoo's own model (no ``transformers`` needed; every source but an export folder is read by :mod:`memzoo.loading`).

    model = memzoo.load_pretrained("exports/my-model")                       # a Transformer, eval mode
    model, tokenizer = memzoo.load_pretrained("exports/my-model", with_tokenizer=True)
    tokenizer = memzoo.load_tokenizer("exports/my-model")
    model = memzoo.load_pretrained("Qwen2.5-0.5B/")                         # LlamaForCausalLM, Qwen2, Mistral
    model = memzoo.load_pretrained("Qwen/Qwen2.5-0.5B")                     # a hub id (memzoo.model.hub)
    model = memzoo.load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")       # llama.cpp file (memzoo.model.gguf)
    model = memzoo.load_pretrained("runs/x/version_0/checkpoints/last.ckpt") # memzoo fit checkpoint (LoRA merged)

A Hugging Face folder (``save_pretrained`` output: ``config.json`` naming ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` or ``MistralForCausalLM``, ``model.safetensors`` or its shards) is converted by
:mod:`memzoo.model.hf_llama`; its ``tokenizer.json``, when present, is its tokenizer (``with_tokenizer=True``
returns ``None`` for a folder without one). A ``.gguf`` file is read by :mod:`memzoo.model.gguf` (weights
dequantised, its tokenizer and chat template). Retrofits: ``layers=`` / ``pools=`` as in a model config.

Before reading any weights the folder's manifest is checked (format and version) and every weight file's size and
SHA-256; the weights must then fit the architecture in ``config.json`` exactly. Each failure raises
:class:`~memzoo.export.errors.PretrainedFormatError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memzoo.data.tokenizers import Tokenizer, build_tokenizer
from memzoo.export.architecture import rebuild
from memzoo.export.errors import PretrainedFormatError
from memzoo.export.manifest import MANIFEST_FILE, read_manifest, verify_files
from memzoo.export.tokenizer_files import TOKENIZER_FILE
from memzoo.export.weights import load_weights
from memzoo.loading import ModelSource
from memzoo.model.config import ModelConfig
from memzoo.model.gguf import GGUF_SUFFIX
from memzoo.model.hf_llama import HFImportError
from memzoo.model.hub import resolve_model_source
from memzoo.model.retrofit import InitFromError
from memzoo.model.transformer import ModelConfigError, Transformer
from memzoo.parallel.checkpoint import META_FILE

CONFIG_FILE = "config.json"


def load_pretrained(
    path: str | Path,
    *,
    with_tokenizer: bool = False,
    verify: bool = True,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    layers: dict | None = None,
    pools: dict | None = None,
) -> Transformer | tuple[Transformer, Tokenizer | None]:
    """The :class:`Transformer` stored in folder ``path`` (a memzoo export or a Hugging Face Llama-family folder) or
    in a Llama-family ``.gguf`` file, or in a memzoo checkpoint (``.ckpt`` or sharded folder; LoRA adapters merged),
    in eval mode, on the CPU.

    Args:
        with_tokenizer: also return the tokenizer (``(model, tokenizer)``).
        verify: check the SHA-256 of every weight file against the manifest (reads each file once more).
        dtype: cast floating weights to this dtype (default: as stored, e.g. ``bfloat16`` for a bf16 export).
        max_seq_len, layers, pools: Hugging Face folders and GGUF files only: the context length (default: the config's
            ``max_position_embeddings``) and retrofits (:func:`memzoo.model.hf_llama.load_hf_model`).
    """
    try:
        folder = resolve_model_source(path, where="load_pretrained")
    except InitFromError as err:
        raise PretrainedFormatError(str(err)) from err
    requested = {key: value for key, value in (("max_seq_len", max_seq_len), ("layers", layers), ("pools", pools))
                 if value is not None}
    if str(folder).lower().endswith(GGUF_SUFFIX):  # read by memzoo.model.gguf, which names a missing file
        return _load_source(ModelSource(str(path), folder, "gguf", "load_pretrained"), with_tokenizer, dtype, requested)
    if folder.is_file():  # a memzoo .ckpt: LoRA adapters merged, as in an export
        return _load_source(ModelSource(str(path), folder, "checkpoint", "load_pretrained"), with_tokenizer, dtype,
                            requested)
    if not folder.is_dir():
        raise PretrainedFormatError(f"{folder} is not a folder; give the folder `memzoo export --out` wrote, a "
                                    f"Hugging Face folder, a .gguf file or a memzoo .ckpt")
    if not (folder / MANIFEST_FILE).is_file() and _model_type(folder) not in (None, "memzoo"):
        return _load_source(ModelSource(str(path), folder, "hf", "load_pretrained"), with_tokenizer, dtype, requested)
    if not (folder / MANIFEST_FILE).is_file() and (folder / META_FILE).is_file():  # a sharded memzoo checkpoint
        return _load_source(ModelSource(str(path), folder, "sharded", "load_pretrained"), with_tokenizer, dtype,
                            requested)
    if max_seq_len is not None or layers or pools:
        raise PretrainedFormatError("max_seq_len, layers and pools apply to Hugging Face folders and GGUF files only")
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PretrainedFormatError(f"{config_path} cannot be read as JSON ({err}); export the model again") from err
    model = rebuild(config, source=str(config_path))
    weights = load_weights(folder)
    if model.head.weight is model.embed.weight and "embed.weight" in weights:
        weights.setdefault("head.weight", weights["embed.weight"])  # tied: stored once
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise PretrainedFormatError(
            f"the weights in {folder} do not fit the architecture in {config_path}: {err}"
        ) from err
    stored = next(t.dtype for t in weights.values() if t.is_floating_point())
    model.to(dtype or stored).eval()
    if with_tokenizer:
        return model, _tokenizer_from(folder, manifest)
    return model


def _model_type(folder: Path) -> str | None:
    """``model_type`` of ``folder/config.json`` (``None``: no readable config)."""
    try:
        return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_source(source: ModelSource, with_tokenizer: bool, dtype, requested: dict):
    """A Hugging Face folder, GGUF file or memzoo checkpoint read through :mod:`memzoo.loading`: weights as float32
    (or ``dtype``), the source's tokenizer (``None`` for a folder without ``tokenizer.json``)."""
    if source.kind in ("checkpoint", "sharded") and requested:
        raise PretrainedFormatError("max_seq_len, layers and pools apply to Hugging Face folders and GGUF files only")
    try:
        architecture = source.architecture(requested)
        if architecture is None:
            raise PretrainedFormatError(f"{source.path} records no architecture (its hyper_parameters have none); "
                                        f"was it written by memzoo fit?")
        model = Transformer(ModelConfig.from_dict(architecture).replace(attention_backend="auto"))
        source.load_into(model)
        model.to(dtype or torch.float32).eval()
        if not with_tokenizer:
            return model
        spec = source.tokenizer
        return model, (build_tokenizer(spec) if spec is not None else None)
    except (HFImportError, ModelConfigError, InitFromError) as err:
        raise PretrainedFormatError(str(err)) from err


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The memzoo tokenizer of export folder ``path`` (``ByteTokenizer`` or ``HFTokenizer``)."""
    folder = Path(path)
    return _tokenizer_from(folder, read_manifest(folder))


def _tokenizer_from(folder: Path, manifest: dict) -> Tokenizer:
    entry = manifest.get("tokenizer")
    if entry == "byte":
        return build_tokenizer("byte")
    if entry == TOKENIZER_FILE:
        return build_tokenizer(str(folder / TOKENIZER_FILE))
    raise PretrainedFormatError(
        f"{folder}/memzoo_manifest.json names tokenizer {entry!r}; expected 'byte' or {TOKENIZER_FILE!r}"
    )
