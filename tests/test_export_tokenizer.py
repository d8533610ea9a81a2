"""Tokenizer files of an export: ``AutoTokenizer.from_pretrained(folder)`` gives memzoo's ids for any text, and
``memzoo.load_tokenizer`` gives memzoo's tokenizer back."""

import json

import pytest
import torch

import memzoo
from memzoo.data.tokenizers import ByteTokenizer, HFTokenizer
from memzoo.export.hf import export_model
from memzoo.export.tokenizer_files import byte_to_character
from memzoo.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "héllo wörld — naïve café",
    "中文字符 and 日本語のテキスト",
    "emoji 🎉👩‍👩‍👧 flags 🇫🇷",
    "e\u0301 combining, \u200b zero-width, \ufeff bom",
    "tabs\tnew\nlines\r\nnul\x00 del\x7f",
    "<|endoftext|> and <|pad|> as plain text",
    "",
]


def tiny(vocab_size=258) -> Transformer:
    return Transformer(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32)


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):
    return export_model(tiny(), tmp_path_factory.mktemp("tok") / "export", tokenizer="byte")


def test_byte_characters_are_256_distinct_printable_characters():
    table = byte_to_character()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] != " "


@pytest.mark.parametrize("text", TEXTS)
def test_auto_tokenizer_ids_equal_byte_tokenizer_ids(byte_export, text):
    hf = transformers.AutoTokenizer.from_pretrained(byte_export)
    mine = ByteTokenizer()
    ids = hf(text)["input_ids"]
    assert ids == mine.encode(text) == list(text.encode("utf-8"))
    assert hf.decode(ids) == text == mine.decode(ids)


def test_every_single_byte_decodes_as_memzoo_does(byte_export):
    hf = transformers.AutoTokenizer.from_pretrained(byte_export)
    mine = ByteTokenizer()
    for b in range(256):
        assert hf.decode([b]) == mine.decode([b]), b  # invalid UTF-8 → U+FFFD in both
    assert hf.decode([0xE2, 0x82]) == mine.decode([0xE2, 0x82]) == "\ufffd"


def test_special_tokens_have_memzoo_ids(byte_export):
    hf = transformers.AutoTokenizer.from_pretrained(byte_export)
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token, hf.pad_token_id) == ("<|endoftext|>", 256, "<|pad|>", 257)
    assert len(hf) == 258
    assert hf.decode([104, 256, 105, 257], skip_special_tokens=True) == ByteTokenizer().decode([104, 256, 105, 257])


def test_load_tokenizer_returns_memzoo_byte_tokenizer(byte_export):
    assert memzoo.load_tokenizer(byte_export) == ByteTokenizer()
    model, tokenizer = memzoo.load_pretrained(byte_export, with_tokenizer=True)
    assert isinstance(model, Transformer) and tokenizer == ByteTokenizer()


@pytest.fixture
def word_tokenizer_json(tmp_path):
    """A small Hugging Face tokenizer.json (word level, whitespace split) with [EOS]/[PAD] specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", ".", "[EOS]", "[PAD]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["[EOS]", "[PAD]"])
    path = tmp_path / "word" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_hf_tokenizer_is_copied_and_round_trips(tmp_path, word_tokenizer_json):
    source = HFTokenizer(word_tokenizer_json, eos_token="[EOS]", pad_token="[PAD]")
    folder = export_model(tiny(vocab_size=12), tmp_path / "export", tokenizer=source)
    assert (folder / "tokenizer.json").read_bytes() == word_tokenizer_json.read_bytes()
    assert json.loads((folder / "memzoo_manifest.json").read_text())["tokenizer"] == "tokenizer.json"
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    text = "the cat sat on the mat ."
    assert hf(text)["input_ids"] == source.encode(text) == [1, 2, 3, 4, 1, 5, 6]
    assert (hf.eos_token_id, hf.pad_token_id) == (source.eos_id, source.pad_id) == (7, 8)
    loaded = memzoo.load_tokenizer(folder)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.encode(text), loaded.eos_id, loaded.pad_id) == (source.encode(text), 7, 8)
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert config["eos_token_id"] == generation["eos_token_id"] == 7


def test_generation_config_carries_sampling_defaults(tmp_path):
    folder = export_model(tiny(), tmp_path / "a", tokenizer="byte",
                          generation={"max_new_tokens": 20, "temperature": 0.7, "top_k": None})
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"eos_token_id": 256, "pad_token_id": 257, "max_new_tokens": 20, "do_sample": True,
                          "temperature": 0.7, "top_k": 0}
    config = transformers.GenerationConfig.from_pretrained(folder)
    assert config.do_sample and config.temperature == 0.7 and config.top_k == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    prompt = torch.tensor([[104, 105]])

    def sample(seed):
        torch.manual_seed(seed)
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8).tolist()

    assert sample(0) == sample(0) != sample(1)  # the folder's defaults make generate() sample
