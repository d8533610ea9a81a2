"""MemoryUsage (per-pool row usage) against plain references, and the pool's observe/track_usage hook."""

import math

import pytest
import torch

from memzoo.blocks.memory import ProductKeyMemory
from memzoo.blocks.pool import MemoryPool, find_pools
from memzoo.model.transformer import Transformer
from memzoo.training.metrics import USAGE_KEYS, MemoryUsage


def reference_usage(indices: torch.Tensor, weights: torch.Tensor, n: int) -> dict[str, float]:
    """Plain-Python usage statistics."""
    mass, hits = [0.0] * n, [0] * n
    for i, w in zip(indices.flatten().tolist(), weights.flatten().tolist()):
        mass[i] += w
        hits[i] += 1
    total = sum(mass)
    z = [m / total for m in mass]
    kl = math.log(n) + sum(p * math.log(p) for p in z if p > 0)

    def rows_for(share):
        acc = 0.0
        for count, p in enumerate(sorted(z, reverse=True), start=1):
            acc += p
            if acc >= share - 1e-12:
                return count / n
        return 1.0

    return {"used_fraction": sum(h > 0 for h in hits) / n, "kl_uniform": kl,
            "rows_for_50pct": rows_for(0.5), "rows_for_90pct": rows_for(0.9)}


def as_floats(result: dict[str, torch.Tensor]) -> dict[str, float]:
    assert set(result) == set(USAGE_KEYS)
    return {k: float(v) for k, v in result.items()}


def test_matches_plain_reference_over_several_updates_with_duplicates():
    n = 50
    metric = MemoryUsage(n)
    all_idx, all_w = [], []
    for _ in range(3):
        idx = torch.randint(0, 30, (4, 5, 6))  # rows 30.. never used; duplicates within and across bags
        w = torch.rand(4, 5, 6) ** 3
        metric.update(idx, w)
        all_idx.append(idx)
        all_w.append(w)
    got = as_floats(metric.compute())
    want = reference_usage(torch.cat(all_idx), torch.cat(all_w).double(), n)
    assert got["used_fraction"] == want["used_fraction"] <= 30 / 50
    assert got["rows_for_50pct"] == want["rows_for_50pct"]
    assert got["rows_for_90pct"] == want["rows_for_90pct"]
    assert got["kl_uniform"] == pytest.approx(want["kl_uniform"], rel=1e-9)


def test_extremes_uniform_and_collapsed():
    uniform = MemoryUsage(8)
    uniform.update(torch.arange(8).repeat(3), torch.full((24,), 0.25))
    got = as_floats(uniform.compute())
    assert got["used_fraction"] == 1.0 and got["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert got["rows_for_50pct"] == 0.5 and got["rows_for_90pct"] == 1.0  # 8 equal rows: 4 hold half, all 90%
    collapsed = MemoryUsage(8)
    collapsed.update(torch.tensor([[3, 3, 5]]), torch.tensor([[0.5, 0.5, 0.0]]))
    got = as_floats(collapsed.compute())
    assert got["used_fraction"] == 2 / 8  # a zero-weight hit still counts as used
    assert got["kl_uniform"] == pytest.approx(math.log(8))
    assert got["rows_for_50pct"] == got["rows_for_90pct"] == 1 / 8


def test_nothing_observed_gives_nan_and_reset_clears():
    metric = MemoryUsage(4)
    with pytest.warns(UserWarning, match="called before the ``update``"):
        got = as_floats(metric.compute())
    assert got["used_fraction"] == 0.0 and all(math.isnan(got[k]) for k in USAGE_KEYS[1:])
    metric.update(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]))
    assert float(metric.compute()["used_fraction"]) == 0.5
    metric.reset()
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert float(metric.compute()["used_fraction"]) == 0.0


def test_states_sum_across_processes():
    # what a distributed sync does: sum the per-row states of every process
    a, b, both = MemoryUsage(10), MemoryUsage(10), MemoryUsage(10)
    ia, wa = torch.randint(0, 10, (7, 3)), torch.rand(7, 3)
    ib, wb = torch.randint(0, 10, (5, 3)), torch.rand(5, 3)
    a.update(ia, wa)
    b.update(ib, wb)
    both.update(torch.cat([ia, ib]), torch.cat([wa, wb]))
    a.merge_state(b)
    for key, value in both.compute().items():
        torch.testing.assert_close(a.compute()[key], value)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match=r"num_rows must be a positive int .* got 0"):
        MemoryUsage(0)
    metric = MemoryUsage(4)
    with pytest.raises(ValueError, match=r"indices \(2,\) and weights \(3,\) must have one shape"):
        metric.update(torch.tensor([0, 1]), torch.rand(3))
    with pytest.raises(TypeError, match="must be an integer tensor"):
        metric.update(torch.tensor([0.0, 1.0]), torch.rand(2))
    with pytest.raises(IndexError, match=r"row 4 is outside \[0, 4\)"):
        metric.update(torch.tensor([0, 4]), torch.rand(2))
    with pytest.raises(IndexError, match=r"row -1 is outside"):
        metric.update(torch.tensor([-1, 0]), torch.rand(2))


# ---------------------------------------------------------------------------------------------- the pool hook
class Recorder:
    def __init__(self):
        self.calls = []

    def update(self, indices, weights):
        self.calls.append((indices, weights))


def test_observe_is_a_no_op_until_tracking_and_reports_each_lookup():
    block = ProductKeyMemory(dim=8, heads=2, knn=3, k_dim=4, n_keys=5)
    x = torch.randn(2, 4, 8)
    block(x)  # nothing attached: nothing happens
    recorder = Recorder()
    block.pool.track_usage(recorder)
    block(x)
    assert len(recorder.calls) == 1
    indices, weights = recorder.calls[0]
    want_indices, want_weights = block.lookup(x)
    assert torch.equal(indices, want_indices) and torch.equal(weights, want_weights)
    assert not weights.requires_grad
    block.pool.track_usage(None)
    block(x)
    assert len(recorder.calls) == 1


def test_observer_is_not_part_of_the_model():
    pool = MemoryPool(4, 8)
    metric = MemoryUsage(pool.num_rows)
    pool.track_usage(metric)
    assert pool.usage_observer is metric
    assert list(pool.children()) == [] and list(pool.state_dict()) == ["values"]
    with pytest.raises(TypeError, match=r"needs an object with update\(indices, weights\)"):
        pool.track_usage(object())


def test_a_metric_per_pool_collects_every_layer_reading_it():
    layer = dict(block="product_key_memory", heads=2, knn=3, k_dim=8)
    model = Transformer(
        vocab_size=30, dim=16, n_layers=3, n_heads=2, max_seq_len=16,
        layers={0: {**layer, "pool": "shared"}, 1: {**layer, "n_keys": 4}, 2: {**layer, "pool": "shared"}},
        pools={"shared": {"n_keys": 6, "value_dim": 16}},
    ).eval()
    pools = find_pools(model)
    assert list(pools) == ["pools.shared", "layers.1.ffn.private_pool"]
    metrics = {name: MemoryUsage(pool.num_rows) for name, pool in pools.items()}
    for name, pool in pools.items():
        pool.track_usage(metrics[name])
    with torch.no_grad():
        model(torch.randint(0, 30, (3, 5)))
    lookups_per_layer = 3 * 5 * 2 * 3  # tokens · heads · knn
    assert int(metrics["pools.shared"].hits.sum()) == 2 * lookups_per_layer
    assert int(metrics["layers.1.ffn.private_pool"].hits.sum()) == lookups_per_layer
    # softmax weights sum to one per head and token
    torch.testing.assert_close(float(metrics["pools.shared"].mass.sum()), 2 * 3 * 5 * 2.0)
    assert 0 < float(metrics["pools.shared"].compute()["used_fraction"]) <= 1


def test_position_mask_skips_padded_lookups():
    indices = torch.tensor([[[0, 1], [2, 3], [3, 3]]])  # (B=1, T=3, K=2); position 2 is padding
    weights = torch.full((1, 3, 2), 0.5)
    masked, reference = MemoryUsage(4), MemoryUsage(4)
    masked.set_position_mask(torch.tensor([[True, True, False]]))
    masked.update(indices, weights)
    reference.update(indices[:, :2], weights[:, :2])
    assert torch.equal(masked.hits, reference.hits) and torch.equal(masked.mass, reference.mass)
    masked.set_position_mask(None)
    masked.update(indices, weights)
    assert int(masked.hits[3]) == 1 + 3
    masked.set_position_mask(torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match=r"do not start with the position mask's \(1, 2\)"):
        masked.update(indices, weights)
    with pytest.raises(ValueError, match="bool"):
        masked.set_position_mask(torch.ones(1, 3))
