"""Scores an exported model on the country-facts cloze set with lm-evaluation-harness (the local task
``tools/lm_eval/country_facts.yaml``) and with memzoo's own count, and checks they agree.

memzoo's count: an item is right when every answer token is the greedy prediction after the prompt (teacher-forced;
as ``tools/continual_smollm2.py`` counts). lm-eval's ``acc`` of a ``loglikelihood`` task is the same test
(``is_greedy``), run on the folder loaded by plain ``transformers`` (``trust_remote_code``). Needs ``pip install
lm-eval``; runs offline (``HF_HUB_OFFLINE=1``). Writes ``docs/results/lm-eval-country-facts.json``.

    HF_HUB_OFFLINE=1 python tools/lm_eval_check.py --model EXPORT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
CLOZE = ROOT / "docs" / "results" / "continual-smollm2-cloze.jsonl"


def memzoo_right(folder: str) -> dict[str, bool]:
    """Prompt -> whether memzoo's own model (``memzoo.load_pretrained``) answers it right."""
    import memzoo
    from continual_smollm2 import correct

    model, tokenizer = memzoo.load_pretrained(folder, with_tokenizer=True)
    items = [json.loads(line) for line in CLOZE.read_text(encoding="utf-8").splitlines() if line.strip()]
    right = correct(model, tokenizer, [(it["context"], it["answer"]) for it in items])
    return {it["context"]: ok for it, ok in zip(items, right)}


def lm_eval_right(folder: str) -> tuple[float, dict[str, bool]]:
    """lm-eval's accuracy and, per prompt, its ``acc`` (the transformers model of the folder)."""
    from lm_eval.tasks import TaskManager

    from lm_eval import simple_evaluate

    os.chdir(ROOT)  # lm-eval reads the data file named in country_facts.yaml relative to the repository root
    results = simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32", tasks=["memzoo_country_facts"],
        task_manager=TaskManager(include_path=str(ROOT / "tools" / "lm_eval")), device="cpu", batch_size=16,
        log_samples=True,
    )
    samples = {s["doc"]["context"]: bool(s["acc"]) for s in results["samples"]["memzoo_country_facts"]}
    return float(results["results"]["memzoo_country_facts"]["acc,none"]), samples


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a memzoo export folder (e.g. the study's --export)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "lm-eval-country-facts.json"))
    args = parser.parse_args(argv)
    folder = str(Path(args.model).resolve())
    t0 = time.time()
    ours = memzoo_right(folder)
    accuracy, theirs = lm_eval_right(folder)
    differ = sorted(k for k in ours if theirs.get(k) != ours[k])
    result = {"model": args.model, "task": "tools/lm_eval/country_facts.yaml (memzoo_country_facts)",
              "items": len(ours), "memzoo_accuracy": sum(ours.values()) / len(ours), "lm_eval_accuracy": accuracy,
              "items_scored_differently": differ, "agree": not differ and len(theirs) == len(ours),
              "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    if not result["agree"]:
        raise SystemExit("lm-eval and memzoo disagree")
    return result


if __name__ == "__main__":
    main()
