"""Helpers of the side-by-side tools (``tools/sidebyside_<block>.py``): import an authors' module from a clone given
at run time (with import-time-only dependencies stubbed when absent), compare tensors, time fwd+bwd, write results.

Nothing of the authors' code is part of memzoo: each tool imports it from ``--repo DIR`` when it runs.
"""

from __future__ import annotations

import importlib
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch

from memzoo.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def import_from_clone(repo: Path, module: str, stubs: dict[str, dict[str, Any]] | None = None) -> tuple[Any, list[str]]:
    """``module`` imported with ``repo`` first on ``sys.path``; returns it and the names of the modules stubbed.

    ``stubs``: ``{module name: {attribute: value}}`` installed only where the real module cannot be imported (an
    import-time dependency such as ``xformers`` that the compared code never calls).
    """
    if not repo.is_dir():
        raise SystemExit(f"--repo {repo} is not a folder; extract the authors' repository there first")
    stubbed = []
    for name, attributes in (stubs or {}).items():
        try:
            importlib.import_module(name)
        except Exception:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            for key, value in attributes.items():
                setattr(sys.modules[name], key, value)
            stubbed.append(name)
    sys.path.insert(0, str(repo.resolve()))
    return importlib.import_module(module), stubbed


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.to_dense() if a.is_sparse else a
    b = b.to_dense() if b.is_sparse else b
    return (a.detach().double() - b.detach().double()).abs().max().item()


def time_fwd_bwd(fns: dict[str, Callable[[], torch.Tensor]], repeats: int = 10, rounds: int = 3) -> dict[str, float]:
    """Best-of-rounds median seconds of ``fn().sum().backward()`` for each function, interleaved round by round."""
    def once(fn):
        start = time.perf_counter()
        fn().float().square().mean().backward()
        return time.perf_counter() - start

    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm-up
        for _ in range(2):
            once(fn)
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], statistics.median(once(fn) for _ in range(repeats)))
    return best


def write_results(name: str, result: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> Path:
    """Writes ``sidebyside-<name>.json`` and ``.md`` (atomically); returns the JSON path."""
    result = {**result, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "processor": platform.processor()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sidebyside-{name}.json"
    write_bytes_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
    write_bytes_atomic(out_dir / f"sidebyside-{name}.md", markdown.encode())
    return path
