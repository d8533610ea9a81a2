"""The plain (non-Lightning) verbs of the ``memzoo`` command: ``blocks``, ``summary``, ``export``, ``generate``,
``memorize`` and ``slot-stats``."""

from __future__ import annotations

import argparse
import inspect
from typing import Sequence

from memzoo.cli_base import CommandError, VerbParser


def _format_default(value: object) -> str:
    if value is inspect.Parameter.empty:
        return "(required)"
    return repr(value)


def _check_file(verb: str, option: str, path: str) -> None:
    from pathlib import Path

    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise CommandError(f"{verb}: {option}: file {path!r} {what}")


def _check_output_folder(verb: str, option: str, path: str) -> None:
    """Fails unless the folder ``path`` is to be written in exists (it is not created: a typo would go unseen)."""
    from pathlib import Path

    folder = Path(path).parent
    if not folder.is_dir():
        fix = "choose another" if folder.exists() else f"create it (mkdir -p {folder}) or choose another"
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise CommandError(f"{verb}: {option} {path}: the folder {str(folder)!r} {what}; {fix} {option}")


def blocks_command(args: Sequence[str]) -> list[str]:
    """``memzoo blocks [FILTER]``: every registered block and preset (name, class, summary line, the paper it
    follows, a preset's settings) with its hyperparameters and their defaults (a preset's settings included)."""
    from memzoo.registry import block_entry, block_hyperparameters, list_blocks

    parser = VerbParser(prog="memzoo blocks", description="List the registered FFN-slot blocks.")
    parser.add_argument("filter", nargs="?", default=None, help="substring or glob of block names")
    options = parser.parse_args(list(args))
    names = list_blocks(options.filter)
    if not names:
        print(f"no registered block matches {options.filter!r}")
        return names
    for name in names:
        entry = block_entry(name)
        cls = entry.cls
        doc = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        kind = f"preset of {entry.preset_of}" if entry.preset_of else f"{cls.__module__}.{cls.__qualname__}"
        print(f"{name}  ({kind})")
        if doc:
            print(f"    {doc}")
        if entry.paper:
            print(f"    paper: {entry.paper}")
        if entry.settings:
            print("    settings: " + ", ".join(f"{key}={value!r}" for key, value in entry.settings.items()))
        for hp in block_hyperparameters(name):
            annotation = f": {hp.annotation}" if hp.annotation else ""
            print(f"    {hp.name}{annotation} = {_format_default(hp.default)}")
        print()
    return names


def summary_command(args: Sequence[str]) -> object:
    """``memzoo summary --config X.yaml``: parameters, active parameters and FLOPs per token of the config's model.
    The arguments are checked before anything is imported or built: a mistake is the only output."""
    parser = VerbParser(
        prog="memzoo summary",
        description="Per-layer parameters, active parameters per token and forward FLOPs per token of a model config.",
    )
    parser.add_argument("--config", required=True, help="a memzoo YAML config (as given to `memzoo fit`)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--world-size", type=int, default=None,
                        help="also plan a run on this many ranks: per-rank bytes of parameters, gradients and "
                        "optimizer states, and each pool's gradient communication per step")
    parser.add_argument("--memory-parallel", type=int, default=None,
                        help="with --world-size: ranks sharing each pool, its tables split along value_dim "
                        "(default: the config's MemoryParallelStrategy memory_parallel, else 1)")
    parser.add_argument("--strategy", choices=["ddp", "memory_parallel"], default=None,
                        help="with --world-size: the layout to plan: ddp (everything replicated) or memory_parallel "
                        "(MemoryParallelStrategy: dense weights FSDP2-sharded, pools split over --memory-parallel "
                        "ranks); default: the config's strategy, memory_parallel when --memory-parallel > 1, else ddp")
    options = parser.parse_args(list(args))
    _check_file("summary", "--config", options.config)
    _check_parallel_layout(options.world_size, options.memory_parallel, options.strategy)
    from memzoo.config_accounting import model_from_config, plan_config, summarize_config

    built = model_from_config(options.config)  # built once for the summary and the plan
    summary = summarize_config(options.config, built=built)
    plan = None
    if options.world_size is not None:
        try:
            plan = plan_config(options.config, options.world_size, options.memory_parallel, strategy=options.strategy,
                               built=built)
        except ValueError as err:
            raise CommandError(f"summary: {err}") from None
    if options.json:
        import json

        out = summary.to_dict()
        if plan is not None:
            out["parallel"] = plan.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(summary.table())
        if plan is not None:
            print()
            print(plan.table())
    return summary if plan is None else (summary, plan)


def _check_parallel_layout(world_size: int | None, memory_parallel: int | None, strategy: str | None) -> None:
    """``memzoo summary``'s --world-size / --memory-parallel / --strategy, as far as they are known without the
    config (whose MemoryParallelStrategy may set memory_parallel; :func:`memzoo.parallel.planning.plan_parallel`
    checks the whole layout once the model is built)."""
    if world_size is None:
        if memory_parallel is not None or strategy is not None:
            raise CommandError("summary: --memory-parallel and --strategy need --world-size (the ranks to plan)")
        return
    if world_size < 1:
        raise CommandError(f"summary: --world-size must be >= 1, got {world_size}")
    if memory_parallel is None:
        return
    if memory_parallel < 1:
        raise CommandError(f"summary: --memory-parallel must be >= 1, got {memory_parallel}")
    if world_size % memory_parallel:
        raise CommandError(f"summary: --memory-parallel {memory_parallel} does not divide --world-size {world_size}: "
                           f"ranks form a (world size / memory parallel) x memory parallel mesh; pick a divisor of "
                           f"{world_size}")
    if strategy == "ddp" and memory_parallel > 1:
        raise CommandError(f"summary: --strategy ddp replicates every pool; --memory-parallel {memory_parallel} needs "
                           f"--strategy memory_parallel")


def export_command(args: Sequence[str]) -> object:
    """``memzoo export --ckpt X.ckpt --out DIR``: a Hugging Face folder (see :mod:`memzoo.export.hf`)."""
    parser = VerbParser(
        prog="memzoo export",
        description="Write a Lightning checkpoint as a Hugging Face folder (config, safetensors weights, modeling "
        "code, tokenizer) that AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) and "
        "memzoo.load_pretrained(DIR) load.",
    )
    parser.add_argument("--ckpt", required=True, help="the .ckpt file or sharded checkpoint folder (e.g. runs/X/version_0/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, help="destination folder (absent or empty unless --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored weights (default: float32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 500MB or 2GB (default 5GB)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer spec ('byte' or a tokenizer.json path); default: the one the checkpoint records")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export at --out, once the new one is complete")
    parser.add_argument("--reparameterize", action="store_true",
                        help="export MoLE layers in lookup mode: their experts become per-token lookup tables "
                        "(equal outputs, no expert FLOPs)")
    options = parser.parse_args(list(args))

    from pathlib import Path

    from memzoo.export.checkpoint_check import CheckpointError
    from memzoo.export.errors import ExportError, PretrainedFormatError
    from memzoo.export.hf import export_checkpoint
    from memzoo.parallel.checkpoint import ShardedCheckpointError

    blocking = next((p for p in [Path(options.out), *Path(options.out).parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CommandError(f"export: --out {options.out!r}: {str(blocking)!r} is a file, not a folder; choose another "
                           f"--out")
    try:
        out = export_checkpoint(options.ckpt, options.out, tokenizer=options.tokenizer, dtype=options.dtype,
                                max_shard_size=options.max_shard_size, overwrite=options.overwrite,
                                reparameterize=options.reparameterize)
    except (ExportError, PretrainedFormatError, CheckpointError, ShardedCheckpointError, FileNotFoundError) as err:
        raise CommandError(f"export: {err}") from None
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported {options.ckpt} to {out} ({size / 1e6:.1f} MB)")
    return out


def generate_command(args: Sequence[str]) -> str:
    """``memzoo generate --model DIR --prompt TEXT``: streams a continuation to the terminal; returns it."""
    parser = VerbParser(
        prog="memzoo generate",
        description="Continue a prompt with an exported model (a folder written by `memzoo export`), printing the "
        "text as it is generated. Defaults come from the folder's generation_config.json.",
    )
    parser.add_argument("--model", required=True,
                        help="an export folder, a Hugging Face folder, a .gguf file, package:NAME or a memzoo .ckpt")
    parser.add_argument("--prompt", required=True, help="the text to continue (may be empty: a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens to generate (default: the model's generation_config.json, else 64, lowered to "
                        "what fits the model's context beside the prompt)")
    parser.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the model's)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible sampling)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--memory", default=None,
                        help="a memory bank written by `memzoo memorize` for this model: its layers' attention also "
                        "reads the bank's keys/values (Extended Mind)")
    parser.add_argument("--memory-topk", type=int, default=None,
                        help="memories each query retrieves per layer and head (default: the model's, or 8)")
    parser.add_argument("--memory-distance", type=int, default=None,
                        help="positions between the memories and the prompt: a query at position p sees them at "
                        "distance p + D (default: the model's, or 0, the Extended Mind authors' placement)")
    parser.add_argument("--memory-sink-positions", type=int, default=None,
                        help="the first S positions (the attention sinks) read no memory (default: the model's, or 0)")
    parser.add_argument("--memory-documents", type=int, default=None,
                        help="each query retrieves only from the D bank documents that best match the text so far "
                        "(by the layer's own keys; default: the model's, or 0: the whole bank)")
    parser.add_argument("--memory-min-document-score", type=float, default=None,
                        help="with --memory-documents: a document is chosen only when its match (a mean centred "
                        "cosine in [-1, 1]) reaches this; otherwise the text reads no memory (default: none)")
    parser.add_argument("--cite", action="store_true",
                        help="after the text, print the memorised document spans the generated tokens attended to most")
    parser.add_argument("--cite-top", type=int, default=3, help="how many spans --cite prints (default 3)")
    options = parser.parse_args(list(args))
    if options.cite and options.memory is None:
        raise CommandError("generate: --cite needs --memory BANK (citations name the bank's documents)")

    import json
    import sys
    from contextlib import nullcontext
    from pathlib import Path

    import torch

    from memzoo.export.errors import PretrainedFormatError
    from memzoo.export.streaming import TextStream, generate_tokens
    from memzoo.model.sampling import (
        DEFAULT_MAX_NEW_TOKENS,
        context_warning,
        default_max_new_tokens,
        prompt_tokens_to_keep,
    )
    from memzoo.pretrained import load_pretrained

    device = options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device_type = torch.device(device).type
    except RuntimeError as err:
        raise CommandError(f"generate: --device {options.device!r} is not a device ({err}); use cpu or cuda") from None
    if device_type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"generate: --device {options.device} needs a CUDA GPU and this machine has none (or "
                           f"torch was built without CUDA); use --device cpu")
    try:
        model, tokenizer = load_pretrained(options.model, with_tokenizer=True)
    except (PretrainedFormatError, FileNotFoundError) as err:
        raise CommandError(f"generate: {err}") from None
    if tokenizer is None:
        raise CommandError(f"generate: {options.model} has no tokenizer (a folder without tokenizer.json, or a checkpoint "
                           f"whose run recorded none); add the model's tokenizer.json to the folder, or export the checkpoint with "
                           f"`memzoo export --tokenizer`")
    bank = _attach_bank(model, options.memory, "generate", topk=options.memory_topk, distance=options.memory_distance,
                        sink_positions=options.memory_sink_positions, documents=options.memory_documents,
                        min_document_score=options.memory_min_document_score) if options.memory else None
    defaults_file = Path(options.model) / "generation_config.json"
    defaults = json.loads(defaults_file.read_text(encoding="utf-8")) if defaults_file.is_file() else {}
    max_new_tokens, temperature, top_k = _generation_settings(options, defaults)
    model.to(device)
    generator = torch.Generator(device).manual_seed(options.seed) if options.seed is not None else None

    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(options.prompt)]  # a document starts after eos, as in training
    if options.max_new_tokens is None:  # not asked for: the folder's default (else 64), lowered to what fits
        max_new_tokens = default_max_new_tokens(len(prompt_ids), model.max_seq_len,
                                                max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    try:
        kept = prompt_tokens_to_keep(len(prompt_ids), max_new_tokens, model.max_seq_len, flag="--max-new-tokens")
    except ValueError as err:
        raise CommandError(f"generate: {err}") from None
    if kept < len(prompt_ids):
        print(f"memzoo: warning: {context_warning(len(prompt_ids), kept, max_new_tokens, model.max_seq_len)}",
              file=sys.stderr)
        prompt_ids = prompt_ids[-kept:]
    stream = TextStream(tokenizer)
    pieces = []
    sys.stdout.write(options.prompt)
    sys.stdout.flush()
    from memzoo.model.memory_bank import recording_memory_attention

    with recording_memory_attention(model) if options.cite else nullcontext() as recorder:
        try:
            for token in generate_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, tokenizer.eos_id,
                                         generator):
                pieces.append(stream.push(token))
                sys.stdout.write(pieces[-1])
                sys.stdout.flush()
        except ValueError as err:
            raise CommandError(f"generate: {err}") from None
    pieces.append(stream.flush())
    sys.stdout.write(pieces[-1] + "\n")
    if options.cite:
        _print_citations(bank, recorder, tokenizer, options.cite_top)
    sys.stdout.flush()
    return "".join(pieces)


def _attach_bank(model, path: str, verb: str, **settings):
    """Loads the bank at ``path`` and attaches it to ``model`` with ``settings`` (``Transformer.attach_memory``'s
    keywords); bank errors become command errors."""
    from memzoo.model.attention_memory import AttentionMemoryError
    from memzoo.model.memory_bank import MemoryBank

    try:
        bank = MemoryBank.load(path)
        model.attach_memory(bank, **settings)
    except AttentionMemoryError as err:  # a bank that does not fit, or a bad setting
        raise CommandError(f"{verb}: {err}") from None
    return bank


def _print_citations(bank, recorder, tokenizer, top: int) -> None:
    """The document spans with the most memory attention, and each document's share."""
    weights = recorder.entry_weights(bank.n_entries)
    citations = bank.citations(weights, tokenizer, top=top)
    if not citations:
        print("memories attended: none (no memory received attention)")
        return
    shares = bank.doc_shares(weights)
    order = shares.argsort(descending=True).tolist()
    print("memories attended (share of the attention paid to memory while generating):")
    print("  documents: " + ", ".join(f"{bank.doc_names[d]} {float(shares[d]):.1%}" for d in order if shares[d] > 0))
    for rank, c in enumerate(citations, 1):
        text = c.text.replace("\n", " ").strip()
        print(f"  [{rank}] {c.share:6.1%}  {c.name}  tokens {c.start}-{c.end}: {text!r}")


def memorize_command(args: Sequence[str]) -> object:
    """``memzoo memorize --model M --docs FILES --out BANK``: a memory bank (keys/values of every chosen layer over
    the documents, with their origins) for attention memory (see :mod:`memzoo.model.memory_bank`)."""
    parser = argparse.ArgumentParser(
        prog="memzoo memorize",
        description="Run a model over documents and store each chosen layer's attention keys and values, with the "
        "document and token offset of every entry, as a memory bank (safetensors) for "
        "`memzoo generate --memory BANK [--cite]`.",
    )
    parser.add_argument("--model", required=True,
                        help="a memzoo export folder, a Hugging Face Llama-family folder or hub id, or a .ckpt")
    parser.add_argument("--docs", nargs="+", required=True, help="text files, one document each")
    parser.add_argument("--out", required=True, help="the bank file to write (e.g. facts.bank)")
    parser.add_argument("--layers", default="all", help="`all` (default) or comma-separated layer indices")
    parser.add_argument("--window", type=int, default=None,
                        help="tokens the model reads at once (default: min(max_seq_len, 1024))")
    parser.add_argument("--stride", type=int, default=None, help="tokens each window advances (default: window/2)")
    parser.add_argument("--prefix", default="",
                        help="text read before every document and not stored, so that the attention-sink role of "
                        "a sequence's first positions falls on it, not on the document's first tokens (default: none)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the stored keys/values (default float32)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer spec ('byte' or a tokenizer.json path); default: the model's")
    options = parser.parse_args(list(args))

    from pathlib import Path

    import torch

    from memzoo.model.memory_bank import MemoryBank, MemoryBankError

    try:
        layers = options.layers if options.layers == "all" else [int(x) for x in options.layers.split(",")]
    except ValueError:
        raise CommandError(f"memorize: --layers {options.layers!r} must be `all` or comma-separated integers") from None
    docs = {}
    for name in options.docs:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"memorize: --docs {name!r} is not a file")
        try:
            docs[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CommandError(f"memorize: --docs {name!r} is not UTF-8 text ({err})") from None
    model, tokenizer = load_model_and_tokenizer(options.model, options.tokenizer, "memorize")
    try:
        bank = MemoryBank.build(model, tokenizer, docs, layers=layers, window=options.window, stride=options.stride,
                                dtype=getattr(torch, options.dtype), prefix=options.prefix)
    except MemoryBankError as err:
        raise CommandError(f"memorize: {err}") from None
    bank.build_settings["model"] = options.model
    bank.save(options.out)
    size = Path(options.out).stat().st_size
    print(f"memorized {bank.n_entries} tokens of {len(docs)} document(s) in layers {bank.layers} to {options.out} "
          f"({size / 1e6:.1f} MB)")
    return bank


def load_model_and_tokenizer(source: str, tokenizer_spec: str | None, verb: str):
    """``(model, tokenizer)`` of whatever :func:`memzoo.load_pretrained` reads (an export folder, a Hugging Face
    folder or hub id, a ``.gguf`` file, a memzoo ``.ckpt`` or sharded checkpoint: one loader, :mod:`memzoo.loading`)
    with the source's tokenizer; ``tokenizer_spec`` replaces it (the source's is then not read)."""
    from memzoo.data.tokenizers import build_tokenizer
    from memzoo.export.errors import PretrainedFormatError
    from memzoo.pretrained import load_pretrained

    try:
        if tokenizer_spec is None:
            model, tokenizer = load_pretrained(source, with_tokenizer=True)
        else:
            model, tokenizer = load_pretrained(source), build_tokenizer(tokenizer_spec)
    except (PretrainedFormatError, FileNotFoundError) as err:
        raise CommandError(f"{verb}: {err}") from None
    if tokenizer is None:
        raise CommandError(f"{verb}: {source} records no tokenizer; pass --tokenizer (byte, or a tokenizer.json)")
    return model, tokenizer


def _generation_settings(options: argparse.Namespace, defaults: dict) -> tuple[int | None, float, int | None]:
    """``(max_new_tokens, temperature, top_k)``: the command line's, else generation_config.json's (greedy unless
    it samples), else greedy; ``max_new_tokens`` is ``None`` when neither names one."""
    sampled = bool(defaults.get("do_sample", False))
    max_new_tokens = options.max_new_tokens if options.max_new_tokens is not None else defaults.get("max_new_tokens")
    if options.temperature is not None:
        temperature = options.temperature
    else:
        temperature = defaults.get("temperature", 1.0) if sampled else 0.0
    if options.top_k is not None:
        top_k = options.top_k
    else:
        top_k = (defaults.get("top_k") or None) if sampled else None
    return max_new_tokens, temperature, top_k


def slot_stats_command(args: Sequence[str]) -> object:
    """``memzoo slot-stats --config X.yaml --ckpt_path Y.ckpt --out stats.pt``: per-pool, per-slot background access
    counts and document frequencies (see :mod:`memzoo.training.slot_stats`), written atomically."""
    parser = VerbParser(
        allow_unknown=True,
        prog="memzoo slot-stats",
        description="Run a model over a background dataset (the config's data) and store, per memory pool and slot, "
        "how often it is read and in how many documents (sequences): the background of sparse memory finetuning.",
    )
    parser.add_argument("--config", action="append", required=True, help="a memzoo YAML config (repeatable)")
    parser.add_argument("--ckpt_path", default=None, help="the .ckpt whose weights to use (default: the config's init)")
    parser.add_argument("--out", required=True, help="the statistics file to write (e.g. stats.pt)")
    parser.add_argument("--split", default="train", choices=["train", "val"], help="which data split to read")
    parser.add_argument("--max_batches", type=int, default=100, help="batches to read (default 100)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    options, overrides = parser.parse_known_args(list(args))
    if options.max_batches < 1:
        raise CommandError(f"slot-stats: --max_batches must be >= 1, got {options.max_batches}")
    parser.refuse_unknown_options(overrides)  # the others are config overrides, checked by the config's parser
    _check_output_folder("slot-stats", "--out", options.out)  # before the model reads its batches

    import torch

    from memzoo.atomic import atomic_file
    from memzoo.cli_lightning import build_from_config
    from memzoo.export.checkpoint_check import CheckpointError, check_checkpoint_file
    from memzoo.safe_load import RefusedPickleError, load_data
    from memzoo.training.slot_stats import SlotStatsError, collect_slot_stats

    cli_args = [arg for path in options.config for arg in ("--config", path)] + overrides
    cli = build_from_config(cli_args)
    module, datamodule = cli.model, cli.datamodule
    if options.ckpt_path:
        try:
            check_checkpoint_file(options.ckpt_path)
        except CheckpointError as err:
            raise CommandError(f"slot-stats: {err}") from None
        try:
            checkpoint = load_data(options.ckpt_path, f"checkpoint {options.ckpt_path!r}")
        except RefusedPickleError as err:
            raise CommandError(f"slot-stats: {err}") from None
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CommandError(f"slot-stats: checkpoint {options.ckpt_path!r} has no 'state_dict'; give a .ckpt "
                               f"that memzoo fit wrote")
        module.load_state_dict(checkpoint["state_dict"])
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if options.split == "train" else datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]  # the language-modelling loader (fact probes come after it)
    model = module.model.to(options.device)
    try:
        stats = collect_slot_stats(model, loader, options.max_batches)
    except SlotStatsError as err:
        raise CommandError(f"slot-stats: {err}") from None
    stats.source = {"config": list(options.config), "ckpt_path": options.ckpt_path, "split": options.split,
                    "max_batches": options.max_batches}
    with atomic_file(options.out) as f:
        torch.save(stats.to_dict(), f)
    for name, pool in stats.pools.items():
        used = int((pool.counts > 0).sum())
        print(f"{name}: {used}/{pool.num_rows} slots read over {stats.n_docs} documents ({stats.n_tokens} tokens)")
    print(f"wrote {options.out}")
    return stats
