"""Command-line overrides of one key inside the architecture's dict fields (memzoo.config_overrides): merged into
the configured dict, not replacing its entry; the parsed result and the model built from it."""

import sys
from pathlib import Path

import pytest
import yaml

from memzoo.cli import main
from memzoo.config_overrides import _split, dict_fields, merge_dict_overrides

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "configs" / "capacity" / "model-memoryplus.yaml")
DATA = str(ROOT / "configs" / "capacity" / "data-biographies.yaml")
ARCH = "--model.init_args.architecture."


def printed_architecture(capsys, *overrides):
    saved = sys.argv
    sys.argv = ["memzoo"]
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", MODEL, "--config", DATA, *overrides, "--print_config"])
    finally:
        sys.argv = saved
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["architecture"]


def test_the_dict_fields_are_the_architectures_dicts():
    assert dict_fields() == {"block_args", "layers", "pools", "rope_scaling", "attention_memory"}


def test_one_key_of_a_pool_and_of_a_layer_keeps_the_rest(capsys):
    arch = printed_architecture(capsys, ARCH + "pools.memory.lr", "0.12", ARCH + "layers.1.knn=8")
    assert arch["pools"]["memory"] == {"n_keys": 64, "value_dim": 32, "update": "sparse", "lr": 0.12,
                                       "weight_decay": 0.0}
    layers = {int(k): v for k, v in arch["layers"].items()}
    assert layers[0]["knn"] == 16 and layers[1]["knn"] == 8
    assert layers[1] == {**layers[0], "knn": 8}  # the layer's other settings are kept


def test_a_key_of_an_empty_dict_and_a_whole_dict_still_work(capsys):
    arch = printed_architecture(capsys, ARCH + "block_args.hidden", "24")
    assert arch["block_args"] == {"hidden": 24}
    whole = printed_architecture(capsys, ARCH + "pools", "{memory: {n_keys: 16, value_dim: 8}}")
    assert whole["pools"] == {"memory": {"n_keys": 16, "value_dim": 8}}  # a whole entry replaces, as written


def test_the_built_model_reads_the_merged_pool():
    from memzoo.blocks.pool import MemoryPool
    from memzoo.cli_lightning import build_from_config

    built = build_from_config(["--config", MODEL, "--config", DATA, ARCH + "pools.memory.n_keys", "32"]).model
    pool = next(m for m in built.modules() if isinstance(m, MemoryPool))
    assert tuple(pool.values.shape) == (32 * 32, 32)  # n_keys from the override, value_dim from the YAML


def test_args_without_such_overrides_are_not_parsed_twice():
    def refuse(args):
        raise AssertionError("parsed")

    args = ["fit", "--config", MODEL, ARCH + "dim", "64", "--model.init_args.lr_decay_steps", "10"]
    assert merge_dict_overrides(args, refuse) is args
    kept, overrides = _split(["fit", ARCH + "pools.p.lr", "0.1", ARCH + "layers.2.knn=4", "--x", "1"], dict_fields())
    assert kept == ["fit", "--x", "1"]
    assert overrides == [(1, "pools", ["p", "lr"], "0.1"), (1, "layers", ["2", "knn"], "4")]
