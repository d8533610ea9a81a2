"""One architecture config end to end: YAML → LanguageModel → checkpoint hyperparameters → export's config.json →
``memzoo.load_pretrained`` gives back the same :class:`ModelConfig` (every field) and the same resolved blocks, for
every block type; the checkpoint stores it as plain data."""

import json

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

import memzoo
from memzoo.export.architecture import describe_block
from memzoo.export.hf import export_model
from memzoo.model.config import ModelConfig, ModelConfigError
from memzoo.training.module import LanguageModel

pytest.importorskip("transformers")

#: One architecture per block type, as a user writes it under model.init_args.architecture (defaults left out).
ARCHITECTURES = {
    "dense": "{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 16, block_args: {hidden: 40}, norm_eps: 1.0e-5}",
    "moe": "{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 16, layers: {-1: {block: moe, n_experts: 3, top_k: 2}}}",
    "pkm": "{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 16, layers: {1: {block: pkm, n_keys: 6,"
           " knn: 4, query_norm: rmsnorm}}, rope_base: 500.0}",
    "memoryplus": "{dim: 32, n_layers: 3, n_heads: 4, max_seq_len: 16, tie_embeddings: false, layers: {0: &m {block:"
                  " memory_plus, pool: mem, heads: 2, knn: 3, k_dim: 16}, 2: *m},"
                  " pools: {mem: {n_keys: 5, value_dim: 24, update: sparse, lr: 0.01}}}",
    "spelled_out": "{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 16, layers: {0: {block: product_key_memory,"
                   " n_keys: 5, heads: 2, knn: 3, k_dim: 16, query_norm: none, qk_norm: true, gate: silu}}}",
    "peer": "{dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 16, init_std: 0.01, layers: {0: {block: peer, n_keys: 6,"
            " heads: 2, knn: 3, k_dim: 8, query_norm: layernorm, qk_norm: true, score: sigmoid}}}",
}


def parse_model_section(architecture_yaml: str) -> LanguageModel:
    """The model section as the ``memzoo`` CLI parses and instantiates it (jsonargparse, subclass mode)."""
    section = {"class_path": "memzoo.LanguageModel",
               "init_args": {"architecture": {"vocab_size": 258, **yaml.safe_load(architecture_yaml)}}}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LanguageModel, "model", required=True)
    return parser.instantiate_classes(parser.parse_object({"model": section})).model


@pytest.mark.parametrize("block_type", list(ARCHITECTURES))
def test_yaml_to_export_to_load_pretrained_keeps_the_config(block_type, tmp_path):
    lm = parse_model_section(ARCHITECTURES[block_type])
    config = lm.architecture
    assert isinstance(config, ModelConfig)
    assert ModelConfig.from_dict(lm.hparams["architecture"]) == config  # what checkpoints store: plain data
    torch.save({"hyper_parameters": dict(lm.hparams)}, tmp_path / "hp.pt")
    assert torch.load(tmp_path / "hp.pt", weights_only=True)["hyper_parameters"]["architecture"] == config.to_dict()

    folder = export_model(lm.model, tmp_path / "export", tokenizer="byte")
    stored = json.loads((folder / "config.json").read_text())
    loaded = memzoo.load_pretrained(folder)
    assert loaded.config == config  # every field, e.g. norm_eps, rope_base, init_std, pool update and lr
    built = [describe_block(i, layer.ffn) for i, layer in enumerate(lm.model.layers)]
    assert [describe_block(i, layer.ffn) for i, layer in enumerate(loaded.layers)] == built == stored["blocks"]
    assert [layer.ffn.hparams for layer in loaded.layers] == [layer.ffn.hparams for layer in lm.model.layers]
    ids = torch.randint(0, 258, (2, 9))
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), lm.model(ids))


def test_resolved_hyperparameters_are_recorded_by_the_registry():
    lm = parse_model_section(ARCHITECTURES["memoryplus"])
    spec = lm.model.layers[0].ffn.hparams
    # k_dim given; the preset's settings; value_dim and n_keys resolved from the pool
    assert spec["block"] == "memory_plus" and spec["pool"] == "mem"
    assert (spec["gate"], spec["qk_norm"], spec["query_norm"]) == ("silu", True, "none")
    assert (spec["n_keys"], spec["value_dim"], spec["per_head_keys"]) == (5, 24, True)
    assert lm.model.layers[1].ffn.hparams == {"block": "dense", "hidden": 128, "dropout": 0.0, "bias": False}
    # the export writes the family and every setting, plus what its modeling code reads
    exported = describe_block(0, lm.model.layers[0].ffn)
    assert exported == {**spec, "block": "product_key_memory", "bias": False, "output_proj": True}


def test_bad_architecture_fields_are_named():
    with pytest.raises(ModelConfigError, match=r"unknown architecture field\(s\) \['dimm'\]"):
        ModelConfig.from_dict({"dimm": 3})
    with pytest.raises(ModelConfigError, match="dim=30 is not divisible by n_heads=4"):
        ModelConfig(dim=30, n_heads=4)
