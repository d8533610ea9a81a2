"""tools/continual.py: the matched-recall comparison and its targets, the recall metric and one finetuning run per
method on a tiny untrained model (the study itself runs outside the test suite)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("memzoo_continual_tool", ROOT / "tools" / "continual.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def point(method, recall_b, drop, loss_up, lr=1.0, steps=10, idf_power=None):
    if method == "smf" and idf_power is None:
        idf_power = 3.0
    return {"method": method, "lr": lr, "steps": steps, "recall_b": recall_b, "recall_a_drop": drop,
            "heldout_loss_increase": loss_up, "top_t": 8 if method == "smf" else None, "idf_power": idf_power}


def test_comparison_takes_each_methods_least_forgetting_at_the_matched_recall(tool):
    points = [
        point("full", 0.5, 0.30, 0.20), point("full", 0.9, 0.60, 0.50),
        point("lora", 0.4, 0.10, 0.05), point("lora", 0.7, 0.20, 0.08),   # lora reaches at most 0.7
        point("smf", 0.7, 0.05, 0.01), point("smf", 0.8, 0.04, 0.02), point("smf", 0.3, 0.0, 0.0),
        point("smf", 0.9, 0.30, 0.03, idf_power=1.0),  # the plain TF-IDF configuration: reported on its own too
    ]
    comparison, targets = tool.compare(points)
    assert comparison["matched_recall_b"] == 0.7
    assert comparison["forgetting"]["recall_a_drop"] == {"full": 0.60, "lora": 0.20, "smf": 0.04, "smf_tfidf": 0.30}
    assert comparison["forgetting"]["heldout_loss_increase"] == {"full": 0.50, "lora": 0.08, "smf": 0.01,
                                                                 "smf_tfidf": 0.03}
    assert comparison["max_recall_b"]["smf"] == 0.9 and comparison["frontier"]["recall_a_drop"]["0.25"]["smf"] == 0.0
    assert [t["met"] for t in targets] == [True, True, True, True]
    assert all({"target", "met", "detail"} <= set(t) for t in targets)
    assert "plain TF-IDF (idf_power 1): 0.3000" in targets[0]["detail"]
    worse = points + [point("full", 0.95, 0.01, 0.001)]  # full finetuning now forgets little at that recall
    _, targets = tool.compare(worse)
    assert [t["met"] for t in targets] == [False, True, False, True]


def test_recall_counts_exact_answers_and_every_method_runs(tool, tmp_path):
    from memzoo.data.facts_corpus import FactsCorpus
    from memzoo.training.slot_stats import collect_slot_stats

    torch.manual_seed(0)
    model = tool.build_model().eval()
    pairs = tool.facts(FactsCorpus(4, seed=0), range(2))
    assert tool.recall(model, pairs) == 0.0  # an untrained model recalls nothing
    runs = (tool.Run("full", 1e-3), tool.Run("lora", 1e-3), *tool.smf_runs([(8, 3.0)], (1.0,)))
    settings = tool.Settings("t", n_a=2, n_b=2, pretrain_steps=1, finetune_steps=(1, 2), runs=runs, n_keys=16,
                             batch=2)
    model = tool.build_model(settings.n_keys).eval()
    stats = tmp_path / "s.pt"
    torch.save(collect_slot_stats(model, [tool.fact_batch(pairs)]).to_dict(), stats)
    base = tool.save_base(model, tmp_path / "base.ckpt")
    for run in settings.runs:
        measured = tool.finetune(run, base, settings, pairs, stats, lambda m: {"recall_b": tool.recall(m, pairs)})
        assert [p["steps"] for p in measured] == [1, 2]
        assert measured[0]["idf_power"] == run.idf_power and measured[0]["top_t"] == run.top_t
    assert np.isfinite(tool.heldout_loss(model, [tool.fact_batch(pairs)]))
