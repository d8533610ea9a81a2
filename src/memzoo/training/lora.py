"""LoRA adapters on memzoo's decoder through ``peft`` (``lora:`` in a LanguageModel's YAML), and merging them back.

:func:`apply_lora` wraps the chosen ``nn.Linear`` modules of a Transformer in peft's LoRA layers (``W x + (α/r) B A x``,
``B = 0`` at the start, so the model starts unchanged) and leaves only the adapters trainable. Targets are module
name suffixes (``qkv``, ``attn.proj``, ``ffn.down``) as in peft; by default every linear layer inside the decoder
layers (attention and FFN-slot blocks; not embeddings, LM head, memory values or sub-keys). :func:`merge_lora` folds
the adapters into the base weights and restores plain ``nn.Linear`` modules (same logits), so a LoRA-finetuned
model exports like any other. Needs ``peft`` (the ``memzoo[hf]`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn


class LoraConfigError(ValueError):
    """A LoRA setting that cannot apply to this model (names the setting and the fix)."""


def linear_names(model: nn.Module) -> list[str]:
    """Module paths of every ``nn.Linear`` inside the decoder layers (``layers.<i>.…``)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("layers.")]


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
) -> list[str]:
    """Adds LoRA adapters (rank ``r``, scale ``alpha / r``) to ``model``'s targeted linears in place and freezes
    everything else; returns the adapted module paths."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("lora: needs the peft package; pip install 'memzoo[hf]' (or pip install peft)") from err
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LoraConfigError(f"lora: r must be a positive int, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraConfigError(f"lora: dropout must be in [0, 1), got {dropout!r}")
    linears = linear_names(model)
    targets = list(target_modules) if target_modules is not None else linears
    if not targets:
        raise LoraConfigError("lora: the model has no linear layers inside its decoder layers to adapt")
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in linears):
            suffixes = sorted({name.split(".", 2)[-1] for name in linears})
            raise LoraConfigError(
                f"lora: target_modules entry {target!r} matches no linear layer; linear layers end in {suffixes}"
            )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model)
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]


def merge_lora(model: nn.Module) -> int:
    """Folds every LoRA adapter of ``model`` into its base linear and puts the plain ``nn.Linear`` back (in place);
    returns how many were merged. The model's outputs do not change (to float rounding)."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
