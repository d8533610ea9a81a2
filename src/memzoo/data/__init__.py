"""Data modules (token batches for :class:`~memzoo.training.module.LanguageModel`) and tokenizers.

- :class:`FactsDataModule`: the embedded default, a synthetic corpus of facts about made-up people, with recall
  probes that measure memorisation;
- :class:`BiographiesDataModule`: biographies with uniformly random attributes over a word vocabulary, whose
  validation loss measures the knowledge a model stores in bits (capacity studies);
- :class:`TextDataModule`: local text / jsonl / parquet files or a Hugging Face dataset;
- :class:`LMDataModule`: their common base (batch format, loaders, checks);
- :func:`build_tokenizer`: ``"byte"`` (:class:`ByteTokenizer`) or a ``tokenizer.json`` (:class:`HFTokenizer`).

The data modules subclass Lightning's ``LightningDataModule``, so they are imported on first use (PEP 562): the
tokenizers (all that :func:`memzoo.load_pretrained` and ``memzoo generate`` need) load without Lightning.
"""

from __future__ import annotations

from memzoo.data.tokenizers import ByteTokenizer, HFTokenizer, build_tokenizer
from memzoo.lazy_exports import lazy_exports

#: Public name -> the module defining it, imported when the name is first read.
_LAZY = {
    "LMDataModule": "memzoo.data.base",
    "BiographiesDataModule": "memzoo.data.biographies",
    "FactsDataModule": "memzoo.data.facts",
    "TextDataModule": "memzoo.data.text",
}

__all__ = [
    "BiographiesDataModule",
    "ByteTokenizer",
    "FactsDataModule",
    "HFTokenizer",
    "LMDataModule",
    "TextDataModule",
    "build_tokenizer",
]

__getattr__, __dir__ = lazy_exports(globals(), _LAZY, __all__)
