"""A checkpoint whose recorded layer settings build a different block today (a preset's default changed after it was
trained, as ``memory_plus``'s gate did: a layer trained without it) is refused with the layer, its tensors and the fix named: by
``load_pretrained``, by ``init_from`` and by a resume (``--ckpt_path``), never loaded with the layer re-initialised."""

import copy

import pytest
import torch

import memzoo
from memzoo.export.checkpoint_check import CheckpointError, check_same_architecture
from memzoo.export.errors import PretrainedFormatError
from memzoo.loading import build_language_model
from memzoo.training.init_from import InitFromError
from memzoo.training.module import LanguageModel

UNGATED = {"block": "memory_plus", "pool": "mem", "heads": 2, "knn": 4, "k_dim": 16, "gate": "none"}
ARCHITECTURE = {"vocab_size": 258, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 16,
                "layers": {1: UNGATED}, "pools": {"mem": {"n_keys": 8, "value_dim": 32}}}


def unpinned(architecture):
    """The architecture as a run recorded it while the preset had no gate: the layer names no gate."""
    out = copy.deepcopy(architecture)
    del out["layers"][1]["gate"]
    return out


@pytest.fixture
def old_checkpoint(tmp_path):
    """A checkpoint of an ungated Memory+ layer whose hyperparameters do not name the gate."""
    torch.manual_seed(0)
    module = LanguageModel(ARCHITECTURE, warmup_steps=0)
    hparams = dict(module.hparams)
    hparams["architecture"] = unpinned(ARCHITECTURE)
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path, module


def test_load_pretrained_refuses_it_naming_the_layer_and_the_fix(old_checkpoint):
    path, _ = old_checkpoint
    with pytest.raises(PretrainedFormatError, match=r"the source lacks \['layers\.1\.ffn\.gate_proj\.weight', "
                       r"'layers\.1\.ffn\.out_proj\.weight'\].*layer 1's recorded settings.*needs gate: none"):
        memzoo.load_pretrained(path)


def test_init_from_refuses_it_and_loads_every_tensor_once_the_setting_is_pinned(old_checkpoint):
    path, module = old_checkpoint
    with pytest.raises(InitFromError, match="layer 1's recorded settings build a block with more tensors"):
        build_language_model(init_from=str(path), warmup_steps=0)
    same_spec = {"layers": {1: unpinned(ARCHITECTURE)["layers"][1]}}  # the recorded spec again: not a retrofit
    with pytest.raises(InitFromError, match="layer 1's recorded settings build a block with more tensors"):
        build_language_model(init_from=str(path), architecture=same_spec, warmup_steps=0)
    loaded = build_language_model(init_from=str(path), architecture={"layers": {1: dict(UNGATED)}}, warmup_steps=0)
    expected = module.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_a_real_retrofit_of_a_layer_still_drops_its_old_ffn(old_checkpoint):
    """A layer the run replaces by another block keeps its new init (the source's FFN there has no place)."""
    path, module = old_checkpoint
    layers = {0: dict(UNGATED), 1: dict(UNGATED)}  # layer 0's dense FFN replaced; layer 1 pinned as it was trained
    loaded = build_language_model(init_from=str(path), architecture={"layers": layers}, warmup_steps=0)
    assert loaded.model.layers[0].ffn.hparams["block"] == "memory_plus"
    assert loaded.model.layers[1].ffn.gate_proj is None
    for name in ("router.query.weight", "router.sub_keys"):
        assert torch.equal(loaded.model.layers[1].ffn.get_parameter(name), module.model.layers[1].ffn.get_parameter(name))


def test_resume_check_names_the_tensors_the_configured_model_lacks(old_checkpoint):
    path, _ = old_checkpoint
    configured = LanguageModel(unpinned(ARCHITECTURE), warmup_steps=0)  # today's build of the recorded settings
    hparams = {**dict(configured.hparams), "architecture": unpinned(ARCHITECTURE)}
    check_same_architecture(path, hparams)  # the recorded settings are the configured ones
    with pytest.raises(CheckpointError, match=r"tensors only in the configured model \['model\.layers\.1\.ffn\."
                       r"gate_proj\.weight', 'model\.layers\.1\.ffn\.out_proj\.weight'\].*needs gate: none"):
        check_same_architecture(path, hparams, configured.state_dict())
    pinned = LanguageModel(ARCHITECTURE, warmup_steps=0)
    check_same_architecture(path, {**dict(pinned.hparams), "architecture": unpinned(ARCHITECTURE)},
                            pinned.state_dict())  # the same tensors: no complaint
