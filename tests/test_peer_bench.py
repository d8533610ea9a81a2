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


@pytest.mark.slow  # two subprocesses importing torch: ~15 s on a busy 2-core machine
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="CPU peak memory needs Linux /proc")
def test_quick_run_reports_matching_variants_and_ratios(capsys):
    bench = load_bench()
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
    assert result["memory_ratio_bound_dense_update"] == pytest.approx(
        result["memory_bytes"]["materialised"]["step_peak"] / (32**2 * 64 * 4))
    out = capsys.readouterr().out
    assert "ratio mat/ops" in out and '"time_ratio"' in out and "step-peak ratio is at most" in out


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
