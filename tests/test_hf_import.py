"""Import of Hugging Face Llama-family folders (Llama, Qwen2, Mistral): logits equal transformers' (fp32, 1e-4) on
tiny random models saved with save_pretrained, KV-cache decoding, tokenizers, retrofits, export of an imported and
retrofitted model, init_from in YAML, and clear errors for what memzoo does not implement."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

import memzoo  # noqa: E402
from memzoo.build import build_language_model  # noqa: E402
from memzoo.cli import main  # noqa: E402
from memzoo.export.errors import PretrainedFormatError  # noqa: E402
from memzoo.export.hf import export_model  # noqa: E402
from memzoo.model.hf_llama import HFImportError, transformer_arguments_from_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import write_config  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama3-gqa-untied": ("Llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0)),
    "llama-linear-bias-tied": ("Llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                             attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2-qkv-bias": ("Qwen2", dict(rope_theta=1e6, rms_norm_eps=1e-5)),
    "mistral": ("Mistral", dict(sliding_window=None)),
}


def save_hf(folder, family, **extra):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**{**COMMON, **extra})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # biases and norm gains away from their init, so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, save_hf(root / name, family, **extra)) for name, (family, extra) in CASES.items()}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("name", list(CASES))
def test_imported_logits_equal_transformers(folders, name):
    folder, reference = folders[name]
    model = memzoo.load_pretrained(folder)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), rtol=0, atol=1e-4)
        caches = model.new_caches(2, 40)  # GQA KV cache: prefill then token by token
        pieces = [model(ids[:, :30], caches)] + [model(ids[:, t : t + 1], caches) for t in range(30, 40)]
        torch.testing.assert_close(torch.cat(pieces, 1), hf_logits(reference, ids), rtol=0, atol=1e-4)


def test_architecture_fields_are_read(folders):
    args = transformer_arguments_from_hf(json.loads((folders["qwen2-qkv-bias"][0] / "config.json").read_text()))
    assert (args["n_kv_heads"], args["qkv_bias"], args["proj_bias"], args["norm_eps"]) == (2, True, False, 1e-5)
    args = transformer_arguments_from_hf(json.loads((folders["llama3-gqa-untied"][0] / "config.json").read_text()))
    assert args["rope_scaling"]["rope_type"] == "llama3" and args["rope_base"] == 500000.0
    assert args["tie_embeddings"] is False


def test_retrofit_on_import_starts_at_the_base_and_exports_with_equal_logits(folders, tmp_path):
    folder, reference = folders["llama3-gqa-untied"]
    layers = {1: {"block": "beside", "base": "dense",
                  "add": {"block": "memory_plus", "pool": "mem", "heads": 2, "knn": 4, "gate": "silu"}}}
    model = memzoo.load_pretrained(folder, layers=layers, pools={"mem": {"n_keys": 8, "value_dim": 32}})
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), rtol=0, atol=1e-4)
        for p in model.layers[1].ffn.add.parameters():  # a healed memory: the added branch is no longer zero
            p.add_(torch.randn_like(p) * 0.1)
        model.pools["mem"].values.add_(0.1)
        ours = model(ids)
    out = export_model(model, tmp_path / "export", tokenizer=_byte_free_tokenizer(tmp_path))
    again = memzoo.load_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(hf_logits(hf, ids), ours, rtol=0, atol=1e-4)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2


def _byte_free_tokenizer(tmp_path):
    """A small BPE tokenizer.json (vocab <= 320, the imported models' size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir(exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the birth year of ada is 1815, said the fox"] * 20, trainer)
    tok.save(str(path))
    return str(path)


def test_folder_tokenizer_is_used_and_a_folder_without_one_still_loads(folders, tmp_path):
    folder = folders["qwen2-qkv-bias"][0]
    model, tokenizer = memzoo.load_pretrained(folder, with_tokenizer=True)
    assert tokenizer is None and model.vocab_size == 320
    with_tok = tmp_path / "with-tok"
    save_hf(with_tok, "Qwen2", rope_theta=1e6)
    (with_tok / "tokenizer.json").write_bytes(Path(_byte_free_tokenizer(tmp_path)).read_bytes())
    _, tokenizer = memzoo.load_pretrained(with_tok, with_tokenizer=True)
    assert 256 < tokenizer.vocab_size <= 300 and tokenizer.decode(tokenizer.encode("the fox")) == "the fox"


def _write_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "'GPT2LMHeadModel'.*not supported.*LlamaForCausalLM"),
    ({"sliding_window": 16, "use_sliding_window": True}, "sliding-window attention"),
    ({"num_local_experts": 8}, "mixture-of-experts"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
])
def test_unsupported_configs_fail_clearly(folders, tmp_path, changes, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    source = folders["llama3-gqa-untied"][0]
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _write_config(folder, **changes)
    with pytest.raises(PretrainedFormatError, match=message):
        memzoo.load_pretrained(folder)


def test_missing_weights_and_out_of_range_retrofit_fail_clearly(folders, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_bytes((folders["mistral"][0] / "config.json").read_bytes())
    with pytest.raises(PretrainedFormatError, match="no model.safetensors"):
        memzoo.load_pretrained(folder)
    with pytest.raises(PretrainedFormatError, match="out of range"):
        memzoo.load_pretrained(folders["mistral"][0], layers={7: {"block": "beside", "base": "dense", "add": "dense"}})
    with pytest.raises(HFImportError, match="sliding-window"):
        transformer_arguments_from_hf({**json.loads((folders["mistral"][0] / "config.json").read_text()),
                                       "sliding_window": 8})


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["memzoo"])


def test_init_from_hf_folder_in_yaml_uses_its_tokenizer_and_trains(folders, tmp_path, monkeypatch, _plain_argv):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "qwen"
    reference = save_hf(folder, "Qwen2", rope_theta=1e6)
    (folder / "tokenizer.json").write_bytes(Path(_byte_free_tokenizer(tmp_path)).read_bytes())
    lm = build_language_model(architecture={"max_seq_len": 32}, init_from=str(folder))
    ids = torch.randint(0, 300, (1, 16))
    torch.testing.assert_close(lm.eval()(ids), hf_logits(reference, ids), rtol=0, atol=1e-4)
    arch = lm.hparams.architecture
    assert arch["dim"] == 32 and arch["n_kv_heads"] == 2 and arch["qkv_bias"] and arch["max_seq_len"] == 32
    config = write_config(tmp_path, steps=2, val_every=2)
    cli = main(["fit", "--config", str(config), "--model.init_args.warmup_steps", "0",
                "--model.init_args.init_from", str(folder)])
    assert cli.datamodule.tokenizer.spec == str(folder / "tokenizer.json") and cli.model.model.vocab_size == 320
    ckpt = Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"
    out = memzoo.export.hf.export_checkpoint(ckpt, tmp_path / "exported")
    exported = memzoo.load_pretrained(out)
    torch.testing.assert_close(exported(ids), cli.model.model.eval()(ids), rtol=0, atol=1e-5)


def test_hub_id_resolves_to_its_snapshot_folder(folders, monkeypatch, tmp_path):
    """``org/name[@rev]`` goes to huggingface_hub.snapshot_download (faked here: no hub in tests); the folder it
    returns is imported as a local folder would be, for init_from and load_pretrained."""
    import huggingface_hub

    folder, reference = folders["qwen2-qkv-bias"]
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        assert "*.safetensors" in allow_patterns and "*.json" in allow_patterns
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    lm = build_language_model(architecture={"max_seq_len": 32}, init_from="memzoo-tests/tiny-qwen2@v1")
    torch.testing.assert_close(lm.eval()(ids), hf_logits(reference, ids), rtol=0, atol=1e-4)
    assert lm.hparams.init_from == "memzoo-tests/tiny-qwen2@v1"  # the checkpoint records the name given
    torch.testing.assert_close(memzoo.load_pretrained("memzoo-tests/tiny-qwen2")(ids), hf_logits(reference, ids),
                               rtol=0, atol=1e-4)
    assert calls == [("memzoo-tests/tiny-qwen2", "v1"), ("memzoo-tests/tiny-qwen2", None)]
    monkeypatch.chdir(tmp_path)  # a local path of the same spelling wins over the hub
    (tmp_path / "memzoo-tests").mkdir()
    (tmp_path / "memzoo-tests" / "tiny-qwen2").symlink_to(folder)
    memzoo.load_pretrained("memzoo-tests/tiny-qwen2")
    assert len(calls) == 2


def test_hub_id_offline_and_not_cached_fails_clearly(monkeypatch, tmp_path):
    from memzoo.model.hub import looks_like_hub_id
    from memzoo.training.init_from import InitFromError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(InitFromError, match=r"init_from: 'memzoo-tests/not-cached'.*huggingface-cli download "
                                            r"memzoo-tests/not-cached --local-dir DIR"):
        build_language_model(init_from="memzoo-tests/not-cached")
    with pytest.raises(PretrainedFormatError, match="load_pretrained: 'memzoo-tests/not-cached'"):
        memzoo.load_pretrained("memzoo-tests/not-cached")
    # a missing checkpoint file is reported as a missing path, never sent to the hub
    assert not looks_like_hub_id("runs/last.ckpt") and looks_like_hub_id("Qwen/Qwen2.5-0.5B@main")
    with pytest.raises(InitFromError, match="'runs/last.ckpt' does not exist"):
        build_language_model(init_from="runs/last.ckpt")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["xformers", "sdpa"])
def test_imported_gqa_model_on_cuda_matches_transformers(folders, backend):
    """Grouped-query attention of an imported model on the GPU, through xformers and SDPA, against transformers on
    the CPU (float32; GPU matmuls may use TF32, hence the looser tolerance), and KV-cached decoding on the GPU."""
    from memzoo.model.hf_llama import load_hf_model

    if backend == "xformers":
        pytest.importorskip("xformers")
    folder, reference = folders["llama3-gqa-untied"]
    model = load_hf_model(folder, attention_backend=backend).cuda().eval()
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf_logits(reference, ids)
        torch.testing.assert_close(model(ids.cuda()).cpu(), expected, rtol=0, atol=2e-3)
        caches = model.new_caches(2, 40)
        pieces = [model(ids[:, :30].cuda(), caches)] + [model(ids[:, t : t + 1].cuda(), caches) for t in range(30, 40)]
        torch.testing.assert_close(torch.cat(pieces, 1).cpu(), expected, rtol=0, atol=2e-3)
