"""The studies in tools/ train through memzoo's LanguageModel and Lightning's Trainer (the CLI or
tools/continual_training.py), never through a loop of their own: no tool outside the benchmarks below calls
``backward()`` or an optimizer's ``step()``. The benchmarks time raw training steps on purpose (a block's or a
layer's step cost, memory of a raw step, or a baseline against which the Trainer's overhead is measured)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: tools that time or measure raw steps, each with why a Trainer would defeat the measurement
RAW_STEP_BENCHMARKS = {
    "bench_blocks.py": "step time of each block's model, as ratios to dense",
    "bench_memory.py": "single-op and single-layer step times against PyTorch baselines",
    "bench_memory_parallel.py": "per-rank peak memory of a raw step, sharded vs replicated",
    "bench_nanogpt.py": "a plain PyTorch loop as the baseline memzoo's Trainer run is compared with",
    "bench_peer.py": "one PEER layer's forward/backward under two gradient regimes",
    "bench_train.py": "the minimal loop the Trainer's per-step overhead is measured against",
    "bench_host_tables.py": "step time of a host table with and without prefetch against an on-device one",
}
#: side-by-side tools (``sidebyside*.py``) call backward() to compare gradients with the authors' modules: no training


def _measures_raw_steps(name: str) -> bool:
    return name in RAW_STEP_BENCHMARKS or name.startswith("sidebyside")
OWN_LOOP = re.compile(r"\.backward\(|\b\w*opt\w*\.step\(")


def test_studies_have_no_training_loop_of_their_own():
    tools = sorted((ROOT / "tools").glob("*.py"))
    assert {"continual.py", "continual_smollm2.py", "study.py", "capacity.py"} <= {t.name for t in tools}
    offenders = [t.name for t in tools if not _measures_raw_steps(t.name) and OWN_LOOP.search(t.read_text())]
    assert offenders == [], f"{offenders} train with a loop of their own; train through tools/continual_training.fit"
    assert all((ROOT / "tools" / name).is_file() for name in RAW_STEP_BENCHMARKS)  # the list names real files
    assert OWN_LOOP.search("loss.backward()") and OWN_LOOP.search("opt.step()")  # the pattern catches a loop
