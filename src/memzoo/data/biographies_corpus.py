"""Synthetic biographies with uniformly random attributes over a word-level vocabulary (knowledge-capacity studies).

The corpus of Allen-Zhu & Li, "Physics of Language Models, Part 3.3" (arXiv 2404.05405), in miniature: every person's
attributes are drawn independently and uniformly at random, so what a model knows about them is measurable in bits
(:func:`knowledge_bits`). Everything is a pure function of ``(seed, person, attribute, template)``
(:mod:`memzoo.data.keyed_random`).

- **Vocabulary.** Whole words: template words, ``"."``, :data:`N_GIVEN` given names, :data:`N_FAMILY` family names
  and every attribute value's words (made-up names built from consonant-vowel syllables, distinct across the whole
  vocabulary). The vocabulary depends on the seed only, never on the number of people, so a model's size is the same
  at every knowledge load. A sentence is words separated by single spaces (``"."`` is a word).
- **People.** Person ``p ∈ [0, N)`` is ``"<given> <family>"``, two tokens, from a keyed bijection onto the
  ``N_GIVEN · N_FAMILY`` name pairs: names are unique and no single name word identifies a person once
  ``N ≫ N_GIVEN``.
- **Attributes** (:data:`ATTRIBUTES`): ``birth_date`` (``"<day> <month> <year>"``: 28 · 12 · 50 = 16,800 values,
  three tokens), ``birth_city``, ``university``, ``major``, ``employer`` (one token each). Value of ``(p, a)`` =
  ``keyed_choice(key_a, p, |V_a|)``: independent and uniform, as the bit-complexity bound assumes.
- **Templates.** :data:`TEMPLATES_PER_ATTRIBUTE` phrasings per attribute, the value always last, then ``"."``; all
  of them are training phrasings, used in rotation (fact ``f`` in pass ``q`` gets template
  ``(choice(f) + q) mod T``). A template's words before the value are the prompt; the value's tokens the answer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from memzoo.data.facts_corpus import SYLLABLES
from memzoo.data.keyed_random import KeyedPermutation, derive_key, keyed_choice
from memzoo.data.templated_corpus import TemplatedCorpus, syllable_word

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")
N_GIVEN, N_FAMILY = 128, 128  # at most 16,384 people
DAYS = tuple(str(d) for d in range(1, 29))
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
YEARS = tuple(str(y) for y in range(1950, 2000))
N_CITIES, N_UNIVERSITIES, N_MAJORS, N_EMPLOYERS = 100, 100, 50, 100
TERMINATOR = "."
TEMPLATES_PER_ATTRIBUTE = 4
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": ("{name} was born on {value} .", "{name} born {value} .", "{name} birthday is {value} .",
                   "birth date of {name} is {value} ."),
    "birth_city": ("{name} was born in {value} .", "{name} comes from {value} .", "{name} hometown is {value} .",
                   "{name} grew up in {value} ."),
    "university": ("{name} studied at {value} .", "{name} graduated from {value} .", "{name} attended {value} .",
                   "{name} went to {value} ."),
    "major": ("{name} majored in {value} .", "{name} read {value} .", "{name} major is {value} .",
              "{name} specialised in {value} ."),
    "employer": ("{name} works for {value} .", "{name} is employed by {value} .", "{name} employer is {value} .",
                 "{name} works at {value} ."),
}  # fmt: skip
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


def knowledge_bits(n_people: int, value_set_sizes: Sequence[int], cross_entropy_nats: float) -> float:
    """The bit-complexity lower bound of Allen-Zhu & Li (arXiv 2404.05405) on the knowledge a model stores about
    ``n_people`` people whose attributes are independent and uniform over value sets of the given sizes:

        bits = Σ_a [ N · log2 |V_a| ] − (the model's total cross-entropy over every person's attribute values, in bits)

    i.e. Σ_a N · log2(|V_a| / e^{p_a}) with ``p_a`` the model's mean loss (nats) on attribute ``a``'s value tokens per
    person. ``cross_entropy_nats`` is the sum, over all people and attributes, of −ln p(value tokens | prompt) (each
    value's token losses added). A model that knows nothing beyond the value sets scores 0; a perfect one
    ``N · Σ log2 |V_a|``; a model worse than uniform guessing scores below 0 (not clipped). The paper's name term
    (the bits of the names themselves) is not included.
    """
    if n_people < 0 or any(s < 1 for s in value_set_sizes) or cross_entropy_nats < 0:
        raise ValueError(f"need n_people >= 0, value sets of size >= 1 and cross-entropy >= 0, got {n_people}, "
                         f"{list(value_set_sizes)}, {cross_entropy_nats}")
    return n_people * sum(math.log2(s) for s in value_set_sizes) - cross_entropy_nats / math.log(2)


class BiographyCorpus(TemplatedCorpus):
    """``n_people`` people with :data:`ATTRIBUTES`, all drawn from ``seed`` (see the module docstring).

    A *fact* is a ``(person, attribute)`` pair numbered ``fact = person · 5 + attribute_index`` (the numbering and
    the ``sentences`` / ``training_template`` interface of :class:`~memzoo.data.facts_corpus.FactsCorpus`, so the
    facts' training stream reads it unchanged).
    """

    entity_word, count_name = "person", "n_people"

    def __init__(self, n_people: int, seed: int = 0):
        if not isinstance(n_people, int) or isinstance(n_people, bool) or not 1 <= n_people <= N_GIVEN * N_FAMILY:
            raise ValueError(f"n_people must be an int in [1, {N_GIVEN * N_FAMILY}] (distinct two-word names), "
                             f"got {n_people!r}")
        self.n_entities = n_people
        self.seed = int(seed)
        self.attributes = ATTRIBUTES
        self.templates = TEMPLATES
        rng = random.Random(derive_key(self.seed, "biography words"))
        seen: set[str] = set()

        def words(count: int, n_syllables: tuple[int, ...], suffix: str = "") -> tuple[str, ...]:
            out: list[str] = []
            while len(out) < count:
                word = syllable_word(rng, SYLLABLES, rng.choice(n_syllables)) + suffix
                if word not in seen:
                    seen.add(word)
                    out.append(word)
            return tuple(out)

        self.given_names = words(N_GIVEN, (2,))
        self.family_names = words(N_FAMILY, (3,))
        self.value_sets: dict[str, tuple[str, ...]] = {
            "birth_date": tuple(f"{d} {m} {y}" for d in DAYS for m in MONTHS for y in YEARS),
            "birth_city": words(N_CITIES, (2,), "ville"),
            "university": words(N_UNIVERSITIES, (2,), "tech"),
            "major": words(N_MAJORS, (2,), "ology"),
            "employer": words(N_EMPLOYERS, (2,), "corp"),
        }
        self._names = KeyedPermutation(N_GIVEN * N_FAMILY, derive_key(self.seed, "names"))
        self._value_keys = [derive_key(self.seed, "values", a) for a in ATTRIBUTES]
        self._rotation_key = derive_key(self.seed, "template rotation")

    # ----------------------------------------------------------------------------------------- sizes
    @property
    def n_people(self) -> int:
        return self.n_entities

    @property
    def value_token_counts(self) -> dict[str, int]:
        """Tokens of one value of each attribute (every value of an attribute has the same count)."""
        return {a: len(v[0].split(" ")) for a, v in self.value_sets.items()}

    @property
    def max_bits(self) -> float:
        """``N · Σ_a log2 |V_a|``: the knowledge in the corpus, what a perfect model stores."""
        return knowledge_bits(self.n_entities, list(self.value_set_sizes.values()), 0.0)

    def vocabulary(self) -> list[str]:
        """Every word a sentence can contain, specials first (ids 0 and 1), then sorted: a pure function of ``seed``."""
        words = {TERMINATOR, *self.given_names, *self.family_names}
        for attribute, templates in self.templates.items():
            for template in templates:
                words.update(w for w in template.split(" ") if w not in ("{name}", "{value}"))
            for value in self.value_sets[attribute]:
                words.update(value.split(" "))
        return [*SPECIAL_TOKENS, *sorted(words)]

    # ----------------------------------------------------------------------------------------- who and what
    def names(self, people: np.ndarray | Sequence[int]) -> list[str]:
        codes = self._names(self._check_ids(people))
        return [f"{self.given_names[c // N_FAMILY]} {self.family_names[c % N_FAMILY]}" for c in codes.tolist()]

    def value_indices(self, people: np.ndarray | Sequence[int], attribute_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Index into ``value_sets[attribute]`` of each ``(person, attribute)``: independent, uniform; int64."""
        people = self._check_ids(people)
        attribute_ids = np.broadcast_to(np.asarray(attribute_ids, dtype=np.int64), people.shape)
        out = np.empty_like(people)
        for a, attribute in enumerate(self.attributes):
            rows = attribute_ids == a
            if rows.any():
                out[rows] = keyed_choice(self._value_keys[a], people[rows], len(self.value_sets[attribute]))
        return out

    def value(self, person: int, attribute: str) -> str:
        a = self.attributes.index(attribute)
        return self.value_sets[attribute][int(self.value_indices([person], [a])[0])]

    # ----------------------------------------------------------------------------------------- phrasings
    def training_template(self, fact_ids: np.ndarray, pass_index: int) -> np.ndarray:
        """The template of each fact in training pass ``pass_index`` (all templates, in rotation)."""
        start = keyed_choice(self._rotation_key, fact_ids, TEMPLATES_PER_ATTRIBUTE)
        return (start + pass_index) % TEMPLATES_PER_ATTRIBUTE

    def prompt_and_answer(self, person: int, attribute: str, template: int) -> tuple[str, str]:
        """The template's words before the value, and ``" " + value`` (no terminator: the answer is the value)."""
        prefix = self.templates[attribute][template].split(" {value}")[0]
        return prefix.format(name=self.names([person])[0]), f" {self.value(person, attribute)}"
