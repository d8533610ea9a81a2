"""tools/bench_blocks.py: the previous top-k path it compares against is exact, and its targets list judges ratios."""

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location("bench_blocks", Path(__file__).parents[1] / "tools" / "bench_blocks.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_previous_and_new_topk_agree():
    gen = torch.Generator().manual_seed(0)
    query, sub_keys = torch.randn(10, 4, 16, generator=gen), torch.randn(4, 2, 40, 8, generator=gen)
    new = bench.product_key_topk(query, sub_keys, 8)
    for fn in (bench.previous_topk, bench.full_product_topk):
        scores, indices = fn(query, sub_keys, 8)
        torch.testing.assert_close(scores, new[0])
        assert torch.equal(indices, new[1])


def test_targets_and_table_from_a_result():
    result = {
        "machine": "test",
        "blocks": {"1": {m: {"ms": 1.0, "ratio_to_dense": r} for m, r in
                         (("dense", 1.0), ("moe", 1.1), ("pkm", 1.2), ("memoryplus", 1.3), ("peer", 1.0))}},
        "topk_cpu": {"128": {"speedup_vs_previous": 5.0, "speedup_vs_full_product": 20.0},
                     "1024": {"speedup_vs_previous": 3.0}},
    }
    result["targets"] = bench.targets(result)
    met = {t["target"].split(" ")[0]: t["met"] for t in result["targets"]}
    assert met == {"pkm": True, "memoryplus": False, "peer": True, "product-key": False}
    table = bench.markdown(result)
    assert "| memoryplus | 1.30 |" in table and "| 1024 | 3.00x | n/a (memory) |" in table


def test_one_thread_targets_judge_the_cpu_time_ratio_and_the_table_shows_both():
    rows = {m: {"ms": 1.0, "ratio_to_dense": wall, "cpu_ms": 1.0, "cpu_ratio_to_dense": cpu}
            for m, wall, cpu in (("dense", 1.0, 1.0), ("moe", 1.0, 1.0), ("pkm", 2.0, 1.1),
                                 ("memoryplus", 1.0, 1.4), ("peer", 1.2, 1.2))}
    result = {"machine": "test", "blocks": {"1": rows}}
    result["targets"] = bench.targets(result)
    met = {t["target"].split(" ")[0]: t["met"] for t in result["targets"]}
    assert met == {"pkm": True, "memoryplus": False, "peer": True}
    assert "1.10x dense (CPU time; wall time 2.00x)" in result["targets"][0]["detail"]
    assert "| pkm | 1.10 | 2.00 |" in bench.markdown(result)


def test_dense_with_models_replace_layers_1_and_3_at_equal_forward_flops():
    dense = bench.study_model("dense")[0].model
    dense_ffn = dense.layers[1].ffn.flops_per_token()
    assert set(bench.DENSE_VARIANTS) == {"ultramem", "ultramem_v2", "ultramem_v2_shared", "engram"}
    for name in bench.DENSE_VARIANTS:
        model = bench.study_model(name)[0].model
        for i in (1, 3):
            block = model.layers[i].ffn
            # engram sits beside a narrowed FFN; ultramem_v2_shared is ultramem_v2 over a shared pool
            assert block.block_name in (name, name.removesuffix("_shared")) or block.add.block_name == name
            assert abs(block.flops_per_token() / dense_ffn - 1) < 0.04  # UltraMemV2 over private tables: 0.965x
        assert model.layers[0].ffn.block_name == "dense"


def test_models_filter_refuses_an_unknown_name(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--models", "dense,ultramem,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


def test_layer_breakdown_times_every_part_and_the_table_derives_selection_and_rest():
    for name in bench.BREAKDOWN_MODELS:  # PKM's memory layer is layer 2, Memory+'s and PEER's layers 1 and 3
        row = bench.layer_breakdown(name, repeats=1)
        assert set(row) == {"layer_ms", "dense_ffn_ms", "query_ms", "router_ms", "read_ms", "read_cold_ms",
                            "read_table_mb"}
        assert all(value > 0 for value in row.values()), name
        # 768 tokens x 4 heads x 32 rows (PEER: x 16 experts, two tables) of 128 float32
        assert row["read_table_mb"] == pytest.approx(768 * 4 * (16 * 2 if name == "peer" else 32) * 128 * 4 / 1e6)
    result = {"machine": "test", "targets": [],
              "layer_breakdown": {"pkm": {"layer_ms": 10.0, "dense_ffn_ms": 5.0, "query_ms": 1.0, "router_ms": 4.0,
                                          "read_ms": 5.0, "read_cold_ms": 7.5, "read_table_mb": 50.3}}}
    assert "| pkm | 10.0 | 5.0 | 1.0 | 3.0 | 5.0 | 7.5 | 1.0 | 50.3 |" in bench.markdown(result)


def test_paired_ratios_take_the_median_over_rounds_of_each_rounds_ratio(monkeypatch):
    """Round by round each function's time over the base's; the median of those ratios, their spread, and the
    table and target detail show both."""
    times = iter([1.0, 2.0, 3.0,  # round 1: base, a, b
                  2.0, 3.0, 2.0,  # round 2: the machine slows the base: a's ratio 1.5, b's 1.0
                  1.0, 1.8, 3.3])
    monkeypatch.setattr(bench, "timed", lambda fn, repeats, **kw: next(times))
    out = bench.paired_ratios({"base": None, "a": None, "b": None}, "base", repeats=1, rounds=3)
    assert out["a"]["ratio"] == pytest.approx(1.8) and out["a"]["spread"] == pytest.approx([1.5, 2.0])
    assert out["b"]["ratio"] == pytest.approx(3.0) and out["b"]["spread"] == pytest.approx([1.0, 3.3])
    assert out["base"]["ratio"] == 1.0 and out["a"]["ms"] == pytest.approx(2000.0)
    row = {"ms": 1.0, "ratio_to_dense": 1.3, "ratio_spread": [1.2, 1.4], "cpu_ms": 1.0, "cpu_ratio_to_dense": 1.24,
           "cpu_ratio_spread": [1.19, 1.30]}
    result = {"machine": "test", "blocks": {"1": {"dense": dict(row, ratio_to_dense=1.0, cpu_ratio_to_dense=1.0),
                                                  "memoryplus": row}}}
    result["targets"] = bench.targets(result)
    assert result["targets"][0]["met"]
    assert result["targets"][0]["detail"] == "1.24x dense (CPU time, rounds 1.19–1.30; wall time 1.30x)"
    assert "| memoryplus | 1.24 (1.19–1.30) | 1.30 (1.20–1.40) |" in bench.markdown(result)


def test_topk_section_times_the_merge_kernel_alone_and_the_table_shows_it():
    rows = bench.bench_topk("cpu", [32], tokens=8, repeats=1)
    assert rows["32"]["merge_kernel_us_per_row"] > 0 and rows["32"]["speedup_vs_previous"] > 0
    table = bench.markdown({"machine": "test", "targets": [], "topk_cpu": {
        "128": {"speedup_vs_previous": 4.0, "merge_kernel_us_per_row": 0.81},
        "1024": {"speedup_vs_previous": 5.0}}})
    assert "merge kernel alone, forward (µs per token and head)" in table
    assert "| 128 | 4.00x | 0.81 |" in table and "| 1024 | 5.00x | n/a |" in table


def test_a_run_whose_rounds_disagree_is_flagged_busy_and_a_quiet_one_is_not():
    def rows(pkm_spread, pkm_wall_spread):
        return {"dense": {"ms": 1.0, "ratio_to_dense": 1.0, "ratio_spread": [1.0, 1.0], "cpu_ms": 1.0,
                          "cpu_ratio_to_dense": 1.0, "cpu_ratio_spread": [1.0, 1.0]},
                "pkm": {"ms": 1.2, "ratio_to_dense": 1.2, "ratio_spread": pkm_wall_spread, "cpu_ms": 1.2,
                        "cpu_ratio_to_dense": 1.2, "cpu_ratio_spread": pkm_spread}}

    quiet = {"machine": "test", "blocks": {"1": rows([1.1, 1.5], [1.0, 2.0])}}  # the wall spread is not the headline
    quiet["targets"] = bench.targets(quiet)
    assert bench.widest_round_spread(quiet["blocks"]["1"]) == pytest.approx(1.5 / 1.1)
    assert bench.busy_machine_warnings(quiet) == [] and "Busy machine" not in bench.markdown(quiet)
    busy = {"machine": "test", "blocks": {"1": rows([1.16, 1.89], [1.0, 1.0]),
                                          "2": {"dense": {"ms": 1.0, "ratio_to_dense": 1.0, "ratio_spread": [1.0, 1.5]}}}}
    busy["targets"] = bench.targets(busy)
    warnings = bench.busy_machine_warnings(busy)
    assert [w.split(":")[0] for w in warnings] == ["1 thread(s)", "2 thread(s)"]
    assert "differ by up to 1.63x" in warnings[0] and "differ by up to 1.50x" in warnings[1]
    assert bench.markdown(busy).count("**Busy machine**") == 2


def test_the_gpu_sections_run_their_code_small_on_a_cpu_and_report_their_targets():
    """The CUDA-only parts (top-k against torch.topk, the 1.3B layer) run only on a lent GPU: the same code at small
    sizes on the CPU here, so the one GPU run does not fail on a Python error."""
    topk = bench.bench_topk("cpu", [32], tokens=8, repeats=1, against_torch_topk=True)
    assert topk["32"]["speedup_vs_torch_topk_halves"] > 0 and topk["32"]["torch_topk_halves_ms"] > 0
    layer = bench.bench_layer_13b(1, device="cpu", dim=64, n_keys=32, tokens=16, k_dim=32)
    assert layer["ratio"] > 0 and layer["dense_hidden"] >= 64
    assert layer["memory_flops_per_token"] / layer["dense_flops_per_token"] == pytest.approx(1.0, rel=0.5)
    result = {"machine": "test", "topk_cuda": topk, "layer_13b": layer}
    result["targets"] = bench.targets(result)
    assert [t["target"].split(" ")[0] for t in result["targets"]] == ["top-k", "1.3B-shape"]
    table = bench.markdown(result)
    assert "CUDA" in table and f"{topk['32']['speedup_vs_torch_topk_halves']:.2f}x" in table
