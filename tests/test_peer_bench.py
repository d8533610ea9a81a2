"""Smoke test of tools/bench_peer.py: both variants compute the same layer, and the report has its ratios."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_peer", ROOT / "tools" / "bench_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two subprocesses importing torch: ~8 s on a busy 2-core machine
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peak memory needs Linux /proc")
def test_quick_run_reports_matching_variants_and_ratios(capsys, monkeypatch):
    bench = load_bench()
    in_subprocesses = bench.measure_memory
    # the headline regime's memory is measured as the tool measures it, in a fresh subprocess per variant; the other
    # regime's numbers are only reported, so they are measured in this process (a subprocess: ~4 s CPU importing)
    monkeypatch.setattr(bench, "measure_memory", lambda cfg, device, variant, regime: (
        in_subprocesses if regime == bench.REGIMES[0] else bench.measure_memory_here)(cfg, device, variant, regime))
    result = bench.main(["--quick", "--device", "cpu", "--warmup", "0", "--repeats", "1"])
    assert result["max_abs_output_difference"] < 1e-5
    assert result["config"]["experts"] == 32**2
    for variant in bench.VARIANTS:
        assert result["seconds_per_step"][variant] > 0
        assert result["memory_bytes"][variant]["step_peak"] > 0
    # the materialised forward keeps two (B, T, heads, k, dim) gathered tensors alive for the backward
    assert result["memory_bytes"]["materialised"]["after_forward"] >= 2 * result["one_gathered_tensor_bytes"] * 0.9
    assert result["time_ratio"] > 0 and result["memory_ratio"] > 0
    assert result["one_table_gradient_bytes"] == 32**2 * 64 * 4
    # both gradient regimes are measured; the headline keys are the first one's
    assert set(result["regimes"]) == set(bench.REGIMES) and result["headline_regime"] == "zeroed"
    for key in ("seconds_per_step", "memory_bytes", "time_ratio", "memory_ratio", "after_forward_memory_ratio"):
        assert result[key] == result["regimes"]["zeroed"][key]
    out = capsys.readouterr().out
    assert "ratio mat/ops" in out and '"time_ratio"' in out
    assert out.count("ratio mat/ops") == 2 and "none    ops" in out


def test_gradient_regimes_keep_or_drop_the_grad_buffers():
    bench = load_bench()
    peer, x, grad_out = bench.build(bench.QUICK, "cpu")
    bench.step(peer, "ops", x, grad_out)
    down_grad = peer.pool.down.grad
    bench.zero_grads(peer, x, "zeroed")
    assert peer.pool.down.grad is down_grad and not down_grad.any()  # the same buffer, zeroed in place
    bench.zero_grads(peer, x, "none")
    assert all(p.grad is None for p in (*peer.parameters(), x))


def test_sparse_update_mode_gives_both_variants_row_sparse_table_gradients():
    bench = load_bench()
    cfg = {**bench.QUICK, "update": "sparse"}
    peer, x, grad_out = bench.build(cfg, "cpu")
    for variant in bench.VARIANTS:
        bench.zero_grads(peer, x)
        bench.step(peer, variant, x, grad_out)
        assert peer.pool.down.grad.is_sparse and peer.pool.up.grad.is_sparse, variant
    dense_peer, _, _ = bench.build(bench.QUICK, "cpu")
    assert not dense_peer.pool.sparse
    assert bench.max_output_difference(cfg, "cpu") < 1e-5
