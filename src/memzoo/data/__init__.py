"""Data modules (token batches for :class:`~memzoo.training.module.LanguageModel`) and tokenizers.

- :class:`FactsDataModule`: the embedded default, a synthetic corpus of facts about made-up people, with recall
  probes that measure memorisation;
- :class:`BiographiesDataModule`: biographies with uniformly random attributes over a word vocabulary, whose
  validation loss measures the knowledge a model stores in bits (capacity studies);
- :class:`TextDataModule`: local text / jsonl / parquet files or a Hugging Face dataset;
- :class:`LMDataModule`: their common base (batch format, loaders, checks);
- :func:`build_tokenizer`: ``"byte"`` (:class:`ByteTokenizer`) or a ``tokenizer.json`` (:class:`HFTokenizer`).
"""

from memzoo.data.base import LMDataModule
from memzoo.data.biographies import BiographiesDataModule
from memzoo.data.facts import FactsDataModule
from memzoo.data.text import TextDataModule
from memzoo.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer

__all__ = [
    "BiographiesDataModule",
    "ByteTokenizer",
    "FactsDataModule",
    "HFTokenizer",
    "LMDataModule",
    "TextDataModule",
    "build_tokenizer",
]
