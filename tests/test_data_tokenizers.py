"""Tokenizers: byte-level round trips, Hugging Face tokenizer.json files, specs and their errors."""

import json

import pytest

from memzoo.data import ByteTokenizer, HFTokenizer, build_tokenizer
from memzoo.data.tokenizers import Tokenizer

TEXTS = ["", "hello world", "Grüße, 世界! 🙂", "tabs\tand\nnewlines", "a" * 1000]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_specials_are_skipped_and_constants():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.spec) == (258, 256, 257, "byte")
    assert tok.decode([256, *b"ab", 257, *b"c", 256]) == "abc"
    assert isinstance(tok, Tokenizer)


def test_byte_invalid_utf8_is_replaced_and_bad_ids_raise():
    tok = ByteTokenizer()
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="id 258.*0..257"):
        tok.decode([1, 258])
    with pytest.raises(ValueError, match="id -1"):
        tok.decode([-1])


def test_equality_by_spec():
    assert ByteTokenizer() == ByteTokenizer() == build_tokenizer("byte")
    assert hash(ByteTokenizer()) == hash(build_tokenizer("byte"))


def _train_tokenizer(path, specials=("<|endoftext|>", "<pad>")):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, said the fox"] * 20, trainer)
    tok.save(str(path))
    return path


@pytest.fixture
def tokenizer_json(tmp_path):
    return _train_tokenizer(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("text", TEXTS)
def test_hf_round_trip(tokenizer_json, text):
    tok = HFTokenizer(tokenizer_json)
    assert tok.decode(tok.encode(text)) == text


def test_hf_specials_found_skipped_and_not_added(tokenizer_json):
    tok = build_tokenizer(str(tokenizer_json))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<pad>")
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    ids = tok.encode("the fox")
    assert tok.eos_id not in ids and tok.pad_id not in ids  # encode adds no specials
    assert tok.decode([tok.eos_id, *ids, tok.pad_id]) == "the fox"
    assert tok.vocab_size == tok._tokenizer.get_vocab_size(with_added_tokens=True) > 256
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # half a UTF-8 character


def test_hf_spec_is_absolute_and_rebuilds(tokenizer_json, monkeypatch):
    monkeypatch.chdir(tokenizer_json.parent)
    relative = build_tokenizer("tokenizer.json")
    assert relative.spec == str(tokenizer_json.resolve())
    assert build_tokenizer(relative.spec) == relative
    assert build_tokenizer(str(tokenizer_json.parent)) == relative  # a folder holding tokenizer.json
    assert relative != ByteTokenizer()


def test_hf_explicit_tokens_and_config(tokenizer_json):
    tok = HFTokenizer(tokenizer_json, eos_token="<pad>")
    assert tok.eos_id == 1 and tok.spec.endswith("?eos=%3Cpad%3E")
    rebuilt = build_tokenizer(tok.spec)
    assert rebuilt == tok and rebuilt.eos_id == 1
    assert tok != HFTokenizer(tokenizer_json)
    (tokenizer_json.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert HFTokenizer(tokenizer_json).eos_token == "<pad>"
    (tokenizer_json.parent / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="could not read .*tokenizer_config.json .*fix or remove it"):
        HFTokenizer(tokenizer_json)


def test_hf_pad_defaults_to_eos(tmp_path):
    tok = HFTokenizer(_train_tokenizer(tmp_path / "t.json", specials=("</s>",)))
    assert tok.eos_token == tok.pad_token == "</s>"


def test_hf_without_known_eos_says_how_to_set_it(tmp_path):
    path = _train_tokenizer(tmp_path / "t.json", specials=("<weird>",))
    with pytest.raises(ValueError, match=r"ends a document.*<weird>.*eos_token"):
        HFTokenizer(path)
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in the vocabulary"):
        HFTokenizer(path, eos_token="<nope>")
    assert build_tokenizer(f"{path}?eos=%3Cweird%3E").eos_token == "<weird>"


def test_bad_specs_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'nowhere\.json'.*looked for .*nowhere\.json"):
        build_tokenizer("nowhere.json")
    with pytest.raises(ValueError, match="'byte' or a path"):
        build_tokenizer("")
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        HFTokenizer(tmp_path)  # a folder without tokenizer.json
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(ValueError, match="could not read .*corrupt.json as a Hugging Face tokenizer.json"):
        build_tokenizer(str(corrupt))
    good = _train_tokenizer(tmp_path / "good.json")
    with pytest.raises(ValueError, match=r"unknown options \['bos'\]"):
        build_tokenizer(f"{good}?bos=x")
