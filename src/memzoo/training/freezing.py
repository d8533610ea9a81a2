"""Freezing parameters by name patterns (``freeze:`` / ``unfreeze:`` in a LanguageModel's YAML).

Names are the decoder's parameter names (``Transformer.named_parameters()``): ``embed.weight``,
``layers.3.attn.qkv.weight``, ``layers.3.ffn.add.query.weight``, ``pools.shared.values``. Patterns are shell globs
(``fnmatch``; ``*`` also crosses dots). A parameter matching a ``freeze`` pattern is frozen, one matching an
``unfreeze`` pattern trains (``unfreeze`` wins), any other keeps its state (e.g. LoRA's): ``freeze: ["*"]`` +
``unfreeze: ["pools.*.values"]`` trains only the memory values.
Frozen parameters get ``requires_grad = False``; :func:`memzoo.training.optim.param_groups` leaves them out, so the
optimizer keeps no state for them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch.nn as nn


class FreezeConfigError(ValueError):
    """A ``freeze`` / ``unfreeze`` pattern that matches nothing, or a selection that leaves nothing to train."""


def apply_freezing(model: nn.Module, freeze: Sequence[str] = (), unfreeze: Sequence[str] = ()) -> list[str]:
    """Sets ``requires_grad`` of the parameters the patterns match; returns the names of all trainable ones.

    Raises :class:`FreezeConfigError` for a pattern matching no parameter (naming it and a few real names) and
    when nothing is left to train.
    """
    for key, patterns in (("freeze", freeze), ("unfreeze", unfreeze)):
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise FreezeConfigError(f"{key} must be a list of name patterns like ['layers.*.ffn.*'], got {patterns!r}")
    names = [name for name, _ in model.named_parameters()]
    for key, patterns in (("freeze", freeze), ("unfreeze", unfreeze)):
        for pattern in patterns:
            if not fnmatch.filter(names, pattern):
                examples = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
                raise FreezeConfigError(
                    f"{key}: pattern {pattern!r} matches no parameter; parameter names look like {examples} "
                    f"(`memzoo summary` lists the layers)"
                )
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in unfreeze):
            param.requires_grad_(True)
        elif any(fnmatch.fnmatchcase(name, p) for p in freeze):
            param.requires_grad_(False)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    if (freeze or unfreeze) and not trainable:
        raise FreezeConfigError(f"freeze={list(freeze)} with unfreeze={list(unfreeze)} leaves no parameter to train")
    return trainable
