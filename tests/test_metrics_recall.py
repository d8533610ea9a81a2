"""FactRecall against a plain per-row reference on hand-made logits."""

import warnings

import pytest
import torch

from memzoo.training.metrics import FactRecall

IGNORE = -100


def _logits_predicting(predictions: list[list[int]], vocab: int = 6) -> torch.Tensor:
    """Logits (B, T, V) whose argmax at [b, t] is predictions[b][t]."""
    logits = torch.randn(len(predictions), len(predictions[0]), vocab)
    for b, row in enumerate(predictions):
        for t, token in enumerate(row):
            logits[b, t, token] = logits[b, t].abs().max() + 1.0
    return logits


def _reference(predictions, labels) -> tuple[int, int]:
    hits = rows = 0
    for pred_row, label_row in zip(predictions, labels):
        labelled = [(p, y) for p, y in zip(pred_row, label_row) if y != IGNORE]
        if labelled:
            rows += 1
            hits += all(p == y for p, y in labelled)
    return hits, rows


def test_hits_misses_partial_answers_and_unlabelled_rows():
    predictions = [
        [1, 2, 3, 4],  # hit: both answer tokens right
        [1, 2, 3, 0],  # partial: first answer token right, terminator wrong → miss
        [5, 5, 5, 5],  # miss everywhere
        [0, 0, 0, 0],  # no labelled positions: not counted
        [4, 1, 2, 3],  # hit with a single labelled position; wrong predictions elsewhere do not matter
    ]
    labels = [
        [IGNORE, IGNORE, 3, 4],
        [IGNORE, IGNORE, 3, 4],
        [IGNORE, 2, 3, 4],
        [IGNORE, IGNORE, IGNORE, IGNORE],
        [IGNORE, 1, IGNORE, IGNORE],
    ]
    metric = FactRecall()
    metric.update(_logits_predicting(predictions), torch.tensor(labels))
    assert _reference(predictions, labels) == (2, 4)
    assert metric.hits.item() == 2 and metric.rows.item() == 4
    assert metric.compute().item() == pytest.approx(0.5)


def test_accumulates_over_batches_like_the_reference():
    generator = torch.Generator().manual_seed(0)
    metric = FactRecall()
    all_predictions, all_labels = [], []
    for _ in range(5):
        predictions = torch.randint(0, 3, (7, 5), generator=generator)
        labels = torch.where(torch.rand(7, 5, generator=generator) < 0.4,
                             torch.randint(0, 3, (7, 5), generator=generator), torch.full((7, 5), IGNORE))
        labels[0] = IGNORE
        metric.update(_logits_predicting(predictions.tolist(), vocab=3), labels)
        all_predictions += predictions.tolist()
        all_labels += labels.tolist()
    hits, rows = _reference(all_predictions, all_labels)
    assert 0 < hits < rows
    assert metric.compute().item() == pytest.approx(hits / rows)


def test_no_rows_is_zero_without_warnings():
    metric = FactRecall()
    metric.update(torch.randn(2, 3, 4), torch.full((2, 3), IGNORE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metric.compute().item() == 0.0


def test_states_are_sum_reduced_and_reset():
    metric = FactRecall()
    for state in ("hits", "rows"):  # what DDP sync applies to the gathered per-process states
        assert metric._reductions[state](torch.tensor([2, 3])).item() == 5
    metric.update(_logits_predicting([[1, 2]]), torch.tensor([[IGNORE, 2]]))
    assert metric.compute().item() == 1.0
    metric.reset()
    assert metric.rows.item() == 0


def test_shape_errors():
    with pytest.raises(ValueError, match=r"logits \(B, T, V\) and labels \(B, T\), got logits \(2, 3\)"):
        FactRecall().update(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \(2, 4\)"):
        FactRecall().update(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
