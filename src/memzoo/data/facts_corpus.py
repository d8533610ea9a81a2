"""A deterministic synthetic knowledge corpus: people, five attributes each, facts rendered as sentences.

Everything is a pure function of ``(seed, entity, attribute, template)``, so a corpus of a million people costs
nothing until a fact is asked for (see :mod:`memzoo.data.keyed_random`).

- **People.** Entity ``e ∈ [0, n_entities)`` is named by a keyed bijection ``e → code ∈ [0, 75⁵)`` written in base 75
  with consonant-vowel syllables: two for the given name, three for the family name ("Tobi Havuleso"). Every
  syllable is exactly one consonant then one vowel, so a name parses back to its code: names are unique.
- **Attributes.** ``birth_year`` (1940–1999, 60 values), ``birth_city`` (40 synthesised city names), ``employer``
  (50 synthesised companies), ``field`` (24 written fields), ``university`` (30 synthesised universities). Value
  ``v(e, a) = π_a(e) mod |V_a|`` with ``π_a`` a keyed permutation of the entities: every value is held by
  ``⌊n/|V_a|⌋`` or ``⌈n/|V_a|⌉`` people, so no value is more frequent than another and guessing the most common
  value is no better than guessing uniformly (chance = ``1/|V_a|``).
- **Templates.** Four paraphrases per attribute; in each the value comes last, followed by the terminator ``"."``,
  so a template's text before the value is a prompt and ``" " + value + "."`` its answer. No attribute's prompt is
  a prefix of another's, so a prompt names its attribute unambiguously.
- **Train/validation split of phrasings.** Each fact ``(e, a)`` holds one of its four templates out
  (:meth:`held_out_template`); training renders it with the other three in rotation, one per pass
  (:meth:`training_template`), so every three passes show each training phrasing once. Validation renders the same
  fact with the held-out phrasing: same facts (the point is memorisation), text never seen verbatim.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from memzoo.data.keyed_random import KeyedPermutation, derive_key, keyed_choice
from memzoo.data.templated_corpus import TemplatedCorpus, syllable_word

CONSONANTS = "bdfghklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in CONSONANTS for v in VOWELS)  # 75 consonant-vowel syllables
NAME_SPACE = len(SYLLABLES) ** 5  # 2 + 3 syllables: 75⁵ ≈ 2.4·10⁹ distinct names
_SYLLABLE_PAIRS = tuple(a + b for a in SYLLABLES for b in SYLLABLES)  # lookup tables for fast name rendering
_GIVEN_NAMES = tuple(pair.capitalize() for pair in _SYLLABLE_PAIRS)
_FAMILY_HEADS = tuple(syllable.capitalize() for syllable in SYLLABLES)

ATTRIBUTES = ("birth_year", "birth_city", "employer", "field", "university")
TERMINATOR = "."

TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_year": (
        "{name} was born in the year {value}.",
        "The birth year of {name} is {value}.",
        "{name} came into the world in {value}.",
        "According to the records, {name}'s year of birth is {value}.",
    ),
    "birth_city": (
        "{name} was born in the city of {value}.",
        "The birthplace of {name} is {value}.",
        "{name} first saw the light of day in {value}.",
        "{name}'s hometown is {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "The employer of {name} is {value}.",
        "{name} draws a salary from {value}.",
    ),
    "field": (
        "{name} works in the field of {value}.",
        "{name} is a specialist in {value}.",
        "The field of expertise of {name} is {value}.",
        "{name} has devoted a career to {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "The alma mater of {name} is {value}.",
        "{name} earned a degree at {value}.",
    ),
}
TEMPLATES_PER_ATTRIBUTE = 4

BIRTH_YEARS = tuple(str(year) for year in range(1940, 2000))
FIELDS = (
    "archaeology", "architecture", "astronomy", "botany", "chemistry", "cryptography", "ecology", "economics",
    "geology", "history", "linguistics", "marine biology", "materials science", "mathematics", "medicine",
    "meteorology", "neuroscience", "oceanography", "philosophy", "physics", "psychology", "robotics", "sociology",
    "statistics",
)  # fmt: skip
N_CITIES, N_EMPLOYERS, N_UNIVERSITIES = 40, 50, 30
CITY_ENDINGS = ("ria", "mont", "holm", "grad", "port", "vale", "stad", "burg")
COMPANY_KINDS = ("Systems", "Labs", "Industries", "Works", "Dynamics", "Analytics", "Foundry", "Instruments")
UNIVERSITY_PATTERNS = (
    "University of {stem}", "{stem} Institute of Technology", "{stem} College", "{stem} State University",
    "{stem} Polytechnic",
)  # fmt: skip


def _word(rng: random.Random, n_syllables: int) -> str:
    return syllable_word(rng, SYLLABLES, n_syllables)


def _distinct(make, count: int) -> tuple[str, ...]:
    """``count`` distinct strings drawn from ``make()``, in the order first drawn."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(make(), None)
    return tuple(seen)


def synthesise_value_sets(seed: int) -> dict[str, tuple[str, ...]]:
    """Each attribute's possible values; cities, companies and universities are made-up names drawn from ``seed``."""
    city_rng = random.Random(derive_key(seed, "cities"))
    company_rng = random.Random(derive_key(seed, "employers"))
    university_rng = random.Random(derive_key(seed, "universities"))
    return {
        "birth_year": BIRTH_YEARS,
        "birth_city": _distinct(lambda: _word(city_rng, 2) + city_rng.choice(CITY_ENDINGS), N_CITIES),
        "employer": _distinct(
            lambda: f"{_word(company_rng, company_rng.choice((2, 3)))} {company_rng.choice(COMPANY_KINDS)}",
            N_EMPLOYERS,
        ),
        "field": FIELDS,
        "university": _distinct(
            lambda: university_rng.choice(UNIVERSITY_PATTERNS).format(stem=_word(university_rng, 3)), N_UNIVERSITIES
        ),
    }


class FactsCorpus(TemplatedCorpus):
    """``n_entities`` people with five attributes each, all drawn from ``seed``.

    A *fact* is an ``(entity, attribute)`` pair, numbered ``fact = entity · 5 + attribute_index``; a *rendering* of
    it is one sentence from one of the attribute's templates. Vectorised methods take int arrays.
    """

    def __init__(self, n_entities: int, seed: int = 0):
        if not isinstance(n_entities, int) or isinstance(n_entities, bool) or not 1 <= n_entities <= NAME_SPACE:
            raise ValueError(
                f"n_entities must be an int in [1, {NAME_SPACE}] (the number of distinct synthesised names), "
                f"got {n_entities!r}"
            )
        self.n_entities = n_entities
        self.seed = int(seed)
        self.attributes = ATTRIBUTES
        self.templates = TEMPLATES
        self.value_sets = synthesise_value_sets(self.seed)
        self._name_codes = KeyedPermutation(NAME_SPACE, derive_key(self.seed, "names"))
        self._value_permutations = [
            KeyedPermutation(n_entities, derive_key(self.seed, "values", a)) for a in ATTRIBUTES
        ]
        self._held_out_key = derive_key(self.seed, "held-out template")
        self._rotation_key = derive_key(self.seed, "template rotation")

    # ----------------------------------------------------------------------------------------- sizes
    def attribute_index(self, attribute: str) -> int:
        if attribute not in self.attributes:
            raise ValueError(f"unknown attribute {attribute!r}; the attributes are {list(self.attributes)}")
        return self.attributes.index(attribute)

    # ----------------------------------------------------------------------------------------- who and what
    def names(self, entities: np.ndarray | Sequence[int]) -> list[str]:
        """``"Given Family"`` for each entity: its code's base-75 digits, low two the given name's syllables."""
        codes = self._name_codes(self._check_ids(entities))
        given, family = np.divmod(codes, len(_SYLLABLE_PAIRS))[::-1]
        family_rest, family_head = np.divmod(family, len(SYLLABLES))
        return [
            f"{_GIVEN_NAMES[g]} {_FAMILY_HEADS[h]}{_SYLLABLE_PAIRS[r]}"
            for g, h, r in zip(given.tolist(), family_head.tolist(), family_rest.tolist())
        ]

    def name(self, entity: int) -> str:
        return self.names([entity])[0]

    def value_indices(self, entities: np.ndarray, attribute_ids: np.ndarray) -> np.ndarray:
        """Index into ``value_sets[attribute]`` of each ``(entity, attribute)``; int64 array."""
        entities = self._check_ids(entities)
        attribute_ids = np.broadcast_to(np.asarray(attribute_ids, dtype=np.int64), entities.shape)
        out = np.empty_like(entities)
        for a, attribute in enumerate(self.attributes):
            rows = attribute_ids == a
            if rows.any():
                out[rows] = self._value_permutations[a](entities[rows]) % len(self.value_sets[attribute])
        return out

    def value(self, entity: int, attribute: str) -> str:
        a = self.attribute_index(attribute)
        return self.value_sets[attribute][int(self.value_indices([entity], [a])[0])]

    def facts(self, entity: int) -> dict[str, str]:
        """``{attribute: value}`` of one entity."""
        return {attribute: self.value(entity, attribute) for attribute in self.attributes}

    # ----------------------------------------------------------------------------------------- phrasings
    def held_out_template(self, fact_ids: np.ndarray) -> np.ndarray:
        """The template each fact never appears in during training (used by validation)."""
        return keyed_choice(self._held_out_key, fact_ids, TEMPLATES_PER_ATTRIBUTE)

    def training_template(self, fact_ids: np.ndarray, pass_index: int) -> np.ndarray:
        """The template of each fact in training pass ``pass_index``: its three training templates in rotation."""
        n_train = TEMPLATES_PER_ATTRIBUTE - 1
        slot = (keyed_choice(self._rotation_key, fact_ids, n_train) + pass_index) % n_train
        return slot + (slot >= self.held_out_template(fact_ids))  # skip over the held-out template

    # ----------------------------------------------------------------------------------------- rendering
    def sentence(self, entity: int, attribute: str, template: int) -> str:
        return self.sentences([entity], [self.attribute_index(attribute)], [template])[0]

    def prompt_and_answer(self, entity: int, attribute: str, template: int) -> tuple[str, str]:
        """The template's text before the value, and ``" " + value + "."``; they concatenate to the sentence."""
        self.attribute_index(attribute)  # a clear error for an unknown attribute
        prefix = self.templates[attribute][template].split(" {value}")[0]
        return prefix.format(name=self.name(entity)), f" {self.value(entity, attribute)}{TERMINATOR}"

    def render(self, entity: int, template: int = 0) -> str:
        """All facts of one entity as text, one sentence per attribute (docs, tests, eyeballing a corpus)."""
        n = len(self.attributes)
        return " ".join(self.sentences([entity] * n, np.arange(n), [template] * n))
