"""Loading trained weights into a decoder that may carry retrofits (used by ``init_from`` and the HF import).

:func:`load_initial_weights` copies a source state dict into a freshly built decoder. The decoder may be the
source's architecture plus retrofits:

- a layer whose FFN became ``beside`` (``{block: beside, base: <the old FFN>, add: <new block>}``) takes the
  source's ``layers.i.ffn.*`` as ``layers.i.ffn.base.*``;
- parameters the source does not have are allowed only in new parts: the ``add`` branch (and ``scale``) of a
  ``beside`` layer, a layer whose FFN was replaced by another block, and pools the source lacks. They keep their
  init (zero output for ``beside``, so the retrofitted model starts at its base). A new ``add`` branch of a
  ``beside`` with ``init: base_scale`` is then drawn at the scale of the pretrained block beside it, still at zero
  output (:meth:`Beside.match_base_scale`); its pool must be new too (its values become zero).

Everything else must match in name and shape; any mismatch raises :class:`InitFromError` naming the tensors.

:func:`whiten_memory_queries` then fits the query projections of the added product-key memories to the inputs
the pretrained model gives them (a few batches of text), so tokens spread over the memory's rows.
"""

from __future__ import annotations

import re
from typing import Collection, Mapping

import torch
import torch.nn as nn

from memzoo.blocks.composition import Beside
from memzoo.blocks.presets import CHANGED_DEFAULTS


class InitFromError(ValueError):
    """Weights that cannot initialise this model (names the source, tensors and fix)."""


_FFN = re.compile(r"^layers\.(\d+)\.ffn\.")


def _pin_the_setting(layer: int) -> str:
    """The fix for a layer whose recorded settings build another block today (a preset's default changed)."""
    return (f"e.g. after a preset's default changed ({CHANGED_DEFAULTS}). Give the layer's spec with the setting "
            f"pinned (init_from: architecture: layers: {{{layer}: {{...}}}})")


def load_initial_weights(model: nn.Module, source: Mapping[str, torch.Tensor], where: str = "init_from",
                         retrofitted: Collection[int] | None = None) -> None:
    """Copies ``source`` into ``model`` (a Transformer) with the retrofit mapping of the module docstring.

    ``retrofitted``: the layers whose FFN the caller's architecture changed (the only ones whose source FFN may be
    dropped as replaced); ``None``: any layer whose source FFN tensors have no place counts as replaced."""
    target = model.state_dict()
    beside_layers = {i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, Beside)}
    mapped: dict[str, torch.Tensor] = {}
    unused = []
    for key, value in source.items():
        match = _FFN.match(key)
        if match and int(match.group(1)) in beside_layers and key not in target:
            key = f"{match.group(0)}base.{key[match.end():]}"
        (mapped.__setitem__(key, value) if key in target else unused.append(key))
    replaced_layers = {int(m.group(1)) for k in unused if (m := _FFN.match(k))}
    if retrofitted is not None and replaced_layers - set(retrofitted):
        layer = min(replaced_layers - set(retrofitted))
        extra = [k for k in unused if k.startswith(f"layers.{layer}.ffn.")]
        raise InitFromError(
            f"{where}: layer {layer}'s FFN holds tensors {extra[:6]} that the block its recorded settings build "
            f"today lacks, and this run does not change that layer: those settings build a different block now, "
            + _pin_the_setting(layer)
        )
    unused = [k for k in unused if not _FFN.match(k)]
    if unused:
        raise InitFromError(
            f"{where}: source tensors {unused[:6]} have no place in this model; the model must be the source's "
            f"architecture plus retrofits (beside / replaced FFNs, new pools)"
        )
    bad_shapes = [f"{k}: source {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in mapped.items() if v.shape != target[k].shape]
    if bad_shapes:
        raise InitFromError(f"{where}: shapes differ: {'; '.join(bad_shapes[:6])}")
    source_pools = {k.split(".")[1] for k in source if k.startswith("pools.")}

    def is_new(key: str) -> bool:
        match = _FFN.match(key)
        if match:
            layer = int(match.group(1))
            rest = key[match.end():]
            return layer in replaced_layers or (layer in beside_layers and not rest.startswith("base."))
        return key.startswith("pools.") and key.split(".")[1] not in source_pools

    missing = [k for k in target if k not in mapped and not is_new(k)]
    tied = getattr(model, "head", None) is not None and model.head.weight is model.embed.weight
    if tied and "head.weight" in missing and "embed.weight" in mapped:
        missing.remove("head.weight")
    if missing:
        drifted = sorted({int(m.group(1)) for k in missing if (m := _FFN.match(k))})
        hint = (f": layer {drifted[0]}'s recorded settings build a block with more tensors today, "
                + _pin_the_setting(drifted[0])) if drifted else ""
        raise InitFromError(f"{where}: the source lacks {missing[:6]}; they are not new (retrofitted) parts{hint}")
    model.load_state_dict(mapped, strict=False)
    loaded_pools = {id(model.pools[name]) for name in source_pools if name in getattr(model, "pools", {})}
    for i in sorted(beside_layers):
        ffn = model.layers[i].ffn
        if ffn.init != "base_scale" or any(k.startswith(f"layers.{i}.ffn.add.") for k in mapped):
            continue
        pool = getattr(ffn.add, "pool", None)
        if pool is not None and id(pool) in loaded_pools:
            raise InitFromError(f"{where}: layer {i}'s beside has init: base_scale, which zeroes its pool's values, "
                                f"but the source holds that pool's values; use init: zero or a new pool")
        ffn.match_base_scale()


@torch.no_grad()
def whiten_memory_queries(model: nn.Module, batches, floor: float = 1e-3) -> dict[int, int]:
    """Whitens the query projection of every product-key memory added ``beside`` a layer's FFN
    (:meth:`~memzoo.nn.product_key_router.ProductKeyRouter.whiten_query`) on the inputs that FFN sees when
    ``model`` (a Transformer) reads ``batches`` (token ids ``(B, T)``, or dicts with ``input_ids``). Call it on a
    freshly retrofitted model, before training its memory: the branch's output is unchanged while its values are
    zero (``init: base_scale``), otherwise the model's function changes. Returns ``{layer: inputs seen}``."""
    routers = {i: layer.ffn.add.router for i, layer in enumerate(model.layers)
               if isinstance(layer.ffn, Beside) and hasattr(getattr(layer.ffn.add, "router", None), "whiten_query")}
    if not routers:
        raise ValueError("whiten_memory_queries: the model has no product-key memory beside an FFN")
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in routers}
    hooks = [model.layers[i].ffn.register_forward_pre_hook(
        lambda module, args, i=i: seen[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))) for i in routers]
    was = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch["input_ids"] if isinstance(batch, Mapping) else batch)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was)
    for i, router in routers.items():
        router.whiten_query(torch.cat(seen[i]), floor)
    return {i: sum(len(x) for x in seen[i]) for i in routers}
