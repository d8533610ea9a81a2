"""Streaming generation: KV-cached token stream equals the model's own generate, text pieces never split a
character, and ``memzoo generate`` streams to the terminal."""

import io
import json

import pytest
import torch

import memzoo
from memzoo.cli import CommandError, main
from memzoo.data.tokenizers import ByteTokenizer
from memzoo.export.hf import export_model
from memzoo.export.streaming import TextStream, generate_tokens
from memzoo.model.transformer import Transformer


def tiny_model() -> Transformer:
    torch.manual_seed(3)
    return Transformer(vocab_size=258, dim=32, n_layers=2, n_heads=4, max_seq_len=40,
                       layers={1: {"block": "product_key_memory", "n_keys": 8, "heads": 2, "knn": 4}}).eval()


# ---------------------------------------------------------------------------------------------- text pieces
@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "日本語 🎉 ok", "🎉", "a\u0301"])
def test_pieces_join_to_the_text_and_never_hold_a_partial_character(text):
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in text.encode("utf-8")] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_a_multibyte_character_appears_with_its_last_byte():
    stream = TextStream(ByteTokenizer())
    assert [stream.push(b) for b in "é!".encode()] == ["", "é", "!"]
    assert [stream.push(b) for b in "🎉".encode()] == ["", "", "", "🎉"]


def test_invalid_bytes_come_out_as_replacement_characters():
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in [0xFF, ord("a"), 0xE2, 0x82]]
    assert pieces == ["", "\ufffda", "", ""]  # a trailing U+FFFD waits: it may be a character's start
    assert stream.flush() == "\ufffd"  # the incomplete E2 82 at the end
    assert stream.flush() == ""
    assert "".join(pieces) + "\ufffd" == ByteTokenizer().decode([0xFF, ord("a"), 0xE2, 0x82])


def test_special_tokens_add_no_text():
    stream = TextStream(ByteTokenizer())
    assert [stream.push(i) for i in (104, 256, 105)] == ["h", "", "i"]


# ---------------------------------------------------------------------------------------------- token stream
def test_cached_stream_equals_uncached_greedy_generate():
    model = tiny_model()
    prompt = [256, *b"once upon"]
    streamed = list(generate_tokens(model, prompt, max_new_tokens=12))
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, use_cache=False)[0, len(prompt):]
    assert streamed == reference.tolist() and len(streamed) == 12


def test_seeded_sampling_equals_generate_with_the_same_seed():
    model = tiny_model()
    prompt = [256, *b"abc"]
    streamed = list(generate_tokens(model, prompt, 10, temperature=0.9, top_k=20,
                                    generator=torch.Generator().manual_seed(5)))
    reference = model.generate(torch.tensor([prompt]), 10, temperature=0.9, top_k=20,
                               generator=torch.Generator().manual_seed(5))[0, len(prompt):]
    assert streamed == reference.tolist()
    other = list(generate_tokens(model, prompt, 10, temperature=0.9, top_k=20,
                                 generator=torch.Generator().manual_seed(6)))
    assert other != streamed


def test_stream_stops_after_eos_and_at_max_seq_len():
    model = tiny_model()
    prompt = [256, *b"xyz"]
    first = next(generate_tokens(model, prompt, 5))
    assert list(generate_tokens(model, prompt, 5, eos_id=first)) == [first]
    long_prompt = [65] * 35
    assert len(list(generate_tokens(model, long_prompt, 50))) == 40 - 35


def test_stream_refuses_bad_prompts():
    model = tiny_model()
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        list(generate_tokens(model, [], 3))
    with pytest.raises(ValueError, match="max_seq_len=40"):
        list(generate_tokens(model, [1] * 40, 3))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        list(generate_tokens(model, [1], -1))


# ---------------------------------------------------------------------------------------------- the CLI verb
class RecordingStdout(io.StringIO):
    """Counts writes, to see that the text arrives piece by piece."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def export_dir(tmp_path):
    return export_model(tiny_model(), tmp_path / "export", tokenizer="byte")


def test_generate_verb_streams_the_greedy_continuation(export_dir, monkeypatch):
    stdout = RecordingStdout()
    monkeypatch.setattr("sys.stdout", stdout)
    text = main(["generate", "--model", str(export_dir), "--prompt", "héllo", "--max-new-tokens", "8"])
    model = memzoo.load_pretrained(export_dir)
    prompt = [256, *"héllo".encode()]
    expected_ids = model.generate(torch.tensor([prompt]), 8, eos_id=256)[0, len(prompt):].tolist()
    expected_ids = expected_ids[: expected_ids.index(256) + 1] if 256 in expected_ids else expected_ids
    assert text == ByteTokenizer().decode(expected_ids)
    assert stdout.getvalue() == "héllo" + text + "\n"
    assert len(stdout.writes) >= 1 + len(expected_ids)  # the prompt, then a write per token (some empty)


def test_generate_verb_sampling_is_reproducible_with_a_seed(export_dir, capsys):
    args = ["generate", "--model", str(export_dir), "--prompt", "", "--max-new-tokens", "12",
            "--temperature", "1.0", "--top-k", "50"]
    first = main([*args, "--seed", "1"])
    assert main([*args, "--seed", "1"]) == first
    assert main([*args, "--seed", "2"]) != first


def test_generate_verb_reports_a_bad_folder(tmp_path):
    with pytest.raises(CommandError, match="generate: .*not a folder"):
        main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"])


def test_a_prompt_longer_than_the_context_keeps_its_end_and_says_so(export_dir, capsys):
    from memzoo.model.sampling import prompt_tokens_to_keep

    assert prompt_tokens_to_keep(10, 5, 40) == 10 and prompt_tokens_to_keep(50, 5, 40) == 35
    assert prompt_tokens_to_keep(50, 0, 40) == 39
    with pytest.raises(ValueError, match="ask for at most 39 new tokens"):
        prompt_tokens_to_keep(3, 40, 40)
    prompt = "a long prompt that does not fit " * 2  # 64 bytes + eos, the model reads 40 tokens
    text = main(["generate", "--model", str(export_dir), "--prompt", prompt, "--max-new-tokens", "20"])
    err = capsys.readouterr().err
    assert "memzoo: warning: the prompt has 65 tokens; with max_new_tokens=20 only its last 20 fit" in err
    model = memzoo.load_pretrained(export_dir)
    kept = list(prompt.encode())[-20:]
    expected = model.generate(torch.tensor([kept]), 20, eos_id=256)[0, 20:].tolist()
    expected = expected[: expected.index(256) + 1] if 256 in expected else expected
    assert text == ByteTokenizer().decode(expected) and len(expected) == 20 or 256 in expected
    with pytest.raises(CommandError, match="ask for at most 39 new tokens"):
        main(["generate", "--model", str(export_dir), "--prompt", "x", "--max-new-tokens", "40"])


def test_readme_snippets_run_as_written_and_hf_generate_agrees_with_memzoo_generate(export_dir, tmp_path, capsys):
    """The README's Python blocks under "Using a trained model elsewhere", run as written in a fresh
    non-interactive interpreter next to a folder named my-model: no custom-code prompt, and the printed Hugging Face
    continuation equals `memzoo generate`'s."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using a trained model elsewhere", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2 and "trust_remote_code=True)" in blocks[0].splitlines()[2]
    shutil.copytree(export_dir, tmp_path / "my-model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    done = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[y/N]" not in done.stdout + done.stderr
    ours = main(["generate", "--model", str(tmp_path / "my-model"), "--prompt", "The birth year of",
                 "--max-new-tokens", "20"])
    assert done.stdout == ours + "\n"  # the snippet's only output is its print


def test_default_number_of_new_tokens_fits_the_context():
    from memzoo.model.sampling import default_max_new_tokens

    assert default_max_new_tokens(18, 64) == 46  # the quickstart model, "The birth year of" after eos
    assert default_max_new_tokens(1, 64) == 63  # an empty prompt
    assert default_max_new_tokens(1, 1024) == 64 and default_max_new_tokens(5, 40, configured=8) == 8
    assert default_max_new_tokens(100, 64) == 32  # a prompt filling the context is cut to leave half of it
    assert default_max_new_tokens(1, 1) == 0
    for prompt_len in range(1, 90):
        for max_seq_len in (1, 2, 40, 64):
            n = default_max_new_tokens(prompt_len, max_seq_len)
            assert 0 <= n < max_seq_len or max_seq_len == 1


def test_generate_without_max_new_tokens_fits_a_model_whose_default_fills_its_context(tmp_path, capsys):
    """A generation_config.json asking for as many tokens as the context holds (the quickstart export: 64 of 64),
    and an empty prompt: the default is lowered to fit; an explicit number that does not fit names the flag."""
    folder = export_model(tiny_model(), tmp_path / "export", tokenizer="byte", generation={"max_new_tokens": 40})
    assert json.loads((folder / "generation_config.json").read_text())["max_new_tokens"] == 40
    for prompt in ("The birth year of", ""):
        text = main(["generate", "--model", str(folder), "--prompt", prompt])
        model = memzoo.load_pretrained(folder)
        ids = [256, *prompt.encode()]
        expected = model.generate(torch.tensor([ids]), 40 - len(ids), eos_id=256)[0, len(ids):].tolist()
        expected = expected[: expected.index(256) + 1] if 256 in expected else expected
        assert text == ByteTokenizer().decode(expected)
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(CommandError, match="--max-new-tokens=40 does not fit .* at most 39 new tokens with "
                                           "--max-new-tokens"):
        main(["generate", "--model", str(folder), "--prompt", "x", "--max-new-tokens", "40"])


def test_batch_generate_and_streaming_share_one_decode_loop():
    """Transformer.generate and generate_tokens are decode_steps: a batch row stops at eos and is padded with it,
    and the stream of each prompt is that row's tokens."""
    from memzoo.model.decoding import decode_steps

    torch.manual_seed(0)
    model = Transformer(vocab_size=50, dim=16, n_layers=2, n_heads=2, max_seq_len=40).eval()
    prompts = torch.randint(0, 50, (2, 5))
    out = model.generate(prompts, 8)
    eos = int(out[0, 6])  # row 0's second new token: row 0 ends there, row 1 goes on (or ends too)
    stopped = model.generate(prompts, 8, eos_id=eos)
    steps = torch.stack(list(decode_steps(model, prompts, 8, eos_id=eos)), dim=1)
    assert torch.equal(stopped[:, 5:], steps)
    for row in range(2):
        streamed = list(generate_tokens(model, prompts[row].tolist(), 8, eos_id=eos))
        expected = stopped[row, 5:].tolist()
        assert streamed == expected[: expected.index(eos) + 1] if eos in expected else streamed == expected
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        model.generate(prompts, -1)
