"""The Hugging Face code files of an export (``configuration_memzoo.py``, ``modeling_memzoo.py``).

They are copied verbatim into every export folder and must stay self-contained: imports of ``torch``,
``transformers`` and each other only (a package here so they ship with memzoo and tests can import them).
"""
