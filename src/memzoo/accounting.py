"""Parameter and FLOP accounting of a model: what it stores, what one token reads, what one token costs.

:func:`summarize` gives one row per component (embedding, each layer's attention and FFN-slot block, each shared
pool, the head) with

- ``parameters``: parameters stored (tied or shared tensors counted once, in the row that owns them; a shared pool
  is its own row);
- ``active_parameters``: parameters one token's forward pass reads: all of a dense component, one embedding row,
  only the retrieved rows of a memory or expert table (counted in the layer that reads them, so a shared pool's own
  row shows 0 active), ``top_k`` experts of a MoE;
- ``flops``: forward FLOPs per token.

FLOP convention: a multiply-add counts 2 FLOPs; elementwise work (norms, activations, softmax, top-k selection,
residual adds) and the embedding lookup are not counted. Attention at context length ``T`` costs, per token,
``2·dim·3·dim`` (qkv) + ``2·dim·dim`` (output projection) + the score and value products, ``2·dim`` each per key
attended; averaged over the positions of one causal sequence of length ``T`` a token attends ``(T + 1) / 2`` keys,
so these add ``2·2·dim·(T + 1)/2 = 2·dim·(T + 1)``. An FFN-slot block reports its own cost through
``Block.flops_per_token()`` (dense, moe, peer and product-key memory count their own, the latter two including
their product-key lookup); a block that does not (``Block.declares_flops()`` false) gets the base class's
``2 · active_parameters`` and its row is marked estimated. The head
costs ``2·dim·vocab_size``. A training step costs about 3× the forward FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from memzoo.blocks.base import Block
from memzoo.model.summary import active_parameters, count_parameters
from memzoo.model.transformer import Transformer

if TYPE_CHECKING:
    from memzoo.parallel.planning import ParallelPlan


@dataclass(frozen=True)
class Row:
    """One component of the model."""

    name: str  # "embed", "layers.3.attn", "layers.3.ffn", "pools.shared", "head"
    kind: str  # "embedding", "attention", the block name (with its pool), "pool (experts, dense)", "head"
    parameters: int
    active_parameters: int
    flops: int  # forward FLOPs per token
    flops_estimated: bool = False  # True: 2·active_parameters, the block does not count its own FLOPs


@dataclass(frozen=True)
class Summary:
    """Accounting rows of a model, their totals, and the context length the attention FLOPs assume."""

    rows: list[Row]
    context_length: int
    notes: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(r.parameters for r in self.rows)

    @property
    def active_parameters(self) -> int:
        return sum(r.active_parameters for r in self.rows)

    @property
    def flops(self) -> int:
        """Forward FLOPs per token of the whole model."""
        return sum(r.flops for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): rows, totals, context length, notes."""
        return {
            "context_length": self.context_length,
            "flop_convention": "forward FLOPs per token, multiply-add = 2, attention averaged over a causal "
            "sequence of context_length tokens",
            "rows": [asdict(r) for r in self.rows],
            "total": {
                "parameters": self.parameters,
                "active_parameters": self.active_parameters,
                "flops": self.flops,
            },
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """A fixed-width text table with a total line and the FLOP convention underneath."""
        header = ("name", "block", "params", "active/token", "FLOPs/token")
        body = [
            (r.name, r.kind, f"{r.parameters:,}", f"{r.active_parameters:,}",
             f"{r.flops:,}" + ("*" if r.flops_estimated else ""))
            for r in self.rows
        ]
        total = ("total", "", f"{self.parameters:,}", f"{self.active_parameters:,}", f"{self.flops:,}")
        widths = [max(len(line[i]) for line in (header, *body, total)) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            left = [f"{line[0]:<{widths[0]}}", f"{line[1]:<{widths[1]}}"]
            right = [f"{cell:>{w}}" for cell, w in zip(line[2:], widths[2:], strict=True)]
            return "  ".join(left + right).rstrip()

        rule = "-" * len(fmt(header))
        lines = [fmt(header), rule, *map(fmt, body), rule, fmt(total)]
        lines.append(
            f"FLOPs: forward, per token, multiply-add = 2; attention averaged over a causal sequence of "
            f"{self.context_length} tokens. Training ≈ 3× forward."
        )
        if any(r.flops_estimated for r in self.rows):
            lines.append("* estimated as 2 × active parameters (the block does not count its own FLOPs)")
        lines.extend(self.notes)
        return "\n".join(lines)


def attention_flops_per_token(dim: int, context_length: int) -> int:
    """Forward FLOPs per token of one causal self-attention layer: projections ``8·dim²`` + scores and values
    ``2·dim·(T + 1)`` (the mean over a causal sequence of ``T`` tokens; see the module docstring)."""
    return 2 * dim * 3 * dim + 2 * dim * dim + 2 * dim * (context_length + 1)


def block_flops_per_token(block: Block) -> tuple[int, bool]:
    """A block's forward FLOPs per token and whether it is an estimate (``2 · active parameters``)."""
    return int(block.flops_per_token()), not block.declares_flops()


def summarize(model: nn.Module, context_length: int | None = None) -> Summary:
    """Accounting rows of a :class:`Transformer` (or a module holding one as ``.model``, e.g. ``LanguageModel``).

    ``context_length`` (default: the model's ``max_seq_len``) sets the attention cost; see the module docstring.
    """
    transformer = _find_transformer(model)
    T = transformer.max_seq_len if context_length is None else context_length
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    dim, vocab = transformer.dim, transformer.vocab_size
    rows = [Row("embed", "embedding", transformer.embed.weight.numel(), dim, 0)]
    for i, (layer, spec) in enumerate(zip(transformer.layers, transformer.layer_specs, strict=True)):
        attn_params = sum(count_parameters(m) for m in (layer.attn_norm, layer.attn, layer.ffn_norm))
        rows.append(Row(f"layers.{i}.attn", "attention", attn_params, attn_params, attention_flops_per_token(dim, T)))
        flops, estimated = block_flops_per_token(layer.ffn)
        kind = spec.block + (f" (pool {spec.pool})" if spec.pool else "")
        rows.append(Row(f"layers.{i}.ffn", kind, count_parameters(layer.ffn), active_parameters(layer.ffn), flops,
                        estimated))
    for name, pool in transformer.pools.items():  # rows read are counted by the layers reading them
        rows.append(Row(f"pools.{name}", f"pool ({pool.kind}, {pool.update})", count_parameters(pool), 0, 0))
    tied = transformer.head.weight is transformer.embed.weight
    head_params = transformer.norm.weight.numel() + (0 if tied else transformer.head.weight.numel())
    rows.append(Row("head", "head (tied)" if tied else "head", head_params, dim + vocab * dim, 2 * dim * vocab))
    notes = []
    stored, listed = count_parameters(transformer), sum(r.parameters for r in rows)
    if stored != listed:  # e.g. two blocks registering one tensor: it appears in both rows
        notes.append(f"note: the rows add up to {listed:,} parameters, the model stores {stored:,}")
    return Summary(rows, T, notes)


def _find_transformer(model: nn.Module) -> Transformer:
    if isinstance(model, Transformer):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, Transformer):
        return inner
    raise TypeError(
        f"summarize() needs a memzoo Transformer or a module holding one as `.model` (LanguageModel), "
        f"got {type(model).__name__}"
    )


# ----------------------------------------------------------------------------------------------- from a config
def summarize_config(path: str, context_length: int | None = None, vocab_size: int | None = None) -> Summary:
    """Builds the model of a memzoo YAML config (as ``memzoo fit`` would, without data or training) and summarises it.

    The ``model`` section is parsed and validated by the same jsonargparse machinery as the CLI, so bad keys fail
    with the same messages. The data section is read but never instantiated (its files may not exist here):
    ``vocab_size`` (unless the model sets it) comes from the data's ``tokenizer`` as the CLI links it, and the
    context length (unless given) is the data's ``block_size`` (else the model's ``max_seq_len``). ``vocab_size``, when
    given, replaces both (for data modules that bring their own vocabulary, e.g. the biographies' words). ``plugins:``
    in the config are imported first, so user blocks resolve. The weights are built on the ``meta`` device: no memory
    is allocated, so configs of any size are summarised.
    """
    built = model_from_config(path, vocab_size)
    if context_length is None:
        context_length = built.data_args.get("block_size") or _find_transformer(built.model).max_seq_len
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


def model_from_config(path: str, vocab_size: int | None = None) -> ConfigModel:
    """The ``LanguageModel`` of a memzoo YAML config as :func:`memzoo.build_model` builds it (the CLI's parser and
    defaults), on the ``meta`` device, without its data module or ``init_from``'s weights (``vocab_size``: see
    :func:`summarize_config`)."""
    import torch

    from memzoo.build import build_model
    from memzoo.config_yaml import load_yaml_file
    from memzoo.data.tokenizers import build_tokenizer

    config = load_yaml_file(path) or {}
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path}: a memzoo config needs a `model:` section (see configs/quickstart.yaml)")
    data_args = _class_section(config.get("data") or {}, None)["init_args"]
    model_section = _class_section(config["model"], "memzoo.LanguageModel")
    architecture = model_section["init_args"].get("architecture") or {}
    if not isinstance(architecture, dict):
        raise ValueError(f"{path}: model.init_args.architecture must be a mapping of architecture fields")
    if vocab_size is None:  # the CLI links it from the data module, whose vocabulary is its tokenizer's
        vocab_size = architecture.get("vocab_size") or build_tokenizer(data_args.get("tokenizer", "byte")).vocab_size
    with torch.device("meta"):
        model = build_model(path, vocab_size=int(vocab_size), load_weights=False)
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
    path: str, world_size: int, memory_parallel: int | None = None, element_bytes: int = 4, strategy: str | None = None
) -> ParallelPlan:
    """:func:`memzoo.parallel.planning.plan_parallel` of a memzoo YAML config's model (built on ``meta``: any size),
    with the tokens per rank and step from its data (``batch_size · block_size``) and trainer
    (``accumulate_grad_batches``) sections and the optimizer states from its ``optimizer`` and ``sparse_optimizer``.

    ``strategy`` / ``memory_parallel`` ``None``: the config's own (``trainer.strategy`` naming
    ``MemoryParallelStrategy`` and its ``memory_parallel``), else ``memory_parallel`` 1 and, by
    :func:`~memzoo.parallel.planning.plan_parallel`'s rule, ``memory_parallel`` when ``M > 1``, ``ddp`` otherwise."""
    from memzoo.config_yaml import load_yaml_file
    from memzoo.parallel.planning import plan_parallel

    built = model_from_config(path)
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
        built.model, world_size, memory_parallel or 1, tokens_per_rank_step=batch * block * accumulate,
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
