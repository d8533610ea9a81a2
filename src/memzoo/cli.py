"""The ``memzoo`` command.

``memzoo fit|validate|test|predict`` run through LightningCLI (subclass mode: ``class_path``/``init_args`` YAML,
``--print_config``); ``memzoo blocks`` lists the registered blocks; ``memzoo summary`` prints a model's parameters and
FLOPs; ``memzoo export`` writes a checkpoint as a Hugging Face folder and ``memzoo generate`` streams a
continuation from one. Heavy imports happen only once a verb is chosen, so ``memzoo --help`` is instant.

User blocks come in with ``--plugins my_blocks.py`` (or a module name; repeatable) on any verb, or a ``plugins:``
list in the config file.

Errors: every verb reports a mistake in the input (config, data, checkpoint, arguments) through one place,
:func:`entry_point`: one line ``memzoo: error: <message>`` on stderr and exit status 2 (config errors are described by
:mod:`memzoo.config_errors`: key, file and line, did-you-mean); ``--debug`` (any verb) or ``MEMZOO_DEBUG=1`` shows the
full traceback instead. Options are never abbreviated.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from memzoo.cli_base import CommandError, ConfigError, VerbParser  # noqa: F401  (public names of memzoo.cli)

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")
PLAIN_VERBS = {
    "blocks": "list registered blocks with their hyperparameters and defaults",
    "summary": "parameters, active parameters and FLOPs per token of a config's model; with --world-size N\n"
    "               [--memory-parallel M]: per-rank bytes and gradient communication per step",
    "export": "write a checkpoint as a Hugging Face folder:  memzoo export --ckpt X.ckpt --out DIR",
    "generate": "continue a prompt with an exported model:  memzoo generate --model DIR --prompt TEXT",
    "memorize": "store a model's attention keys/values over documents as a memory bank:  memzoo memorize\n"
    "               --model M --docs A.txt B.txt --out facts.bank   (then: generate --memory facts.bank --cite)",
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

Common options: --config FILE (repeatable), --print_config, --plugins FILE_OR_MODULE (repeatable), --seed_everything N,
  --debug (or MEMZOO_DEBUG=1): full tracebacks instead of one-line errors
Outputs go to runs/<experiment>/version_<n>/ (metrics.csv, config.yaml, checkpoints/).
Resume: memzoo fit --config X.yaml --ckpt_path last   (the newest last.ckpt of the experiment) or a .ckpt path.
"""

# exit status of a run stopped by a mistake in its input (as argparse's usage errors)
ERROR_STATUS = 2


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
                raise CommandError("--plugins needs a value: a .py file or an importable module name")
            plugins.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--plugins="):
            plugins.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return plugins, rest


def debug_requested(args: Sequence[str] = ()) -> bool:
    """Whether tracebacks were asked for: ``--debug`` among ``args`` or ``MEMZOO_DEBUG`` set to a non-empty value
    other than ``0``."""
    import os

    return "--debug" in args or os.environ.get("MEMZOO_DEBUG", "") not in ("", "0")


def error_message(error: BaseException) -> str:
    """The one line a user needs from ``error``: jsonargparse's "Does not validate ... Given value: Namespace(...)"
    wrappers are peeled off down to the error the model, data or checkpoint code raised; a parse error no verb
    described is described by :func:`memzoo.config_errors.describe_parse_error`; line breaks become spaces."""
    if isinstance(error, argparse.ArgumentError):
        from memzoo.config_errors import describe_parse_error

        return describe_parse_error(error)
    while error.__cause__ is not None and _is_wrapper(error):
        error = error.__cause__
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (KeyError, OSError)) and not isinstance(error, FileNotFoundError) or not str(error).strip():
        text = f"{type(error).__name__}: {text}"
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _is_wrapper(error: BaseException) -> bool:
    text = str(error)
    return (
        type(error).__module__.startswith(("jsonargparse", "lightning"))
        or "Given value: Namespace(" in text
        or text.startswith(("Does not validate against any of the Union subtypes", "Problem with given class_path"))
    )


def entry_point() -> int:
    """The ``memzoo`` console script and ``python -m memzoo``: runs :func:`main` on ``sys.argv``.

    Exit status 0 on success; 2 with ``memzoo: error: <message>`` on stderr when the input is wrong (the traceback
    only with ``--debug`` / ``MEMZOO_DEBUG=1``); 128 + N for a run stopped by signal N; 130 on Ctrl-C outside
    training. Output piped into a reader that stops early (``memzoo blocks | head``) ends quietly, as Unix tools do."""
    args = sys.argv[1:]
    debug = debug_requested(args)
    try:
        main([a for a in args if a != "--debug"])
    except BrokenPipeError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nmemzoo: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure ends in one readable line
        if debug:
            raise
        sys.stdout.flush()
        print(f"memzoo: error: {error_message(error)}", file=sys.stderr)  # `memzoo --help` tells of --debug
        return ERROR_STATUS
    return 0


def main(args: Sequence[str] | None = None) -> object:
    """Runs one verb in-process; ``args`` excludes the program name. Returns what the verb produced (the
    LightningCLI object for training verbs), for use from Python and tests."""
    args = [a for a in (sys.argv[1:] if args is None else args) if a != "--debug"]  # entry_point reads it
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return None
    verb = args[0]
    from memzoo import host_allocator

    host_allocator.keep_freed_memory()  # freed tensors' pages stay mapped: no page faults on every step's temporaries
    plugins, rest = _pop_plugins(args[1:])
    if plugins:
        from memzoo.registry import load_plugins

        load_plugins(plugins)
    if verb in LIGHTNING_VERBS:
        from memzoo.cli_lightning import run_lightning_cli
        from memzoo.subnormals import flushing_subnormals

        with flushing_subnormals():  # a confident model's subnormal floats would slow every CPU step
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
    if verb == "memorize":
        from memzoo.cli_verbs import memorize_command

        return memorize_command(rest)
    if verb == "slot-stats":
        from memzoo.cli_verbs import slot_stats_command

        return slot_stats_command(rest)
    raise CommandError(f"unknown verb {verb!r}; the verbs are {', '.join([*LIGHTNING_VERBS, *PLAIN_VERBS])} "
                       f"(memzoo --help describes them)")
