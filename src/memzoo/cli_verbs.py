"""The plain (non-Lightning) verbs of the ``memzoo`` command: ``blocks``, ``summary``, ``export``, ``generate`` and
``slot-stats``."""

from __future__ import annotations

import argparse
import inspect
from typing import Sequence

from memzoo.cli import CommandError


def _format_default(value: object) -> str:
    if value is inspect.Parameter.empty:
        return "(required)"
    return repr(value)


def blocks_command(args: Sequence[str]) -> list[str]:
    """``memzoo blocks [FILTER]``: every registered block (name, class, summary line) with its hyperparameters and
    their defaults."""
    from memzoo.registry import block_hyperparameters, get_block, list_blocks

    parser = argparse.ArgumentParser(prog="memzoo blocks", description="List the registered FFN-slot blocks.")
    parser.add_argument("filter", nargs="?", default=None, help="substring or glob of block names")
    options = parser.parse_args(list(args))
    names = list_blocks(options.filter)
    if not names:
        print(f"no registered block matches {options.filter!r}")
        return names
    for name in names:
        cls = get_block(name)
        doc = (inspect.getdoc(cls) or "").split("\n", 1)[0]
        print(f"{name}  ({cls.__module__}.{cls.__qualname__})")
        if doc:
            print(f"    {doc}")
        for hp in block_hyperparameters(name):
            annotation = f": {hp.annotation}" if hp.annotation else ""
            print(f"    {hp.name}{annotation} = {_format_default(hp.default)}")
        print()
    return names


def summary_command(args: Sequence[str]) -> object:
    """``memzoo summary --config X.yaml``: parameters, active parameters and FLOPs per token of the config's model."""
    from memzoo.accounting import summarize_config

    parser = argparse.ArgumentParser(
        prog="memzoo summary",
        description="Per-layer parameters, active parameters per token and forward FLOPs per token of a model config.",
    )
    parser.add_argument("--config", required=True, help="a memzoo YAML config (as given to `memzoo fit`)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--world-size", type=int, default=None,
                        help="also plan a run on this many ranks: per-rank bytes of parameters, gradients and "
                        "optimizer states, and each pool's gradient communication per step")
    parser.add_argument("--memory-parallel", type=int, default=1,
                        help="with --world-size: ranks sharing each pool, its tables split along value_dim (default 1)")
    options = parser.parse_args(list(args))
    if options.world_size is None and options.memory_parallel != 1:
        raise SystemExit("memzoo summary: --memory-parallel needs --world-size (the ranks it divides)")
    summary = summarize_config(options.config)
    plan = None
    if options.world_size is not None:
        from memzoo.accounting import plan_config

        try:
            plan = plan_config(options.config, options.world_size, options.memory_parallel)
        except ValueError as err:
            raise SystemExit(f"memzoo summary: {err}") from None
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


def export_command(args: Sequence[str]) -> object:
    """``memzoo export --ckpt X.ckpt --out DIR``: a Hugging Face folder (see :mod:`memzoo.export.hf`)."""
    parser = argparse.ArgumentParser(
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
                                max_shard_size=options.max_shard_size, overwrite=options.overwrite)
    except (ExportError, PretrainedFormatError, CheckpointError, ShardedCheckpointError, FileNotFoundError) as err:
        raise CommandError(f"export: {err}") from None
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"exported {options.ckpt} to {out} ({size / 1e6:.1f} MB)")
    return out


def generate_command(args: Sequence[str]) -> str:
    """``memzoo generate --model DIR --prompt TEXT``: streams a continuation to the terminal; returns it."""
    parser = argparse.ArgumentParser(
        prog="memzoo generate",
        description="Continue a prompt with an exported model (a folder written by `memzoo export`), printing the "
        "text as it is generated. Defaults come from the folder's generation_config.json.",
    )
    parser.add_argument("--model", required=True,
                        help="an export folder, a Hugging Face folder, a .gguf file or package:NAME")
    parser.add_argument("--prompt", required=True, help="the text to continue (may be empty: a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: model's, or 64)")
    parser.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the model's)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible sampling)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    options = parser.parse_args(list(args))

    import json
    import sys
    from pathlib import Path

    import torch

    from memzoo.export.errors import PretrainedFormatError
    from memzoo.export.streaming import TextStream, generate_tokens
    from memzoo.model.sampling import context_warning, prompt_tokens_to_keep
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
    defaults_file = Path(options.model) / "generation_config.json"
    defaults = json.loads(defaults_file.read_text(encoding="utf-8")) if defaults_file.is_file() else {}
    max_new_tokens, temperature, top_k = _generation_settings(options, defaults)
    model.to(device)
    generator = torch.Generator(device).manual_seed(options.seed) if options.seed is not None else None

    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(options.prompt)]  # a document starts after eos, as in training
    try:
        kept = prompt_tokens_to_keep(len(prompt_ids), max_new_tokens, model.max_seq_len)
    except ValueError as err:
        raise CommandError(f"generate: {err} (--max-new-tokens)") from None
    if kept < len(prompt_ids):
        print(f"memzoo: warning: {context_warning(len(prompt_ids), kept, max_new_tokens, model.max_seq_len)}",
              file=sys.stderr)
        prompt_ids = prompt_ids[-kept:]
    stream = TextStream(tokenizer)
    pieces = []
    sys.stdout.write(options.prompt)
    sys.stdout.flush()
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
    sys.stdout.flush()
    return "".join(pieces)


def _generation_settings(options: argparse.Namespace, defaults: dict) -> tuple[int, float, int | None]:
    """``(max_new_tokens, temperature, top_k)``: the command line's, else generation_config.json's (greedy unless
    it samples), else 64 greedy tokens."""
    sampled = bool(defaults.get("do_sample", False))
    max_new_tokens = options.max_new_tokens if options.max_new_tokens is not None else defaults.get("max_new_tokens", 64)
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
    parser = argparse.ArgumentParser(
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
        raise SystemExit(f"memzoo slot-stats: --max_batches must be >= 1, got {options.max_batches}")

    import torch

    from memzoo.atomic import atomic_file
    from memzoo.cli_lightning import build_from_config
    from memzoo.export.checkpoint_check import CheckpointError, check_checkpoint_file
    from memzoo.training.slot_stats import SlotStatsError, collect_slot_stats

    cli_args = [arg for path in options.config for arg in ("--config", path)] + overrides
    cli = build_from_config(cli_args)
    module, datamodule = cli.model, cli.datamodule
    if options.ckpt_path:
        try:
            check_checkpoint_file(options.ckpt_path)
        except CheckpointError as err:
            raise SystemExit(f"memzoo slot-stats: {err}") from None
        state = torch.load(options.ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if options.split == "train" else datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]  # the language-modelling loader (fact probes come after it)
    model = module.model.to(options.device)
    try:
        stats = collect_slot_stats(model, loader, options.max_batches)
    except SlotStatsError as err:
        raise SystemExit(f"memzoo slot-stats: {err}") from None
    stats.source = {"config": list(options.config), "ckpt_path": options.ckpt_path, "split": options.split,
                    "max_batches": options.max_batches}
    with atomic_file(options.out) as f:
        torch.save(stats.to_dict(), f)
    for name, pool in stats.pools.items():
        used = int((pool.counts > 0).sum())
        print(f"{name}: {used}/{pool.num_rows} slots read over {stats.n_docs} documents ({stats.n_tokens} tokens)")
    print(f"wrote {options.out}")
    return stats
