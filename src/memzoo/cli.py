"""The ``memzoo`` command.

``memzoo fit|validate|test|predict`` run through LightningCLI (subclass mode: ``class_path``/``init_args`` YAML,
``--print_config``); ``memzoo blocks`` lists the registered blocks; ``memzoo summary`` prints a model's parameters and
FLOPs; ``memzoo export`` writes a checkpoint as a Hugging Face folder and ``memzoo generate`` streams a
continuation from one. Heavy imports happen only once a verb is chosen, so ``memzoo --help`` is instant.

User blocks come in with ``--plugins my_blocks.py`` (or a module name; repeatable) on any verb, or a ``plugins:``
list in the config file.
"""

from __future__ import annotations

import sys
from typing import Sequence

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
PLAIN_VERBS = {
    "blocks": "list registered blocks with their hyperparameters and defaults",
    "summary": "parameters, active parameters and FLOPs per token of a config's model",
    "export": "write a checkpoint as a Hugging Face folder:  memzoo export --ckpt X.ckpt --out DIR",
    "generate": "continue a prompt with an exported model:  memzoo generate --model DIR --prompt TEXT",
    "slot-stats": "background slot statistics for sparse memory finetuning:  memzoo slot-stats --config X.yaml "
    "--ckpt_path Y.ckpt --out stats.pt",
}

USAGE = """usage: memzoo <verb> [options]

memzoo trains language models whose FFN slots hold sparse-memory blocks (product-key memory, Memory+, PEER) or
dense / MoE baselines, configured entirely in YAML.

Training verbs (LightningCLI; `memzoo <verb> --help` lists every option):
  fit          train a model:            memzoo fit --config configs/quickstart.yaml
  validate     evaluate on validation data
  test         evaluate on test data
  predict      continue prompts and write them to a file

Other verbs:
{plain}

Common options: --config FILE (repeatable), --print_config, --plugins FILE_OR_MODULE (repeatable), --seed_everything N
Outputs go to runs/<experiment>/version_<n>/ (metrics.csv, config.yaml, checkpoints/).
"""


def _usage() -> str:
    plain = "\n".join(f"  {verb:<12} {text}" for verb, text in PLAIN_VERBS.items())
    return USAGE.format(plain=plain)


def _pop_plugins(args: list[str]) -> tuple[list[str], list[str]]:
    """Removes ``--plugins X`` / ``--plugins=X`` from ``args``; returns (plugins, remaining args)."""
    plugins, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--plugins":
            if i + 1 >= len(args):
                raise SystemExit("memzoo: --plugins needs a value: a .py file or an importable module name")
            plugins.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--plugins="):
            plugins.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return plugins, rest


def entry_point() -> int:
    """The ``memzoo`` console script and ``python -m memzoo``: runs :func:`main` on ``sys.argv``, exit status 0.

    Output piped into a reader that stops early (``memzoo blocks | head``) ends quietly, as Unix tools do."""
    try:
        main()
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    return 0


def main(args: Sequence[str] | None = None) -> object:
    """Runs one verb in-process; ``args`` excludes the program name. Returns what the verb produced (the
    LightningCLI object for training verbs), for use from Python and tests."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    verb = args[0]
    plugins, rest = _pop_plugins(args[1:])
    if plugins:
        from memzoo.registry import load_plugins

        load_plugins(plugins)
    if verb in LIGHTNING_VERBS:
        from memzoo.cli_lightning import run_lightning_cli

        return run_lightning_cli([verb, *rest])
    if verb == "blocks":
        from memzoo.cli_verbs import blocks_command

        return blocks_command(rest)
    if verb == "summary":
        from memzoo.cli_verbs import summary_command

        return summary_command(rest)
    if verb == "export":
        from memzoo.cli_verbs import export_command

        return export_command(rest)
    if verb == "generate":
        from memzoo.cli_verbs import generate_command

        return generate_command(rest)
    if verb == "slot-stats":
        from memzoo.cli_verbs import slot_stats_command

        return slot_stats_command(rest)
    raise SystemExit(f"memzoo: unknown verb {verb!r}.\n\n{_usage()}")
