"""Memory-op benchmarks: memzoo's sparse ops against PyTorch baselines measured in the same run.

Sections (``--sections a,b``; each a function in :data:`SECTIONS` returning table rows):

- ``gather``: ``weighted_gather`` forward+backward vs ``F.embedding_bag(per_sample_weights, mode="sum")`` and vs the
  naive ``(w[..., None] * values[idx]).sum(-2)``, at N ∈ {2^16, 2^20} rows, D ∈ {256, 1024}, 2^14 bags of 32, fp32.
  Reports time ratios (ours / baseline), the forward's bandwidth as a fraction of a copy-bandwidth probe, and the
  peak *temporary* memory of forward+backward (above inputs, outputs and gradients) of ours vs the naive gather.
- ``sparse_update``: forward + backward + optimizer step at N = 2^20, D = 512: ``weighted_gather(sparse_grad=True)``
  with :class:`memzoo.training.rowwise_optim.LazyAdam` (touched rows only) vs ``embedding_bag`` with dense ``torch.optim.Adam``.
- ``lookup``: ``product_key_topk`` vs brute-force top-k over N flat keys, N = 2^12 … 2^20.
- ``cuda`` (only with a GPU): Triton forward / backward bandwidth at N = 2^20, D = 1024, bf16, as a fraction of the
  card's copy bandwidth measured in the same run, and time vs CUDA ``embedding_bag``.
- ``layer_step``: a whole ``product_key_memory`` training step (forward, backward, optimizer) as the table grows
  2^12 … 2^22 rows, dense vs sparse value updates; each mode's time relative to its own at 2^14 (CPU, and CUDA
  when present).

Measurements. Times: median of ``repeats`` runs after one warm-up (CUDA: synchronised). Copy bandwidth: a
``dst.copy_(src)`` of a tensor far larger than the caches, counting read + write bytes. Op bandwidth: the bytes
the op must move at least (rows read, outputs written, indices/weights read), divided by its time. Peak temporary
memory on CPU: ``torch.profiler`` with ``profile_memory=True`` records every CPU tensor allocation and free (bytes,
time); the peak of their running sum during one forward+backward, minus the bytes of the output and the
gradients that the step must produce anyway. On CUDA: ``torch.cuda.max_memory_allocated`` likewise.

    python tools/bench_memory.py [--quick] [--sections gather,lookup] [--json out.json]

The JSON goes to stdout (table to stderr), or to ``--json PATH`` (table to stdout).

One file past 500 lines: the five sections share the timing, bandwidth and memory probes and write one JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from memzoo.ops import product_key_topk, weighted_gather

Row = dict[str, object]
GIB = 2**30

#: Issue targets, reported next to the measurements.
TARGETS = {
    "cpu_forward_copy_fraction": 0.5,
    "temporary_memory_vs_naive": 1 / 8,
    "sparse_update_speedup": 3.0,
    "cuda_forward_copy_fraction": 0.7,
    "cuda_backward_copy_fraction": 0.4,
    "layer_step_sparse_growth": 1.5,  # sparse-mode layer step at N = 2^22 over its time at 2^14
}


# ----------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median time of ``fn()`` over ``repeats`` runs after one warm-up run.

    CPU: wall time. CUDA: the device time between CUDA events around each call, the calls issued back to back
    (as a training loop does), so launch latency is hidden but any host synchronisation inside ``fn`` counts.
    """
    fn()
    synchronize(device)
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        for start, end in events:
            start.record()
            fn()
            end.record()
        synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median time of each ``fn`` over ``repeats`` rounds, the variants run in turn (A, B, A, B, ...) so that
    drift in a shared machine's load hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write bytes) for a ``nbytes`` float32 tensor."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeats, device)
    return 2 * nbytes / seconds / 1e9


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak of the live CPU tensor bytes allocated while ``fn()`` runs (torch.profiler memory events)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # + allocation, - free
        peak = max(peak, live)
    return peak


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device) -> int:
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def available_bytes() -> int:
    """Memory the OS can still give this process (``MemAvailable``), to skip runs that would not fit."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


# ----------------------------------------------------------------------------------------------- the read


def naive_gather(values, indices, weights):
    """What memory-layer code without a fused op does: materialise the (B, K, D) gathered rows."""
    return (weights.unsqueeze(-1) * values[indices]).sum(-2)


def embedding_bag(values, indices, weights):
    return F.embedding_bag(indices, values, per_sample_weights=weights, mode="sum")


READS = {"ours": weighted_gather, "embedding_bag": embedding_bag, "naive": naive_gather}


def read_inputs(n_rows, dim, n_bags, k, device, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    values = torch.randn(n_rows, dim, generator=gen, dtype=dtype).to(device).requires_grad_()
    indices = torch.randint(0, n_rows, (n_bags, k), generator=gen).to(device)
    weights = torch.rand(n_bags, k, generator=gen, dtype=dtype).to(device).requires_grad_()
    grad_out = torch.randn(n_bags, dim, generator=gen, dtype=dtype).to(device)
    return values, indices, weights, grad_out


def forward_only(read, values, indices, weights):
    with torch.no_grad():
        return read(values, indices, weights)


def forward_backward(read, values, indices, weights, grad_out):
    values.grad = weights.grad = None
    read(values, indices, weights).backward(grad_out)


def read_bytes(n_bags, k, dim, element_size):
    """Least traffic of one forward: the B·K rows, indices and weights read, the (B, D) output written."""
    return n_bags * k * (dim * element_size + 8 + element_size) + n_bags * dim * element_size


def bench_gather(quick: bool) -> list[Row]:
    device = torch.device("cpu")
    n_bags, k = (2**10, 32) if quick else (2**14, 32)
    configs = (
        [(2**12, 64), (2**14, 256)] if quick else [(2**16, 256), (2**16, 1024), (2**20, 256), (2**20, 1024)]
    )
    copy_gbps = copy_bandwidth(device, (64 if quick else 1024) * 2**20)
    return [gather_row(n_rows, dim, n_bags, k, copy_gbps, device) for n_rows, dim in configs]


def gather_row(n_rows: int, dim: int, n_bags: int, k: int, copy_gbps: float, device: torch.device) -> Row:
    """One configuration of the ``gather`` section: times, ratios, bandwidth, temporary memory."""
    values, indices, weights, grad_out = read_inputs(n_rows, dim, n_bags, k, device)
    gathered = n_bags * k * dim * 4
    # forward+backward of the naive read holds ~3 gathered-size tensors next to a dense (N, D) gradient
    run_naive = available_bytes() > 2 * (3 * gathered + 2 * values.numel() * 4)
    reads = {name: read for name, read in READS.items() if name != "naive" or run_naive}
    forward_fns = {
        f"{name}_fwd": partial(forward_only, read, values, indices, weights) for name, read in reads.items()
    }
    step_fns = {
        f"{name}_fwdbwd": partial(forward_backward, read, values, indices, weights, grad_out)
        for name, read in reads.items()
    }
    seconds = interleaved_median_seconds(forward_fns, 5, device) | interleaved_median_seconds(
        step_fns, 3, device
    )
    row: Row = {"N": n_rows, "D": dim, "bags": n_bags, "K": k}
    row["ours_fwd_ms"] = 1e3 * seconds["ours_fwd"]
    row["ours_fwdbwd_ms"] = 1e3 * seconds["ours_fwdbwd"]
    for base in ("embedding_bag", "naive"):
        if f"{base}_fwd" in seconds:
            row[f"fwd_vs_{base}"] = seconds["ours_fwd"] / seconds[f"{base}_fwd"]
            row[f"fwdbwd_vs_{base}"] = seconds["ours_fwdbwd"] / seconds[f"{base}_fwdbwd"]
    row["fwd_GBps"] = read_bytes(n_bags, k, dim, 4) / seconds["ours_fwd"] / 1e9
    row["copy_GBps"] = copy_gbps
    row["fwd_copy_fraction"] = row["fwd_GBps"] / copy_gbps
    # temporary memory of one forward+backward: its peak minus the output and gradients it must produce anyway
    produced = (n_bags * dim + values.numel() + weights.numel()) * 4
    temporary = {}
    for name in ("ours", "naive") if run_naive else ("ours",):
        # free the previous gradients outside the profile: a free of a block the profiler saw allocated in an
        # earlier profile would count as negative bytes here
        values.grad = weights.grad = None
        step = partial(forward_backward, READS[name], values, indices, weights, grad_out)
        temporary[name] = max(0, peak_cpu_bytes(step) - produced)
    row["gathered_MiB"] = gathered / 2**20
    row["ours_temp_MiB"] = temporary["ours"] / 2**20
    if run_naive:
        row["naive_temp_MiB"] = temporary["naive"] / 2**20
        row["temp_vs_naive"] = temporary["ours"] / temporary["naive"]
    else:
        row["naive"] = "skipped (not enough free memory)"
    return row


# ----------------------------------------------------------------------------------------------- sparse update


def bench_sparse_update(quick: bool) -> list[Row]:
    from memzoo.training.optim import LazyAdam

    device = torch.device("cpu")
    n_rows, dim, n_bags, k = (2**16, 128, 2**10, 32) if quick else (2**20, 512, 2**14, 32)
    repeats = 3
    rows = []
    values, indices, weights, grad_out = read_inputs(n_rows, dim, n_bags, k, device)
    weights.requires_grad_(False)

    def make_step(read, optimizer):
        def step():
            optimizer.zero_grad(set_to_none=True)
            read(values, indices, weights).backward(grad_out)
            optimizer.step()

        return step

    steps = {
        "ours_sparse_lazyadam": make_step(
            partial(weighted_gather, sparse_grad=True), LazyAdam([values], lr=1e-3)
        ),
        "embedding_bag_dense_adam": make_step(embedding_bag, torch.optim.Adam([values], lr=1e-3)),
    }
    seconds = interleaved_median_seconds(steps, repeats, device)
    rows.append(
        {
            "N": n_rows,
            "D": dim,
            "bags": n_bags,
            "K": k,
            "rows_touched": int(indices.unique().numel()),
            **{f"{name}_ms": 1e3 * s for name, s in seconds.items()},
            "speedup": seconds["embedding_bag_dense_adam"] / seconds["ours_sparse_lazyadam"],
            "target": TARGETS["sparse_update_speedup"],
        }
    )
    return rows


# ----------------------------------------------------------------------------------------------- lookup


def bench_lookup(quick: bool) -> list[Row]:
    tokens, heads, dk, k = (16, 4, 64, 16) if quick else (32, 4, 128, 32)
    exponents = range(12, 17, 2) if quick else range(12, 21, 2)
    return [lookup_row(2 ** (exponent // 2), tokens, heads, dk, k) for exponent in exponents]


def brute_force_topk(query, flat_keys, k):
    """Score all N keys of every head, then top-k: ``query (T, H, Dk)``, ``flat_keys (H, N, Dk)``."""
    return torch.einsum("thd,hnd->thn", query, flat_keys).topk(k, dim=-1)


@torch.no_grad()
def lookup_row(n_keys: int, tokens: int, heads: int, dk: int, k: int) -> Row:
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(tokens, heads, dk, generator=gen)
    sub_keys = torch.randn(heads, 2, n_keys, dk // 2, generator=gen)
    flat_keys = torch.randn(heads, n_keys**2, dk, generator=gen)  # as many full keys as product keys
    ours = median_seconds(partial(product_key_topk, query, sub_keys, k), 5, device)
    flat = median_seconds(partial(brute_force_topk, query, flat_keys, k), 3, device)
    return {
        "N": n_keys**2,
        "n_keys": n_keys,
        "queries": tokens * heads,
        "Dk": dk,
        "k": k,
        "ours_ms": 1e3 * ours,
        "flat_topk_ms": 1e3 * flat,
        "speedup": flat / ours,
    }


# ----------------------------------------------------------------------------------------------- CUDA


def bench_cuda(quick: bool) -> list[Row]:
    if not torch.cuda.is_available():
        return [{"skipped": "no CUDA device"}]
    device = torch.device("cuda")
    shape = (2**16, 256, 2**12, 32) if quick else (2**20, 1024, 2**14, 32)
    copy_gbps = copy_bandwidth(device, 2 * GIB)
    inputs = read_inputs(*shape, device, dtype=torch.bfloat16)
    return [cuda_row(inputs, sparse_grad, copy_gbps, device) for sparse_grad in (False, True)]


def backward_again(output, grad_out, *leaves):
    for leaf in leaves:
        leaf.grad = None
    torch.autograd.backward(output, grad_out, retain_graph=True)


def cuda_row(inputs, sparse_grad: bool, copy_gbps: float, device: torch.device) -> Row:
    values, indices, weights, grad_out = inputs
    (n_rows, dim), (n_bags, k), size = values.shape, indices.shape, values.element_size()
    repeats = 20
    read = partial(weighted_gather, sparse_grad=sparse_grad)
    fwd = median_seconds(partial(forward_only, read, values, indices, weights), repeats, device)
    fwd_bag = median_seconds(partial(forward_only, embedding_bag, values, indices, weights), repeats, device)
    out = read(values, indices, weights)
    bwd = median_seconds(partial(backward_again, out, grad_out, values, weights), repeats, device)
    # the table gradient alone, ours vs embedding_bag's (CUDA embedding_bag has no bf16 per_sample_weights grad)
    fixed = weights.detach()
    out_values_only, out_bag = read(values, indices, fixed), embedding_bag(values, indices, fixed)
    bwd_values = median_seconds(partial(backward_again, out_values_only, grad_out, values), repeats, device)
    bwd_bag = median_seconds(partial(backward_again, out_bag, grad_out, values), repeats, device)
    del out, out_values_only, out_bag
    rows_used = int(indices.unique().numel())
    # backward traffic: grad_weights (the rows read again, grad_out read) + the table gradient (grad_out read
    # once per position, each used row written once; a dense gradient also writes all other rows as zeros)
    table_rows_written = rows_used if sparse_grad else n_rows
    fwd_bytes = read_bytes(n_bags, k, dim, size)
    bwd_bytes = fwd_bytes + n_bags * k * (dim * size + 16) + table_rows_written * dim * size
    peak = peak_cuda_bytes(partial(forward_backward, read, values, indices, weights, grad_out), device)
    produced = (n_bags * dim + weights.numel() + table_rows_written * dim) * size
    return {
        "N": n_rows,
        "D": dim,
        "dtype": str(values.dtype).removeprefix("torch."),
        "sparse_grad": sparse_grad,
        "fwd_ms": 1e3 * fwd,
        "bwd_ms": 1e3 * bwd,
        "fwd_GBps": fwd_bytes / fwd / 1e9,
        "bwd_GBps": bwd_bytes / bwd / 1e9,
        "copy_GBps": copy_gbps,
        "fwd_copy_fraction": fwd_bytes / fwd / 1e9 / copy_gbps,
        "bwd_copy_fraction": bwd_bytes / bwd / 1e9 / copy_gbps,
        "fwd_vs_embedding_bag": fwd / fwd_bag,
        "table_bwd_vs_embedding_bag": bwd_values / bwd_bag,
        "temp_MiB": max(0, peak - produced) / 2**20,
    }


# ----------------------------------------------------------------------------------------------- layer step


def bench_layer_step(quick: bool) -> list[Row]:
    """A full memory-layer training step (forward, backward, optimizer) as the table grows, dense vs sparse values.

    One :class:`~memzoo.blocks.memory.ProductKeyMemory` layer (dim = value_dim = 128, 4 heads, knn 32, k_dim 64)
    with a private table of N = n_keys² rows, optimised by :func:`memzoo.training.optim.build_optimizer` (AdamW for
    the layer's weights; the values by AdamW too in ``dense`` mode, by LazyAdam on the rows read in ``sparse``
    mode). Ratios: each mode's step time over its own time at N = 2^14 (target for sparse: 1.5 at 2^22), and
    dense over sparse at the same N. ``lookup_ms`` (the product-key search alone, forward) grows with n_keys =
    sqrt(N) in both modes: the part of the step that is not about the table. ``rows_touched``: distinct rows the
    batch reads (at most tokens · 4 · 32 = 131,072): a sparse step's update work is proportional to it, so it grows
    until N is well above the number of lookups (at 2^14 the batch touches nearly every row). Runs on the CPU, and
    on CUDA too when there is a GPU. Sizes whose tables (values plus gradient and optimizer state) would not fit
    are skipped.
    """
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [row for device in devices for row in _layer_step_rows(device, quick)]


def _layer_step_rows(device: torch.device, quick: bool) -> list[Row]:
    import gc

    dim = 128
    batch, seq = (2, 64) if quick else (4, 256)
    exponents = (12, 14, 16) if quick else (12, 14, 16, 18, 20, 22)
    baseline_exponent = 14
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, dim, generator=gen).to(device)
    grad_out = torch.randn(batch, seq, dim, generator=gen).to(device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_bytes()
    _layer_step_seconds(2 ** (exponents[0] // 2), "sparse", x, grad_out)  # warm-up: first-call costs
    seconds: dict[tuple[int, str], float] = {}
    lookup_seconds: dict[int, float] = {}
    rows_touched: dict[int, int] = {}
    for exponent in exponents:
        n_keys = 2 ** (exponent // 2)
        for update in ("dense", "sparse"):
            # dense: values, gradient, two moments (+ a temporary); sparse: values and two moments
            if free < (5 if update == "dense" else 3) * n_keys**2 * dim * 4 + 2**30:
                continue
            measured = _layer_step_seconds(n_keys, update, x, grad_out)
            seconds[exponent, update], lookup_seconds[exponent], rows_touched[exponent] = measured
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = []
    for exponent in exponents:
        row: Row = {"device": device.type, "N": f"2^{exponent}", "tokens": batch * seq}
        for update in ("dense", "sparse"):
            row[f"{update}_ms"] = (
                1e3 * seconds[exponent, update] if (exponent, update) in seconds else "skipped"
            )
        if exponent in lookup_seconds:
            row["lookup_ms"] = 1e3 * lookup_seconds[exponent]
            row["rows_touched"] = rows_touched[exponent]
        for update in ("dense", "sparse"):
            if (exponent, update) in seconds and (baseline_exponent, update) in seconds:
                ratio = seconds[exponent, update] / seconds[baseline_exponent, update]
                row[f"{update}_vs_2^{baseline_exponent}"] = ratio
        if (exponent, "dense") in seconds and (exponent, "sparse") in seconds:
            row["dense_vs_sparse"] = seconds[exponent, "dense"] / seconds[exponent, "sparse"]
        row["target_sparse_vs_2^14"] = TARGETS["layer_step_sparse_growth"]
        rows.append(row)
    return rows


def _layer_step_seconds(
    n_keys: int, update: str, x: torch.Tensor, grad_out: torch.Tensor
) -> tuple[float, float, int]:
    """Median training-step seconds, median lookup-forward seconds, and distinct rows read, of one memory layer
    with n_keys² rows."""
    from memzoo.blocks.memory import ProductKeyMemory
    from memzoo.training.optim import build_optimizer

    torch.manual_seed(0)
    block = ProductKeyMemory(x.shape[-1], heads=4, knn=32, k_dim=64, n_keys=n_keys, update=update).to(
        x.device
    )
    optimizer = build_optimizer(block, lambda groups: torch.optim.AdamW(groups, lr=1e-3))

    def step():
        optimizer.zero_grad(set_to_none=True)
        block(x).backward(grad_out)
        optimizer.step()

    step_seconds = median_seconds(step, 5, x.device)
    with torch.no_grad():
        lookup_seconds = median_seconds(lambda: block.lookup(x), 5, x.device)
        rows_touched = int(block.lookup(x)[0].unique().numel())
    return step_seconds, lookup_seconds, rows_touched


SECTIONS: dict[str, Callable[[bool], list[Row]]] = {
    "gather": bench_gather,
    "sparse_update": bench_sparse_update,
    "lookup": bench_lookup,
    "cuda": bench_cuda,
    "layer_step": bench_layer_step,
}


# ----------------------------------------------------------------------------------------------- report


def format_table(section: str, rows: list[Row]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_format(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) for i, col in enumerate(columns)]
    lines = [f"== {section}", "  ".join(col.rjust(w) for col, w in zip(columns, widths))]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, of {list(SECTIONS)}"
    )
    parser.add_argument("--json", metavar="PATH", help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")
    table_stream = sys.stdout if args.json else sys.stderr
    report = {
        "quick": args.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "targets": TARGETS,
        "sections": {},
    }
    for name in names:
        rows = SECTIONS[name](args.quick)
        report["sections"][name] = rows
        print(format_table(name, rows), file=table_stream, flush=True)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    else:
        print(text)
    return report


if __name__ == "__main__":
    main()
