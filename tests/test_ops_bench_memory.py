"""Smoke test of tools/bench_memory.py: a quick run of the fast sections writes a well-formed JSON report."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_lookup_and_gather_sections(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--sections", "lookup,gather", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["quick"] is True and set(report["sections"]) == {"lookup", "gather"}
    for row in report["sections"]["lookup"]:
        assert row["speedup"] > 0 and math.isfinite(row["speedup"])
    for row in report["sections"]["gather"]:
        for key in ("fwd_vs_embedding_bag", "fwdbwd_vs_embedding_bag", "fwd_copy_fraction", "ours_temp_MiB"):
            assert math.isfinite(row[key]) and row[key] >= 0, key
        assert row["gathered_MiB"] == row["bags"] * row["K"] * row["D"] * 4 / 2**20
    table = capsys.readouterr().out
    assert "== lookup" in table and "== gather" in table and "fwd_copy_fraction" in table


def test_unknown_section_is_an_error(bench):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "gathr"])


def test_peak_cpu_bytes_sees_a_temporary(bench):
    import torch

    def allocate_and_free():
        torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1)  # 8 MiB, freed at once

    assert 8 * 2**20 <= bench.peak_cpu_bytes(allocate_and_free) < 9 * 2**20


def test_the_cuda_rows_code_runs_small_on_a_cpu(bench, monkeypatch):
    """The cuda section runs only on a lent GPU: its row code (bf16 read vs embedding_bag, both gradient modes,
    traffic and temporaries) runs here at a small size, CUDA's peak-memory counter standing in for the CPU's."""
    monkeypatch.setattr(bench, "peak_cuda_bytes", lambda fn, device: bench.peak_cpu_bytes(fn))
    device = torch.device("cpu")
    inputs = bench.read_inputs(2**10, 32, 2**6, 8, device, dtype=torch.bfloat16)
    rows = [bench.cuda_row(inputs, sparse_grad, 10.0, device) for sparse_grad in (False, True)]
    assert [row["sparse_grad"] for row in rows] == [False, True] and rows[0]["dtype"] == "bfloat16"
    for row in rows:
        for key in ("fwd_ms", "bwd_ms", "fwd_GBps", "bwd_GBps", "fwd_vs_embedding_bag", "table_bwd_vs_embedding_bag"):
            assert row[key] > 0 and math.isfinite(row[key]), (key, row)
    assert "== cuda" in bench.format_table("cuda", rows)
