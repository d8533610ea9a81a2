"""Accounting of a memzoo YAML config: its model's summary (:func:`summarize_config`) and its per-rank plan under a
strategy (:func:`plan_config`), with the model built as ``memzoo fit`` builds it (:func:`memzoo.build_model`) on the
``meta`` device. Top layer: it builds through the CLI's parser; :mod:`memzoo.accounting` counts a built model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from memzoo.accounting import Summary, find_transformer, summarize

if TYPE_CHECKING:
    from memzoo.parallel.planning import ParallelPlan


def summarize_config(path: str, context_length: int | None = None, vocab_size: int | None = None,
                     built: ConfigModel | None = None, overrides: Sequence[str] = ()) -> Summary:
    """Builds the model of a memzoo YAML config (as ``memzoo fit`` would, without data or training) and summarises it.

    The ``model`` section is parsed and validated by the same jsonargparse machinery as the CLI, so bad keys fail
    with the same messages. The data section is read but never instantiated (its files may not exist here):
    ``vocab_size`` (unless the model sets it) comes from the data's ``tokenizer`` as the CLI links it, and the
    context length (unless given) is the data's ``block_size`` (else the model's ``max_seq_len``). ``vocab_size``, when
    given, replaces both (for data modules that bring their own vocabulary, e.g. the biographies' words). ``plugins:``
    in the config are imported first, so user blocks resolve. The weights are built on the ``meta`` device: no memory
    is allocated, so configs of any size are summarised. ``built``: the config's model already built by
    :func:`model_from_config` (then ``vocab_size`` is its own). ``overrides``: command-line arguments applied after
    the config, as ``memzoo fit --config path OVERRIDES`` would (e.g. ``["--model.init_args.architecture.layers.1.knn",
    "32"]``).
    """
    built = built or model_from_config(path, vocab_size, overrides)
    if context_length is None:
        context_length = built.data_args.get("block_size") or find_transformer(built.model).max_seq_len
    summary = summarize(built.model, context_length)
    summary.notes.append(f"config: {path} (vocab_size {built.vocab_size})")
    return summary


@dataclass
class ConfigModel:
    """A config's model (weights on the ``meta`` device) and the plain sections it was read with."""

    model: nn.Module  # the LanguageModel
    vocab_size: int
    data_args: dict[str, Any]
    trainer_args: dict[str, Any]


def model_from_config(path: str, vocab_size: int | None = None, overrides: Sequence[str] = ()) -> ConfigModel:
    """The ``LanguageModel`` of a memzoo YAML config as :func:`memzoo.build_model` builds it (the CLI's parser and
    defaults), on the ``meta`` device, without its data module or ``init_from``'s weights (``vocab_size``,
    ``overrides``: see :func:`summarize_config`; the plain sections returned are the file's, before overrides)."""
    import torch

    from memzoo.build import build_model
    from memzoo.config_yaml import load_yaml_file
    from memzoo.data.tokenizers import build_tokenizer

    config = load_yaml_file(path) or {}
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path}: a memzoo config needs a `model:` section (see configs/quickstart.yaml)")
    data_args = _class_section(config.get("data") or {}, None)["init_args"]
    model_section = _class_section(config["model"], "memzoo.training.module.LanguageModel")
    architecture = model_section["init_args"].get("architecture") or {}
    if not isinstance(architecture, dict):
        raise ValueError(f"{path}: model.init_args.architecture must be a mapping of architecture fields")
    if vocab_size is None:  # the CLI links it from the data module, whose vocabulary is its tokenizer's
        vocab_size = architecture.get("vocab_size") or build_tokenizer(data_args.get("tokenizer", "byte")).vocab_size
    # a model-only config (e.g. configs/capacity/model-*.yaml): the parser still wants a data section; with
    # vocab_size given it is parsed, never built, so the quickstart's module stands in
    stand_in_data = None if config.get("data") else {"class_path": "memzoo.data.FactsDataModule"}
    source: str | dict | list[str] = path if stand_in_data is None else {**config, "data": stand_in_data}
    if overrides:  # parsed after the file, as on `memzoo fit`'s command line
        source = ["--config", str(path), *(["--data", json.dumps(stand_in_data)] if stand_in_data else []),
                  *overrides]
    with torch.device("meta"):
        model = build_model(source, vocab_size=int(vocab_size), load_weights=False)
    return ConfigModel(model, int(vocab_size), data_args, dict(config.get("trainer") or {}))


def _optimizer_states(optimizer_section: Any) -> tuple[int, str | None]:
    """Optimizer tensors per weight for a YAML ``optimizer`` section, and a note when it is assumed."""
    class_path = optimizer_section.get("class_path", "") if isinstance(optimizer_section, dict) else ""
    args = (optimizer_section.get("init_args") or {}) if isinstance(optimizer_section, dict) else {}
    short = class_path.rsplit(".", 1)[-1]
    if short in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax") or not class_path:
        return 2, None
    if short == "SGD":
        return (1 if args.get("momentum") else 0), None
    if short in ("Adagrad", "RMSprop"):
        return 1 + bool(args.get("momentum")), None
    return 2, f"note: {class_path} assumed to keep 2 optimizer tensors per weight (as Adam)"


def plan_config(
    path: str, world_size: int, memory_parallel: int | None = None, element_bytes: int = 4, strategy: str | None = None,
    built: ConfigModel | None = None,
) -> ParallelPlan:
    """:func:`memzoo.parallel.planning.plan_parallel` of a memzoo YAML config's model (built on ``meta``: any size),
    with the tokens per rank and step from its data (``batch_size · block_size``) and trainer
    (``accumulate_grad_batches``) sections and the optimizer states from its ``optimizer`` and ``sparse_optimizer``.

    ``strategy`` / ``memory_parallel`` ``None``: the config's own (``trainer.strategy`` naming
    ``MemoryParallelStrategy`` and its ``memory_parallel``), else ``memory_parallel`` 1 and, by
    :func:`~memzoo.parallel.planning.plan_parallel`'s rule, ``memory_parallel`` when ``M > 1``, ``ddp`` otherwise.
    ``built``: the config's model already built by :func:`model_from_config`."""
    from memzoo.config_yaml import load_yaml_file
    from memzoo.parallel.planning import plan_parallel

    built = built or model_from_config(path)
    batch = int(built.data_args.get("batch_size", 32))
    block = int(built.data_args.get("block_size") or built.model.architecture.max_seq_len)
    accumulate = int(built.trainer_args.get("accumulate_grad_batches", 1) or 1)
    config = load_yaml_file(path) or {}
    model_section = config.get("model") or {}
    init_args = model_section.get("init_args", model_section) if isinstance(model_section, dict) else {}
    states, note = _optimizer_states(init_args.get("optimizer"))
    configured = (config.get("trainer") or {}).get("strategy") if isinstance(config.get("trainer"), dict) else None
    if isinstance(configured, dict) and "MemoryParallelStrategy" in str(configured.get("class_path", "")):
        strategy = strategy or "memory_parallel"
        if memory_parallel is None:
            memory_parallel = int((configured.get("init_args") or {}).get("memory_parallel", 1))
    plan = plan_parallel(
        built.model, world_size, 1 if memory_parallel is None else memory_parallel, tokens_per_rank_step=batch * block * accumulate,
        dense_optimizer_states=states, sparse_optimizer=built.model.hparams.sparse_optimizer,
        element_bytes=element_bytes, strategy=strategy, micro_batches=accumulate,
    )
    plan.notes.append(f"config: {path}")
    if note:
        plan.notes.append(note)
    return plan


def _class_section(section: Any, default_class: str | None) -> dict[str, Any]:
    """A ``class_path``/``init_args`` section as a dict (a bare mapping of arguments gets ``default_class``)."""
    if isinstance(section, str):
        return {"class_path": section, "init_args": {}}
    if not isinstance(section, dict):
        raise ValueError(f"expected a mapping with class_path/init_args, got {section!r}")
    if "class_path" in section:
        return {"class_path": section["class_path"], "init_args": dict(section.get("init_args") or {})}
    out = {"init_args": dict(section)}
    if default_class is not None:
        out["class_path"] = default_class
    return out
