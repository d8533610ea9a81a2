"""The facts corpus and FactsDataModule: determinism, unique names, scale, the pass stream, validation, probes."""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from memzoo.data import FactsDataModule
from memzoo.data.facts import RecallProbes
from memzoo.data.facts_corpus import ATTRIBUTES, NAME_SPACE, TEMPLATES, FactsCorpus
from memzoo.data.sampling import IGNORE_INDEX

EOS = 256


def _documents(tokens) -> list[str]:
    """Byte tokens split at eos into decoded documents (a trailing partial document is dropped)."""
    tokens = list(tokens)
    ends = [i for i, t in enumerate(tokens) if t == EOS]
    docs, start = [], 0
    for end in ends:
        docs.append(bytes(tokens[start:end]).decode())
        start = end + 1
    return docs


# ------------------------------------------------------------------------------------------------ corpus
def test_names_are_unique_and_syllabic():
    names = FactsCorpus(1_000_000, seed=0).names(np.arange(20_000))
    assert len(set(names)) == 20_000
    assert all(re.fullmatch(r"([BDFGHKLMNPRSTVZ][aeiou])([bdfghklmnprstvz][aeiou]) "
                            r"([BDFGHKLMNPRSTVZ][aeiou])([bdfghklmnprstvz][aeiou]){2}", n) for n in names)


def test_corpus_is_deterministic_in_the_seed():
    a, b, c = FactsCorpus(500, seed=1), FactsCorpus(500, seed=1), FactsCorpus(500, seed=2)
    assert [a.render(e) for e in range(50)] == [b.render(e) for e in range(50)]
    assert a.value_sets == b.value_sets
    assert a.names(range(50)) != c.names(range(50))
    assert a.value_sets["birth_city"] != c.value_sets["birth_city"]
    assert [a.facts(e) for e in range(50)] != [c.facts(e) for e in range(50)]


def test_value_sets_sizes_and_balance():
    corpus = FactsCorpus(1000, seed=0)
    assert corpus.value_set_sizes == {"birth_year": 60, "birth_city": 40, "employer": 50, "field": 24,
                                      "university": 30}
    for a, attribute in enumerate(ATTRIBUTES):
        values = corpus.value_sets[attribute]
        assert len(set(values)) == len(values)
        counts = np.bincount(corpus.value_indices(np.arange(1000), a), minlength=len(values))
        assert counts.max() - counts.min() <= 1  # every value equally common: guessing the mode is chance


def test_templates_give_unambiguous_prompts():
    name = "Bada Kelimo"
    prompts = []
    for attribute in ATTRIBUTES:
        assert len(TEMPLATES[attribute]) >= 3
        for template in TEMPLATES[attribute]:
            assert template.count("{name}") == 1 and template.endswith(" {value}.")
            prompts.append(template.split(" {value}")[0].format(name=name))
    assert len(set(prompts)) == len(prompts)
    for p in prompts:
        for q in prompts:
            assert p == q or not q.startswith(p), (p, q)  # no prompt continues into another attribute's


def test_render_and_prompt_and_answer():
    corpus = FactsCorpus(10, seed=0)
    facts = corpus.facts(3)
    text = corpus.render(3)
    assert text.count(corpus.name(3)) == 5 and all(v in text for v in facts.values())
    prompt, answer = corpus.prompt_and_answer(3, "employer", 1)
    assert prompt + answer == corpus.sentence(3, "employer", 1)
    assert answer == f" {facts['employer']}."
    with pytest.raises(ValueError, match="unknown attribute 'height'"):
        corpus.value(0, "height")
    with pytest.raises(IndexError, match="entity 10 is outside"):
        corpus.name(10)


def test_held_out_and_training_templates():
    corpus = FactsCorpus(200, seed=0)
    facts = np.arange(corpus.n_facts)
    held_out = corpus.held_out_template(facts)
    per_pass = np.stack([corpus.training_template(facts, p) for p in range(3)])
    assert not (per_pass == held_out).any()
    # three consecutive passes show each fact in its three training templates, once each
    assert (np.sort(per_pass, axis=0) != np.sort(per_pass, axis=0)[[0]]).any()  # not all equal
    for f in range(0, corpus.n_facts, 37):
        assert sorted(per_pass[:, f].tolist()) == sorted(set(range(4)) - {held_out[f]})
    assert np.array_equal(corpus.training_template(facts, 5), per_pass[2])
    assert set(np.bincount(held_out, minlength=4) > corpus.n_facts / 8) == {True}


@pytest.mark.parametrize("n_entities", [0, -5, NAME_SPACE + 1, 2.0])
def test_bad_n_entities(n_entities):
    with pytest.raises(ValueError, match="n_entities must be an int in"):
        FactsDataModule(n_entities=n_entities)


def test_bad_facts_arguments():
    with pytest.raises(ValueError, match="recall_samples must be a positive int, got 0"):
        FactsDataModule(n_entities=10, recall_samples=0)
    with pytest.raises(ValueError, match="recall_phrasing must be 'seen' or 'held_out', got 'new'"):
        FactsDataModule(n_entities=10, recall_phrasing="new")
    with pytest.raises(ValueError, match="samples_per_epoch must be a positive int, got 0"):
        FactsDataModule(n_entities=10, samples_per_epoch=0)


# ------------------------------------------------------------------------------------------------ training
def test_a_pass_renders_every_fact_once_in_a_training_phrasing():
    dm = FactsDataModule(n_entities=30, block_size=16, seed=4)
    stream = dm.build_train_dataset()
    corpus = dm.corpus
    facts = np.arange(corpus.n_facts)
    for pass_index in (0, 1):
        tokens = stream.pass_stream(pass_index).window(0, stream.pass_stream(pass_index).total)
        docs = _documents(tokens)
        expected = corpus.sentences(facts // 5, facts % 5, corpus.training_template(facts, pass_index))
        assert Counter(docs) == Counter(expected)
        held_out = corpus.sentences(facts // 5, facts % 5, corpus.held_out_template(facts))
        assert not set(docs) & set(held_out)
    order0 = _documents(stream.pass_stream(0).window(0, stream.pass_stream(0).total))
    assert [corpus.name(e) for e in range(5)] != [d.split(" was")[0] for d in order0[:5]]  # shuffled facts


def test_training_windows_tile_the_pass_stream():
    dm = FactsDataModule(n_entities=40, block_size=32, seed=0)
    stream = dm.build_train_dataset()
    pass0 = stream.pass_stream(0)
    assert abs(stream.blocks_per_pass * 32 - pass0.total) <= 16  # the pass estimate is exact for small corpora
    rebuilt = [stream[0]["input_ids"][0].item()]
    for j in range(stream.blocks_per_pass):
        sample = stream[j]
        assert sample["input_ids"].shape == sample["labels"].shape == (32,)
        assert torch.equal(sample["input_ids"][1:], sample["labels"][:-1])
        rebuilt += sample["labels"].tolist()
    assert rebuilt == pass0.window(0, stream.blocks_per_pass * 32 + 1).tolist()
    assert (stream[stream.blocks_per_pass]["input_ids"] != stream[0]["input_ids"]).any()  # pass 1 differs


def test_a_batched_fetch_is_the_samples_one_by_one_and_owns_its_tensors():
    stream = FactsDataModule(n_entities=40, block_size=16, seed=0).build_train_dataset()
    indices = [3, 0, stream.blocks_per_pass + 2, 3]  # out of order, across passes, a repeat
    batched = stream.__getitems__(indices)
    for sample, index in zip(batched, indices):
        single = stream[index]
        assert torch.equal(sample["input_ids"], single["input_ids"]) and torch.equal(sample["labels"], single["labels"])
    batched[0]["labels"].fill_(-1)  # labels and inputs do not share memory
    assert torch.equal(batched[0]["input_ids"], stream[3]["input_ids"])


def test_the_sentence_cache_and_whole_pass_order_change_no_token(monkeypatch):
    import memzoo.data.facts as facts_module

    def passes(cache):
        monkeypatch.setattr(facts_module, "SENTENCE_CACHE", cache)
        stream = FactsDataModule(n_entities=300, block_size=16, seed=3).build_train_dataset()
        tokens = [stream.pass_stream(p).window(0, stream.pass_stream(p).total) for p in range(5)]
        return stream, tokens

    cached, with_cache = passes(10_000)
    uncached, without = passes(0)  # every sentence rendered when read, the order computed chunk by chunk
    assert len(cached._sentences) == 300 * 5 * 3 and not uncached._sentences  # 5 attributes, 3 training phrasings
    assert all(np.array_equal(a, b) for a, b in zip(with_cache, without))


def test_training_batches_are_deterministic_and_epochs_move_on():
    def epochs(seed, n=2):
        dm = FactsDataModule(n_entities=200, block_size=32, batch_size=4, samples_per_epoch=6, seed=seed)
        loader = dm.train_dataloader()
        out = []
        for epoch in range(n):
            loader.sampler.set_epoch(epoch)
            out.append(torch.cat([b["input_ids"] for b in loader]))
        return out

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (6, 32)
    assert not torch.equal(a[0], a[1])  # epoch 1 continues the stream
    assert not torch.equal(a[0], c[0])


def test_validation_batches_are_deterministic():
    def val_batches(seed):
        dm = FactsDataModule(n_entities=100, block_size=32, batch_size=8, recall_samples=16, seed=seed)
        return [[b["input_ids"].tolist() + b["labels"].tolist() for b in loader] for loader in dm.val_dataloader()]

    a, b, c = val_batches(0), val_batches(0), val_batches(1)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


def test_default_epoch_is_one_pass():
    dm = FactsDataModule(n_entities=50, block_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == loader.dataset.blocks_per_pass
    assert len(loader) == -(-loader.dataset.blocks_per_pass // 32)


def test_a_million_entities_without_rendering_everything(monkeypatch):
    rendered = []
    original = FactsCorpus.sentences

    def counting(self, entities, *args):
        rendered.append(len(np.atleast_1d(entities)))
        return original(self, entities, *args)

    monkeypatch.setattr(FactsCorpus, "sentences", counting)
    dm = FactsDataModule(n_entities=1_000_000, block_size=128, recall_samples=64)
    dm.setup()
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (32, 128)
    stream = dm._train
    assert stream.blocks_per_pass > 1_500_000  # ≈ 5,000,000 facts of ≈ 46 tokens / 128
    later = stream[3 * stream.blocks_per_pass + 1]  # pass 3, without touching passes 1 and 2
    assert (later["labels"] != IGNORE_INDEX).all()
    assert sum(rendered) < 20_000  # of 5,000,000 facts per pass
    assert dm.corpus.render(999_999).count(".") == 5


# ------------------------------------------------------------------------------------------------ validation
def test_validation_is_held_out_phrasings_of_the_probed_facts():
    dm = FactsDataModule(n_entities=100, block_size=64, recall_samples=40)
    dm.setup("validate")
    loaders = dm.val_dataloader()
    assert len(loaders) == 2 and dm.has_recall
    tokens = [loaders[0].dataset[0]["input_ids"][0].item()]
    for batch in loaders[0]:
        labels = batch["labels"].flatten()
        tokens += labels[labels != IGNORE_INDEX].tolist()
    docs = _documents(tokens)
    facts = dm.probed_facts
    assert len(facts) == len(set(facts.tolist())) == 40
    assert docs == dm.corpus.sentences(facts // 5, facts % 5, dm.corpus.held_out_template(facts))


@pytest.mark.parametrize("phrasing", ["seen", "held_out"])
def test_recall_labels_cover_exactly_the_answer(phrasing):
    dm = FactsDataModule(n_entities=100, recall_samples=30, batch_size=8, recall_phrasing=phrasing)
    dm.setup("validate")
    corpus, facts = dm.corpus, dm.probed_facts
    templates = corpus.training_template(facts, 0) if phrasing == "seen" else corpus.held_out_template(facts)
    rows = [row for batch in dm.val_dataloader()[1]
            for row in zip(batch["input_ids"].tolist(), batch["labels"].tolist())]
    assert len(rows) == 30
    for (input_ids, labels), f, t in zip(rows, facts, templates):
        entity, attribute = int(f) // 5, ATTRIBUTES[int(f) % 5]
        prompt, answer = corpus.prompt_and_answer(entity, attribute, int(t))
        labelled = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        assert labelled == list(range(labelled[0], labelled[-1] + 1))  # one contiguous answer span
        assert bytes(labels[i] for i in labelled).decode() == answer == f" {corpus.value(entity, attribute)}."
        assert input_ids[0] == EOS and bytes(input_ids[1 : labelled[0] + 1]).decode() == prompt
        assert all(input_ids[i + 1] == labels[i] for i in labelled[:-1])  # teacher forcing


def test_recall_chance_and_probe_count():
    dm = FactsDataModule(n_entities=1000)
    sizes = [dm.corpus.value_set_sizes[ATTRIBUTES[f % 5]] for f in dm.probed_facts]
    assert dm.recall_chance == pytest.approx(np.mean([1 / s for s in sizes]))
    assert 1 / 60 < dm.recall_chance < 1 / 24
    small = FactsDataModule(n_entities=2, recall_samples=512)
    assert sorted(small.probed_facts.tolist()) == list(range(10))  # capped at every fact


def test_recall_boundary_with_a_tokenizer_that_merges_across_it():
    class MergingTokenizer:
        """Bytes, except "ab" is one token (300): the prompt "xa" + answer "b." tokenises as [x, ab, .]."""

        eos_id, pad_id, vocab_size, spec = 256, 257, 301, "merging"

        def encode(self, text):
            out, i = [], 0
            while i < len(text):
                if text.startswith("ab", i):
                    out.append(300)
                    i += 2
                else:
                    out.append(ord(text[i]))
                    i += 1
            return out

    probes = RecallProbes([("xa", "b.")], MergingTokenizer())
    sample = probes[0]
    assert sample["input_ids"].tolist() == [256, ord("x"), 300]
    assert sample["labels"].tolist() == [IGNORE_INDEX, 300, ord(".")]  # the merged token joins the answer


def test_facts_with_a_hugging_face_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = FactsCorpus(50, seed=0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus.render(e, t) for e in range(50) for t in range(4)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    dm = FactsDataModule(n_entities=50, block_size=32, recall_samples=20, tokenizer=str(tmp_path / "tokenizer.json"))
    dm.setup()
    assert dm.vocab_size == tok.get_vocab_size()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].max() < dm.vocab_size
    for sample, f in zip(dm._recall, dm.probed_facts):
        answer_ids = [i for i in sample["labels"].tolist() if i != IGNORE_INDEX]
        value = dm.corpus.value(int(f) // 5, ATTRIBUTES[int(f) % 5])
        assert dm.tokenizer.decode(answer_ids) == f" {value}."
