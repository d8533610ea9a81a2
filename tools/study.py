"""The iso-FLOP study: dense, 2x / 4x dense, MoE, PKM, Memory+, PEER, UltraMemV2, Engram, STEM and MoLE on the same
data, tokens and schedule.

A *cell* is one (workload, model) training run. The models are ``configs/study/model-<name>.yaml``, matched on active
forward FLOPs per token with :func:`memzoo.config_accounting.summarize_config` (``dense-2x`` / ``dense-4x`` are matched to
2x / 4x the dense model); the study prints the FLOP/parameter table and refuses a grid whose cells miss their FLOP
target by more than ``--tolerance``. The workloads are the synthetic facts corpus at several knowledge loads
(``configs/study/data-facts.yaml``, ``n_entities`` per load) and byte-level tiny Shakespeare
(``configs/study/data-shakespeare.yaml``, ``--text``). Every cell of a workload trains for the same steps on the same
batches with the same schedule.

Each cell runs in-process through ``memzoo.cli.main(["fit", ...])`` (one training at a time, ``--threads`` torch
threads), writes its run folder ``runs/study-<study>-<workload>-<model>/version_<n>/`` and then its result JSON,
atomically, to ``docs/results/<study>-cells/<workload>__<model>.json``. A rerun skips every cell whose result exists
with the same config hash (model file, data file, command-line overrides), so an interrupted study resumes; a fresh
clone restores the committed page's cells (:func:`restore_cells`) and trains none of them again. ``--reproduce``
trains them afresh as ``<study>-reproduced`` and heads that page with each cell beside its committed one
(:func:`reproduction_rows`): bit-exact on the processor that trained them (each cell names its ``machine``).
Outputs: ``docs/results/<study>.json`` (all cells, the FLOP table, the targets), ``<study>.md`` (tables) and two
plots, ``<study>-loss-vs-flops.png`` (validation loss against training FLOPs, one panel per workload) and
``<study>-recall-vs-load.png`` (fact recall against knowledge load).

    python tools/study.py --quick                 # 33 cells (11 models x 3 workloads); 4 min 8 s on 2 idle cores
    python tools/study.py --jobs 2 --threads 1    # the full study, 44 cells (the 28 of its first 7 models: 46 min)
    python tools/study.py --dry-run               # the FLOP/parameter table and the plan only
    python tools/study.py --report-only           # rewrite the json/md/png from the stored cells
    python tools/study.py --quick --reproduce     # the quick cells trained afresh, each against its committed one
    python tools/study.py --name full-lr-3e-3 --set model.init_args.optimizer.init_args.lr=3e-3   # a variant study
    python tools/study.py --name study --workloads shakespeare --seeds 1337 2 --jobs 2 --threads 1   # text, 2 seeds
    python tools/study.py --name study-bpe --workloads shakespeare --seeds 1337 2 --jobs 2 --threads 1 \
        --tokenizer configs/study/tokenizer-shakespeare-bpe-2048.json   # text at a 2,048-id subword vocabulary

``--tokenizer`` tokenises every workload with a ``tokenizer.json`` (its content is part of each cell's hash) and the
FLOP table counts its vocabulary. The committed one is a byte-level BPE of 2,048 ids learned from the first 90% of
tiny Shakespeare (``--write-bpe`` rewrites it): the vocabulary kind that the token-indexed tables (STEM, Engram,
MoLE) are designed for, where a byte vocabulary gives a table one row per byte.

A variant study (``--name`` + ``--set KEY=VALUE``, repeatable) appends ``--KEY VALUE`` to every cell's ``memzoo fit``
arguments; a dict-valued key (``layers``, ``pools``) takes the whole dict as JSON, e.g.
``--set 'model.init_args.architecture.pools={"memory": {"n_keys": 128, "value_dim": 128, "update": "sparse", "lr": 0.03}}'``.

``--seeds`` trains every model at each seed (cells ``<model>@seed<n>`` for seeds other than the configs' 1337); the
text targets compare each model with dense at the same seed and count as met only when every seed agrees.

Throughput (tokens/s) is reported as a ratio to the dense model of the same workload and seed: absolute times on a
shared machine are noise. Text workloads also get a table at equal wall-clock: each model's validation loss after
the dense cell's training time, read off its validation curve.

One file past 500 lines: the grid runner (worker processes, resume, failure reporting), the FLOP check and the report
share the cell records; tools/capacity.py runs its grid through them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from memzoo.atomic import write_bytes_atomic
from memzoo.machine import describe_machine
from memzoo.subnormals import ENV_SWITCH as SUBNORMALS_SWITCH
from memzoo.subnormals import flush_requested

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "study"
RESULTS_DIR = ROOT / "docs" / "results"
DEFAULT_TEXT = (ROOT / ".." / "shared" / "data" / "tinyshakespeare.txt").resolve()
STUDY_VERSION = 1  # bump to invalidate every stored cell (the hash covers it)

#: model name -> FLOP target as a multiple of the reference model's FLOPs per token
MODELS: dict[str, float] = {
    "dense": 1.0,
    "dense-2x": 2.0,
    "dense-4x": 4.0,
    "moe": 1.0,
    "pkm": 1.0,
    "memoryplus": 1.0,
    "peer": 1.0,
    "ultramem_v2": 1.0,
    "engram": 1.0,
    "stem": 1.0,
    "mole": 1.0,
}
#: models trained only when named in ``--models`` (outside the default grid), name -> FLOP target: "dense-0.5x" is
#: dense at MoLE's inference FLOPs (its layers re-parameterised into lookup tables)
EXTRA_MODELS: dict[str, float] = {"dense-0.5x": 0.49}
ALL_MODELS: dict[str, float] = {**MODELS, **EXTRA_MODELS}
REFERENCE_MODEL = "dense"
#: the study configs' ``seed_everything``: a cell trained with it is named by its model alone, another seed's cell
#: ``<model>@seed<n>`` (``--seeds``)
SEED = 1337
#: dense learning rate on the facts workloads (memorisation; the quickstart's): 3x the text rate of the model configs
FACTS_LR = 3.0e-3
MEMORY_MODELS = ("pkm", "memoryplus", "peer", "ultramem_v2", "engram")
#: token-indexed tables (STEM: the byte vocabulary's rows; MoLE: experts as trained, a table only at inference)
LOOKUP_MODELS = ("stem", "mole")
#: tables read through a learned router (product keys), whose rows can collapse onto a few: the usage target's models.
#: Engram's hashed n-grams and STEM's token rows are indexed by the text, so their share of rows read is set by the
#: data (STEM reads the bytes that occur), not by training; it is reported, not targeted.
ROUTED_MODELS = ("pkm", "memoryplus", "peer", "ultramem_v2")


class StudyError(ValueError):
    """A study that cannot run as asked (unmatched FLOPs, missing files, unknown names)."""


# ------------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Workload:
    """One dataset and schedule; every model of the study trains on it identically.

    ``knowledge_load`` is the number of entities of a facts workload (``None`` for text). ``steps`` optimizer steps
    of ``batch_size x block_size`` tokens; validation every ``val_every`` steps over ``val_batches`` batches.
    """

    name: str
    data_config: str  # file name in configs/study/
    steps: int
    val_every: int
    val_batches: int | float  # an int counts batches, 1.0 means all of them
    batch_size: int
    block_size: int = 64
    knowledge_load: int | None = None
    data_args: tuple[tuple[str, Any], ...] = ()  # extra --data.init_args.<key> <value>
    lr: float | None = None  # the dense learning rate of every model on this workload (None: the model config's)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    def overrides(self) -> list[str]:
        """Command-line overrides that turn a model config + this workload's data config into the cell's run."""
        warmup = min(100, max(1, self.steps // 10))
        args = [
            "--trainer.max_steps", str(self.steps),
            "--trainer.val_check_interval", str(self.val_every),
            "--trainer.check_val_every_n_epoch", "null",
            "--trainer.limit_val_batches", str(self.val_batches),
            "--trainer.num_sanity_val_steps", "0",
            "--trainer.gradient_clip_val", "1.0",
            "--trainer.log_every_n_steps", str(max(1, min(10, self.val_every))),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--model.init_args.warmup_steps", str(warmup),
            "--model.init_args.lr_decay_steps", str(self.steps),
            "--data.init_args.batch_size", str(self.batch_size),
            "--data.init_args.block_size", str(self.block_size),
        ]
        if self.lr is not None:
            args += ["--model.init_args.optimizer.init_args.lr", str(self.lr)]
        for key, value in self.data_args:
            args += [f"--data.init_args.{key}", str(value)]
        return args


def facts_workloads(loads: Sequence[int], steps: int, val_every: int, val_batches: int, batch_size: int,
                    recall_samples: int, lr: float | None = FACTS_LR) -> list[Workload]:
    return [
        Workload(f"facts-{n}", "data-facts.yaml", steps, val_every, val_batches, batch_size, knowledge_load=n,
                 data_args=(("n_entities", n), ("recall_samples", recall_samples)), lr=lr)
        for n in loads
    ]


def study_plan(quick: bool, text: Path) -> list[Workload]:
    """The workloads of the quick or the full study (see the module docstring).

    Sized for a 2-core CPU. The full study trains each of the 7 models on about 4M tokens: facts at 30, 100 and 300
    entities, 1,000 steps x 1,024 tokens each (a pass over the facts is 112, 364 and 1,089 windows of 64 bytes, so
    about 143, 44 and 15 passes), and shakespeare, 1,000 steps x 768 tokens (half the nanoGPT schedule). The quick
    one trains on about 0.17M tokens. With a fixed token budget a larger knowledge load also means fewer passes over
    each fact, so the load axis mixes capacity and repetition (on 2 cores, a budget in which a 0.9M-parameter dense
    model runs out of *capacity* is out of reach; it runs out of passes first). Facts train at
    :data:`FACTS_LR` (memorisation wants a higher rate than text)."""
    if quick:
        facts = facts_workloads((100, 1000), steps=60, val_every=30, val_batches=4, batch_size=16,
                                recall_samples=64)
        shakespeare = Workload("shakespeare", "data-shakespeare.yaml", steps=60, val_every=30, val_batches=20,
                               batch_size=12, data_args=(("path", text),))
    else:
        facts = facts_workloads((30, 100, 300), steps=1000, val_every=250, val_batches=16, batch_size=16,
                                recall_samples=256)
        shakespeare = Workload("shakespeare", "data-shakespeare.yaml", steps=1000, val_every=250, val_batches=50,
                               batch_size=12, data_args=(("path", text),))
    return [*facts, shakespeare]


#: the committed byte-level BPE of tiny Shakespeare (``--write-bpe``): ``--tokenizer`` for a study at a subword
#: vocabulary, the one token-indexed tables (STEM, Engram, MoLE) are designed for
BPE_TOKENIZER = CONFIG_DIR / "tokenizer-shakespeare-bpe-2048.json"
BPE_VOCAB = 2048
#: the share of the text the BPE learns from: the text workload validates on the last 10% of the tokens
BPE_TRAIN_SHARE = 0.9


def write_bpe_tokenizer(text: Path, path: Path = BPE_TOKENIZER, vocab_size: int = BPE_VOCAB) -> Path:
    """Learns a byte-level BPE of ``vocab_size`` ids at most (``<|endoftext|>`` and the 256 bytes among them) from
    the first :data:`BPE_TRAIN_SHARE` of ``text`` (not the held-out tail) with the ``tokenizers`` library and writes
    its ``tokenizer.json`` to ``path`` atomically. About a second for tiny Shakespeare (1.1 MB)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise StudyError(f"--bpe-vocab {vocab_size}: a byte-level BPE needs >= 257 ids (256 bytes + end of text)")
    content = text.read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([content[: int(len(content) * BPE_TRAIN_SHARE)]], trainer=trainer)
    write_bytes_atomic(path, tokenizer.to_str(pretty=True).encode())
    return path


def with_tokenizer(plan: Sequence[Workload], spec: str) -> list[Workload]:
    """Every workload of ``plan`` tokenised by ``spec`` (``--data.init_args.tokenizer``)."""
    return [replace(w, data_args=(*w.data_args, ("tokenizer", spec))) for w in plan]


# ------------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class ModelCost:
    """Accounting of one study model: forward FLOPs per token, stored and active parameters, FLOP target."""

    model: str
    flops_per_token: int
    parameters: int
    active_parameters: int
    flop_target: float  # multiple of the reference model's FLOPs
    flop_ratio: float  # actual multiple

    @property
    def flop_error(self) -> float:
        """Relative miss of the FLOP target: ``ratio / target - 1``."""
        return self.flop_ratio / self.flop_target - 1.0


def model_config(model: str, config_dir: Path = CONFIG_DIR) -> Path:
    return config_dir / f"model-{model}.yaml"


def model_overrides(extra: Sequence[str]) -> list[str]:
    """The ``--model.…`` pairs of a variant's ``--set`` arguments (``["--key", "value", ...]``): what changes the
    model a cell builds (seed, data and trainer keys do not)."""
    pairs = zip(extra[::2], extra[1::2])
    return [arg for key, value in pairs if key.startswith("--model.") for arg in (key, value)]


def flop_table(models: Iterable[str], targets: dict[str, float] | None = None, config_dir: Path = CONFIG_DIR,
               vocab_size: int | None = None, overrides: Sequence[str] = ()) -> list[ModelCost]:
    """One :class:`ModelCost` per model of ``config_dir``, ratios against ``REFERENCE_MODEL``'s own config (always
    computed); ``targets`` maps a model to its FLOP multiple (default :data:`ALL_MODELS`); ``vocab_size`` overrides the
    one the configs' data section implies (a study whose data module brings its own vocabulary); ``overrides``
    (a variant's ``--set`` arguments) apply to ``models`` as their cells train them, not to the reference."""
    from memzoo.config_accounting import summarize_config

    targets = ALL_MODELS if targets is None else targets
    models = list(models)
    overrides = model_overrides(overrides)

    def summary(model: str, extra: Sequence[str]):
        return summarize_config(str(model_config(model, config_dir)), vocab_size=vocab_size, overrides=list(extra))

    reference = summary(REFERENCE_MODEL, ()).flops
    costs = []
    for m in dict.fromkeys(models):
        s = summary(m, overrides)
        costs.append(ModelCost(m, s.flops, s.parameters, s.active_parameters, targets[m], s.flops / reference))
    return costs


def check_flop_matching(costs: Sequence[ModelCost], tolerance: float, config_dir: Path = CONFIG_DIR) -> list[str]:
    """Messages for every model whose FLOPs miss its target by more than ``tolerance`` (relative); empty if matched."""
    if not 0 < tolerance < 1:
        raise StudyError(f"tolerance must be in (0, 1), got {tolerance!r} (0.1 = cells within 10% of their target)")
    return [
        f"{c.model}: {c.flop_ratio:.3f}x the {REFERENCE_MODEL} FLOPs per token, target {c.flop_target:g}x "
        f"({c.flop_error:+.1%}, tolerance ±{tolerance:.0%}); change {_relative(model_config(c.model, config_dir))}"
        for c in costs
        if abs(c.flop_error) > tolerance
    ]


def format_flop_table(costs: Sequence[ModelCost]) -> str:
    header = "| model | FLOPs/token (fwd) | × dense | target | parameters | active parameters |"
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in costs:
        lines.append(f"| {c.model} | {c.flops_per_token:,} | {c.flop_ratio:.2f} | {c.flop_target:g} | "
                     f"{c.parameters:,} | {c.active_parameters:,} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- cells
def cell_name(workload: Workload, model: str) -> str:
    return f"{workload.name}__{model}"


def base_model(model: str) -> str:
    """The model of a cell name: a variant cell ``<model>@<variant>`` (a seed, a rate, a control) trains
    ``<model>``'s config with its variant's arguments."""
    return model.split("@", 1)[0]


def seed_variant(model: str, seed: int, default: int = SEED) -> str:
    """The cell model of ``model`` trained with ``seed``: ``model`` for the configs' own seed, else
    ``model@seed<n>``."""
    return model if seed == default else f"{model}@seed{seed}"


def cell_seed(model: str, default: int = SEED) -> int:
    """The seed a cell model trains with: its ``@seed<n>`` part, else the configs' seed ``default``."""
    return next((int(part[4:]) for part in model.split("@")[1:] if part.startswith("seed")), default)


def cell_args(study: str, workload: Workload, model: str, extra: Sequence[str] = (),
              config_dir: Path = CONFIG_DIR) -> list[str]:
    """The ``memzoo fit`` arguments of one cell (verb excluded), configs from ``config_dir``; ``extra`` (a variant's
    ``--set`` overrides, as ``--key value`` pairs) comes last, so it wins over the configs and the workload."""
    return [
        "--config", str(model_config(base_model(model), config_dir)),
        "--config", str(config_dir / workload.data_config),
        *workload.overrides(),
        "--trainer.callbacks+", '{"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step", "verbose": false}}',
        "--checkpoint.save_last", "false",
        "--checkpoint.save_top_k", "0",
        "--experiment", f"study-{study}-{workload.name}-{model}",
        *extra,
    ]


#: the argument that names a workload's tokenizer (``--tokenizer``, :func:`with_tokenizer`)
TOKENIZER_ARG = "--data.init_args.tokenizer"
#: arguments whose value is a file that a cell's hash reads by name and content (a tokenizer spec may be "byte")
FILE_ARGS = ("--config", TOKENIZER_ARG)


def config_hash(args: Sequence[str]) -> str:
    """SHA-256 of what determines a cell's result: the study version, the arguments and the content of every config
    file and ``tokenizer.json`` they name (so editing a YAML invalidates exactly the cells that use it)."""
    h = hashlib.sha256(f"memzoo-study-v{STUDY_VERSION}\n".encode())
    args = list(args)
    for i, arg in enumerate(args):
        is_file = i > 0 and args[i - 1] in FILE_ARGS and (args[i - 1] == "--config" or Path(arg).is_file())
        h.update((Path(arg).name if is_file else arg).encode() + b"\0")
        if is_file:  # by name and content: a moved checkout keeps its cells; a tokenizer's merges decide every token
            h.update(Path(arg).read_bytes())
    return h.hexdigest()


def load_cell(path: Path, expected_hash: str, cost: ModelCost | None = None) -> dict[str, Any] | None:
    """The stored result at ``path`` if it exists, parses and has ``expected_hash``; else ``None`` (rerun). With
    ``cost``, its accounting (:func:`with_cost`) is today's: what it trained is measured, what that costs is counted."""
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if result.get("config_hash") != expected_hash:
        return None
    return result if cost is None else with_cost(result, cost)


#: The fields of a cell record (:func:`cell_result`, ``wall_seconds``, the cost fields of :func:`with_cost`); a results
#: page's JSON adds derived ones (bits, ratios) to each cell it lists.
CELL_FIELDS = ("workload", "model", "knowledge_load", "config_hash", "args", "run_dir", "steps", "tokens",
               "train_seconds", "tokens_per_s", "final", "memory", "curve", "wall_seconds", "flops_per_token",
               "parameters", "active_parameters", "train_flops", "machine", "code", "flush_subnormals")


def restore_cells(page_json: Path, cells_dir: Path) -> int:
    """Writes the cell records a results page's JSON lists (``cells`` and ``variant_cells``) into ``cells_dir``
    where that cell has no file yet; returns how many it wrote.

    The cells folders are not committed, so without this a fresh clone would train every cell again to re-report
    or extend a committed study (a new seed, a new rate). A restored record is reused only where :func:`load_cell`
    finds its config hash equal to today's (the same arguments and config files); any other cell trains again.
    """
    try:
        page = json.loads(page_json.read_text())
    except FileNotFoundError:
        return 0
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"{page_json}: not valid JSON ({err}); restore it with git checkout or delete it") from None
    written = 0
    for record in [*page.get("cells", []), *page.get("variant_cells", [])]:
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("workload", "model", "config_hash")):
            continue
        name = f"{record['workload']}__{record['model']}.json"
        if Path(name).name != name or name.startswith("."):  # a file name, never a path out of cells_dir
            raise StudyError(f"{page_json}: cell {name!r} is not a plain file name; the page is damaged")
        path = cells_dir / name
        if path.exists():
            continue
        write_json_atomic(path, {key: record[key] for key in CELL_FIELDS if key in record})
        written += 1
    return written


def reference_cells(page_json: Path) -> list[dict[str, Any]]:
    """The cells (plain and variant) of a committed results page, for ``--reproduce`` to compare with."""
    try:
        page = json.loads(page_json.read_text())
    except FileNotFoundError:
        raise StudyError(f"--reproduce: no committed page {page_json} to reproduce; name a page that exists with "
                         f"--name (and its grid's flags), or drop --reproduce") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudyError(f"{page_json}: not valid JSON ({err}); restore it with git checkout") from None
    return [c for c in [*page.get("cells", []), *page.get("variant_cells", [])] if isinstance(c, dict)]


def same_run(args: Sequence[str], other: Sequence[str]) -> bool:
    """Whether two cells' arguments train the same run: equal but for the experiment's name (a run folder) and the
    folder the config and tokenizer files lie in (their content is in each cell's config hash, not compared here)."""
    def key(a: Sequence[str]) -> list[str]:
        a = list(a)
        return [Path(x).name if i and a[i - 1] in FILE_ARGS else
                "" if i and a[i - 1] == "--experiment" else x for i, x in enumerate(a)]
    return key(args) == key(other)


def reproduction_rows(cells: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]],
                      bits: Callable[[dict[str, Any]], float] | None = None) -> dict[str, Any]:
    """Each reproduced cell beside the committed cell of the same workload and name: final validation loss (and
    ``bits(cell)`` where given), the difference, and where each trained. ``status``: ``bit-exact`` (equal
    validation loss), ``differs``, ``no committed cell`` or ``other arguments`` (the committed cell trained another
    run: compared, but not a reproduction). A one-thread CPU run repeats to the bit on the machine that trained it;
    elsewhere kernels round differently and training amplifies that (:mod:`memzoo.machine`)."""
    committed = {(c.get("workload"), c.get("model")): c for c in reference}
    rows = []
    for cell in sorted(cells, key=lambda c: (c["workload"], c["model"])):
        ref = committed.get((cell["workload"], cell["model"]))
        row = {"workload": cell["workload"], "model": cell["model"], "val_loss": cell["final"]["val_loss"],
               "machine": cell.get("machine"), "code": cell.get("code"),
               "flush_subnormals": cell.get("flush_subnormals"), **({} if bits is None else {"bits": bits(cell)})}
        if ref is None:
            rows.append({**row, "status": "no committed cell"})
            continue
        status = ("other arguments" if not same_run(cell.get("args", []), ref.get("args", []))
                  else "bit-exact" if ref["final"]["val_loss"] == row["val_loss"] else "differs")
        row |= {"status": status, "committed_val_loss": ref["final"]["val_loss"],
                "committed_machine": ref.get("machine"), "committed_code": ref.get("code"),
                "committed_flush_subnormals": ref.get("flush_subnormals"),
                "delta_val_loss": row["val_loss"] - ref["final"]["val_loss"]}
        if bits is not None:
            committed_bits = bits(ref)
            row |= {"committed_bits": committed_bits, "delta_bits": row["bits"] - committed_bits}
        rows.append(row)
    compared = [r for r in rows if r["status"] in ("bit-exact", "differs")]
    largest = max(compared, key=lambda r: abs(r["delta_val_loss"]), default=None)
    return {"rows": rows, "compared": len(compared), "bit_exact": sum(r["status"] == "bit-exact" for r in compared),
            "max_abs_delta_val_loss": None if largest is None else abs(largest["delta_val_loss"]),
            **({} if bits is None else {"max_abs_delta_bits": max((abs(r["delta_bits"]) for r in compared),
                                                                  default=None)})}


def reproduction_section(reproduction: dict[str, Any], bits: bool = False, level: int = 2) -> list[str]:
    """A reproduced page's comparison with the committed page (:func:`reproduction_rows`), as Markdown lines under a
    heading of ``level``; with ``bits`` also the bits columns (the capacity study's)."""
    largest = reproduction["max_abs_delta_val_loss"]
    summary = (f"{reproduction['bit_exact']} of {reproduction['compared']} cells that train the committed runs came "
               "out bit-exact" + ("" if largest is None else f"; the largest validation-loss difference is {largest:.4f}")
               + ("" if not bits or reproduction.get("max_abs_delta_bits") is None
                  else f" ({reproduction['max_abs_delta_bits']:,.0f} bits at most)")
               + ".")
    head = "| workload | cell | status | val loss (committed → here) | Δ val loss |"
    rule = "| --- | --- | --- | --- | ---: |"
    if bits:
        head += " bits (committed → here) | Δ bits |"
        rule += " ---: | ---: |"
    def recorded(value: Any) -> str:
        return "not recorded" if value is None else ("yes" if value else "no") if isinstance(value, bool) else str(value)

    def tally(key: str) -> str:
        names = (recorded(r.get(key)) for r in reproduction["rows"] if "committed_val_loss" in r)
        return ", ".join(f"{name} ({n})" for name, n in Counter(names).most_common()) or "–"

    here = reproduction["rows"][0] if reproduction["rows"] else {}
    setup = (f"Committed cells: code {tally('committed_code')}; subnormals flushed: "
             f"{tally('committed_flush_subnormals')}. This run: {recorded(here.get('machine'))}, code "
             f"{recorded(here.get('code'))}, subnormals flushed: {recorded(here.get('flush_subnormals'))}. A cell "
             f"repeats to the bit only with the same machine, code and `{SUBNORMALS_SWITCH}` setting.")
    lines = [f"{'#' * level} Reproduction: each cell against the committed one", "", summary, "", setup, "",
             head + " committed on |", rule + " --- |"]
    for r in reproduction["rows"]:
        if "committed_val_loss" not in r:
            line = f"| {r['workload']} | {r['model']} | {r['status']} | – → {r['val_loss']:.4f} | – |"
            line += f" – → {r['bits']:,.0f} | – |" if bits else ""
            lines.append(line + " – |")
            continue
        line = (f"| {r['workload']} | {r['model']} | {r['status']} | {r['committed_val_loss']:.4f} → "
                f"{r['val_loss']:.4f} | {r['delta_val_loss']:+.4f} |")
        if bits:
            share = f" ({r['delta_bits'] / r['committed_bits']:+.1%})" if r["committed_bits"] else ""
            line += f" {r['committed_bits']:,.0f} → {r['bits']:,.0f} | {r['delta_bits']:+,.0f}{share} |"
        lines.append(line + f" {r['committed_machine'] or 'not recorded'} |")
    return [*lines, ""]


def with_cost(cell: dict[str, Any], cost: ModelCost) -> dict[str, Any]:
    """``cell`` with the fields that count its model (``flops_per_token``, ``parameters``, ``active_parameters``,
    ``train_flops`` and each curve point's) from ``cost``: training FLOPs are 3x forward per token."""
    per_token = 3 * cost.flops_per_token  # forward + backward ≈ 3x forward
    return {**cell, "flops_per_token": cost.flops_per_token, "parameters": cost.parameters,
            "active_parameters": cost.active_parameters, "train_flops": cell["tokens"] * per_token,
            "curve": [{**p, "train_flops": p["tokens"] * per_token} for p in cell["curve"]]}


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------------------------------------- metrics.csv
def _float(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def read_validation(metrics_csv: Path) -> list[dict[str, float]]:
    """The validation rows of a run's ``metrics.csv``: ``{"step": s, "val/loss": ..., ...}`` with every ``val/`` metric
    logged at that step (Lightning may split one step's metrics over several rows; they are merged)."""
    by_step: dict[int, dict[str, float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            values = {k: _float(v) for k, v in row.items() if k.startswith("val/") and _float(v) is not None}
            if values and row.get("step") not in (None, ""):
                step = int(float(row["step"]))
                by_step.setdefault(step, {"step": step}).update(values)
    return [by_step[s] for s in sorted(by_step) if "val/loss" in by_step[s]]


def memory_usage(row: dict[str, float]) -> dict[str, dict[str, float]]:
    """``val/memory/<pool>/<stat>`` entries of a validation row as ``{pool: {stat: value}}``."""
    pools: dict[str, dict[str, float]] = {}
    for key, value in row.items():
        if key.startswith("val/memory/"):
            pool, stat = key[len("val/memory/"):].rsplit("/", 1)
            pools.setdefault(pool, {})[stat] = value
    return pools


def cell_result(workload: Workload, model: str, cost: ModelCost, metrics_csv: Path, train_seconds: float,
                config_hash_: str, args: Sequence[str]) -> dict[str, Any]:
    """The result record of a finished cell (plain data, JSON-ready; its cost fields by :func:`with_cost`)."""
    rows = read_validation(metrics_csv)
    if not rows:
        raise StudyError(f"{metrics_csv}: no validation rows (val/loss); did the run validate at its last step?")
    final = rows[-1]
    tokens = workload.steps * workload.tokens_per_step
    return with_cost({
        "workload": workload.name,
        "model": model,
        "knowledge_load": workload.knowledge_load,
        "config_hash": config_hash_,
        "args": list(args),
        "run_dir": str(metrics_csv.parent),
        "steps": workload.steps,
        "tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_s": tokens / train_seconds if train_seconds > 0 else None,
        "machine": describe_machine(),
        "code": code_version(),
        "flush_subnormals": flush_requested(),
        "final": {
            "step": final["step"],
            "val_loss": final["val/loss"],
            "val_ppl": final.get("val/ppl", math.exp(final["val/loss"])),
            "val_accuracy": final.get("val/accuracy"),
            "fact_recall": final.get("val/fact_recall"),
            "fact_recall_chance": final.get("val/fact_recall_chance"),
        },
        "memory": memory_usage(final),
        "curve": [
            {"step": r["step"], "tokens": (r["step"] + 1) * workload.tokens_per_step,
             "val_loss": r["val/loss"], "fact_recall": r.get("val/fact_recall")}
            for r in rows
        ],
    }, cost)


def code_version(root: Path = ROOT) -> str | None:
    """The commit of the memzoo checkout that trains a cell (``git rev-parse HEAD``), with ``+changes`` when its
    ``src`` or ``configs`` differ from that commit; ``None`` outside a git checkout. What a reproduction needs
    beside the machine: the code and configs that trained the cell."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "src", "configs").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if changed else "")


def machines_line(cells: Sequence[dict[str, Any]]) -> str:
    """Where a page's cells trained, for its header: each machine (:func:`memzoo.machine.describe_machine`, recorded
    by :func:`cell_result`) with its cell count, most cells first, and how many cells recorded none. A run on one CPU
    thread repeats to the bit only on the machine that trained it."""
    counts = Counter(cell.get("machine") or "not recorded (cells trained before cells named their machine)"
                     for cell in cells)
    if not counts:
        return "Trained on: no cells yet"
    return "Trained on: " + "; ".join(f"{machine} ({n} cell{'s' * (n != 1)})" for machine, n in counts.most_common())


def training_seconds(trainer: Any, n_validations: int) -> float:
    """Seconds spent training (the fit's wall time minus its validation runs), from Lightning's ``Timer``: the
    training stage spans the whole fit, and every validation run of a cell is the same size, so validation costs
    ``n_validations x`` the last one."""
    from lightning.pytorch.callbacks import Timer

    timers = [c for c in trainer.callbacks if isinstance(c, Timer)]
    if not timers:
        raise StudyError("the cell's trainer has no Timer callback (cell_args adds one)")
    timer = timers[0]
    return timer.time_elapsed("train") - n_validations * timer.time_elapsed("validate")


def stored_cell(study: str, workload: Workload, model: str, cost: ModelCost, cells_dir: Path,
                extra: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> dict[str, Any] | None:
    """The cell's stored result when one with today's config hash exists (:func:`load_cell`, reported as skipped),
    else ``None``: it has to train."""
    digest = config_hash(cell_args(study, workload, model, extra, config_dir))
    stored = load_cell(cells_dir / f"{cell_name(workload, model)}.json", digest, cost)
    if stored is not None:
        print(f"[study] {cell_name(workload, model)}: done before (hash {digest[:10]}), skipped", flush=True)
    return stored


def run_cell(study: str, workload: Workload, model: str, cost: ModelCost, cells_dir: Path,
             extra: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """Trains one cell in-process (unless a stored result with the same config hash exists) and stores its result."""
    from memzoo.cli import main as memzoo_main

    stored = stored_cell(study, workload, model, cost, cells_dir, extra, config_dir)
    if stored is not None:
        return stored
    args = cell_args(study, workload, model, extra, config_dir)
    digest = config_hash(args)
    path = cells_dir / f"{cell_name(workload, model)}.json"
    print(f"[study] {cell_name(workload, model)}: training {workload.steps} steps ...", flush=True)
    start = time.perf_counter()
    cli = memzoo_main(["fit", *args])
    metrics_csv = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    cli.trainer.logger.finalize("success")
    n_val = workload.steps // workload.val_every
    result = cell_result(workload, model, cost, metrics_csv, training_seconds(cli.trainer, n_val), digest, args)
    result["wall_seconds"] = time.perf_counter() - start
    write_json_atomic(path, result)
    f = result["final"]
    recall = "" if f["fact_recall"] is None else f", fact recall {f['fact_recall']:.3f}"
    print(f"[study] {cell_name(workload, model)}: val loss {f['val_loss']:.4f}{recall} "
          f"({result['wall_seconds']:.0f} s)", flush=True)
    return result


def _run_cell_in_worker(threads: int, study: str, workload: Workload, model: str, cost: ModelCost,
                        cells_dir: Path, extra: Sequence[str], config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """:func:`run_cell` with ``threads`` torch threads (in a ``--jobs`` worker process, or in this one)."""
    import torch

    torch.set_num_threads(threads)
    return run_cell(study, workload, model, cost, cells_dir, extra, config_dir)


def _cell_failed(workload: Workload, model: str, error: BaseException) -> StudyError:
    return StudyError(f"cell {cell_name(workload, model)} failed: {error!r}; its finished neighbours are stored, a "
                      f"rerun resumes")


def _die_with_parent(parent: int) -> None:
    """A ``--jobs`` worker's first step (Linux): the kernel sends it SIGKILL when the study process that started it
    exits, so a study stopped by a signal (``kill``, a job scheduler) leaves no worker training on and storing its
    cell afterwards; a worker whose study is already gone exits at once. Elsewhere, nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def run_grid(study: str, grid: Sequence[tuple[Workload, str]], costs: dict[str, ModelCost], cells_dir: Path,
             jobs: int, threads: int, on_cell: Any = None, extra: Sequence[str] = (),
             config_dir: Path = CONFIG_DIR, cell_extra: dict[str, Sequence[str]] | None = None
             ) -> list[dict[str, Any]]:
    """Every cell of ``grid`` (stored ones are reused), ``jobs`` trainings at a time, each with ``threads`` torch
    threads (``jobs x threads`` should not exceed the free cores). Returns the results in grid order; calls
    ``on_cell(results so far, in grid order)`` once for the stored cells (read before any training) and after every
    cell trained, so a partial study is readable and lists every finished cell.

    With ``jobs > 1`` each cell trains in a fresh spawned process: cells share no state, and a cell's tokens/s is
    measured while the other jobs train (the throughput ratios stay comparable when every cell runs that way). The
    workers end with this process, however it ends (:func:`_die_with_parent`).
    ``cell_extra`` maps a model (e.g. a variant ``<model>@<variant>``) to more arguments after ``extra``."""
    cell_extra = cell_extra or {}
    if jobs < 1 or threads < 1:
        raise StudyError(f"--jobs and --threads must be >= 1, got jobs={jobs}, threads={threads}")
    results: dict[int, dict[str, Any]] = {}

    def report() -> None:
        if on_cell is not None:
            on_cell([results[j] for j in sorted(results)])

    def finished(i: int, result: dict[str, Any]) -> None:
        results[i] = result
        report()

    to_train = []
    for i, (workload, model) in enumerate(grid):
        try:  # (its config hash reads the config files its arguments name)
            stored = stored_cell(study, workload, model, costs[model], cells_dir,
                                 (*extra, *cell_extra.get(model, ())), config_dir)
        except OSError as error:
            raise _cell_failed(workload, model, error) from error
        if stored is None:
            to_train.append(i)
        else:
            results[i] = stored
    if results:
        report()

    if jobs == 1:
        for i in to_train:
            workload, model = grid[i]
            finished(i, _run_cell_in_worker(threads, study, workload, model, costs[model], cells_dir,
                                            (*extra, *cell_extra.get(model, ())), config_dir))
        return [results[i] for i in range(len(grid))]

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state in the workers
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(_run_cell_in_worker, threads, study, *grid[i], costs[grid[i][1]], cells_dir,
                               (*extra, *cell_extra.get(grid[i][1], ())), config_dir): i
                   for i in to_train}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)  # report each cell as it finishes
            for future in done:
                i = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise _cell_failed(*grid[i], error) from error
                finished(i, future.result())
    return [results[i] for i in range(len(grid))]


# ------------------------------------------------------------------------------------------------------- report
def targets(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The study's targets checked on the results: ``{"target", "met", "detail"}`` each (skipped if cells are missing).

    - facts, at every knowledge load (on 2 cores no load makes the small dense model run out of capacity rather
      than of passes, so the study shows all of them; the largest is the one the headline reads): Memory+ recalls
      >= 2x the dense model's facts, and at least as many as dense-2x (both only count as met when Memory+ recalls
      more than chance: 0 >= 2 x 0 is no win);
    - text (a workload without a knowledge load): every memory and lookup design (:data:`MEMORY_MODELS`,
      :data:`LOOKUP_MODELS`) reaches a validation loss <= the dense model's at equal FLOPs, at every seed both ran
      (``--seeds``; met only when all seeds agree);
    - every pool of a routed model (:data:`ROUTED_MODELS`) uses >= 80% of its rows in the final validation (no
      collapse).
    """
    by = {(c["workload"], c["model"]): c for c in cells}
    out: list[dict[str, Any]] = []
    loads = sorted({c["knowledge_load"] for c in cells if c["knowledge_load"] is not None})
    for load in loads:
        w = f"facts-{load}"
        recall = {m: by[(w, m)]["final"]["fact_recall"] for m in ("dense", "dense-2x", "memoryplus") if (w, m) in by}
        if "memoryplus" in recall:
            mp = recall["memoryplus"]
            chance = by[(w, "memoryplus")]["final"]["fact_recall_chance"] or 0.0
            for other, factor in (("dense", 2.0), ("dense-2x", 1.0)):
                if other in recall:
                    out.append({"target": f"{w}: Memory+ recall >= {factor:g}x {other}",
                                "met": mp >= factor * recall[other] and mp > chance,
                                "detail": f"Memory+ {mp:.3f} vs {other} {recall[other]:.3f}, chance {chance:.3f}"})
    for w in dict.fromkeys(c["workload"] for c in cells if c["knowledge_load"] is None):
        loss = {(base_model(c["model"]), cell_seed(c["model"])): c["final"]["val_loss"] for c in cells
                if c["workload"] == w}
        for m in (*MEMORY_MODELS, *LOOKUP_MODELS):
            seeds = sorted(s for (model, s) in loss if model == m and (REFERENCE_MODEL, s) in loss)
            if seeds:
                out.append({"target": f"{w}: {m} val loss <= {REFERENCE_MODEL} at equal FLOPs, every seed",
                            "met": all(loss[(m, s)] <= loss[(REFERENCE_MODEL, s)] for s in seeds),
                            "detail": "; ".join(f"seed {s}: {loss[(m, s)]:.4f} vs {loss[(REFERENCE_MODEL, s)]:.4f}"
                                                for s in seeds)})
    for c in (c for c in cells if base_model(c["model"]) in ROUTED_MODELS):
        for pool, stats in c["memory"].items():
            used = stats.get("used_fraction")
            if used is not None:
                out.append({"target": f"{c['workload']}/{c['model']} pool {pool}: used >= 80%", "met": used >= 0.8,
                            "detail": f"used {used:.1%}, KL to uniform {stats.get('kl_uniform', float('nan')):.3f}"})
    return out


def loss_at_seconds(cell: dict[str, Any], seconds: float) -> float | None:
    """The cell's validation loss after ``seconds`` of its training time: its final loss if it trained for less,
    else interpolated linearly in time between its validation points (a point's time is ``train_seconds`` x its
    share of the cell's tokens: throughput taken as constant over a run); ``None`` before its first point. The
    learning-rate schedule is the full run's, so a point before the end is read at a higher rate than a run ending
    there would have (pessimistic for the slower model)."""
    if seconds >= cell["train_seconds"]:
        return cell["final"]["val_loss"]
    points = [(cell["train_seconds"] * p["tokens"] / cell["tokens"], p["val_loss"]) for p in cell["curve"]]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    return None


def equal_wall_clock(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per text workload and seed, every model's validation loss after the dense cell's training time (its
    ``train_seconds``, validation excluded), beside its loss at equal FLOPs (its final one): one row per cell."""
    rows = []
    dense = {(c["workload"], cell_seed(c["model"])): c for c in cells
             if base_model(c["model"]) == REFERENCE_MODEL and c["knowledge_load"] is None}
    for c in cells:
        ref = dense.get((c["workload"], cell_seed(c["model"])))
        if ref is None:
            continue
        budget = ref["train_seconds"]
        rows.append({"workload": c["workload"], "model": base_model(c["model"]), "seed": cell_seed(c["model"]),
                     "seconds": budget, "share_of_steps": min(1.0, budget / c["train_seconds"]),
                     "val_loss_equal_time": loss_at_seconds(c, budget), "val_loss_equal_flops": c["final"]["val_loss"],
                     "dense_val_loss": ref["final"]["val_loss"]})
    return rows


def equal_wall_clock_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`equal_wall_clock`'s rows."""
    lines = ["| workload | model | seed | steps done in dense's time | val loss, equal time | val loss, equal FLOPs | "
             "dense |", "|" + " --- |" * 3 + " ---: |" * 4]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['model']} | {r['seed']} | {r['share_of_steps']:.0%} | "
                     f"{_fmt(r['val_loss_equal_time'], '.4f')} | {r['val_loss_equal_flops']:.4f} | "
                     f"{r['dense_val_loss']:.4f} |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(cells: Sequence[dict[str, Any]]) -> str:
    """Markdown table of every cell, grouped by workload; tokens/s as a ratio to the dense cell of the workload and
    seed."""
    dense_speed = {(c["workload"], cell_seed(c["model"])): c["tokens_per_s"] for c in cells
                   if base_model(c["model"]) == REFERENCE_MODEL}
    header = ("| workload | model | val loss | val ppl | fact recall | memory used | memory KL | tokens/s ÷ dense | "
              "params | active params | train FLOPs |")
    lines = [header, "|" + " --- |" * 2 + " ---: |" * 9]
    for c in cells:
        f = c["final"]
        used = [s["used_fraction"] for s in c["memory"].values() if "used_fraction" in s]
        kl = [s["kl_uniform"] for s in c["memory"].values() if "kl_uniform" in s]
        base = dense_speed.get((c["workload"], cell_seed(c["model"])))
        speed = c["tokens_per_s"] / base if base and c["tokens_per_s"] else None
        lines.append(
            f"| {c['workload']} | {c['model']} | {f['val_loss']:.4f} | {f['val_ppl']:.2f} | "
            f"{_fmt(f['fact_recall'], '.3f')} | {', '.join(f'{u:.1%}' for u in used) or '–'} | "
            f"{', '.join(f'{k:.3f}' for k in kl) or '–'} | {_fmt(speed, '.2f')} | {c['parameters']:,} | "
            f"{c['active_parameters']:,} | {c['train_flops']:.2e} |"
        )
    return "\n".join(lines)


def model_color(model: str) -> str:
    """One colour per model, the same in every panel and plot (matplotlib's tab10 in :data:`ALL_MODELS` order, then
    :data:`MORE_COLOURS`)."""
    names = list(ALL_MODELS)
    if model not in names:
        return "black"
    i = names.index(model)
    return f"C{i}" if i < 10 else MORE_COLOURS[(i - 10) % len(MORE_COLOURS)]


MORE_COLOURS = ("darkgoldenrod", "teal", "indigo", "olive", "crimson")


def plot_loss_vs_flops(cells: Sequence[dict[str, Any]], path: Path) -> None:
    """Validation loss against training FLOPs (3x forward), one panel per workload, one line per cell (a model's
    colour; dashed for a seed other than the configs')."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(c["workload"] for c in cells))
    fig, axes = plt.subplots(1, len(workloads), figsize=(6.0 * len(workloads), 3.8), squeeze=False)
    for ax, w in zip(axes[0], workloads, strict=True):
        for c in (c for c in cells if c["workload"] == w):  # another seed than the configs': dashed
            ax.plot([p["train_flops"] for p in c["curve"]], [p["val_loss"] for p in c["curve"]], marker="o",
                    markersize=3, label=c["model"], color=model_color(base_model(c["model"])),
                    linestyle="-" if cell_seed(c["model"]) == SEED else "--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.set_title(w)
        ax.set_xlabel("training FLOPs (3 × forward)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        # every panel (a panel may hold a subset of the models), beside it: 20 cells would cover the curves
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall_vs_load(cells: Sequence[dict[str, Any]], path: Path) -> None:
    """Final fact recall against knowledge load (entities), one line per model, chance as a dashed line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = sorted((c for c in cells if c["knowledge_load"] is not None), key=lambda c: c["knowledge_load"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for model in dict.fromkeys(c["model"] for c in facts):
        points = [(c["knowledge_load"], c["final"]["fact_recall"]) for c in facts if c["model"] == model]
        ax.plot(*zip(*points, strict=True), marker="o", label=model, color=model_color(model))
    chance = [c["final"]["fact_recall_chance"] for c in facts if c["final"]["fact_recall_chance"] is not None]
    if chance:
        ax.axhline(sum(chance) / len(chance), color="grey", linestyle="--", linewidth=1, label="chance")
    top = max([c["final"]["fact_recall"] or 0.0 for c in facts] + chance + [0.0])
    ax.set_ylim(0.0, max(0.1, 1.1 * top))
    ax.set_xscale("log")
    loads = sorted({c["knowledge_load"] for c in facts})
    ax.set_xticks(loads, [f"{n:,}" for n in loads])  # the loads themselves, not log-scale decades
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("knowledge load (entities, 5 facts each)")
    ax.set_ylabel("fact recall (exact match)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(study: str, cells: Sequence[dict[str, Any]], costs: Sequence[ModelCost], out_dir: Path,
                 meta: dict[str, Any], reference: Sequence[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Writes ``<study>.json``, ``<study>.md`` and the two plots into ``out_dir``; returns their paths. With
    ``reference`` (``--reproduce``: the committed page's cells) both also compare each cell with its committed one."""
    paths = {
        "json": out_dir / f"{study}.json",
        "md": out_dir / f"{study}.md",
        "loss_plot": out_dir / f"{study}-loss-vs-flops.png",
        "recall_plot": out_dir / f"{study}-recall-vs-load.png",
    }
    checked = targets(cells)
    same_time = equal_wall_clock(cells)
    reproduction = None if reference is None else reproduction_rows(cells, reference)
    write_json_atomic(paths["json"], {"study": study, **meta, "flop_table": [asdict(c) for c in costs],
                                      "targets": checked, "equal_wall_clock": same_time, "cells": list(cells),
                                      **({} if reproduction is None else {"reproduction": reproduction})})
    target_lines = [f"- {'met' if t['met'] else 'MISSED'}: {t['target']} ({t['detail']})" for t in checked]
    has_facts = any(c["knowledge_load"] is not None for c in cells)
    md = [f"# Study `{study}`", "", f"Command: `{meta.get('command', '')}`", "", machines_line(cells), "",
          *([] if reproduction is None else reproduction_section(reproduction)),
          "## Models (FLOPs matched)", "",
          format_flop_table(costs), "", "## Results (final validation)", "", results_table(cells), ""]
    if same_time:
        md += ["## Text at equal wall-clock", "",
               "Each model's validation loss after the dense model's training time (same workload and seed; "
               "validation excluded), read off its validation curve (see `loss_at_seconds` in tools/study.py: "
               "throughput constant over a run, the full run's learning-rate schedule). Equal FLOPs is the final "
               "loss.", "", equal_wall_clock_table(same_time), ""]
    md += ["## Targets", "", *target_lines, "", f"![loss vs FLOPs]({paths['loss_plot'].name})", ""]
    if has_facts:
        md += [f"![recall vs load]({paths['recall_plot'].name})", ""]
    write_bytes_atomic(paths["md"], "\n".join(md).encode())
    if cells:
        plot_loss_vs_flops(cells, paths["loss_plot"])
        if has_facts:
            plot_recall_vs_load(cells, paths["recall_plot"])
    return paths


# ------------------------------------------------------------------------------------------------------- main
def variant_args(overrides: Sequence[str], name: str | None) -> list[str]:
    """``["key=value", ...]`` (``--set``) as ``memzoo fit`` arguments ``["--key", "value", ...]``."""
    if overrides and not name:
        raise StudyError("--set makes a variant study: give it a --name (e.g. --name full-lr-3e-3), so its cells are "
                         "stored apart from the study it varies")
    extra: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise StudyError(f"--set {item!r}: expected KEY=VALUE, e.g. model.init_args.optimizer.init_args.lr=3e-3")
        extra += [f"--{key}", value]
    return extra


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small study: 60 steps a cell, about 4 minutes on 2 CPU cores")
    parser.add_argument("--name", default=None, help="study name (default: quick | full)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="tiny Shakespeare text file")
    parser.add_argument("--models", nargs="+", default=list(MODELS),
                        help=f"subset of {list(MODELS)} (the default), or of these and {list(EXTRA_MODELS)}")
    parser.add_argument("--workloads", nargs="+", default=None, help="subset of workload names (default: all)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="allowed relative miss of a FLOP target")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per training")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained at once, each in its own process (jobs x threads <= free cores)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a variant: pass --KEY VALUE to every cell (e.g. model.init_args.optimizer.init_args.lr=3e-3); "
                             "needs --name, so the variant's cells never replace the study's own")
    parser.add_argument("--seeds", type=int, nargs="+", default=[SEED],
                        help=f"seeds of every model (default: the configs' {SEED}); another seed's cells are "
                             "<model>@seed<n>, and the text targets need every seed to agree")
    parser.add_argument("--tokenizer", default=None, metavar="SPEC",
                        help="tokenise every workload with SPEC ('byte', the configs' default, or a tokenizer.json, "
                             f"e.g. {BPE_TOKENIZER.relative_to(ROOT)}); the FLOP table counts its vocabulary")
    parser.add_argument("--write-bpe", action="store_true",
                        help=f"learn the byte-level BPE of --text ({BPE_VOCAB} ids) into "
                             f"{BPE_TOKENIZER.relative_to(ROOT)} and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the FLOP table and the plan, train nothing")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the stored cells")
    parser.add_argument("--reproduce", action="store_true",
                        help="train the study's cells afresh (none restored from the committed page) as "
                             "<name>-reproduced and compare each with the committed <name>.json's cell (with "
                             "--report-only: rewrite that page from its stored cells)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    study = args.name or ("quick" if args.quick else "full")
    extra = variant_args(args.overrides, args.name)
    reference = None
    if args.reproduce:  # with --report-only: the reproduced page rewritten from its stored cells
        reference = reference_cells(args.out / f"{study}.json")
        study = f"{study}-reproduced"
    unknown = [m for m in args.models if m not in ALL_MODELS]
    if unknown:
        raise StudyError(f"unknown model(s) {unknown}; choose from {list(ALL_MODELS)}")
    if not args.text.is_file():
        raise StudyError(f"--text {args.text}: no such file (tiny Shakespeare, e.g. ../shared/data/tinyshakespeare.txt)")
    if args.write_bpe:
        path = write_bpe_tokenizer(args.text)
        print(f"[study] wrote {_relative(path)}", flush=True)
        return {"tokenizer": str(path)}
    plan = study_plan(args.quick, args.text.resolve())
    vocab_size = None
    if args.tokenizer is not None:
        from memzoo.data.tokenizers import build_tokenizer

        spec = args.tokenizer if args.tokenizer == "byte" else str(Path(args.tokenizer).resolve())
        try:
            vocab_size = build_tokenizer(spec).vocab_size
        except (OSError, ValueError) as err:
            raise StudyError(f"--tokenizer {args.tokenizer}: {err}") from None
        plan = with_tokenizer(plan, spec)
    if args.workloads is not None:
        names = [w.name for w in plan]
        missing = [w for w in args.workloads if w not in names]
        if missing:
            raise StudyError(f"unknown workload(s) {missing}; this study has {names}")
        plan = [w for w in plan if w.name in args.workloads]

    costs = flop_table(args.models, vocab_size=vocab_size, overrides=extra)
    print(format_flop_table(costs), flush=True)
    problems = check_flop_matching(costs, args.tolerance)
    if problems:
        raise StudyError("the grid is not FLOP-matched:\n  " + "\n  ".join(problems))
    print(f"[study] FLOPs matched within ±{args.tolerance:.0%}; {len(plan)} workloads × {len(args.models)} models × "
          f"{len(set(args.seeds))} seeds: "
          + ", ".join(f"{w.name} ({w.steps} steps × {w.tokens_per_step} tokens)" for w in plan), flush=True)
    command = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report-only"]
    meta = {"command": " ".join(["python tools/study.py", *command]),
            "tolerance": args.tolerance, "torch_threads": args.threads, "jobs": args.jobs, "overrides": extra,
            "workloads": [asdict(w) | {"data_args": [list(a) for a in w.data_args]} for w in plan]}
    meta["workloads"] = json.loads(json.dumps(meta["workloads"], default=str))
    if args.dry_run:
        return {"flop_table": [asdict(c) for c in costs], "plan": meta["workloads"]}

    cells_dir = args.out / f"{study}-cells"
    restored = restore_cells(args.out / f"{study}.json", cells_dir)
    if restored:
        print(f"[study] {restored} cell records restored from {study}.json into {_relative(cells_dir)}", flush=True)
    cell_extra = {seed_variant(m, seed): [] if seed == SEED else ["--seed_everything", str(seed)]
                  for m in args.models for seed in dict.fromkeys(args.seeds)}
    by_model = {m: next(c for c in costs if c.model == base_model(m)) for m in cell_extra}
    grid = [(workload, model) for workload in plan for model in cell_extra]
    if args.report_only:
        stored = (load_cell(cells_dir / f"{cell_name(w, m)}.json",
                            config_hash(cell_args(study, w, m, [*extra, *cell_extra[m]])), by_model[m])
                  for w, m in grid)
        cells = [c for c in stored if c is not None]
    else:
        cells = run_grid(study, grid, by_model, cells_dir, args.jobs, args.threads,
                         on_cell=lambda done: write_report(study, done, costs, args.out, meta, reference),
                         extra=extra, cell_extra=cell_extra)
    paths = write_report(study, cells, costs, args.out, meta, reference)
    print(results_table(cells))
    for t in targets(cells):
        print(f"{'met' if t['met'] else 'MISSED'}: {t['target']} ({t['detail']})")
    print("[study] wrote " + ", ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                                     for p in paths.values() if p.exists()))  # no recall plot without facts
    return {"cells": cells, "paths": {k: str(v) for k, v in paths.items()}}


if __name__ == "__main__":
    try:
        main()
    except StudyError as err:
        raise SystemExit(f"study: {err}") from None
