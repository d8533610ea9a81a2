"""Training speed of memzoo's dense decoder against karpathy/nanoGPT's GPT, side by side in one process.

Both bare models train on nanoGPT's CPU recipe for character-level tiny Shakespeare (4 layers, 4 heads, width 128,
context 64, batch 12, AdamW lr 1e-3 betas (0.9, 0.99) weight decay 0.1 on matrices, gradient clipping 1.0, no
dropout): each step is forward, cross-entropy (each library's own: nanoGPT's ``F.cross_entropy`` inside its
forward, memzoo's fused CPU kernel), backward, ``clip_grad_norm_(1.0)``, ``AdamW.step``,
``zero_grad(set_to_none=True)``. The process runs with memzoo's allocator settings
(:func:`memzoo.host_allocator.keep_freed_memory`, as every ``memzoo`` command), for both models. No Lightning, no data loader: the same pre-drawn random windows of the text feed both,
as the recipe's 65 character ids to both models (``--vocab recipe``, the default: equal shapes everywhere) or to
memzoo as bytes with its byte tokenizer's 258 ids (``--vocab bytes``). ``--compile`` runs both steps' forward and loss
under ``torch.compile`` (inductor; compiled during the warmup), as nanoGPT's ``train.py`` does by default. The runs
alternate A B A B (``--repeats`` pairs of
``--steps`` timed steps each, after ``--warmup`` untimed steps per model) so drifts in machine load hit both; the
headline is the median over pairs of ``memzoo tokens/s ÷ nanoGPT tokens/s`` measured in the same pair, from wall time
and, less disturbed by other processes on a shared machine, from the CPU time of the (single) compute thread.

nanoGPT's code is not part of memzoo: get a checkout and pass its directory (its ``model.py`` is imported at run
time)::

    git clone https://github.com/karpathy/nanoGPT ../nanoGPT
    python tools/bench_nanogpt.py --nanogpt ../nanoGPT [--config configs/study/shakespeare-nanogpt.yaml]
        [--text ../shared/data/tinyshakespeare.txt] [--steps 100] [--warmup 10] [--repeats 6] [--threads 1]
        [--vocab recipe|bytes] [--compile] [--nanogpt-fused-adamw] [--json docs/results/bench_nanogpt.json]
        [--profile 20]

memzoo's architecture comes from ``--config`` (the model section of a ``memzoo fit`` YAML), and its AdamW's
implementation settings (``fused: true`` in the shipped config) from the config's optimizer, checked against the
recipe. nanoGPT's AdamW is what its ``configure_optimizers`` picks for the CPU (PyTorch's per-parameter loop);
``--nanogpt-fused-adamw`` gives it its fused path too (the JSON's ``adamw_fused`` says which ran). ``--profile N`` adds a
torch.profiler table of the ops with the most self CPU time over N steps of each model. The JSON's ``targets`` list
(``target``, ``met``, ``detail``, as the other benchmarks') holds the target memzoo's dense decoder is held to:
>= 1.0x nanoGPT's tokens/s, by the median over pairs of the wall-time ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml

from memzoo.data.tokenizers import ByteTokenizer
from memzoo.host_allocator import keep_freed_memory
from memzoo.model.config import ModelConfig
from memzoo.model.transformer import Transformer
from memzoo.nn.cross_entropy import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, bias=False)
ADAMW = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
CLIP = 1.0
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ models
def load_nanogpt(checkout: Path):
    """nanoGPT's ``model`` module imported from ``checkout/model.py`` (a clone of github.com/karpathy/nanoGPT)."""
    path = checkout / "model.py"
    if not path.is_file():
        raise SystemExit(
            f"--nanogpt {checkout}: no model.py there; clone nanoGPT first: "
            f"git clone https://github.com/karpathy/nanoGPT {checkout}"
        )
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile re-imports the modules of the code it traces
    spec.loader.exec_module(module)
    return module


def nanogpt_commit(checkout: Path) -> str | None:
    """The git commit of a nanoGPT checkout, or None when it is not a git checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_nanogpt(module, vocab_size: int, fused_adamw: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """nanoGPT's GPT with the recipe's sizes and its own ``configure_optimizers`` (decay on ≥2-D tensors). It
    chooses fused AdamW only for ``device_type="cuda"``; ``fused_adamw`` passes that so it takes its fused path
    (PyTorch's fused AdamW runs on CPU tensors too)."""
    config = module.GPTConfig(vocab_size=vocab_size, **{k: v for k, v in RECIPE.items() if k != "batch_size"})
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = module.GPT(config)
        opt = model.configure_optimizers(ADAMW["weight_decay"], ADAMW["lr"], ADAMW["betas"],
                                         "cuda" if fused_adamw else "cpu")
    return model, opt


def memzoo_architecture(config: Path) -> dict[str, Any]:
    """The architecture fields of a ``memzoo fit`` YAML (``model.init_args.architecture``)."""
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    if "architecture" not in init:
        raise SystemExit(f"--config {config}: no model.init_args.architecture section")
    return dict(init["architecture"])


#: AdamW settings a config may add to the recipe's: how the update runs, not what it computes
ADAMW_IMPLEMENTATION = ("fused", "foreach")


def memzoo_adamw_options(config: Path) -> dict[str, Any]:
    """The implementation settings (:data:`ADAMW_IMPLEMENTATION`) of ``config``'s AdamW, checked against the recipe:
    a config without an optimizer section gets memzoo's defaults (the fused step,
    :func:`memzoo.training.optim.prefer_fused`); another optimizer class, other recipe values or
    other settings are errors (the comparison would not be the recipe's)."""
    optimizer = yaml.safe_load(config.read_text())["model"]["init_args"].get("optimizer")
    if optimizer is None:
        return {}
    if optimizer.get("class_path") != "torch.optim.AdamW":
        raise SystemExit(f"--config {config}: the recipe's optimizer is torch.optim.AdamW, the config has "
                         f"{optimizer.get('class_path')!r}")
    options = dict(optimizer.get("init_args") or {})
    for key, value in ADAMW.items():
        given = options.pop(key, value)
        if (list(given) if isinstance(given, (list, tuple)) else given) != (list(value) if key == "betas" else value):
            raise SystemExit(f"--config {config}: optimizer {key} {given!r} is not the recipe's {value!r}")
    unknown = sorted(set(options) - set(ADAMW_IMPLEMENTATION))
    if unknown:
        raise SystemExit(f"--config {config}: optimizer settings {unknown} are not the recipe's; only "
                         f"{list(ADAMW_IMPLEMENTATION)} may be added")
    return options


def build_memzoo(config: Path, vocab_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """memzoo's Transformer from ``config``'s architecture, AdamW with memzoo's parameter groups and the config's
    implementation settings (``fused``: :func:`memzoo_adamw_options`), as ``memzoo fit`` builds them."""
    from memzoo.training.optim import build_optimizer

    options = memzoo_adamw_options(config)
    arch = {**memzoo_architecture(config), "vocab_size": vocab_size}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(arch) - fields)
    if unknown:
        raise SystemExit(f"--config {config}: model.init_args.architecture has unknown keys {unknown}")
    model = Transformer(ModelConfig(**arch))
    opt = build_optimizer(model, lambda groups: torch.optim.AdamW(groups, **ADAMW, **options))
    return model, opt


def parameter_counts(model: nn.Module, embedding_weights: list[torch.Tensor]) -> dict[str, int]:
    """Total (tied weights once) and non-embedding parameters (without token/position embeddings and LM head)."""
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    embedding = sum(p.numel() for p in {id(w): w for w in embedding_weights}.values())
    return {"total": total, "non_embedding": total - embedding}


def training_step(model: nn.Module, opt: torch.optim.Optimizer, loss_of: Callable, compile: bool = False) -> Step:
    """One optimizer step as both recipes take it: ``loss_of(model, x, y)`` (under ``torch.compile`` with
    ``compile``), backward, clip 1.0, AdamW step."""
    def forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_of(model, x, y)

    forward = torch.compile(forward) if compile else forward

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def nanogpt_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y)[1]  # nanoGPT's forward returns (logits, loss)


def memzoo_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of memzoo's training step (:func:`memzoo.nn.cross_entropy.cross_entropy`: fused on the CPU)."""
    return cross_entropy(model(x).flatten(0, 1), y.flatten())


# ------------------------------------------------------------------------------------------------ data
def windows(text: Path | None, n: int, block: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``n`` random windows of ``block + 1`` characters: (nanoGPT char ids, memzoo byte ids, nanoGPT vocab size).

    Without a text file: uniform random characters over 65 printable ASCII symbols (timing only).
    """
    g = torch.Generator().manual_seed(seed)
    if text is not None and text.is_file():
        data = text.read_bytes()
        if not data.isascii():
            raise SystemExit(f"--text {text}: not ASCII, so its bytes are not its characters; use an ASCII text")
    else:
        data = bytes(range(58, 123)) * 1000
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    chars = torch.unique(raw)
    lookup = torch.zeros(256, dtype=torch.long)
    lookup[chars] = torch.arange(len(chars))
    starts = torch.randint(0, len(raw) - block - 1, (n,), generator=g)
    idx = starts[:, None] + torch.arange(block + 1)
    byte_windows = raw[idx]
    return lookup[byte_windows], byte_windows, len(chars)


# ------------------------------------------------------------------------------------------------ timing
def run_steps(step: Step, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
    """Wall seconds and CPU seconds of this thread for ``step`` over every ``(inputs, targets)`` batch, and the last
    loss. With one torch thread all compute runs on the calling thread, so its CPU time excludes the time other
    processes on a shared machine take from it."""
    start, start_cpu = time.perf_counter(), time.thread_time()
    loss = torch.zeros(())
    for x, y in batches:
        loss = step(x, y)
    return time.perf_counter() - start, time.thread_time() - start_cpu, float(loss)


def profile_table(step: Step, batches: list[tuple[torch.Tensor, torch.Tensor]], rows: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            step(x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


#: issue target: memzoo's dense decoder trains at least as fast as nanoGPT on nanoGPT's CPU recipe (tokens/s)
TARGET_RATIO = 1.0


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark's ``targets`` list (``target``, ``met``, ``detail``), as the other benchmarks' JSON has it: the
    median over pairs of memzoo's tokens/s over nanoGPT's, by wall time (the headline), with the CPU-time median and
    the pairs' spread beside it."""
    ratios, cpu = result["ratios_memzoo_vs_nanogpt"], result["median_cpu_time_ratio_memzoo_vs_nanogpt"]
    median = result["median_ratio_memzoo_vs_nanogpt"]
    setting = ("compiled" if result["compiled"] else "eager") + (
        ", both with fused AdamW" if all(result["adamw_fused"].values()) else ", each AdamW as configured")
    return [{
        "target": f"memzoo's dense decoder >= {TARGET_RATIO}x nanoGPT's tokens/s on its CPU recipe "
                  f"({result['torch_threads']} thread(s), {setting})",
        "met": median >= TARGET_RATIO,
        "detail": f"{median:.3f}x by wall time (median of {len(ratios)} pairs, {min(ratios):.2f}–{max(ratios):.2f}); "
                  f"{cpu:.3f}x by CPU time",
    }]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of github.com/karpathy/nanoGPT")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/study/shakespeare-nanogpt.yaml")
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per model before the first run")
    parser.add_argument("--repeats", type=int, default=6, help="A B pairs; the ratio is the median over pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vocab", choices=("recipe", "bytes"), default="recipe",
                        help="memzoo's inputs: the recipe's 65 character ids (as nanoGPT's) or bytes (258 ids)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models' forward and loss")
    parser.add_argument("--nanogpt-fused-adamw", action="store_true",
                        help="nanoGPT's fused AdamW path (its code takes it on CUDA only) instead of its CPU default")
    parser.add_argument("--profile", type=int, default=0, help="also profile this many steps of each model")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as every memzoo command (one process: both models run with it)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.compile and args.warmup < 2:
        raise SystemExit(f"--compile compiles during the warmup: give --warmup 2 or more, got {args.warmup}")
    torch.set_num_threads(args.threads)

    B, T = RECIPE["batch_size"], RECIPE["block_size"]
    n_batches = args.warmup + args.steps * args.repeats + args.profile
    char_ids, byte_ids, char_vocab = windows(args.text, n_batches * B, T, seed=0)
    def split(ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:  # contiguous, as nanoGPT's get_batch
        ids = ids.view(n_batches, B, T + 1)
        return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in ids]

    torch.manual_seed(1337)
    nano, nano_opt = build_nanogpt(load_nanogpt(args.nanogpt), char_vocab, args.nanogpt_fused_adamw)
    torch.manual_seed(1337)
    memzoo_vocab = char_vocab if args.vocab == "recipe" else ByteTokenizer.vocab_size
    mz, mz_opt = build_memzoo(args.config, memzoo_vocab)
    nano.train(), mz.train()
    counts = {  # before compiling: the parameters of the modules themselves
        "nanogpt": parameter_counts(
            nano, [nano.transformer.wte.weight, nano.transformer.wpe.weight, nano.lm_head.weight]
        ),
        "memzoo": parameter_counts(mz, [mz.embed.weight, mz.head.weight]),
    }
    steps = {"nanogpt": training_step(nano, nano_opt, nanogpt_loss, args.compile),
             "memzoo": training_step(mz, mz_opt, memzoo_loss, args.compile)}
    batches = {"nanogpt": split(char_ids), "memzoo": split(char_ids if args.vocab == "recipe" else byte_ids)}

    w = args.warmup
    for name in steps:
        run_steps(steps[name], batches[name][:w])
    times: dict[str, list[float]] = {"nanogpt": [], "memzoo": []}
    cpu_times: dict[str, list[float]] = {"nanogpt": [], "memzoo": []}
    losses: dict[str, float] = {}
    for r in range(args.repeats):  # A B A B: nanoGPT then memzoo in every pair
        chunk = slice(w + r * args.steps, w + (r + 1) * args.steps)
        for name in steps:
            seconds, cpu_seconds, losses[name] = run_steps(steps[name], batches[name][chunk])
            times[name].append(seconds)
            cpu_times[name].append(cpu_seconds)
    tokens = args.steps * B * T
    ratios = [n / m for n, m in zip(times["nanogpt"], times["memzoo"])]
    cpu_ratios = [n / m for n, m in zip(cpu_times["nanogpt"], cpu_times["memzoo"])]
    result = {
        "recipe": {**RECIPE, "adamw": ADAMW, "clip": CLIP},
        "command": "python tools/bench_nanogpt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "nanogpt_commit": nanogpt_commit(args.nanogpt),
        "memzoo_config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "memzoo_architecture": memzoo_architecture(args.config),
        "vocab": {"nanogpt": char_vocab, "memzoo": memzoo_vocab},
        "compiled": args.compile,
        "adamw_fused": {"nanogpt": bool(nano_opt.defaults.get("fused")), "memzoo": bool(mz_opt.defaults.get("fused"))},
        "params": counts,
        "non_embedding_params_ratio_memzoo_vs_nanogpt": counts["memzoo"]["non_embedding"]
        / counts["nanogpt"]["non_embedding"],
        "timed_steps_per_run": args.steps,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "tokens_per_s": {name: [tokens / s for s in times[name]] for name in times},
        "median_tokens_per_s": {name: tokens / statistics.median(times[name]) for name in times},
        "ratios_memzoo_vs_nanogpt": ratios,
        "median_ratio_memzoo_vs_nanogpt": statistics.median(ratios),
        "cpu_time_tokens_per_s": {name: [tokens / s for s in cpu_times[name]] for name in cpu_times},
        "median_cpu_time_tokens_per_s": {name: tokens / statistics.median(cpu_times[name]) for name in cpu_times},
        "cpu_time_ratios_memzoo_vs_nanogpt": cpu_ratios,
        "median_cpu_time_ratio_memzoo_vs_nanogpt": statistics.median(cpu_ratios),
        "last_train_loss": losses,
    }
    result["targets"] = targets(result)
    result["target_met"] = result["targets"][0]["met"]
    print(json.dumps(result, indent=2))
    print()
    print(f"{'model':<10}{'params':>10}{'non-emb':>10}{'tok/s wall':>12}{'tok/s CPU':>12}   tok/s wall per pair")
    for name in ("nanogpt", "memzoo"):
        per = " ".join(f"{v:.0f}" for v in result["tokens_per_s"][name])
        print(f"{name:<10}{counts[name]['total']:>10,}{counts[name]['non_embedding']:>10,}"
              f"{result['median_tokens_per_s'][name]:>12.0f}{result['median_cpu_time_tokens_per_s'][name]:>12.0f}"
              f"   {per}")
    print(f"ratio memzoo/nanoGPT, wall time, per pair: {' '.join(f'{x:.3f}' for x in ratios)}; "
          f"median {result['median_ratio_memzoo_vs_nanogpt']:.3f} (target >= 1.0 "
          f"{'met' if result['target_met'] else 'missed'})")
    print(f"ratio memzoo/nanoGPT, CPU time, per pair: {' '.join(f'{x:.3f}' for x in cpu_ratios)}; "
          f"median {result['median_cpu_time_ratio_memzoo_vs_nanogpt']:.3f}")
    if args.profile:
        tail = slice(n_batches - args.profile, n_batches)
        torch.set_num_threads(args.threads)
        for name in steps:
            print(f"\n== {name}: {args.profile} steps, ops by self CPU time")
            print(profile_table(steps[name], batches[name][tail]))
    if args.json:
        from memzoo.atomic import write_bytes_atomic

        write_bytes_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


if __name__ == "__main__":
    main()
