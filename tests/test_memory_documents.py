"""Document selection for attention memory (``attention_memory.documents``): the choice and the attention against a
float64 reference that scores every entry of every document (forward and gradients, ties between documents,
interleaved entries, sink positions, thresholds), the running choice across KV-cache chunks, causality, decoding, a
prompt that quotes a document choosing it, nothing chosen equal to the plain model. (The ``generate`` flags are tested
in ``test_attention_memory``.)"""

import math

import pytest
import torch

from memzoo.data.tokenizers import build_tokenizer
from memzoo.model.attention_memory import AttentionMemory, AttentionMemoryConfig, AttentionMemoryError
from memzoo.model.memory_bank import MemoryBank, recording_memory_attention
from memzoo.model.memory_documents import chosen_documents, position_scores
from test_attention_memory import DOCS, INV_FREQ, reference, tiny


def reference_scores(new_keys, bank_keys, entry_doc, n_docs, sink_positions, q_offset=0, earlier=None):
    """float64 running document scores ``s_t(d)`` ``(B, T, n_docs)``, one position, head and entry at a time.
    ``earlier (B, q_offset, C, hd)``: the keys of the positions before ``q_offset``."""
    keys = new_keys.double() if earlier is None else torch.cat([earlier, new_keys], 1).double()
    bank = bank_keys.double()
    mean = bank.mean(dim=1)  # (C, hd)
    B, T_all, C, _ = keys.shape
    out = torch.full((B, T_all, n_docs), float("nan"), dtype=torch.float64)
    for b in range(B):
        per_position = []
        for u in range(T_all):
            m = torch.full((n_docs,), -1.0, dtype=torch.float64)
            for d in range(n_docs):
                entries = [e for e in range(bank.shape[1]) if int(entry_doc[e]) == d]
                if entries:
                    best = []
                    for c in range(C):
                        x = keys[b, u, c] - mean[c]
                        best.append(max(float(x @ (bank[c, e] - mean[c]) / (x.norm() * (bank[c, e] - mean[c]).norm()))
                                        for e in entries))
                    m[d] = sum(best) / C
            per_position.append(m)
            scored = [per_position[v] for v in range(sink_positions, u + 1)]
            out[b, u] = torch.stack(scored).mean(0) if scored else 0.0
    return out[:, T_all - new_keys.shape[1]:]


def reference_choice(scores, documents, min_score, sink_positions, q_offset=0):
    B, T, D = scores.shape
    chosen = torch.zeros(B, T, D, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            if q_offset + t < sink_positions:
                continue
            order = sorted(range(D), key=lambda d: -float(scores[b, t, d]))[:documents]
            for d in order:
                if min_score is None or float(scores[b, t, d]) >= min_score:
                    chosen[b, t, d] = True
    return chosen


def documents_module(documents, min_score=None, sink_positions=0, topk=3, mode="joint", H=4, C=2, hd=8, seed=0):
    torch.manual_seed(seed)
    config = AttentionMemoryConfig((0,), topk, mode, sink_positions=sink_positions, documents=documents,
                                   min_document_score=min_score)
    module = AttentionMemory(0, H, C, hd, config)
    if module.gate is not None:
        module.gate.data.normal_()
    entry_doc = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 2, 1, 3, 3])  # interleaved; document 4 has no entries
    keys, values = torch.randn(C, len(entry_doc), hd), torch.randn(C, len(entry_doc), hd)
    keys[:, 11], values[:, 11] = keys[:, 10], values[:, 10]  # a duplicate entry inside document 3
    module.set_bank(keys, values, INV_FREQ, entry_doc, n_docs=5)
    return module, keys, values, entry_doc


def local_attention(qv, k_loc, v_loc, visible):
    p = (k_loc[:visible] @ qv / math.sqrt(qv.shape[0])).softmax(0)
    return p @ v_loc[:visible]


@pytest.mark.parametrize("documents,min_score,sinks,mode", [
    (1, None, 0, "joint"), (2, None, 1, "joint"), (1, 0.5, 0, "joint"), (3, -0.05, 2, "gated"), (9, None, 0, "joint"),
])
def test_document_choice_and_attention_equal_a_float64_reference(documents, min_score, sinks, mode):
    module, keys, values, entry_doc = documents_module(documents, min_score, sinks, mode=mode)
    B, T, H, C, hd = 2, 6, 4, 2, 8
    q = torch.randn(B, T, H, hd, requires_grad=True)
    k_loc = torch.randn(B, C, T, hd, requires_grad=True)
    v_loc = torch.randn(B, C, T, hd, requires_grad=True)
    new_keys = torch.randn(B, T, C, hd)
    new_keys[0, 2:] = keys[:, 4].clone()  # row 0 quotes an entry of document 2 from position 2 on
    scores = reference_scores(new_keys, keys, entry_doc, 5, sinks)
    chosen = reference_choice(scores, documents, min_score, sinks)
    got_scores = position_scores(new_keys, module.doc_keys, module.key_mean, module.entry_doc, 5)
    torch.testing.assert_close(chosen_documents(got_scores, 0, sinks, documents, min_score), chosen)
    if min_score is None and documents == 1 and sinks == 0:
        assert chosen[0, 3:, 2].all()  # the quoted document wins once its key dominates the running mean
    if min_score == 0.2:
        assert chosen.any(-1).any() and not chosen.any(-1).all()  # the threshold leaves some positions none

    y = module(q, k_loc, v_loc, 0, new_keys=new_keys)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k_loc, v_loc))
    gate = module.gate.detach().double() if module.gate is not None else None
    rows = []
    for b in range(B):
        for t in range(T):
            entries = chosen[b, t][entry_doc]
            if entries.any():
                rows.append(reference(q64[b : b + 1, t : t + 1], k64[b : b + 1], v64[b : b + 1], keys[:, entries],
                                      values[:, entries], module.topk, t, mode, gate)[0, 0])
            else:  # no document: no memory (gated: the local side of the gate alone)
                local = torch.stack([local_attention(q64[b, t, h], k64[b, h // 2], v64[b, h // 2], t + 1)
                                     for h in range(H)])
                rows.append(local if gate is None else (1 - torch.sigmoid(gate))[:, None] * local)
    expected = torch.stack(rows).view(B, T, H, hd)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(expected)
    (y.double() * grad).sum().backward()
    (expected * grad).sum().backward()
    for got, want in ((q.grad, q64.grad), (k_loc.grad, k64.grad), (v_loc.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_the_choice_runs_on_across_chunks_through_the_cache_state():
    module, keys, _, entry_doc = documents_module(2, sink_positions=1)
    new_keys = torch.randn(2, 9, 2, 8)
    scores = position_scores(new_keys, module.doc_keys, module.key_mean, module.entry_doc, 5)
    whole = chosen_documents(scores, 0, 1, 2, None)
    state = {}
    pieces = [chosen_documents(scores[:, :3], 0, 1, 2, None, state)]
    pieces += [chosen_documents(scores[:, t : t + 1], t, 1, 2, None, state) for t in range(3, 9)]
    assert torch.equal(torch.cat(pieces, 1), whole)
    expected = reference_choice(reference_scores(new_keys[:, 4:], keys, entry_doc, 5, 1, 4, new_keys[:, :4].double()),
                                2, None, 1, q_offset=4)
    assert torch.equal(whole[:, 4:], expected)
    with pytest.raises(AttentionMemoryError, match="memory_state after the first positions"):
        module(torch.randn(1, 1, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 3, new_keys=new_keys[:1, :1])
    unbound = AttentionMemory(0, 4, 2, 8, AttentionMemoryConfig((0,), 2, documents=1))
    with pytest.raises(AttentionMemoryError, match="needs the document of every bank entry"):
        unbound.set_bank(keys, keys)


@pytest.fixture(scope="module")
def bank():
    return MemoryBank.build(tiny(), build_tokenizer("byte"), DOCS, window=32, stride=12)


def test_a_prompt_quoting_a_document_chooses_it_and_cites_it(bank):
    model = tiny()
    model.attach_memory(bank, topk=4, documents=1, sink_positions=1)
    assert model.config.attention_memory["documents"] == 1
    for text, doc in (("the birth year of ada", 0), ("a quick brown fox", 1)):
        ids = torch.tensor([[256, *text.encode()]])
        with recording_memory_attention(model) as recorder, torch.no_grad():
            model(ids)
        shares = bank.doc_shares(recorder.entry_weights(bank.n_entries))
        assert float(shares[doc]) == pytest.approx(1.0)  # every memory read comes from the quoted document


def test_causality_and_kv_cache_decoding_with_documents(bank):
    model = tiny()
    model.attach_memory(bank, topk=4, documents=1, sink_positions=1)
    ids = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(8))
    ids[0, 5:20] = torch.tensor(list(b"quick brown fox"))  # row 0 switches document mid-way
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 7) % 258
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(full[:, :15], model(changed)[:, :15], rtol=0, atol=0)
        caches = model.new_caches(2, 30)
        pieces = [model(ids[:, :12], caches), model(ids[:, 12:20], caches)]
        pieces += [model(ids[:, t : t + 1], caches) for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)
    prompt = ids[:, :9]
    assert torch.equal(model.generate(prompt, 12), model.generate(prompt, 12, use_cache=False))


def test_no_document_chosen_is_the_plain_model(bank):
    ids = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(9))
    plain, strict, every = tiny(), tiny(), tiny()
    strict.attach_memory(bank, documents=2, min_document_score=0.99)  # random bytes match no document that well
    every.attach_memory(bank, documents=2)
    with torch.no_grad():
        torch.testing.assert_close(strict(ids), plain(ids), rtol=0, atol=1e-5)
        assert not torch.allclose(every(ids), plain(ids), atol=1e-3)
    strict.detach_memory()
    assert strict.config.attention_memory is None


def test_generation_chooses_documents_once_from_the_prompt_by_every_layer(bank):
    """Per prompt: the mean over memory layers of the running score at the prompt's last position (positions from
    1 on), the best ``documents`` above the threshold; every position, the first included, reads only them."""
    from memzoo.model.memory_bank import _captured_kv, suspended_memory

    model = tiny()
    model.attach_memory(bank, topk=4, documents=1, min_document_score=0.9)
    prompts = torch.tensor([[256, *b"the birth year "], [256, *b"quick brown fox"], [256, *b"%%%%%%%%%%%%%%%"]])
    expected = []
    for row in prompts:
        with suspended_memory(model), _captured_kv(model, range(3)) as captured, torch.no_grad():
            model(row[None])
        per_layer = [reference_scores(captured[layer][0].transpose(0, 1)[None], bank.keys[layer], bank.entry_doc,
                                      len(bank.doc_names), 1)[0, -1] for layer in range(3)]
        expected.append(torch.stack(per_layer).mean(0))
    expected = torch.stack(expected)
    chosen = model.choose_memory_documents(prompts)
    assert torch.equal(chosen, reference_choice(expected[:, None], 1, 0.9, 0)[:, 0])
    assert chosen.tolist() == [[True, False], [False, True], [False, False]]  # the quoted one; none for noise
    with recording_memory_attention(model) as recorder, torch.no_grad():
        model(prompts[:, :1])  # the first position alone (the sink) reads the chosen document
    for row, doc in ((0, 0), (1, 1)):
        assert bank.doc_shares(recorder.entry_weights(bank.n_entries, row))[doc] == pytest.approx(1.0)
    assert recorder.entry_weights(bank.n_entries, 2).sum() == 0  # no document: no memory read
    with pytest.raises(AttentionMemoryError, match="chosen for 3 prompt row"):
        model(prompts[:2])
    model.release_memory_documents()

    plain = tiny()
    out = model.generate(prompts, 6)
    assert torch.equal(out, model.generate(prompts, 6, use_cache=False))
    assert torch.equal(out[2], plain.generate(prompts[2:], 6)[0])  # nothing chosen: the plain model's tokens
    model.choose_memory_documents(prompts)
    with torch.no_grad():
        logits, plain_logits = model(prompts), plain(prompts)
    model.release_memory_documents()
    torch.testing.assert_close(logits[2], plain_logits[2], rtol=0, atol=1e-5)  # nothing chosen: plain logits
    assert not torch.allclose(logits[:2], plain_logits[:2], atol=1e-3)
    assert all(layer.attn.memory.prompt_documents is None for layer in model.layers)  # released after decoding
    model.detach_memory()
    assert model.choose_memory_documents(prompts) is None
