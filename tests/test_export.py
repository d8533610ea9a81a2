"""Export to a Hugging Face folder, per block family: the Lightning model, ``memzoo.load_pretrained`` and
``AutoModelForCausalLM`` (trust_remote_code) give the same logits and the same cached/uncached greedy tokens; the
folder loads where memzoo is not importable; bf16 and sharded exports load."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

import memzoo
from memzoo.blocks.pool import MemoryPool
from memzoo.export.checkpoint_io import AtomicCheckpointIO
from memzoo.export.hf import export_checkpoint, export_model
from memzoo.export.manifest import MANIFEST_FILE
from memzoo.export.shipped_code import shipped_files
from memzoo.model.config import ModelConfig
from memzoo.model.transformer import Transformer
from memzoo.training.module import LanguageModel

transformers = pytest.importorskip("transformers")

VOCAB = 258
BASE = {"vocab_size": VOCAB, "dim": 32, "n_layers": 3, "n_heads": 4, "max_seq_len": 48}

#: Model arguments of one tiny model per exported block family (each option of the family, somewhere).
FAMILIES = {
    "dense": {"block": "dense", "block_args": {"hidden": 48}, "layers": {1: {"hidden": 40, "bias": True}}},
    "moe": {
        "block": "moe",
        "block_args": {"n_experts": 4, "top_k": 2, "hidden": 32},
        "layers": {2: {"block": "moe", "n_experts": 3, "top_k": 1, "hidden": 24, "renormalize": False}},
    },
    "peer": {
        "block": "dense",
        "layers": {
            0: {"block": "peer", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16, "query_norm": "batchnorm"},
            1: {"block": "peer", "pool": "experts", "heads": 3, "knn": 3, "k_dim": 12, "per_head_keys": True,
                "score": "sigmoid", "query_norm": "layernorm", "activation": "silu"},
            2: {"block": "peer", "n_keys": 6, "heads": 2, "knn": 2, "k_dim": 8, "query_norm": "rmsnorm",
                "activation": "relu"},
        },
        "pools": {"experts": {"kind": "experts", "n_keys": 7, "value_dim": 32}},
    },
    "product_key_memory": {
        "block": "dense",
        "layers": {
            1: {"block": "product_key_memory", "n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16, "value_dim": 24,
                "query_norm": "rmsnorm"},
            2: {"block": "pkm", "n_keys": 6, "heads": 1, "knn": 3, "value_dim": 20},
        },
    },
    "memory_plus_shared_pool": {
        "block": "dense",
        "tie_embeddings": False,
        "layers": {i: {"block": "memory_plus", "pool": "shared", "heads": 2, "knn": 4, "k_dim": 16,
                    "query_norm": "layernorm", "gate": "silu"} for i in (0, 2)},  # the paper's gate: W_1, W_2
        "pools": {"shared": {"n_keys": 8, "value_dim": 40}},
    },
}


def build_model(family: str) -> tuple[Transformer, dict]:
    """A tiny Transformer of ``family`` and the hyperparameters a LanguageModel would save for it. Every parameter
    is perturbed away from its init (so a parameter read under the wrong name, or a norm gain/bias left at 1/0,
    changes the logits) and PEER's BatchNorm statistics are warmed up."""
    torch.manual_seed(1)
    config = ModelConfig(**BASE, **FAMILIES[family])
    hparams = {"architecture": config.to_dict(), "warmup_steps": 0}
    model = Transformer(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.train()
        for _ in range(3):  # BatchNorm running statistics away from (0, 1)
            model(torch.randint(0, VOCAB, (4, 16)))
    return model.eval(), hparams


def save_lightning_checkpoint(model: Transformer, hparams: dict, path: Path) -> Path:
    """The checkpoint format Lightning writes for a LanguageModel (what export reads): the Transformer's weights
    under ``model.`` in ``state_dict``, and ``hyper_parameters``."""
    state_dict = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"state_dict": state_dict, "hyper_parameters": hparams, "global_step": 0}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{family: (Transformer, export folder)}``, each exported once from a checkpoint file."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for family in FAMILIES:
        model, hparams = build_model(family)
        ckpt = save_lightning_checkpoint(model, hparams, root / f"{family}.ckpt")
        out[family] = (model, export_checkpoint(ckpt, root / family, tokenizer="byte"))
    return out


def hf_model(folder: Path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)


def prompt_ids(batch: int = 2, length: int = 11) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------------------------- the folder
def test_export_folder_has_every_file_and_a_complete_config(exported):
    folder = exported["memory_plus_shared_pool"][1]
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "config.json", "generation_config.json", "configuration_memzoo.py", "modeling_memzoo.py",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST_FILE, *shipped_files(),
    ])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "memzoo"
    assert config["auto_map"] == {"AutoConfig": "configuration_memzoo.MemzooConfig",
                                  "AutoModelForCausalLM": "modeling_memzoo.MemzooForCausalLM"}
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (32, 3, 4)
    assert config["tie_word_embeddings"] is False and config["eos_token_id"] == 256
    assert [b["block"] for b in config["blocks"]] == ["product_key_memory", "dense", "product_key_memory"]
    assert config["blocks"][0] == {  # every constructor argument, resolved (k_dim, value_dim, output_proj, n_keys)
        "block": "product_key_memory", "heads": 2, "knn": 4, "k_dim": 16, "query_norm": "layernorm",
        "qk_norm": True, "score": "softmax", "per_head_keys": True, "gate": "silu", "output_proj": True,
        "bias": False, "n_keys": 8, "value_dim": 40, "value_dropout": 0.0, "pool": "shared", "update": None,
        "lr": None, "weight_decay": None,
    }
    assert ModelConfig.from_dict(config["architecture"]) == exported["memory_plus_shared_pool"][0].config
    assert config["pools"] == {"shared": {"kind": "memory", "n_keys": 8, "value_dim": 40}}
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["memzoo_version"] == memzoo.__version__
    assert list(manifest["files"]) == ["model.safetensors"] and len(manifest["files"]["model.safetensors"]["sha256"]) == 64
    package = Path(memzoo.__file__).parent
    assert (folder / "modeling_memzoo.py").read_bytes() == (package / "export/hf_files/modeling_memzoo.py").read_bytes()
    assert {"memzoo_model_transformer.py", "memzoo_blocks_memory.py", "memzoo_ops_product_keys.py"} <= set(
        shipped_files())  # memzoo's own model source (tests/test_export_shipped_code.py checks it in full)


def test_shared_pool_is_stored_once_and_tied_head_is_not_stored(exported):
    with safe_open(str(exported["memory_plus_shared_pool"][1] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "pools.shared.values" in names
    assert not [n for n in names if n.startswith("layers.") and n.endswith(".values")]
    assert "head.weight" in names  # untied here
    with safe_open(str(exported["dense"][1] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "head.weight" not in names and "embed.weight" in names


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lightning_memzoo_and_hf_logits_agree(exported, family):
    model, folder = exported[family]
    ids = prompt_ids()
    with torch.no_grad():
        expected = model(ids)
        mine = memzoo.load_pretrained(folder)(ids)
        theirs = hf_model(folder)(ids).logits
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_and_uncached_greedy_generation_agree_in_memzoo_and_hf(exported, family):
    _, folder = exported[family]
    ids = prompt_ids(length=6)
    model = memzoo.load_pretrained(folder)
    cached = model.generate(ids, max_new_tokens=10, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=10, use_cache=False)
    assert torch.equal(cached, uncached)
    hf = hf_model(folder)
    hf.generation_config.eos_token_id = None  # compare all 10 steps, as memzoo's (eos-free) generate does
    with torch.no_grad():
        hf_cached = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
        hf_uncached = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                  use_cache=False)
    assert torch.equal(hf_cached, hf_uncached)
    assert torch.equal(hf_cached, cached)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["memory_plus_shared_pool", "peer", "moe"])
def test_on_cuda_memzoo_kernels_and_hf_plain_torch_agree(exported, family):
    """On a GPU memzoo reads memories with its Triton kernels, the HF code with embedding_bag: same logits."""
    model, folder = exported[family]
    ids = prompt_ids()
    with torch.no_grad():
        reference = model(ids)
        mine = memzoo.load_pretrained(folder).cuda()(ids.cuda())
        hf = hf_model(folder).cuda()
        theirs = hf(ids.cuda()).logits
        mask = torch.ones_like(ids).cuda()
        cached = hf.generate(ids.cuda(), attention_mask=mask, max_new_tokens=8, do_sample=False)
        uncached = hf.generate(ids.cuda(), attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False)
    torch.testing.assert_close(mine.cpu(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(theirs.cpu(), reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(cached, uncached)


def test_hf_cache_is_a_dynamic_cache_and_continues_a_prefix(exported):
    folder = exported["memory_plus_shared_pool"][1]
    hf = hf_model(folder)
    ids = prompt_ids(length=12)
    with torch.no_grad():
        full = hf(ids).logits
        first = hf(ids[:, :7], use_cache=True)
        assert isinstance(first.cache, transformers.DynamicCache) and first.cache.get_seq_length() == 7
        rest = hf(ids[:, 7:], cache=first.cache, use_cache=True)  # a 5-token chunk after a 7-token prefix
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, rtol=1e-5, atol=1e-5)


def test_hf_left_padded_batch_matches_each_prompt_alone(exported):
    folder = exported["dense"][1]
    hf = hf_model(folder)
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[9, 8, 7, 6, 5]])
    batch = torch.tensor([[257, 257, 5, 6, 7], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = hf(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded[0, 2:], hf(short).logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(padded[1], hf(long).logits[0], rtol=1e-5, atol=1e-5)


def test_hf_loss_is_next_token_cross_entropy(exported):
    hf = hf_model(exported["dense"][1])
    ids = prompt_ids()
    with torch.no_grad():
        out = hf(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_checkpoint_written_by_a_lightning_trainer_exports(tmp_path):
    """The real path: fit a step with the atomic CheckpointIO, save with the Trainer, export the .ckpt."""
    torch.manual_seed(0)
    lm = LanguageModel(ModelConfig(**BASE, **FAMILIES["memory_plus_shared_pool"]), warmup_steps=0)
    ids = torch.randint(0, 256, (4, 16))
    loader = DataLoader([{"input_ids": ids[i], "labels": ids[i]} for i in range(4)], batch_size=2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        default_root_dir=tmp_path)
    trainer.fit(lm, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    folder = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "export", tokenizer="byte")
    lm.eval()
    with torch.no_grad():
        expected = lm(ids)
        torch.testing.assert_close(memzoo.load_pretrained(folder)(ids), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(hf_model(folder)(ids).logits, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- dtypes, shards
def test_bfloat16_export_loads_in_memzoo_and_hf(exported, tmp_path):
    model, _ = exported["memory_plus_shared_pool"]
    folder = export_model(model, tmp_path / "bf16", tokenizer="byte", dtype="bfloat16")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor("pools.shared.values").dtype == torch.bfloat16
    ids = prompt_ids()
    with torch.no_grad():
        reference = model(ids)
        loaded = memzoo.load_pretrained(folder)
        assert loaded.embed.weight.dtype == torch.bfloat16
        mine = loaded(ids)
        hf = hf_model(folder)
        assert hf.dtype == torch.bfloat16
        theirs = hf(ids).logits
    scale = reference.abs().max()
    assert (mine - reference).abs().max() < 0.05 * scale
    assert (theirs - reference).abs().max() < 0.05 * scale
    # fp32 load of the bf16 weights
    assert memzoo.load_pretrained(folder, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_sharded_export_writes_an_index_and_loads(exported, tmp_path):
    model, _ = exported["product_key_memory"]
    folder = export_model(model, tmp_path / "sharded", tokenizer="byte", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert all((folder / s).stat().st_size <= 20_000 or len(safe_open(str(folder / s), "pt").keys()) == 1
               for s in shards)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {*shards, "model.safetensors.index.json"}
    ids = prompt_ids()
    with torch.no_grad():
        torch.testing.assert_close(memzoo.load_pretrained(folder)(ids), model(ids), rtol=0, atol=1e-6)
        torch.testing.assert_close(hf_model(folder)(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_hf_model_saves_again_and_builds_fresh_from_its_config(exported, tmp_path):
    model, folder = exported["peer"]
    hf = hf_model(folder)
    hf.save_pretrained(tmp_path / "resaved")
    ids = prompt_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path / "resaved")(ids).logits, model(ids), rtol=1e-5, atol=1e-5)
    fresh = transformers.AutoModelForCausalLM.from_config(hf.config, trust_remote_code=True)
    pool = fresh.pools["experts"].down
    assert abs(pool.std().item() - 32**-0.5) < 0.02  # tables ~ N(0, value_dim^-1/2)
    assert torch.equal(fresh.layers[0].ffn.router.query_norm.running_var, torch.ones(2 * 16))
    assert abs(fresh.layers[0].ffn.router.sub_keys.std().item() - 8**-0.5) < 0.05  # N(0, (k_dim/2)^-1/2)
    assert fresh.head.weight is fresh.embed.weight


def test_pool_tables_export_with_the_right_kind(exported):
    model = memzoo.load_pretrained(exported["peer"][1])
    pool = model.pools["experts"]
    assert isinstance(pool, MemoryPool) and pool.kind == "experts" and set(pool.tables()) == {"down", "up"}


# ---------------------------------------------------------------------------------------------- without memzoo
ISOLATED_CHECK = textwrap.dedent("""
    import importlib.util, os, sys
    sys.path = [p for p in sys.path if not os.path.isdir(os.path.join(p, "memzoo"))]
    assert importlib.util.find_spec("memzoo") is None, "memzoo is importable in the isolated interpreter"
    try:
        import memzoo  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("import memzoo works in the isolated interpreter")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    expected = torch.load(sys.argv[1])
    for family, (ids, logits) in expected.items():
        model = AutoModelForCausalLM.from_pretrained(family, trust_remote_code=True)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
        assert AutoTokenizer.from_pretrained(family)("h\\u00e9")["input_ids"] == [104, 195, 169]
    assert not [m for m in sys.modules if m == "memzoo" or m.startswith("memzoo.")]
    print("isolated ok", len(expected))
""")


@pytest.mark.slow
def test_export_loads_in_an_interpreter_without_memzoo(exported, tmp_path):
    expected = {}
    ids = prompt_ids()
    for family, (model, folder) in exported.items():
        shutil.copytree(folder, tmp_path / family)
        with torch.no_grad():
            expected[family] = (ids, model(ids))
    torch.save(expected, tmp_path / "expected.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    result = subprocess.run([sys.executable, "-I", "-c", ISOLATED_CHECK, "expected.pt"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"isolated ok {len(FAMILIES)}" in result.stdout


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
def test_export_folder_and_weights_follow_the_umask(exported):
    from memzoo.atomic import current_umask

    folder = next(iter(exported.values()))[1]
    mask = current_umask()
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask
    for file in folder.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file
