"""The biographies corpus and data module: determinism, uniform attributes, the word vocabulary, templates, the
validation probes, and the bit-complexity measure against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from memzoo.data import BiographiesDataModule
from memzoo.data.biographies_corpus import (
    ATTRIBUTES,
    N_FAMILY,
    N_GIVEN,
    TEMPLATES,
    TEMPLATES_PER_ATTRIBUTE,
    BiographyCorpus,
    knowledge_bits,
)
from memzoo.data.sampling import IGNORE_INDEX
from memzoo.data.word_tokenizer import WordTokenizer


# ------------------------------------------------------------------------------------------------ bits
def test_knowledge_bits_hand_computed():
    # 4 people, attributes with 4 and 2 values: 4 * (2 + 1) = 12 bits in the corpus
    assert knowledge_bits(4, [4, 2], 0.0) == pytest.approx(12.0)
    # a model that spends 4 bits (4 ln 2 nats) of cross-entropy in total stores 12 - 4 = 8 bits
    assert knowledge_bits(4, [4, 2], 4 * math.log(2)) == pytest.approx(8.0)
    # uniform guessing over each value set: CE = N * Σ ln |V_a| nats -> 0 bits
    assert knowledge_bits(4, [4, 2], 4 * (math.log(4) + math.log(2))) == pytest.approx(0.0, abs=1e-12)
    # worse than uniform is reported as is (negative), not clipped
    assert knowledge_bits(1, [2], 2 * math.log(2)) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="value sets"):
        knowledge_bits(4, [0, 2], 0.0)


def test_data_module_bits_from_val_loss_hand_computed():
    data = BiographiesDataModule(n_people=10)
    sizes = data.corpus.value_set_sizes
    assert sizes == {"birth_date": 28 * 12 * 50, "birth_city": 100, "university": 100, "major": 50, "employer": 100}
    assert data.corpus.value_token_counts == {"birth_date": 3, "birth_city": 1, "university": 1, "major": 1,
                                              "employer": 1}
    assert data.value_tokens == 10 * 7
    per_person = sum(math.log2(s) for s in sizes.values())  # log2(16800) + 3 log2(100) + log2(50) = 39.61 bits
    assert data.max_bits == pytest.approx(10 * per_person) and per_person == pytest.approx(39.6116, abs=1e-4)
    assert data.knowledge_bits(0.0) == pytest.approx(10 * per_person)
    uniform_loss = sum(math.log(s) for s in sizes.values()) / 7  # nats per value token of uniform guessing
    assert data.knowledge_bits(uniform_loss) == pytest.approx(0.0, abs=1e-9)
    assert data.knowledge_bits(uniform_loss / 2) == pytest.approx(data.max_bits / 2)


def test_bits_of_a_model_that_knows_half_the_people_exactly():
    """End to end through the validation probes: a lookup 'model' that is certain of the values of the first half of
    the people and uniform over each value token's set for the rest stores exactly half the corpus."""
    data = BiographiesDataModule(n_people=6, batch_size=64)
    data.setup("validate")
    probes = data.val_dataloader()[0]
    tok = data.tokenizer
    corpus = data.corpus
    token_sets = {}
    for attribute, values in corpus.value_sets.items():
        for position in range(corpus.value_token_counts[attribute]):
            token_sets[(attribute, position)] = sorted({tok.encode(v)[position] for v in values})
    total, count, fact = 0.0, 0, 0
    for batch in probes:  # the probes are the facts in order: fact = person * 5 + attribute
        for labels in batch["labels"]:
            person, attribute = divmod(fact, len(ATTRIBUTES))
            attribute = ATTRIBUTES[attribute]
            positions = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
            assert tok.decode(labels[positions].tolist()) == corpus.value(person, attribute)
            for i in range(len(positions)):
                count += 1
                if person >= 3:
                    total += math.log(len(token_sets[(attribute, i)]))
            fact += 1
    assert count == data.value_tokens
    assert data.knowledge_bits(total / count) == pytest.approx(data.max_bits / 2)


# ------------------------------------------------------------------------------------------------ corpus
def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b, c = BiographyCorpus(50, seed=3), BiographyCorpus(50, seed=3), BiographyCorpus(50, seed=4)
    people = np.arange(50)
    for attribute_id in range(len(ATTRIBUTES)):
        assert a.sentences(people, attribute_id, 0) == b.sentences(people, attribute_id, 0)
    assert a.vocabulary() == b.vocabulary() and a.vocabulary() != c.vocabulary()
    assert a.names(people) != c.names(people)
    assert (a.value_indices(people, 1) != c.value_indices(people, 1)).any()


def test_a_persons_facts_do_not_depend_on_how_many_people_there_are():
    small, large = BiographyCorpus(20, seed=0), BiographyCorpus(2000, seed=0)
    assert small.vocabulary() == large.vocabulary()  # same model size at every load
    people = np.arange(20)
    for a in range(len(ATTRIBUTES)):
        assert (small.value_indices(people, a) == large.value_indices(people, a)).all()


def test_attributes_are_uniform_and_independent():
    corpus = BiographyCorpus(N_GIVEN * N_FAMILY, seed=0)
    people = np.arange(corpus.n_people)
    values = {}
    for a, attribute in enumerate(ATTRIBUTES):
        values[attribute] = corpus.value_indices(people, a)
        k = len(corpus.value_sets[attribute])
        counts = np.bincount(values[attribute], minlength=k)
        expected = corpus.n_people / k
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # chi-square with k - 1 degrees of freedom: mean k - 1, sd sqrt(2 (k - 1)); 5 sd is far out
        assert chi2 < (k - 1) + 5 * math.sqrt(2 * (k - 1)), (attribute, chi2)
    # independence: city and major jointly uniform over 100 x 50 cells
    joint = np.bincount(values["birth_city"] * 50 + values["major"], minlength=5000)
    expected = corpus.n_people / 5000
    chi2 = float(((joint - expected) ** 2 / expected).sum())
    assert chi2 < 4999 + 5 * math.sqrt(2 * 4999)


def test_names_are_unique_two_words_and_bad_loads_are_refused():
    corpus = BiographyCorpus(N_GIVEN * N_FAMILY)
    names = corpus.names(np.arange(corpus.n_people))
    assert len(set(names)) == len(names) and all(len(n.split(" ")) == 2 for n in names)
    with pytest.raises(ValueError, match="n_people must be an int in"):
        BiographyCorpus(N_GIVEN * N_FAMILY + 1)
    with pytest.raises(IndexError, match="outside"):
        BiographyCorpus(5).names([5])


def test_vocabulary_covers_every_sentence_and_words_are_distinct():
    corpus = BiographyCorpus(300, seed=1)
    vocabulary = corpus.vocabulary()
    assert vocabulary[:2] == ["<|endoftext|>", "<|pad|>"] and len(set(vocabulary)) == len(vocabulary)
    tokenizer = WordTokenizer(vocabulary)
    people = np.arange(300)
    for a in range(len(ATTRIBUTES)):
        for t in range(TEMPLATES_PER_ATTRIBUTE):
            for sentence in corpus.sentences(people, a, t):
                ids = tokenizer.encode(sentence)
                assert tokenizer.decode(ids) == sentence
    value_words = [w for vs in corpus.value_sets.values() for v in vs for w in v.split(" ")]
    name_words = [*corpus.given_names, *corpus.family_names]
    assert not set(name_words) & set(value_words)  # a name word is never a value word
    with pytest.raises(ValueError, match="not in this WordTokenizer"):
        tokenizer.encode("Alice was born")


def test_templates_end_with_the_value_and_prompts_name_their_attribute():
    corpus = BiographyCorpus(3)
    prompts = []
    for attribute in ATTRIBUTES:
        assert len(TEMPLATES[attribute]) == TEMPLATES_PER_ATTRIBUTE
        for t, template in enumerate(TEMPLATES[attribute]):
            assert template.endswith(" {value} .") and "{name}" in template
            prompt, answer = corpus.prompt_and_answer(0, attribute, t)
            assert f"{prompt}{answer} ." == corpus.sentences([0], ATTRIBUTES.index(attribute), t)[0]
            prompts.append((attribute, template.split(" {value}")[0].split(" ")))
    for a1, p1 in prompts:  # no prompt is a prefix of another attribute's prompt
        for a2, p2 in prompts:
            if a1 != a2:
                assert p2[: len(p1)] != p1, (a1, p1, a2, p2)


def test_training_rotates_through_every_template():
    corpus = BiographyCorpus(40)
    facts = np.arange(corpus.n_facts)
    seen = np.stack([corpus.training_template(facts, q) for q in range(TEMPLATES_PER_ATTRIBUTE)])
    assert (np.sort(seen, axis=0) == np.arange(TEMPLATES_PER_ATTRIBUTE)[:, None]).all()
    assert len(set(seen[0].tolist())) == TEMPLATES_PER_ATTRIBUTE  # pass 0 already mixes the templates


# ------------------------------------------------------------------------------------------------ data module
def test_training_batches_are_word_sentences_each_fact_once_per_pass():
    data = BiographiesDataModule(n_people=20, block_size=16, batch_size=4, seed=2)
    data.setup("fit")
    stream = data._train
    tokens = np.concatenate([stream[j]["input_ids"].numpy() for j in range(stream.blocks_per_pass)])
    text = data.tokenizer.decode(tokens.tolist())
    corpus = data.corpus
    for person in range(20):  # every fact of every person appears in pass 0
        for attribute in ATTRIBUTES:
            assert f"{corpus.names([person])[0]}" in text and corpus.value(person, attribute) in text
    again = BiographiesDataModule(n_people=20, block_size=16, batch_size=4, seed=2)
    again.setup("fit")
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"],
                       next(iter(data.train_dataloader()))["input_ids"])


def test_validation_probes_every_fact_with_labels_on_value_tokens_only():
    data = BiographiesDataModule(n_people=12, batch_size=7)
    data.setup("validate")
    loss_loader, recall_loader = data.val_dataloader()
    assert len(loss_loader.dataset) == len(recall_loader.dataset) == 12 * 5
    labelled, answers = 0, set()
    for batch in loss_loader:
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            assert ids[0] == data.tokenizer.eos_id
            mask = labels != IGNORE_INDEX
            labelled += int(mask.sum())
            assert data.tokenizer.words.index(".") not in labels[mask].tolist()  # the terminator is not scored
            answers.add(data.tokenizer.decode(labels[mask].tolist()))
    assert labelled == data.value_tokens
    assert data.recall_chance == pytest.approx(np.mean([1 / 16800, 1 / 100, 1 / 100, 1 / 50, 1 / 100]))
    assert len(answers) > 30
    assert data.hparams["n_people"] == 12
    with pytest.raises(ValueError, match="samples_per_epoch"):
        BiographiesDataModule(n_people=3, samples_per_epoch=0)
