"""``BiographiesDataModule``: the knowledge-capacity corpus (:mod:`memzoo.data.biographies_corpus`) as batches.

- **Training** is the facts' training stream (:class:`~memzoo.data.facts.FactsTrainStream`) over this corpus: pass
  ``q`` lists every fact once in a keyed random order, each sentence one document followed by eos, rendered with
  the fact's template of pass ``q`` (the four templates rotate); documents are packed into windows of
  ``block_size + 1`` tokens. One pass = one exposure of every fact; ``samples_per_epoch`` windows per epoch
  (default one pass).
- **Validation** probes *every* fact: ``[eos] + prompt + value``, with the prompt of the fact's pass-0 template and
  labels on the value's tokens only (never on the prompt or the terminator). Loader 0 gives ``val/loss`` = the mean
  cross-entropy per value token over all facts, so the model's total cross-entropy on the attribute values is
  ``val/loss · value_tokens`` and the knowledge it stores is :meth:`BiographiesDataModule.knowledge_bits`
  (bit-complexity lower bound, arXiv 2404.05405). Loader 1 is the same probes as recall (exact match of every value
  token: ``val/fact_recall``).
- **Tokens** are words (:class:`~memzoo.data.word_tokenizer.WordTokenizer` over the corpus vocabulary, which does
  not depend on ``n_people``): a fact is 5–10 words (6.5 on average) plus eos.
"""

from __future__ import annotations

import numpy as np

from memzoo.data.base import LMDataModule, _positive_int
from memzoo.data.biographies_corpus import BiographyCorpus, knowledge_bits
from memzoo.data.facts import FactsTrainStream, RecallProbes
from memzoo.data.word_tokenizer import WordTokenizer


class BiographiesDataModule(LMDataModule):
    """Synthetic biographies of ``n_people`` people with uniformly random attributes; see the module docstring.

    Args:
        n_people: people in the corpus (1 … 16,384), 5 facts each (``knowledge_load``).
        samples_per_epoch: training windows per epoch; default one pass over all facts.
        block_size, batch_size, num_workers, seed, predict_prompts, predict_file: see
            :class:`~memzoo.data.base.LMDataModule` (the tokenizer is always the corpus's word vocabulary).
    """

    shuffle_train = False  # a pass is already in random order

    def __init__(
        self,
        n_people: int = 1000,
        block_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        predict_prompts: list[str] | None = None,
        predict_file: str | None = None,
    ):
        super().__init__(block_size, batch_size, num_workers, "byte", seed, predict_prompts, predict_file)
        self.corpus = BiographyCorpus(n_people, seed)
        self.tokenizer = WordTokenizer(self.corpus.vocabulary())
        if samples_per_epoch is not None:
            _positive_int("samples_per_epoch", samples_per_epoch)
        self.samples_per_epoch = samples_per_epoch

    # ---------------------------------------------------------------------------------------- capacity
    @property
    def value_tokens(self) -> int:
        """Labelled tokens of the validation probes: every person's value tokens, all attributes."""
        return self.corpus.n_people * sum(self.corpus.value_token_counts.values())

    @property
    def max_bits(self) -> float:
        return self.corpus.max_bits

    def knowledge_bits(self, val_loss: float) -> float:
        """Bits stored (:func:`~memzoo.data.biographies_corpus.knowledge_bits`) from ``val/loss`` (nats per value
        token over all facts, as loader 0 measures it)."""
        return knowledge_bits(self.corpus.n_people, list(self.corpus.value_set_sizes.values()),
                              val_loss * self.value_tokens)

    @property
    def has_recall(self) -> bool:
        return True

    @property
    def recall_chance(self) -> float:
        """Mean over all facts of ``1 / |V_a|`` (guessing each value uniformly)."""
        sizes = self.corpus.value_set_sizes.values()
        return float(np.mean([1.0 / s for s in sizes]))

    def tokens_per_pass(self) -> float:
        """Training tokens of one pass over all facts (documents and eos), estimated as the training stream does."""
        return FactsTrainStream(self.corpus, self.tokenizer, self.block_size, None).tokens_per_pass_estimate

    # ---------------------------------------------------------------------------------------- datasets
    def build_train_dataset(self) -> FactsTrainStream:
        return FactsTrainStream(self.corpus, self.tokenizer, self.block_size, self.samples_per_epoch)

    def _probes(self) -> RecallProbes:
        facts = np.arange(self.corpus.n_facts)
        templates = self.corpus.training_template(facts, 0)
        n_attributes = len(self.corpus.attributes)
        probes = [self.corpus.prompt_and_answer(int(f // n_attributes), self.corpus.attributes[f % n_attributes],
                                                int(t))
                  for f, t in zip(facts.tolist(), templates.tolist())]
        return RecallProbes(probes, self.tokenizer)

    def build_val_dataset(self) -> RecallProbes:
        return self._probes()

    def build_recall_dataset(self) -> RecallProbes:
        return self._val if self._val is not None else self._probes()
