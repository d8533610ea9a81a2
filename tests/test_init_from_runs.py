"""``init_from`` runs: layer indices resolve against the depth actually built, a run's ``config.yaml`` records the
architecture built (and reruns it), and ``init_from`` a memzoo ``.ckpt`` takes its architecture and tokenizer."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from memzoo.build import build_language_model  # noqa: E402
from memzoo.cli import main  # noqa: E402
from memzoo.model.config import ModelConfig, ModelConfigError  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_import import _byte_free_tokenizer, save_hf  # noqa: E402

MEMORY = {"block": "product_key_memory", "pool": "memory", "heads": 2, "knn": 4, "gate": "silu"}
BESIDE = {"block": "beside", "base": "dense", "add": MEMORY}


def run_config(tmp_path, name, model_args, data_args=""):
    """A 2-step facts run of ``model.init_args`` (YAML lines) written to ``tmp_path/name.yaml``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 1
  val_check_interval: 2
  check_val_every_n_epoch: null
model:
  class_path: memzoo.LanguageModel
  init_args:
    warmup_steps: 0
{model_args}
data:
  class_path: memzoo.data.FactsDataModule
  init_args:
    n_entities: 10
    block_size: 32
    batch_size: 4
    recall_samples: 4
{data_args}""")
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memzoo"])
    return tmp_path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random 2-layer Llama folder (dim 32, 2 kv heads) with a byte-free BPE tokenizer.json."""
    root = tmp_path_factory.mktemp("llama")
    save_hf(root / "llama", "Llama")
    (root / "llama" / "tokenizer.json").write_bytes(Path(_byte_free_tokenizer(root)).read_bytes())
    return root / "llama"


def test_negative_layer_indices_resolve_against_the_imported_depth(llama):
    lm = build_language_model(architecture={"max_seq_len": 32, "layers": {-1: BESIDE},
                                     "pools": {"memory": {"n_keys": 4, "value_dim": 32}}}, init_from=str(llama))
    assert lm.model.n_layers == 2
    assert [spec.block for spec in lm.model.layer_specs] == ["dense", "beside"]
    assert list(lm.hparams.architecture["layers"]) == [1]
    with pytest.raises(ModelConfigError, match="index 8 is out of range for n_layers=2"):
        build_language_model(architecture={"layers": {8: BESIDE}, "pools": {"memory": {"n_keys": 4, "value_dim": 32}}},
                      init_from=str(llama))


def test_negative_layer_index_with_init_from_through_the_cli(llama, in_tmp):
    config = run_config(in_tmp, "retro", f"""    init_from: {llama}
    architecture:
      max_seq_len: 64
      layers:
        -1: {{block: beside, base: dense, add: {{block: product_key_memory, pool: memory, heads: 2, knn: 4, gate: silu}}}}
      pools: {{memory: {{n_keys: 4, value_dim: 32}}}}""")
    cli = main(["fit", "--config", str(config)])
    assert [spec.block for spec in cli.model.model.layer_specs] == ["dense", "beside"]


def test_config_yaml_records_the_imported_architecture_and_reruns_it(llama, in_tmp):
    config = run_config(in_tmp, "retro", f"""    init_from: {llama}
    architecture:
      max_seq_len: 64
      layers:
        -1: {{block: beside, base: dense, add: {{block: product_key_memory, pool: memory, heads: 2, knn: 4, gate: silu}}}}
      pools: {{memory: {{n_keys: 4, value_dim: 32}}}}""")
    first = main(["fit", "--config", str(config)])
    saved = Path(first.trainer.logger.log_dir) / "config.yaml"
    recorded = yaml.safe_load(saved.read_text())["model"]["init_args"]["architecture"]
    built = first.model.architecture.to_dict()
    assert recorded["dim"] == 32 and recorded["n_layers"] == 2 and recorded["n_kv_heads"] == 2
    assert not recorded["tie_embeddings"] and recorded["block_args"]["hidden"] == 48
    recorded = ModelConfig.from_dict({**recorded, "vocab_size": built["vocab_size"]}).to_dict()
    assert recorded == built
    again = main(["fit", "--config", str(saved)])  # the recorded config reruns the same model
    assert again.model.architecture == first.model.architecture
    assert Path(again.trainer.logger.log_dir) != Path(first.trainer.logger.log_dir)


def test_config_yaml_of_a_plain_run_reruns_it(in_tmp):
    config = run_config(in_tmp, "plain", """    architecture: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 64,
                   layers: {-1: {hidden: 16}}}""")
    first = main(["fit", "--config", str(config)])
    saved = Path(first.trainer.logger.log_dir) / "config.yaml"
    recorded = yaml.safe_load(saved.read_text())["model"]["init_args"]["architecture"]["layers"]
    assert {int(k): v for k, v in recorded.items()} == {1: {"hidden": 16}}
    again = main(["fit", "--config", str(saved)])
    assert again.model.architecture == first.model.architecture


def test_init_from_a_memzoo_checkpoint_takes_its_architecture_and_tokenizer(in_tmp):
    tokenizer = _byte_free_tokenizer(in_tmp)
    base = run_config(in_tmp, "base", """    architecture: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 64, block_args: {hidden: 40}}""",
                      f"    tokenizer: {tokenizer}")
    trained = main(["fit", "--config", str(base)])
    ckpt = Path(trained.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    # nothing of the architecture or the tokenizer repeated: only the retrofit and the checkpoint
    retro = run_config(in_tmp, "retro", f"""    init_from: {ckpt}
    architecture:
      max_seq_len: 64
      layers:
        -1: {{block: beside, base: dense, add: {{block: product_key_memory, pool: memory, heads: 2, knn: 4, gate: silu}}}}
      pools: {{memory: {{n_keys: 4, value_dim: 32}}}}""")
    cli = main(["fit", "--config", str(retro), "--trainer.max_steps", "0"])
    arch = cli.model.architecture
    assert (arch.dim, arch.n_layers, arch.n_heads, arch.vocab_size) == (32, 2, 2, trained.model.architecture.vocab_size)
    assert arch.layers[1]["base"] == {"block": "dense", "hidden": 40}
    assert cli.datamodule.tokenizer.spec == tokenizer
    ids = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():  # the added branch starts at zero output: the retrofitted model starts at its base
        torch.testing.assert_close(cli.model.eval()(ids), trained.model.eval()(ids), rtol=0, atol=1e-6)
    # no architecture section at all: the checkpoint's, as built
    bare = main(["fit", "--config", str(run_config(in_tmp, "bare", f"    init_from: {ckpt}")),
                 "--trainer.max_steps", "0"])
    assert bare.model.architecture.dim == 32 and bare.model.architecture.block_args == {"hidden": 40}
