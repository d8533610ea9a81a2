"""Re-parameterising a trained model for inference: MoLE's experts become per-token lookup tables.

:func:`reparameterize_lookup_experts` switches every MoLE layer (:class:`~memzoo.blocks.mole.LookupExperts` in
``mode: experts``) of a :class:`~memzoo.model.transformer.Transformer` to ``mode: lookup``, whose table holds
``E_j(RMSNorm(embed(v)))`` for every token id ``v`` and expert ``j`` (equal outputs, no expert FLOPs), and records
the change in ``model.config`` (those layers get ``mode: lookup``), so the model's config rebuilds the new tensors:
``memzoo export --reparameterize`` and :func:`memzoo.export.hf.export_checkpoint` use it before writing the folder.
"""

from __future__ import annotations

from memzoo.blocks.mole import LookupExperts
from memzoo.model.transformer import Transformer


def reparameterize_lookup_experts(model: Transformer, chunk: int = 4096) -> list[int]:
    """Re-parameterises ``model``'s MoLE layers in place (see the module docstring); returns their indices.

    Raises ``ValueError`` when the model has no MoLE layer in ``experts`` mode (nothing to re-parameterise).
    ``chunk``: token ids tabulated at a time (bounds the temporary ``chunk × n_experts × expert_hidden``).
    """
    layers = [i for i, layer in enumerate(model.layers)
              if isinstance(layer.ffn, LookupExperts) and layer.ffn.mode == "experts"]
    if not layers:
        found = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, LookupExperts)]
        state = f"its MoLE layers {found} are already in lookup mode" if found else "it has no MoLE (lookup_experts) layer"
        raise ValueError(f"nothing to re-parameterise: {state}; export without --reparameterize")
    specs = model.config.layer_specs()
    overrides = dict(model.config.resolved_layers())
    for i in layers:
        model.layers[i].ffn.reparameterize(chunk)
        overrides[i] = {"block": specs[i].block, **specs[i].args, "mode": "lookup"}
    model.config = model.config.replace(layers=overrides)
    return layers
