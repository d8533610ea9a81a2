"""What the synthetic knowledge corpora share: entities ``0 .. n_entities - 1``, one value per (entity, attribute),
sentences rendered from per-attribute templates, and syllable-built words.

A subclass (:class:`~memzoo.data.facts_corpus.FactsCorpus`, :class:`~memzoo.data.biographies_corpus.BiographyCorpus`)
sets ``n_entities``, ``attributes``, ``value_sets`` and ``templates`` (``{attribute: (template, ...)}``, each with
``{name}`` and ``{value}``) and defines ``names(ids)`` and ``value_indices(ids, attribute_ids)``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np


def syllable_word(rng: random.Random, syllables: Sequence[str], n_syllables: int) -> str:
    """A capitalised word of ``n_syllables`` syllables drawn from ``syllables`` with ``rng``."""
    return "".join(rng.choice(syllables) for _ in range(n_syllables)).capitalize()


class TemplatedCorpus:
    """Id checks and sentence rendering over a subclass's names, values and templates (see the module docstring)."""

    #: How errors name an id and the corpus size (``entity`` / ``n_entities``, ``person`` / ``n_people``).
    entity_word = "entity"
    count_name = "n_entities"

    n_entities: int
    attributes: tuple[str, ...]
    value_sets: dict[str, tuple[str, ...]]
    templates: dict[str, tuple[str, ...]]

    @property
    def n_facts(self) -> int:
        """Facts ``(entity, attribute)``, numbered ``entity · len(attributes) + attribute_index``."""
        return self.n_entities * len(self.attributes)

    @property
    def value_set_sizes(self) -> dict[str, int]:
        """How many values each attribute draws from."""
        return {a: len(v) for a, v in self.value_sets.items()}

    def _check_ids(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """``ids`` as a 1-d int64 array; ``IndexError`` naming the first id outside ``[0, n_entities)``."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_entities):
            bad = ids[(ids < 0) | (ids >= self.n_entities)][0]
            raise IndexError(
                f"{self.entity_word} {bad} is outside [0, {self.n_entities}) ({self.count_name}={self.n_entities})"
            )
        return ids

    def sentences(self, ids: np.ndarray | Sequence[int], attribute_ids, templates) -> list[str]:
        """One rendered sentence per ``(id, attribute, template)`` (``attribute_ids`` and ``templates`` broadcast)."""
        ids = self._check_ids(ids)
        attribute_ids = np.broadcast_to(np.asarray(attribute_ids, dtype=np.int64), ids.shape)
        templates = np.broadcast_to(np.asarray(templates, dtype=np.int64), ids.shape)
        names, values = self.names(ids), self.value_indices(ids, attribute_ids)
        out = []
        for name, a, t, v in zip(names, attribute_ids.tolist(), templates.tolist(), values.tolist()):
            attribute = self.attributes[a]
            out.append(self.templates[attribute][t].format(name=name, value=self.value_sets[attribute][v]))
        return out

    def names(self, ids: np.ndarray | Sequence[int]) -> list[str]:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def value_indices(self, ids, attribute_ids) -> np.ndarray:  # pragma: no cover - defined by subclasses
        raise NotImplementedError
