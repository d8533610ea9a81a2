"""``memzoo export``: a Hugging Face folder from a Lightning checkpoint or a Transformer.

The folder (written atomically: built under a temporary name next to ``out``, then renamed into place)::

    config.json                    architecture (model_type memzoo, auto_map, per-layer blocks, pools), dtype
    generation_config.json         eos/pad ids and the model's generation defaults
    configuration_memzoo.py        the config class           } the Hugging Face adapter, copied verbatim from
    modeling_memzoo.py             PreTrainedModel + KV cache  } memzoo/export/hf_files
    memzoo_*.py                    memzoo's own model source (model, blocks, nn, ops), generated from the installed
                                   memzoo by memzoo.export.shipped_code; with the adapter, imports only torch and
                                   transformers (Triton / xformers optional)
    model.safetensors              weights (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer.json                 tokenizer (byte-level for memzoo's ByteTokenizer) + tokenizer_config.json
    memzoo_manifest.json           format version, memzoo version, tokenizer, SHA-256 of each weight file

``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` and :func:`memzoo.load_pretrained` both
read it, with the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import memzoo
from memzoo.atomic import staging_directory
from memzoo.data.tokenizers import Tokenizer, build_tokenizer
from memzoo.export.architecture import architecture_config, rebuild
from memzoo.export.checkpoint_reader import read_checkpoint
from memzoo.export.errors import ExportError
from memzoo.export.manifest import MANIFEST_FILE, build_manifest
from memzoo.export.shipped_code import shipped_files
from memzoo.export.tokenizer_files import write_tokenizer_files
from memzoo.export.weights import DTYPES, export_tensors, parse_size, save_weights
from memzoo.model.reparameterize import reparameterize_lookup_experts
from memzoo.model.transformer import Transformer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: The Hugging Face adapter an export ships verbatim (name in the folder -> source file); memzoo's own model source
#: ships beside it (:func:`~memzoo.export.shipped_code.shipped_files`).
HF_CODE_FILES = {
    "configuration_memzoo.py": Path(__file__).parent / "hf_files" / "configuration_memzoo.py",
    "modeling_memzoo.py": Path(__file__).parent / "hf_files" / "modeling_memzoo.py",
}
DEFAULT_MAX_SHARD_SIZE = "5GB"


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Tokenizer | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    reparameterize: bool = False,
) -> Path:
    """Exports a memzoo Lightning checkpoint to the Hugging Face folder ``out``; returns ``out``.

    Args:
        checkpoint: a ``.ckpt`` written by ``memzoo fit`` (or ``Trainer.save_checkpoint`` of a LanguageModel).
        out: destination folder; must be absent or empty unless ``overwrite``.
        tokenizer: a tokenizer spec (``"byte"``, a ``tokenizer.json`` path) or tokenizer; default: the one the
            checkpoint's run recorded (see :func:`~memzoo.export.checkpoint_reader.recorded_tokenizer`).
        dtype: ``float32`` | ``bfloat16`` | ``float16``, the dtype of the stored floating tensors.
        max_shard_size: largest weight file (``"5GB"``, ``"500MB"``, bytes); bigger models are sharded.
        overwrite: replace an earlier export at ``out`` (only after the new one is complete).
        reparameterize: first turn MoLE's experts into their lookup tables (equal outputs; see
            :func:`~memzoo.model.reparameterize.reparameterize_lookup_experts`); refused for a model without MoLE
            layers in experts mode.
    """
    out = Path(out)
    check_destination(out, overwrite)
    contents = read_checkpoint(checkpoint)
    if reparameterize:
        try:
            reparameterize_lookup_experts(contents.model)
        except ValueError as err:
            raise ExportError(f"--reparameterize: {err}") from None
    if tokenizer is None:
        tokenizer = contents.tokenizer
        if tokenizer is None:
            raise ExportError(
                f"checkpoint {checkpoint} does not record its tokenizer (no data module hyperparameters, no run "
                f"config.yaml beside its folder); pass it: --tokenizer byte, or --tokenizer path/to/tokenizer.json"
            )
    hp = contents.hyperparameters
    generation = {"max_new_tokens": hp.get("max_new_tokens"), "temperature": hp.get("temperature", 0.0),
                  "top_k": hp.get("top_k")}
    return export_model(contents.model, out, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size,
                        overwrite=overwrite, generation=generation)


def export_model(
    model: Transformer,
    out: str | Path,
    *,
    tokenizer: str | Tokenizer,
    dtype: str = "float32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Exports ``model`` with ``tokenizer`` to the Hugging Face folder ``out`` (see :func:`export_checkpoint`).

    ``generation`` holds the defaults written to ``generation_config.json``: ``max_new_tokens``,
    ``temperature`` (0: greedy) and ``top_k`` (``None``: all tokens).
    """
    out = Path(out)
    check_destination(out, overwrite)
    check_no_attention_memory(model)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    tokenizer = build_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if tokenizer.vocab_size > model.vocab_size:
        raise ExportError(
            f"tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} ids but the model only {model.vocab_size}; "
            f"export with the tokenizer the model was trained with"
        )
    config = {
        **architecture_config(model),
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "dtype": dtype,
        "memzoo_version": memzoo.__version__,
    }
    tensors = export_tensors(model.state_dict(), DTYPES[dtype], tied_head=config["tie_word_embeddings"])
    check_architecture_reproduces(config, model)

    with staging_directory(out) as folder:
        _write_json(folder / CONFIG_FILE, config)
        _write_json(folder / GENERATION_CONFIG_FILE, generation_config(tokenizer, generation or {}))
        for name, source in HF_CODE_FILES.items():
            shutil.copyfile(source, folder / name)
        for name, text in shipped_files().items():
            (folder / name).write_text(text, encoding="utf-8")
        tokenizer_entry = write_tokenizer_files(tokenizer, folder, model_max_length=model.max_seq_len)
        files = save_weights(tensors, folder, shard_bytes)
        _write_json(folder / MANIFEST_FILE, build_manifest(folder, files, tokenizer_entry, memzoo.__version__))
    return out


def check_no_attention_memory(model: Transformer) -> None:
    """Refuses a model with attention memory: an export carries no memory bank, so it would not compute what the
    model computes."""
    memory = model.config.attention_memory
    if memory is None and not any(layer.attn.memory is not None for layer in model.layers):
        return
    how = ("detach the bank first (model.detach_memory()) to export the plain model"
           if getattr(model, "memory_enabled_by_attach", False) else
           "its attention_memory layers are part of the architecture; use the checkpoint with memzoo itself "
           "(memzoo generate/predict) or export a model without attention_memory")
    raise ExportError(
        f"the model has attention memory (layers {memory and memory['layers']}, mode {memory and memory['mode']}), "
        f"whose bank an export does not carry; {how}"
    )


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuses an ``out`` that is a file, or a non-empty folder without ``overwrite``; with ``overwrite``, refuses
    a non-empty folder that is not an earlier memzoo export (so a typo cannot replace an unrelated folder)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another folder")
    if not (out / MANIFEST_FILE).is_file():
        raise ExportError(
            f"--out {out} is a non-empty folder that is not a memzoo export (no {MANIFEST_FILE}); --overwrite only "
            f"replaces earlier exports: remove it yourself or choose another folder"
        )


def check_architecture_reproduces(config: dict[str, Any], model: Transformer) -> None:
    """Rebuilds the architecture in ``config`` (on the meta device: no memory) and checks it has exactly the
    model's tensors and shapes, so an export never writes a config its weights do not fit."""
    with torch.device("meta"):
        rebuilt = rebuild(config, source="the exported config")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    if expected != got:
        differ = sorted(set(expected) ^ set(got)) or [n for n in expected if expected[n] != got[n]]
        raise ExportError(f"the exported config does not rebuild the model's tensors (differences: {differ[:8]})")


def generation_config(tokenizer: Tokenizer, defaults: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json``: greedy unless the model's default temperature is positive."""
    config: dict[str, Any] = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if defaults.get("max_new_tokens"):
        config["max_new_tokens"] = defaults["max_new_tokens"]
    temperature = defaults.get("temperature") or 0.0
    if temperature > 0:
        config.update(do_sample=True, temperature=temperature, top_k=defaults.get("top_k") or 0)
    else:
        config["do_sample"] = False
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
