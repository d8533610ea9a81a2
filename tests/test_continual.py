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


def test_recall_counts_exact_answers_and_every_method_trains_through_lightnings_trainer(tool, tmp_path, monkeypatch):
    """Pretraining and each method's finetuning are LanguageModel + Lightning's Trainer fits (a tool that trains
    with a loop of its own fails this: its steps would not be Trainer steps)."""
    import lightning as L

    from memzoo.data.facts_corpus import FactsCorpus
    from memzoo.training.module import LanguageModel
    from memzoo.training.slot_stats import collect_slot_stats

    fits = []
    real_fit = L.Trainer.fit

    def spy(trainer, module, *args, **kwargs):
        assert isinstance(module, LanguageModel)
        real_fit(trainer, module, *args, **kwargs)
        fits.append(trainer.global_step)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    model = tool.build_model(16).model.eval()
    pairs = tool.facts(FactsCorpus(4, seed=0), range(2))
    assert tool.recall(model, pairs) == 0.0  # an untrained model recalls nothing
    runs = (tool.Run("full", 1e-3), tool.Run("lora", 1e-3), *tool.smf_runs([(8, 3.0)], (1.0,)))
    settings = tool.Settings("t", n_a=2, n_b=2, pretrain_steps=3, finetune_steps=(1, 2), runs=runs, n_keys=16,
                             batch=2, window=8)
    base = tool.pretrain(settings, np.arange(200) % 50, pairs, tmp_path / "base.ckpt", log=lambda _: None)
    assert (tmp_path / "base.ckpt").is_file() and not base.training
    stats = tmp_path / "s.pt"
    torch.save(collect_slot_stats(base.model, [tool.fact_batch(pairs)]).to_dict(), stats)
    for run in settings.runs:
        measured = tool.finetune(run, tmp_path / "base.ckpt", settings, pairs, stats,
                                 lambda m: {"recall_b": tool.recall(m, pairs)})
        assert [p["steps"] for p in measured] == [1, 2]
        assert measured[0]["idf_power"] == run.idf_power and measured[0]["top_t"] == run.top_t
    assert fits == [3, 2, 2, 2]
    assert np.isfinite(tool.heldout_loss(base.model, [tool.fact_batch(pairs)]))
    # the cache --pretrained names is that checkpoint, read back by memzoo's loader with the same weights
    loaded = tool.load_base(tmp_path / "base.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), base.model.state_dict().values()))
    (tmp_path / "old.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="--pretrained .* is not a memzoo checkpoint"):
        tool.load_base(tmp_path / "old.pt")
