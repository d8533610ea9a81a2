"""``memzoo.build_model`` builds what ``memzoo fit --config`` builds, and ``init_from`` is read once, by the builder
(:mod:`memzoo.build`, :mod:`memzoo.loading`), for every source kind: never by ``LanguageModel.__init__``."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

import memzoo
from memzoo.build import build_language_model
from memzoo.cli_lightning import MemzooCLI, build_from_config
from memzoo.loading import open_source
from memzoo.model.retrofit import InitFromError
from memzoo.training.module import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
#: configs also built from their dict (the parsed YAML): the dict and the path enter the same parser, so a few
#: kinds suffice: a plain one, init_from with retrofits, memory parallelism, a tokenizer-bound block, finetuning
FROM_DICT = ("quickstart", "smollm2-retrofit", "facts-memoryplus-mp2", "text-engram", "facts-sparse-memory-finetune")
TINY = {"vocab_size": 40, "dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "block_args": {"hidden": 32}}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memzoo"])
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 200)
    return tmp_path


def _with_local_data(path: Path, folder: Path) -> Path:
    """``path``'s config with a text data module reading ``folder/corpus.txt`` (the shipped text configs name their
    corpus on the command line)."""
    config = yaml.safe_load(path.read_text())
    data = config.get("data") or {}
    if "TextDataModule" in str(data.get("class_path", "")) and not (data.get("init_args") or {}).get("path"):
        data.setdefault("init_args", {})["path"] = str(folder / "corpus.txt")
    out = folder / path.name
    out.write_text(yaml.safe_dump(config))
    return out


def _shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_build_model_is_what_the_cli_builds(path, in_tmp, monkeypatch):
    config = _with_local_data(path, in_tmp)
    # shapes and architectures are compared: init_from's architecture is read, its weights (SmolLM2: 135M) are not
    monkeypatch.setattr(MemzooCLI, "load_init_weights", False)
    with torch.device("meta"):  # the scale configs are billions of parameters
        try:
            cli_model = build_from_config(["--config", str(config)]).model
        except InitFromError as err:  # a config whose init_from is a run's output: both refuse it alike
            with pytest.raises(InitFromError) as again:
                memzoo.build_model(config, load_weights=False)
            assert str(again.value) == str(err)
            return
        built = memzoo.build_model(config, load_weights=False)
        from_dict = memzoo.build_model(yaml.safe_load(config.read_text()), load_weights=False) \
            if path.stem in FROM_DICT else built
    assert type(built) is type(cli_model) is LanguageModel
    assert _shapes(built) == _shapes(cli_model) == _shapes(from_dict)
    assert built.hparams.architecture == cli_model.hparams.architecture == from_dict.hparams.architecture
    assert built.hparams.init_from == cli_model.hparams.init_from


def test_the_configs_built_from_a_dict_exist():
    assert set(FROM_DICT) <= {path.stem for path in CONFIGS}


def test_build_model_links_the_data_vocabulary_and_reads_yaml_strictly(in_tmp):
    quickstart = ROOT / "configs" / "quickstart.yaml"
    assert memzoo.build_model(quickstart).architecture.vocab_size == 258  # the byte tokenizer's, linked as fit does
    assert memzoo.build_model(quickstart, vocab_size=300).architecture.vocab_size == 300
    from jsonargparse import dict_to_namespace

    parsed = dict_to_namespace(yaml.safe_load(quickstart.read_text()))  # a parsed namespace builds the same model
    assert memzoo.build_model(parsed).hparams.architecture == memzoo.build_model(quickstart).hparams.architecture
    twice = in_tmp / "twice.yaml"
    twice.write_text(quickstart.read_text() + "\nseed_everything: 1\nseed_everything: 2\n")
    with pytest.raises(ValueError, match="duplicate key 'seed_everything'"):
        memzoo.build_model(twice)


def test_build_model_with_a_vocabulary_needs_no_data_section(in_tmp):
    """With ``vocab_size`` the data module is not built, so a model-only config (a dict, or a YAML such as the
    study's ``model-*.yaml``) builds; a bad key in a dict config is one clear error, not a crash of the reporter."""
    from memzoo.cli_base import ConfigError

    config = {"seed_everything": 0, "model": {"class_path": "memzoo.LanguageModel", "init_args": {
        "architecture": TINY, "warmup_steps": 7}}}
    built = memzoo.build_model(config, vocab_size=50)
    assert built.architecture.vocab_size == 50 and built.hparams.warmup_steps == 7
    assert memzoo.build_model(ROOT / "configs" / "study" / "model-pkm.yaml", vocab_size=64).architecture.vocab_size == 64
    with pytest.raises(ConfigError, match="no data section"):  # without a vocabulary the data module is needed
        memzoo.build_model(ROOT / "configs" / "study" / "model-pkm.yaml")
    config["model"]["init_args"]["warmup"] = 1
    with pytest.raises(ConfigError, match="unknown key 'warmup'"):
        memzoo.build_model(config, vocab_size=50)


def _save_lm_checkpoint(module: LanguageModel, path: Path, **extra) -> Path:
    state = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    import lightning

    torch.save({"state_dict": state, "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__, **extra}, path)
    return path


def test_init_from_is_read_by_the_builder_once_and_never_on_rebuild(tmp_path):
    torch.manual_seed(0)
    base = LanguageModel(architecture=TINY)
    source = _save_lm_checkpoint(base, tmp_path / "base.ckpt")
    lm = build_language_model(architecture={"vocab_size": 40}, init_from=str(source))
    ids = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(lm.eval()(ids), base.eval()(ids), rtol=0, atol=0)
    # LanguageModel itself reads nothing: built from its own hyperparameters without the source file
    trained = _save_lm_checkpoint(lm, tmp_path / "trained.ckpt")
    source.unlink()
    rebuilt = LanguageModel.load_from_checkpoint(trained, weights_only=True)
    torch.testing.assert_close(rebuilt.eval()(ids), base(ids), rtol=0, atol=0)
    assert rebuilt.hparams.init_from == str(source)


def test_init_from_a_lora_checkpoint_merges_its_adapters_as_export_does(tmp_path):
    pytest.importorskip("peft")
    torch.manual_seed(0)
    tuned = LanguageModel(architecture=TINY, lora={"r": 2, "alpha": 4})
    with torch.no_grad():  # adapters that change the output
        for name, parameter in tuned.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    path = _save_lm_checkpoint(tuned, tmp_path / "lora.ckpt")
    ids = torch.randint(0, 40, (2, 10))
    started = build_language_model(architecture={"vocab_size": 40}, init_from=str(path))
    assert not any("lora" in key for key in started.state_dict())
    torch.testing.assert_close(started.eval()(ids), tuned.eval()(ids), rtol=1e-5, atol=1e-5)
    exported = memzoo.load_pretrained(path)
    torch.testing.assert_close(exported(ids), tuned(ids), rtol=1e-5, atol=1e-5)
    # new adapters over a source: the source's weights go to the adapted linears' base layers
    again = build_language_model(architecture={"vocab_size": 40}, init_from=str(path), lora={"r": 2, "alpha": 4})
    assert any("lora_A" in key for key in again.state_dict())
    torch.testing.assert_close(again.eval()(ids), tuned(ids), rtol=1e-5, atol=1e-5)


def test_init_from_a_sharded_checkpoint_folder(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import mp_workers

    runs = []
    mp_workers.in_this_process(lambda rank, world: runs.append(mp_workers.fit(2, 1, 1, 4, save_dir=str(tmp_path))))
    trained = mp_workers.full_weights(runs[0][0].model)
    folder = tmp_path / "step=2.ckpt"
    assert folder.is_dir() and open_source(folder).kind == "sharded"
    lm = build_language_model(architecture={}, init_from=str(folder))
    for name, value in lm.model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)


def test_a_hub_id_is_resolved_once_per_build(monkeypatch, in_tmp):
    """The CLI's build reads init_from's tokenizer and weights from one resolved snapshot: one hub call, no cache
    (a second build asks again)."""
    pytest.importorskip("transformers")
    import huggingface_hub

    sys.path.insert(0, str(Path(__file__).parent))
    from test_hf_import import _byte_free_tokenizer, save_hf

    folder = in_tmp / "snapshot"
    save_hf(folder, "Llama")
    (folder / "tokenizer.json").write_bytes(Path(_byte_free_tokenizer(in_tmp)).read_bytes())
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    config = {"model": {"class_path": "memzoo.LanguageModel",
                        "init_args": {"init_from": "org/model", "architecture": {"max_seq_len": 16}}},
              "data": {"class_path": "memzoo.data.TextDataModule",
                       "init_args": {"path": str(in_tmp / "corpus.txt"), "block_size": 8}}}
    lm = memzoo.build_model(config)
    assert calls == ["org/model"]
    reference = memzoo.load_pretrained(folder)
    ids = torch.arange(8)[None]
    torch.testing.assert_close(lm.eval()(ids), reference(ids), rtol=0, atol=1e-6)
    memzoo.build_model(config)
    assert calls == ["org/model"] * 2
