"""Export and load failures: each raises a clear error naming the file (or block) and the fix, and a failed or
refused export never damages what was at ``--out``."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import memzoo
from memzoo.blocks.dense import DenseMLP
from memzoo.cli import main
from memzoo.export.checkpoint_check import CheckpointError
from memzoo.export.errors import ExportError, PretrainedFormatError
from memzoo.export.hf import export_checkpoint, export_model
from memzoo.export.manifest import MANIFEST_FILE
from memzoo.export.weights import parse_size
from memzoo.model.transformer import Transformer

ARCHITECTURE = {"vocab_size": 258, "dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                "block_args": {"hidden": 24}}
HPARAMS = {"architecture": ARCHITECTURE}


def tiny_model() -> Transformer:
    return Transformer(**ARCHITECTURE).eval()


def save_checkpoint(model: Transformer, path: Path, hparams: dict | None = None, **extra) -> Path:
    state_dict = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state_dict, "hyper_parameters": hparams or HPARAMS, **extra}, path)
    return path


@pytest.fixture
def export_dir(tmp_path) -> Path:
    return export_model(tiny_model(), tmp_path / "export", tokenizer="byte")


# ---------------------------------------------------------------------------------------------- loading
def test_truncated_weight_file_is_named(export_dir):
    weights = export_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PretrainedFormatError, match=r"model\.safetensors has \d+ bytes.*truncated"):
        memzoo.load_pretrained(export_dir)
    with pytest.raises(PretrainedFormatError, match=r"model\.safetensors cannot be read .*truncated or corrupted"):
        memzoo.load_pretrained(export_dir, verify=False)  # safetensors' own parse error, still naming the file


def test_flipped_bytes_fail_the_checksum(export_dir):
    weights = export_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # inside a tensor: same size, still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(PretrainedFormatError, match=r"model\.safetensors fails its SHA-256 check"):
        memzoo.load_pretrained(export_dir)


@pytest.mark.parametrize("version, hint", [(2, "newer memzoo: upgrade"), ("one", "export the model again")])
def test_unknown_format_version_is_refused(export_dir, version, hint):
    manifest = json.loads((export_dir / MANIFEST_FILE).read_text())
    manifest["format_version"] = version
    (export_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PretrainedFormatError, match=f"memzoo_manifest.json: format_version .*{hint}"):
        memzoo.load_pretrained(export_dir)
    with pytest.raises(PretrainedFormatError, match="format_version"):
        memzoo.load_tokenizer(export_dir)


def test_folder_without_manifest_or_weights_is_refused(export_dir, tmp_path):
    with pytest.raises(PretrainedFormatError, match="is not a folder"):
        memzoo.load_pretrained(tmp_path / "nowhere")
    (export_dir / "model.safetensors").unlink()
    with pytest.raises(PretrainedFormatError, match=r"weight file .*model\.safetensors is missing"):
        memzoo.load_pretrained(export_dir)
    (export_dir / MANIFEST_FILE).unlink()
    with pytest.raises(PretrainedFormatError, match="memzoo_manifest.json not found: .* not a memzoo export"):
        memzoo.load_pretrained(export_dir)


def test_config_that_does_not_fit_the_weights_is_named(export_dir):
    original = json.loads((export_dir / "config.json").read_text())
    config = json.loads(json.dumps(original))
    config["blocks"][1]["hidden"] = 40  # blocks no longer what the architecture builds
    (export_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedFormatError, match=r"layer 1 was exported as .*fields \['hidden'\] differ"):
        memzoo.load_pretrained(export_dir)
    config["architecture"]["block_args"]["hidden"] = 40  # consistent, but not what the weights hold
    for block in config["blocks"]:
        block["hidden"] = 40
    (export_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedFormatError, match=r"(?s)do not fit the architecture in .*config\.json.*size mismatch"):
        memzoo.load_pretrained(export_dir)
    del config["blocks"], config["architecture"]
    (export_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(PretrainedFormatError, match=r"config\.json lacks the field 'blocks'"):
        memzoo.load_pretrained(export_dir)


# ---------------------------------------------------------------------------------------------- exporting
def test_checkpoint_whose_weights_do_not_fit_its_hyperparameters(tmp_path):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "bad.ckpt", hparams={"architecture": {**ARCHITECTURE, "block_args": {"hidden": 32}}})
    with pytest.raises(ExportError, match=r"bad\.ckpt: its weights do not fit the architecture"):
        export_checkpoint(ckpt, tmp_path / "out", tokenizer="byte")
    assert not (tmp_path / "out").exists()


def test_truncated_or_foreign_checkpoint_is_named(tmp_path):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "x.ckpt")
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"x\.ckpt"):
        export_checkpoint(ckpt, tmp_path / "out", tokenizer="byte")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.ckpt")
    with pytest.raises(ExportError, match=r"foreign\.ckpt is not a memzoo Lightning checkpoint"):
        export_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "out", tokenizer="byte")


class CustomBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


class DenseSubclass(DenseMLP):
    """Same parameters as dense, but may compute something else: not exportable as dense."""


@pytest.mark.parametrize("block", [CustomBlock, DenseSubclass])
def test_a_block_without_hf_code_is_refused_by_name(tmp_path, block):
    model = tiny_model()
    model.layers[1].ffn = block(16)
    with pytest.raises(ExportError, match=f"layer 1's block .*{block.__name__} cannot be exported.*dense, moe"):
        export_model(model, tmp_path / "out", tokenizer="byte")
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left


def test_out_must_be_empty_unless_overwrite_and_overwrite_replaces_only_exports(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not empty; pass --overwrite"):
        export_model(tiny_model(), out, tokenizer="byte")
    with pytest.raises(ExportError, match="not a memzoo export .* remove it yourself"):
        export_model(tiny_model(), out, tokenizer="byte", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(tiny_model(), tmp_path / "file", tokenizer="byte")


def test_overwrite_replaces_an_earlier_export(tmp_path):
    first, second = tiny_model(), tiny_model()
    out = export_model(first, tmp_path / "out", tokenizer="byte")
    with pytest.raises(ExportError, match="is not empty"):
        export_model(second, out, tokenizer="byte")
    export_model(second, out, tokenizer="byte", overwrite=True)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(memzoo.load_pretrained(out)(ids), second(ids), rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or replaced folders left


def test_failed_export_leaves_the_earlier_export_intact(tmp_path, monkeypatch):
    out = export_model(tiny_model(), tmp_path / "out", tokenizer="byte")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("memzoo.export.hf.save_weights", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(tiny_model(), out, tokenizer="byte", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ExportError, match="dtype 'int8' is not one of"):
        export_model(tiny_model(), tmp_path / "a", tokenizer="byte", dtype="int8")
    with pytest.raises(ExportError, match="shard size '5 parsecs' is not a size"):
        export_model(tiny_model(), tmp_path / "a", tokenizer="byte", max_shard_size="5 parsecs")
    small = Transformer(vocab_size=100, dim=16, n_layers=1, n_heads=2, max_seq_len=16)
    with pytest.raises(ExportError, match="tokenizer 'byte' has 258 ids but the model only 100"):
        export_model(small, tmp_path / "a", tokenizer="byte")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("text, size", [("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5kb", 1500), (64, 64)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_tokenizer_comes_from_the_run_config_or_must_be_given(tmp_path):
    run = tmp_path / "runs" / "exp" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = save_checkpoint(tiny_model(), run / "checkpoints" / "last.ckpt")
    with pytest.raises(ExportError, match="does not record its tokenizer.*--tokenizer byte"):
        export_checkpoint(ckpt, tmp_path / "out")
    (run / "config.yaml").write_text("data:\n  class_path: memzoo.FactsDataModule\n  init_args:\n    tokenizer: byte\n")
    folder = export_checkpoint(ckpt, tmp_path / "out")
    assert json.loads((folder / MANIFEST_FILE).read_text())["tokenizer"] == "byte"
    ckpt2 = save_checkpoint(tiny_model(), tmp_path / "dm.ckpt", datamodule_hyper_parameters={"tokenizer": "byte"})
    assert export_checkpoint(ckpt2, tmp_path / "out2").is_dir()


# ---------------------------------------------------------------------------------------------- the CLI verb
def test_export_verb_writes_a_folder_and_reports_errors(tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "m.ckpt")
    out = main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--tokenizer", "byte",
                "--dtype", "bfloat16", "--max-shard-size", "10KB"])
    assert "exported" in capsys.readouterr().out
    assert (out / "model.safetensors.index.json").is_file()
    assert memzoo.load_pretrained(out).embed.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="memzoo export: --out .* is not empty; pass --overwrite"):
        main(["export", "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", "byte"])
    main(["export", "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", "byte", "--overwrite"])
    assert not (out / "model.safetensors.index.json").exists()  # replaced by the unsharded float32 export
    with pytest.raises(SystemExit, match="memzoo export: checkpoint .*missing.ckpt.* does not exist"):
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
