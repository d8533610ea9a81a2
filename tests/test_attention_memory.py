"""Attention memory (Extended Mind / Memorizing Transformers): retrieval and attention against a float64 reference that
scores every memory entry (forward and gradients, joint and gated), an empty bank equal to the plain model, causality,
KV-cache decoding, the bank file (round trip, validation), ``memzoo memorize`` and ``generate --memory --cite`` on a
tiny Llama folder, export refusal, config errors."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

import memzoo
from memzoo.cli import CommandError, main
from memzoo.data.tokenizers import build_tokenizer
from memzoo.export.errors import ExportError
from memzoo.export.hf import export_model
from memzoo.model.attention_memory import (
    AttentionMemory,
    AttentionMemoryConfig,
    AttentionMemoryError,
    retrieve,
)
from memzoo.model.config import ModelConfigError
from memzoo.model.memory_bank import MemoryBank, MemoryBankError, recording_memory_attention

os.environ["HF_HUB_OFFLINE"] = "1"


def reference(q, k_loc, v_loc, bank_k, bank_v, topk, q_offset, mode="joint", gate=None, threshold=None,
              distance=0, inv_freq=None):
    """float64, one query and head at a time: cosine similarity with *every* bank entry, sorted, the best ``topk``.
    ``distance``: the bank keys first turned back by ``distance`` positions, as complex numbers ``x_i + i x_{i+hd/2}``
    times ``exp(-i · distance · inv_freq_i)``."""
    q, k_loc, v_loc, bank_k, bank_v = (t.double() for t in (q, k_loc, v_loc, bank_k, bank_v))
    if distance:
        half = bank_k.shape[-1] // 2
        z = torch.complex(bank_k[..., :half], bank_k[..., half:]) * torch.polar(
            torch.ones(half, dtype=torch.float64), -distance * inv_freq.double())
        bank_k = torch.cat([z.real, z.imag], dim=-1)
    B, T, H, hd = q.shape
    C = k_loc.shape[1]
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                c = h // (H // C)
                qv = q[b, t, h]
                cos = torch.stack([qv @ key / (qv.norm() * key.norm()) for key in bank_k[c]]).detach()
                chosen = sorted(range(len(cos)), key=lambda i: -float(cos[i]))[:topk]
                mem_logits = torch.stack([qv @ bank_k[c, i] for i in chosen]) / math.sqrt(hd)
                if threshold is not None:
                    keep = torch.tensor([float(cos[i]) >= threshold for i in chosen])
                    mem_logits = torch.where(keep, mem_logits, torch.tensor(float("-inf"), dtype=torch.float64))
                mem_v = bank_v[c, chosen]
                visible = q_offset + t + 1
                loc_logits = k_loc[b, c, :visible] @ qv / math.sqrt(hd)
                if mode == "joint":
                    p = torch.cat([mem_logits, loc_logits]).softmax(0)
                    out[b, t, h] = p[: len(chosen)] @ mem_v + p[len(chosen):] @ v_loc[b, c, :visible]
                else:
                    g = torch.sigmoid(gate[h].double())
                    p_mem = torch.nan_to_num(mem_logits.softmax(0), nan=0.0)
                    out[b, t, h] = g * (p_mem @ mem_v) + (1 - g) * (loc_logits.softmax(0) @ v_loc[b, c, :visible])
    return out


def memory_module(mode, topk, threshold=None, H=4, C=2, hd=8, N=11, seed=0, duplicates=False, distance=0):
    torch.manual_seed(seed)
    module = AttentionMemory(0, H, C, hd, AttentionMemoryConfig((0,), topk, mode, threshold, distance=distance))
    if module.gate is not None:
        module.gate.data.normal_()
    keys, values = torch.randn(C, N, hd), torch.randn(C, N, hd)
    if duplicates:  # the same key/value stored twice: ties in the ranking pick equal entries
        keys[:, 1], values[:, 1] = keys[:, 0], values[:, 0]
    module.set_bank(keys, values, INV_FREQ)
    return module, keys, values


INV_FREQ = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)


@pytest.mark.parametrize("mode,topk,threshold,offset,duplicates,distance", [
    ("joint", 3, None, 0, False, 0), ("joint", 50, None, 2, False, 0), ("joint", 4, 0.1, 1, True, 0),
    ("gated", 3, None, 0, False, 0), ("gated", 2, 0.3, 3, True, 0), ("joint", 3, None, 1, False, 5000),
    ("gated", 4, 0.1, 0, True, 37),
])
def test_memory_attention_equals_a_float64_reference_forward_and_gradients(mode, topk, threshold, offset, duplicates,
                                                                            distance):
    module, keys, values = memory_module(mode, topk, threshold, duplicates=duplicates, distance=distance)
    B, T, H, C, hd = 2, 5, 4, 2, 8
    q = torch.randn(B, T, H, hd, requires_grad=True)
    k_loc = torch.randn(B, C, offset + T, hd, requires_grad=True)
    v_loc = torch.randn(B, C, offset + T, hd, requires_grad=True)
    y = module(q, k_loc, v_loc, offset)
    gate = module.gate.detach().clone().requires_grad_() if module.gate is not None else None
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k_loc, v_loc))
    expected = reference(q64, k64, v64, keys, values, topk, offset, mode, gate, threshold, distance, INV_FREQ)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    (y.double() * grad).sum().backward()
    (expected * grad).sum().backward()
    for got, want in ((q.grad, q64.grad), (k_loc.grad, k64.grad), (v_loc.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    if gate is not None:
        torch.testing.assert_close(module.gate.grad.double(), gate.grad.double(), rtol=1e-4, atol=1e-5)


def test_retrieval_is_the_exact_top_k_by_cosine_in_chunks(monkeypatch):
    torch.manual_seed(1)
    q, keys = torch.randn(2, 3, 2, 7, 16), torch.randn(3, 500, 16)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    monkeypatch.setattr("memzoo.model.attention_memory._SIMILARITY_CHUNK", 3000)  # several query chunks
    sims, idx = retrieve(q, unit, 5)
    full = torch.einsum("bcgtd,cnd->bcgtn", q / q.norm(dim=-1, keepdim=True), unit)
    expected = full.topk(5, dim=-1)
    assert torch.equal(idx, expected.indices)
    torch.testing.assert_close(sims, expected.values)


def tiny(memory=None, **extra):
    torch.manual_seed(0)
    return memzoo.Transformer(vocab_size=258, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                              attention_memory=memory, **extra).eval()


DOCS = {"a.txt": "the birth year of ada is 1815. " * 3, "b.txt": "a quick brown fox jumps over the lazy dog"}


@pytest.fixture(scope="module")
def bank():
    return MemoryBank.build(tiny(), build_tokenizer("byte"), DOCS, window=32, stride=12)


def test_an_empty_or_missing_bank_is_exactly_the_plain_model(bank):
    ids = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(3))
    plain = tiny()
    with torch.no_grad():
        expected = plain(ids)
        for mode in ("joint", "gated"):
            model = tiny({"layers": "all", "mode": mode})
            model.load_state_dict(plain.state_dict(), strict=False)
            assert torch.equal(model(ids), expected)  # nothing attached
            empty = MemoryBank.build(plain, build_tokenizer("byte"), {"empty": ""})
            assert empty.n_entries == 0
            model.attach_memory(empty)
            assert torch.equal(model(ids), expected)
        plain.attach_memory(bank)
        assert not torch.allclose(plain(ids), expected)  # a real bank changes the logits
        plain.detach_memory()
        assert torch.equal(plain(ids), expected) and plain.config.attention_memory is None


def test_causality_with_a_bank(bank):
    model = tiny()
    model.attach_memory(bank, topk=4)
    ids = torch.randint(0, 258, (1, 24), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 15:] = (changed[0, 15:] + 7) % 258
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :15], model(changed)[:, :15], rtol=0, atol=0)


def test_kv_cache_decoding_equals_recomputation_with_a_bank(bank):
    model = tiny()
    model.attach_memory(bank, topk=5)
    ids = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        caches = model.new_caches(2, 30)
        pieces = [model(ids[:, :12], caches), model(ids[:, 12:20], caches)]  # prefill, a chunk, then tokens
        pieces += [model(ids[:, t : t + 1], caches) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)
    prompt = ids[:, :6]
    assert torch.equal(model.generate(prompt, 12), model.generate(prompt, 12, use_cache=False))


def test_memory_distance_equals_queries_moved_that_far_and_needs_the_frequencies(bank):
    """A query at position p sees memories at distance p + D: with ``distance D`` the model equals the model with
    memories at distance 0 whose tokens sit at positions D, D + 1, ... (local attention depends only on differences)."""
    ids = torch.randint(0, 258, (1, 20), generator=torch.Generator().manual_seed(6))
    near, far = tiny(), tiny()
    near.attach_memory(bank, topk=4)
    far.attach_memory(bank, topk=4, distance=30)
    assert far.config.attention_memory["distance"] == 30
    with torch.no_grad():
        moved = near(ids, positions=torch.arange(30, 50)[None])
        torch.testing.assert_close(far(ids), moved, rtol=0, atol=1e-5)
        assert not torch.allclose(far(ids), near(ids), atol=1e-3)  # the distance matters
    module = AttentionMemory(0, 4, 2, 8, AttentionMemoryConfig((0,), 2, distance=3))
    with pytest.raises(AttentionMemoryError, match="distance 3 needs the layer's rotary frequencies"):
        module.set_bank(torch.randn(2, 5, 8), torch.randn(2, 5, 8))


def test_sink_positions_read_no_memory_and_decode_alike(bank):
    """With ``sink_positions S`` the first S positions are the plain model's (they attend only to each other and
    read no memory); later ones read memory; KV-cache decoding across the boundary equals recomputation."""
    ids = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(7))
    plain, every, sinks = tiny(), tiny(), tiny()
    every.attach_memory(bank, topk=4)
    sinks.attach_memory(bank, topk=4, sink_positions=3)
    assert sinks.config.attention_memory["sink_positions"] == 3
    assert [layer.attn.memory.sink_positions for layer in sinks.layers] == [3, 3, 3]
    with torch.no_grad():
        base, with_sinks, without = plain(ids), sinks(ids), every(ids)
        torch.testing.assert_close(with_sinks[:, :3], base[:, :3], rtol=0, atol=1e-6)
        assert not torch.allclose(without[:, :3], base[:, :3], atol=1e-3)  # otherwise the first positions read memory
        assert not torch.allclose(with_sinks[:, 3:], base[:, 3:], atol=1e-3)
        caches = sinks.new_caches(2, 24)
        pieces = [sinks(ids[:, :2], caches), sinks(ids[:, 2:9], caches)]  # the boundary inside a chunk
        pieces += [sinks(ids[:, t : t + 1], caches) for t in range(9, 24)]
    torch.testing.assert_close(torch.cat(pieces, 1), with_sinks, rtol=0, atol=1e-5)


def test_bank_entries_record_their_origin_and_windows_keep_context():
    model = tiny()
    tok = build_tokenizer("byte")
    text = "x" * 5 + "the bank remembers every token of this document"
    whole = MemoryBank.build(model, tok, {"d": text}, window=64, stride=64)
    windows = MemoryBank.build(model, tok, {"d": text}, window=20, stride=7)
    n = len(text.encode())
    for bank in (whole, windows):
        assert bank.n_entries == n and bank.entry_offset.tolist() == list(range(n)) and bank.layers == [0, 1, 2]
    # the first window's tokens are computed alike; later ones with less context (but at least window - stride)
    torch.testing.assert_close(windows.keys[2][:, :19], whole.keys[2][:, :19], rtol=0, atol=1e-6)
    assert not torch.allclose(windows.keys[2][:, 30:], whole.keys[2][:, 30:])
    torch.testing.assert_close(windows.keys[0], whole.keys[0], rtol=0, atol=1e-6)  # layer 0 keys: token only


def test_a_prefix_is_read_before_every_document_and_not_stored(tmp_path):
    """``prefix``: the same forward passes as a document that starts with it, minus the prefix's entries."""
    model, tok = tiny(), build_tokenizer("byte")
    text, prefix = "the bank remembers every token", "note: "
    for window, stride in ((64, 64), (20, 7)):
        with_prefix = MemoryBank.build(model, tok, {"d": text}, window=window, stride=stride, prefix=prefix)
        as_text = MemoryBank.build(model, tok, {"d": prefix + text}, window=window, stride=stride)
        assert with_prefix.n_entries == len(text) and with_prefix.entry_offset.tolist() == list(range(len(text)))
        assert with_prefix.doc_tokens == [tok.encode(text)]
        for layer in with_prefix.layers:
            assert torch.equal(with_prefix.keys[layer], as_text.keys[layer][:, len(prefix):])
            assert torch.equal(with_prefix.values[layer], as_text.values[layer][:, len(prefix):])
    assert MemoryBank.load(with_prefix.save(tmp_path / "p.bank")).build_settings["prefix"] == prefix
    with pytest.raises(MemoryBankError, match="the prefix is 6 tokens, which leaves no room in a window of 6"):
        MemoryBank.build(model, tok, {"d": text}, window=6, stride=3, prefix=prefix)


def test_bank_round_trips_through_safetensors_and_refuses_other_models(bank, tmp_path):
    path = bank.save(tmp_path / "facts.bank")
    loaded = MemoryBank.load(path)
    for layer in bank.layers:
        assert torch.equal(loaded.keys[layer], bank.keys[layer]) and torch.equal(loaded.values[layer], bank.values[layer])
    assert loaded.doc_names == list(DOCS) and loaded.doc_tokens == bank.doc_tokens
    assert torch.equal(loaded.entry_doc, bank.entry_doc) and torch.equal(loaded.entry_offset, bank.entry_offset)
    ids = torch.randint(0, 258, (1, 16), generator=torch.Generator().manual_seed(6))
    a, b = tiny(), tiny()
    a.attach_memory(bank)
    b.attach_memory(loaded)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))

    other_dims = memzoo.Transformer(vocab_size=258, dim=32, n_layers=3, n_heads=4, max_seq_len=64)
    with pytest.raises(MemoryBankError, match=r"facts\.bank was built for another model \(n_kv_heads 2 vs 4"):
        other_dims.attach_memory(loaded)
    torch.manual_seed(99)
    other_weights = memzoo.Transformer(vocab_size=258, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64)
    with pytest.raises(MemoryBankError, match="built by a model with other weights: layer 0"):
        other_weights.attach_memory(loaded)
    with pytest.raises(MemoryBankError, match=r"holds layers \[0, 1, 2\] but the model's attention_memory has layers \[1\]"):
        tiny({"layers": [1]}).attach_memory(loaded)


def test_damaged_or_foreign_bank_files_name_the_problem(bank, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(MemoryBankError, match="does not exist"):
        MemoryBank.load(tmp_path / "missing.bank")
    (tmp_path / "junk.bank").write_bytes(b"not a safetensors file")
    with pytest.raises(MemoryBankError, match="junk.bank cannot be read as a safetensors memory bank"):
        MemoryBank.load(tmp_path / "junk.bank")
    path = bank.save(tmp_path / "good.bank")
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "v9.bank"), {**metadata, "format_version": "9"})
    with pytest.raises(MemoryBankError, match="v9.bank has bank format version '9'"):
        MemoryBank.load(tmp_path / "v9.bank")
    save_file(tensors, str(tmp_path / "weights.bank"), {"format": "pt"})
    with pytest.raises(MemoryBankError, match="is not a memzoo memory bank"):
        MemoryBank.load(tmp_path / "weights.bank")
    broken = dict(tensors)
    broken["layers.1.values"] = broken["layers.1.values"][:, :-1].contiguous()
    save_file(broken, str(tmp_path / "short.bank"), metadata)
    with pytest.raises(MemoryBankError, match=r"short.bank: layers.1.values has shape"):
        MemoryBank.load(tmp_path / "short.bank")
    del broken["entry_doc"]
    save_file(broken, str(tmp_path / "noorigin.bank"), metadata)
    with pytest.raises(MemoryBankError, match="lacks 'entry_doc'"):
        MemoryBank.load(tmp_path / "noorigin.bank")


def test_config_errors_name_the_bad_value():
    for memory, message in [
        ({"layers": [0], "top_k": 4}, "unknown key.*'top_k' \\(did you mean 'topk'\\?\\)"),
        ({"layers": [5]}, "5 is not a layer index of this 3-layer model"),
        ({"layers": [0, -3]}, "names layer 0 twice"),
        ({"topk": 4}, "needs `layers`"),
        ({"layers": "all", "topk": 0}, "topk must be a positive integer, got 0"),
        ({"layers": "all", "mode": "gate"}, "mode must be one of \\('joint', 'gated'\\), got 'gate'"),
        ({"layers": "all", "similarity_threshold": 2}, "similarity_threshold must be a cosine similarity"),
        ({"layers": "all", "index": "hnsw"}, "index must be one of \\('exact', 'faiss_ivf'\\), got 'hnsw'"),
        ({"layers": "all", "distance": -4}, "distance must be a non-negative integer.*got -4"),
        ({"layers": "all", "sink_positions": 1.5}, "sink_positions must be a non-negative integer.*got 1.5"),
        ({"layers": "all", "documents": -1}, "documents must be a non-negative integer.*got -1"),
        ({"layers": "all", "documents": 1, "min_document_score": 2}, "min_document_score must be a mean cosine.*got 2"),
        ({"layers": "all", "min_document_score": 0.5}, "min_document_score 0.5 needs documents >= 1"),
        ({"layers": "all", "documents": 2, "index": "faiss_ivf"}, "documents 2 needs index: exact"),
        ("all", "must be a mapping"),
    ]:
        with pytest.raises(ModelConfigError, match=message):
            tiny(memory)
    model = tiny({"layers": [-1, 0], "mode": "gated"})
    assert model.config.attention_memory == {"layers": [0, 2], "topk": 8, "mode": "gated", "similarity_threshold": None,
                                             "index": "exact", "distance": 0, "sink_positions": 0, "documents": 0,
                                             "min_document_score": None}
    assert [layer.attn.memory is not None for layer in model.layers] == [True, False, True]
    assert set(k for k in model.state_dict() if "memory" in k) == {"layers.0.attn.memory.gate", "layers.2.attn.memory.gate"}
    rebuilt = memzoo.Transformer(model.config.to_dict())
    assert rebuilt.config == model.config


def test_export_refuses_a_model_with_attention_memory(bank, tmp_path):
    model = tiny()
    model.attach_memory(bank)
    with pytest.raises(ExportError, match="detach the bank first"):
        export_model(model, tmp_path / "out", tokenizer="byte")
    with pytest.raises(ExportError, match="attention_memory layers are part of the architecture"):
        export_model(tiny({"layers": [1], "mode": "gated"}), tmp_path / "out", tokenizer="byte")
    model.detach_memory()
    export_model(model, tmp_path / "out", tokenizer="byte")


def test_citations_sum_the_attention_of_the_last_query(bank):
    model = tiny()
    model.attach_memory(bank, topk=3)
    ids = torch.tensor([[256, *b"the birth"]])
    with recording_memory_attention(model) as recorder, torch.no_grad():
        model(ids)
        model(ids[:, :4])
    assert sorted(recorder.records) == [0, 1, 2] and all(len(steps) == 2 for steps in recorder.records.values())
    indices, weights = recorder.records[1][0]
    assert indices.shape == weights.shape == (1, 4, 3) and (weights > 0).all() and (weights < 1).all()
    total = recorder.entry_weights(bank.n_entries)
    expected = sum(w.sum() for steps in recorder.records.values() for _, w in steps)
    torch.testing.assert_close(total.sum(), expected.double())
    citations = bank.citations(total, build_tokenizer("byte"), top=2)
    assert citations and all(c.name in DOCS and 0 < c.share <= 1 for c in citations)
    assert model.layers[0].attn.memory.recorder is None  # recording ends with the block


# ------------------------------------------------------------------------------ memorize + generate on a Llama folder
WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(Path(folder) / "tokenizer.json"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama whose layer-0 queries equal its keys and ignore position (the one fast-turning rotary pair
    of each head zeroed; the others barely turn with rope_theta 1e12), so a token retrieves its own occurrences in the
    bank: a toy where the right citation is known."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=1e12)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        attn.k_proj.weight.mul_(8)
        for head in range(2):  # rotary pair 0 of each head (dims 0 and 8 of 16) turns one radian per position
            attn.k_proj.weight[[16 * head, 16 * head + 8]] = 0
        attn.q_proj.weight.copy_(attn.k_proj.weight)
    model.save_pretrained(folder)
    word_tokenizer(folder)
    return folder


def test_memorize_and_generate_cite_the_document_the_prompt_retrieves(llama_folder, tmp_path, capsys):
    (tmp_path / "pattern.txt").write_text("w1 w2 w3 w40 w41 w42 w43 w4 w5", encoding="utf-8")
    (tmp_path / "other.txt").write_text(" ".join(WORDS[6:30]), encoding="utf-8")
    docs = [str(tmp_path / "other.txt"), str(tmp_path / "pattern.txt")]
    bank = main(["memorize", "--model", str(llama_folder), "--docs", *docs, "--out", str(tmp_path / "m.bank"),
                 "--layers", "0", "--window", "16", "--stride", "8"])
    assert bank.n_entries == 24 + 9 and "memorized 33 tokens of 2 document(s) in layers [0]" in capsys.readouterr().out
    prefixed = main(["memorize", "--model", str(llama_folder), "--docs", *docs, "--out", str(tmp_path / "p.bank"),
                     "--layers", "0", "--window", "16", "--stride", "8", "--prefix", f"{WORDS[0]} {WORDS[1]} "])
    assert prefixed.n_entries == 33 and prefixed.build_settings["prefix"] == f"{WORDS[0]} {WORDS[1]} "
    capsys.readouterr()
    text = main(["generate", "--model", str(llama_folder), "--prompt", "w41 w42", "--memory", str(tmp_path / "m.bank"),
                 "--memory-topk", "2", "--cite", "--max-new-tokens", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    cite = lines.index("memories attended (share of the attention paid to memory while generating):")
    assert lines[cite + 1].startswith(f"  documents: {docs[1]} ")
    assert lines[cite + 2].split()[2] == docs[1] and "w42" in lines[cite + 2]
    assert text in out
    main(["generate", "--model", str(llama_folder), "--prompt", "w41 w42", "--memory", str(tmp_path / "m.bank"),
          "--memory-topk", "2", "--memory-documents", "1", "--memory-min-document-score", "0.5", "--cite",
          "--max-new-tokens", "1", "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert f"  documents: {docs[1]} 100.0%" in lines  # one document chosen: every memory read is from it

    model, tok = memzoo.load_pretrained(llama_folder, with_tokenizer=True)
    loaded = MemoryBank.load(tmp_path / "m.bank")
    model.attach_memory(loaded, topk=2)  # the same bank from Python; the KV cache path equals recomputation
    ids = torch.tensor([[0, *tok.encode("w41 w42 w1")]])
    assert torch.equal(model.generate(ids, 5), model.generate(ids, 5, use_cache=False))


def test_memorize_reads_a_checkpoint_through_the_one_loader(tmp_path, monkeypatch, capsys):
    """A memzoo .ckpt is read by memzoo.loading (as every other source) in memorize and generate, its tokenizer the
    one its run recorded (the run folder's config.yaml); a checkpoint recording none needs --tokenizer."""
    from memzoo.loading import ModelSource
    from memzoo.training.module import LanguageModel

    run = tmp_path / "runs" / "x" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  init_args:\n    tokenizer: byte\n", encoding="utf-8")
    torch.manual_seed(0)
    module = LanguageModel({"dim": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "block_args": {"hidden": 32}})
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    (tmp_path / "d.txt").write_text("a short document", encoding="utf-8")
    loads = []
    real = ModelSource.load_into
    monkeypatch.setattr(ModelSource, "load_into", lambda self, model: (loads.append(self.kind), real(self, model)))
    bank = main(["memorize", "--model", str(ckpt), "--docs", str(tmp_path / "d.txt"), "--out", str(tmp_path / "b")])
    assert loads == ["checkpoint"] and bank.n_entries == len("a short document")  # one entry per byte
    bank_again = MemoryBank.build(module.model.eval(), build_tokenizer("byte"), {str(tmp_path / "d.txt"): "a short document"})
    assert torch.equal(bank.keys[0], bank_again.keys[0])  # the checkpoint's weights
    text = main(["generate", "--model", str(ckpt), "--prompt", "ab", "--max-new-tokens", "3", "--device", "cpu"])
    expected = module.model.generate(torch.tensor([[build_tokenizer("byte").eos_id, 97, 98]]), 3)[0, 3:].tolist()
    assert loads[-1] == "checkpoint" and text == build_tokenizer("byte").decode(expected)  # generate: the same loader
    (run / "config.yaml").unlink()
    with pytest.raises(CommandError, match="records no tokenizer; pass --tokenizer"):
        main(["memorize", "--model", str(ckpt), "--docs", str(tmp_path / "d.txt"), "--out", str(tmp_path / "b")])
    main(["memorize", "--model", str(ckpt), "--docs", str(tmp_path / "d.txt"), "--out", str(tmp_path / "b"),
          "--tokenizer", "byte"])


def test_memorize_and_generate_errors(llama_folder, tmp_path, bank):
    with pytest.raises(CommandError, match="--docs 'nope.txt' is not a file"):
        main(["memorize", "--model", str(llama_folder), "--docs", "nope.txt", "--out", str(tmp_path / "x.bank")])
    (tmp_path / "d.txt").write_text("w1 w2", encoding="utf-8")
    with pytest.raises(CommandError, match="--layers 'x' must be `all` or comma-separated integers"):
        main(["memorize", "--model", str(llama_folder), "--docs", str(tmp_path / "d.txt"), "--out", "x", "--layers", "x"])
    with pytest.raises(CommandError, match="--cite needs --memory BANK"):
        main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--cite"])
    main(["memorize", "--model", str(llama_folder), "--docs", str(tmp_path / "d.txt"), "--out", str(tmp_path / "d.bank"),
          "--layers", "0"])
    with pytest.raises(CommandError, match="generate: attention_memory.distance must be a non-negative integer.*-3"):
        main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory", str(tmp_path / "d.bank"),
              "--memory-distance", "-3", "--device", "cpu"])
    far = main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory", str(tmp_path / "d.bank"),
                "--memory-distance", "5000", "--max-new-tokens", "2", "--device", "cpu"])
    assert isinstance(far, str)
    with pytest.raises(CommandError, match="generate: attention_memory.sink_positions must be a non-negative.*-1"):
        main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory", str(tmp_path / "d.bank"),
              "--memory-sink-positions", "-1", "--device", "cpu"])
    assert isinstance(main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory",
                            str(tmp_path / "d.bank"), "--memory-sink-positions", "1", "--max-new-tokens", "2",
                            "--device", "cpu"]), str)
    with pytest.raises(CommandError, match="generate: attention_memory.documents must be a non-negative.*-1"):
        main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory", str(tmp_path / "d.bank"),
              "--memory-documents", "-1", "--device", "cpu"])
    with pytest.raises(CommandError, match="generate: attention_memory.min_document_score 0.5 needs documents >= 1"):
        main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory", str(tmp_path / "d.bank"),
              "--memory-min-document-score", "0.5", "--device", "cpu"])
    path = bank.save(tmp_path / "byte.bank")  # built by the byte-level tiny model: other dimensions
    with pytest.raises(CommandError, match=r"generate: .*byte\.bank was built for another model"):
        main(["generate", "--model", str(llama_folder), "--prompt", "w1", "--memory", str(path), "--device", "cpu"])
    assert json.loads((Path(llama_folder) / "config.json").read_text())["model_type"] == "llama"


def test_readme_commands_and_python_run_as_written(tmp_path, monkeypatch, capsys):
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Attention memory (Extended Mind)", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    export_model(tiny(), tmp_path / "my-model", tokenizer="byte")
    (tmp_path / "ada.txt").write_text("The birth year of Ada is 1815.", encoding="utf-8")
    (tmp_path / "fox.txt").write_text("The quick brown fox jumps over the lazy dog.", encoding="utf-8")
    assert [c.split()[:2] for c in commands] == [["memzoo", "memorize"], ["memzoo", "generate"], ["memzoo", "generate"]]
    for command in commands:
        main(shlex.split(command)[1:] + (["--device", "cpu", "--max-new-tokens", "4"] if "generate" in command else []))
    out = capsys.readouterr().out
    assert "memorized" in out and "memories attended" in out and "ada.txt" in out
    exec(compile(python, "README.md", "exec"), {})
    assert MemoryBank.load(tmp_path / "ada.bank").doc_names == ["ada.txt"]


def test_language_model_attaches_its_bank_once_the_stage_weights_are_loaded(bank, tmp_path):
    from memzoo.training.module import LanguageModel

    path = bank.save(tmp_path / "b.bank")
    module = LanguageModel(architecture=dict(vocab_size=258, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                             max_seq_len=64), memory=str(path))
    assert getattr(module.model, "memory_bank", None) is None
    module.model.load_state_dict(tiny().state_dict())  # as a checkpoint restore does, before the stage starts
    module.on_predict_start()
    module.on_predict_start()  # once only
    expected = tiny()
    expected.attach_memory(bank)
    ids = torch.randint(0, 258, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(module.model.eval()(ids), expected(ids))


def test_faiss_index_retrieves_nearly_the_exact_top_k_and_equals_exact_when_it_searches_everything(bank):
    pytest.importorskip("faiss")
    from memzoo.model.attention_memory import build_faiss_index, retrieve_faiss

    torch.manual_seed(2)
    keys = torch.randn(2, 4000, 16)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    q = torch.randn(1, 2, 2, 50, 16)
    _, exact = retrieve(q, unit, 8)
    _, approx = retrieve_faiss(q, build_faiss_index(unit), 8)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx.reshape(-1, 8), exact.reshape(-1, 8)))
    assert recall / exact.numel() > 0.8
    # a small bank has few lists, all searched (nprobe = nlist): the same logits as exact retrieval
    ids = torch.randint(0, 258, (1, 20), generator=torch.Generator().manual_seed(9))
    a, b = tiny(), tiny()
    a.attach_memory(bank, topk=4)
    b.attach_memory(bank, topk=4, index="faiss_ivf")
    assert b.layers[0].attn.memory.faiss_indexes is not None
    with torch.no_grad():
        torch.testing.assert_close(b(ids), a(ids), rtol=0, atol=1e-5)


def test_faiss_index_without_faiss_names_the_package(bank, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    from memzoo.model.attention_memory import AttentionMemoryError

    with pytest.raises(AttentionMemoryError, match="needs the faiss-cpu package"):
        tiny().attach_memory(bank, index="faiss_ivf")
