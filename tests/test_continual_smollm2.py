"""tools/continual_smollm2.py's measures on a tiny untrained model and memzoo's byte tokenizer: answer-only labels,
the greedy-answer count (against a per-item reference), the cloze relations (the study itself, on SmolLM2, runs
outside the test suite)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "tools"))
    import continual_smollm2

    return continual_smollm2


def test_answer_only_labels(study):
    from memzoo.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    batch = study.qa_batch(tok, [("ab", " c"), ("abcd", " ef")])
    assert batch["input_ids"].shape == (2, 7)
    # labels only where an answer token is predicted: " " after "b", "c" after " "; padding and prompt -100
    assert batch["labels"][0].tolist() == [-100, ord(" "), ord("c"), -100, -100, -100, -100]
    assert batch["labels"][1].tolist() == [-100, -100, -100, ord(" "), ord("e"), ord("f"), -100]
    assert study.consistent(tok, "ab", " c") and not study.consistent(tok, "ab", "")


class Successor(torch.nn.Module):
    """Predicts token ``t + 1`` after token ``t``: the greedy continuation of "ab" is "cdef..."."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 10


def test_correct_is_the_greedy_answer_test(study):
    from memzoo.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    pairs = [("ab", "c"), ("ab", "cd"), ("ab", "cx"), ("ab", "d"), ("xy", "z{"), ("k", "lmnop")]
    assert study.correct(Successor(tok.vocab_size), tok, pairs, chunk=4) == [True, True, False, False, True, True]


def test_cloze_relations(study):
    record = {"name": "Chile", "capital": "Santiago", "region": "Americas", "subregion": "South America",
              "languages": ["es"]}
    made = {name: make(record) for name, make in study.RELATIONS.items()}
    assert made == {"capital": ("The capital of Chile is", "Santiago"),
                    "capital_of": ("Santiago is the capital of", "Chile"),
                    "continent": ("Chile is a country in", "South America"),
                    "language": ("The official language of Chile is", "Spanish")}
    assert study.continent({"region": "Americas", "subregion": "Caribbean"}) == "North America"
    assert study.language({"languages": ["xx"]}) is None
