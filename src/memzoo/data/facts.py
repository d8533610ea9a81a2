"""``FactsDataModule``: the embedded default corpus, synthetic facts about made-up people (no download).

The corpus itself (people, attributes, value sets, templates, the train/validation split of phrasings) is
:class:`~memzoo.data.facts_corpus.FactsCorpus`. This module turns it into batches:

- **Training** is an endless stream of *passes*. Pass ``p`` lists every fact once, in the order of a keyed
  permutation of the fact ids drawn for that pass, each rendered with its training template for pass ``p`` (the three
  training templates rotate, one per pass). Every rendered fact is one document followed by eos; the pass's
  documents are packed end to end and cut into windows of ``block_size + 1`` tokens at stride ``block_size``.
  A pass is ``blocks_per_pass`` windows, estimated from the first 4096 documents so it is known without rendering
  the pass; its stream is read cyclically, so the last window of a pass wraps to the pass's first tokens when the
  estimate is long and the last few tokens are skipped when it is short (a few documents per pass either way).
  An epoch is ``samples_per_epoch`` windows (default: one pass); epoch ``e`` continues where epoch ``e - 1`` ended.
  Nothing is rendered before it is read (:class:`~memzoo.data.doc_stream.LazyTokenStream`).
- **Cost.** Windows are read in order (the pass order is already random; under DDP each rank reads a contiguous
  share, see :class:`~memzoo.data.sampling.EpochSampler`), so each fact is rendered about once per pass per
  process, at about 10 µs per fact (byte tokenizer, one core); a stream keeps up to :data:`SENTENCE_CACHE` tokenised
  sentences, so a small corpus renders each (fact, template) once and a pass costs only its order. The first read at token ``t`` of a pass renders the
  pass up to ``t`` to locate it: resuming in the middle of a pass of a million-entity corpus takes about a minute.
- **Validation** uses ``recall_samples`` facts drawn once from the seed (the *probed facts*):
  index 0, language-model loss on each probed fact rendered with its held-out template (a sentence never seen in
  training, stating a fact that was); index 1, recall probes: prompt = eos + the text of one template before the
  value, labels on the answer ``" " + value + "."`` only. ``recall_phrasing="seen"`` (default) prompts with the
  fact's training template of pass 0 (memorisation); ``"held_out"`` with its held-out template (does the fact
  transfer to a phrasing never trained on?).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from memzoo.data.base import LMDataModule, _positive_int
from memzoo.data.doc_stream import LazyTokenStream
from memzoo.data.facts_corpus import FactsCorpus
from memzoo.data.keyed_random import KeyedPermutation, derive_key
from memzoo.data.sampling import IGNORE_INDEX
from memzoo.data.tokenizers import Tokenizer
from memzoo.data.windows import ChunkWindows, lm_sample

DOCS_PER_CHUNK = 256  # facts rendered and tokenised together by the training stream (amortises numpy calls)
ESTIMATE_DOCS = 4096  # documents whose mean length sets blocks_per_pass
#: tokenised ``(fact, template)`` sentences a training stream keeps (about 250 bytes each): a pass of a corpus this
#: small renders nothing it rendered before, only the pass's order and templates; beyond it, sentences are rendered
#: every time they are read
SENTENCE_CACHE = 200_000


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    """``encode(t) + [eos]`` for every text, concatenated: int64 array."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    return np.asarray(ids, dtype=np.int64)


class FactsTrainStream(Dataset):
    """Training windows of the facts corpus, rendered on the fly; ``len`` = windows per epoch, and
    ``stream[j]`` for any ``j ≥ 0`` is window ``j mod blocks_per_pass`` of pass ``j // blocks_per_pass``."""

    def __init__(self, corpus: FactsCorpus, tokenizer: Tokenizer, block_size: int, samples_per_epoch: int | None):
        self.corpus, self.tokenizer, self.block_size = corpus, tokenizer, block_size
        self.n_chunks = -(-corpus.n_facts // DOCS_PER_CHUNK)
        self._passes: OrderedDict[int, LazyTokenStream] = OrderedDict()
        self._sentences: dict[tuple[int, int], np.ndarray] = {}  # (fact, template) -> its tokens and eos
        first_pass = self.pass_stream(0)
        estimate_chunks = min(self.n_chunks, -(-ESTIMATE_DOCS // DOCS_PER_CHUNK))
        estimate_docs = min(corpus.n_facts, estimate_chunks * DOCS_PER_CHUNK)
        tokens = sum(len(first_pass.chunk(c)) for c in range(estimate_chunks))
        self.tokens_per_pass_estimate = tokens * corpus.n_facts / estimate_docs
        self.blocks_per_pass = max(1, round(self.tokens_per_pass_estimate / block_size))
        self.samples_per_epoch = samples_per_epoch or self.blocks_per_pass

    def _render_chunk(self, pass_index: int, order: Callable[[np.ndarray], np.ndarray], c: int) -> np.ndarray:
        positions = np.arange(c * DOCS_PER_CHUNK, min((c + 1) * DOCS_PER_CHUNK, self.corpus.n_facts))
        facts = order(positions)
        templates = np.asarray(self.corpus.training_template(facts, pass_index))
        keys = list(zip(facts.tolist(), templates.tolist()))
        missing = [i for i, key in enumerate(keys) if key not in self._sentences]
        rendered: dict[tuple[int, int], np.ndarray] = {}
        if missing:
            n_attributes = len(self.corpus.attributes)
            texts = self.corpus.sentences(facts[missing] // n_attributes, facts[missing] % n_attributes,
                                          templates[missing])
            rendered = {keys[i]: encode_documents(self.tokenizer, [text]) for i, text in zip(missing, texts)}
            if len(self._sentences) + len(rendered) <= SENTENCE_CACHE:
                self._sentences.update(rendered)
        return np.concatenate([rendered[key] if key in rendered else self._sentences[key] for key in keys])

    def pass_stream(self, pass_index: int) -> LazyTokenStream:
        """The token stream of one pass (the two most recently used passes are kept)."""
        if pass_index in self._passes:
            self._passes.move_to_end(pass_index)
        else:
            order = KeyedPermutation(self.corpus.n_facts, derive_key(self.corpus.seed, "pass order", pass_index))
            if self.corpus.n_facts <= SENTENCE_CACHE:  # the whole pass's order in one vectorised call
                order = order(np.arange(self.corpus.n_facts)).__getitem__
            render = partial(self._render_chunk, pass_index, order)
            self._passes[pass_index] = LazyTokenStream(render, self.n_chunks)
            if len(self._passes) > 2:
                self._passes.popitem(last=False)
        return self._passes[pass_index]

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _window(self, index: int) -> np.ndarray:
        pass_index, block = divmod(int(index), self.blocks_per_pass)
        return self.pass_stream(pass_index).window(block * self.block_size, self.block_size + 1)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return lm_sample(self._window(index), self.block_size, self.tokenizer.pad_id)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """``[self[i] for i in indices]`` (the DataLoader's batched fetch): the windows (always full: the stream is
        cyclic) land in one array, and the samples are rows of two tensors, not two tensors each."""
        windows = np.empty((len(indices), self.block_size + 1), dtype=np.int64)
        for row, index in enumerate(indices):
            windows[row] = self._window(index)
        tokens = torch.from_numpy(windows)
        input_ids, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
        return [{"input_ids": input_ids[row], "labels": labels[row]} for row in range(len(indices))]

    def __getstate__(self) -> dict:  # worker processes start with empty caches
        state = dict(self.__dict__)
        state["_passes"], state["_sentences"] = OrderedDict(), {}
        return state


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class RecallProbes(Dataset):
    """``{"input_ids": (L,), "labels": (L,)}`` per probe: ``[eos] + prompt + answer`` shifted by one, labels only on
    the answer's tokens (the terminator included, so a prefix of the value is not an answer)."""

    def __init__(self, prompts_and_answers: list[tuple[str, str]], tokenizer: Tokenizer):
        self.samples = []
        for prompt, answer in prompts_and_answers:
            full = tokenizer.encode(prompt + answer)
            # a tokenizer that merges across the prompt/answer boundary moves the merged tokens into the answer
            shared = _common_prefix_length(full, tokenizer.encode(prompt))
            sequence = torch.tensor([tokenizer.eos_id, *full], dtype=torch.long)
            labels = sequence[1:].clone()
            labels[:shared] = IGNORE_INDEX
            self.samples.append({"input_ids": sequence[:-1], "labels": labels})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


class FactsDataModule(LMDataModule):
    """Synthetic facts about ``n_entities`` made-up people; see the module docstring for the design.

    Args:
        n_entities: people in the corpus (1 … 2.4·10⁹; 100 … 1,000,000 is the intended range), 5 facts each.
        samples_per_epoch: training windows per epoch; default one pass over all facts (``blocks_per_pass``).
        recall_samples: facts probed at validation (capped at the number of facts).
        recall_phrasing: ``"seen"`` prompts with a training phrasing, ``"held_out"`` with the held-out one.
        block_size, batch_size, num_workers, tokenizer, seed, predict_prompts, predict_file: see
            :class:`~memzoo.data.base.LMDataModule`.
    """

    shuffle_train = False  # a pass is already in random order; reading it in order renders each chunk once

    def __init__(
        self,
        n_entities: int = 1000,
        block_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: str = "byte",
        seed: int = 0,
        samples_per_epoch: int | None = None,
        recall_samples: int = 512,
        recall_phrasing: Literal["seen", "held_out"] = "seen",
        predict_prompts: list[str] | None = None,
        predict_file: str | None = None,
    ):
        super().__init__(block_size, batch_size, num_workers, tokenizer, seed, predict_prompts, predict_file)
        self.corpus = FactsCorpus(n_entities, seed)
        if samples_per_epoch is not None:
            _positive_int("samples_per_epoch", samples_per_epoch)
        self.samples_per_epoch = samples_per_epoch
        _positive_int("recall_samples", recall_samples)
        if recall_phrasing not in ("seen", "held_out"):
            raise ValueError(f"recall_phrasing must be 'seen' or 'held_out', got {recall_phrasing!r}")
        self.recall_phrasing = recall_phrasing
        n_probes = min(recall_samples, self.corpus.n_facts)
        self.probed_facts = KeyedPermutation(self.corpus.n_facts, derive_key(self.seed, "probed facts"))(
            np.arange(n_probes)
        )

    # ---------------------------------------------------------------------------------------- facts
    @property
    def has_recall(self) -> bool:
        return True

    @property
    def recall_chance(self) -> float:
        """Mean over the probed facts of ``1 / |values of its attribute|``."""
        attributes = self.corpus.attributes
        sizes = np.array([len(self.corpus.value_sets[attributes[a]]) for a in self.probed_facts % len(attributes)])
        return float(np.mean(1.0 / sizes))

    def _split(self, facts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_attributes = len(self.corpus.attributes)
        return facts // n_attributes, facts % n_attributes

    # ---------------------------------------------------------------------------------------- datasets
    def build_train_dataset(self) -> FactsTrainStream:
        return FactsTrainStream(self.corpus, self.tokenizer, self.block_size, self.samples_per_epoch)

    def build_val_dataset(self) -> ChunkWindows:
        entities, attributes = self._split(self.probed_facts)
        texts = self.corpus.sentences(entities, attributes, self.corpus.held_out_template(self.probed_facts))
        return ChunkWindows(encode_documents(self.tokenizer, texts), self.block_size, self.tokenizer.pad_id)

    def build_recall_dataset(self) -> RecallProbes:
        entities, attributes = self._split(self.probed_facts)
        if self.recall_phrasing == "seen":
            templates = self.corpus.training_template(self.probed_facts, 0)
        else:
            templates = self.corpus.held_out_template(self.probed_facts)
        probes = [
            self.corpus.prompt_and_answer(int(e), self.corpus.attributes[a], int(t))
            for e, a, t in zip(entities, attributes, templates)
        ]
        return RecallProbes(probes, self.tokenizer)
