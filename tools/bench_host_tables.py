"""Host tables (``MemoryPool(table_device="host")``): a stack of token-indexed layers, forward+backward, with its
table on the device, in host memory read ahead of the layers (prefetch), and in host memory read at each layer.

Each of ``--layers`` layers adds a SwiGLU-free dense MLP (``dim -> hidden -> dim``, the compute the host copies may
overlap) and a token-indexed read: ``--heads`` rows per token, hashed from the (previous, current) token ids into its
own table of ``--rows`` rows of width ``dim``, weighted by a softmax gate (an Engram-like read). Three variants, same
weights, same batches, interleaved in one process:

- ``device``: every table on the compute device (``table_device: accelerator``), read by ``weighted_gather``;
- ``host_prefetch``: tables in host memory; before the layers run, every layer's block stages its rows
  (``Block.prefetch`` → ``pool.prefetch``: host gather into pinned memory, copy on a side stream, by a worker thread);
- ``host_sync``: tables in host memory, each layer gathering and copying its rows when it runs.

Reported: median step time (``--repeats`` steps after ``--warmup``) and the ratios to ``device``; each variant's
tables are updated by the row-wise LazyAdam (``update: sparse``), as in training. On CUDA the headline is
``host_prefetch / device`` (what keeping the tables off the accelerator costs) and ``host_sync / host_prefetch``
(what the overlap buys). On CPU host and device are one memory: there is nothing to overlap, and the run measures
the host path's own overhead (its sort of the indices and staging copy), ``host_sync / device``.

    python tools/bench_host_tables.py [--device cpu|cuda] [--quick] [--json docs/results/bench_host_tables.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from memzoo.blocks.base import Block, BlockContext
from memzoo.blocks.pool import MemoryPool
from memzoo.training.optim import LazyAdam

VARIANTS = ("device", "host_prefetch", "host_sync")


class TokenTable(Block):
    """``dim -> dim``: a gated read of ``heads`` hashed (previous, current)-token rows of its own pool. The indices of
    one ``ctx.token_ids`` are computed once, so ``prefetch`` and ``forward`` hand the pool the same tensor."""

    def __init__(self, dim: int, rows: int, heads: int, table_device: str, seed: int):
        super().__init__()
        self.heads = heads
        self.pool = MemoryPool(None, dim, num_rows=rows, update="sparse", lr=None, table_device=table_device)
        self.gate = nn.Linear(dim, heads)
        self.register_buffer("salt", torch.randint(1, 2**20, (heads,), generator=torch.Generator().manual_seed(seed)))
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def table_indices(self, ctx: BlockContext) -> torch.Tensor:
        ids = ctx.token_ids
        if self._memo is not None and self._memo[0] is ids:
            return self._memo[1]
        prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
        indices = (prev[..., None] * 1_000_003 + ids[..., None] * self.salt) % self.pool.num_rows
        self._memo = (ids, indices)
        return indices

    def prefetch(self, ctx: BlockContext) -> None:
        self.pool.prefetch(self.table_indices(ctx))

    def forward(self, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        weights = torch.softmax(self.gate(x), dim=-1)
        return self.pool.read(self.table_indices(ctx), weights.to(self.pool.values.dtype)).to(x.dtype)


class Stack(nn.Module):
    """Embedding, then per layer ``x + mlp(x) + table(x)``; ``prefetch``: stage every layer's rows first."""

    def __init__(self, args, table_device: str, prefetch: bool):
        super().__init__()
        torch.manual_seed(0)
        self.prefetch = prefetch
        self.embed = nn.Embedding(args.vocab, args.dim)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(args.dim, args.hidden), nn.GELU(), nn.Linear(args.hidden, args.dim))
            for _ in range(args.layers)
        )
        self.tables = nn.ModuleList(TokenTable(args.dim, args.rows, args.heads, table_device, seed=i)
                                    for i in range(args.layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ctx = BlockContext.for_tokens(ids)
        if self.prefetch:
            for table in self.tables:
                table.pool.discard_staged()
                table.prefetch(ctx)
        x = self.embed(ids)
        for mlp, table in zip(self.mlps, self.tables):
            x = x + mlp(x) + table(x, ctx)
        return x


def build(args, device: torch.device) -> dict[str, tuple[Stack, list[torch.optim.Optimizer]]]:
    built = {}
    for name in VARIANTS:
        model = Stack(args, "accelerator" if name == "device" else "host", prefetch=name == "host_prefetch").to(device)
        if built:
            model.load_state_dict(next(iter(built.values()))[0].state_dict())
        tables = [t.pool.values for t in model.tables]
        dense = [p for p in model.parameters() if all(p is not t for t in tables)]
        built[name] = (model, [torch.optim.AdamW(dense, lr=1e-3), LazyAdam(tables, lr=1e-3)])
    return built


def step(model: Stack, optimizers, ids: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    for optimizer in optimizers:
        optimizer.zero_grad()
    model(ids).float().square().mean().backward()
    for optimizer in optimizers:
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a small size for a smoke run")
    parser.add_argument("--rows", type=int, default=None, help="rows per table (default: 2^18 on CUDA, 2^16 on CPU)")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (and a .md beside it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; run with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    size = {  # (rows, dim, hidden, layers, batch, seq, repeats)
        (True, False): (2**18, 1024, 4096, 8, 8, 1024, 10),
        (False, False): (2**16, 128, 512, 4, 4, 128, 7),
        (True, True): (2**16, 256, 1024, 4, 4, 256, 5),
        (False, True): (2**12, 64, 256, 2, 2, 64, 3),
    }[(cuda, args.quick)]
    for name, value in zip(("rows", "dim", "hidden", "layers", "batch", "seq", "repeats"), size):
        if getattr(args, name) is None:
            setattr(args, name, value)

    built = build(args, device)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
               for _ in range(args.warmup + args.repeats)]
    with torch.no_grad():  # the three variants compute the same thing
        reference = built["device"][0](batches[0])
        for name in VARIANTS[1:]:
            torch.testing.assert_close(built[name][0](batches[0]), reference, rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i, ids in enumerate(batches):
        for name in VARIANTS:  # interleaved: machine drift hits every variant alike
            elapsed = step(*built[name], ids, device)
            if i >= args.warmup:
                times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    tables_host = [t.pool.values.device.type for t in built["host_prefetch"][0].tables]
    stats = built["host_prefetch"][0].tables[0].pool.prefetch_stats
    table_bytes = args.layers * args.rows * args.dim * 4
    result = {
        "command": " ".join(["python tools/bench_host_tables.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(args, k) for k in ("rows", "dim", "hidden", "layers", "heads", "batch", "seq", "vocab",
                                                  "repeats", "warmup")},
        "table_gib": table_bytes / 2**30,
        "rows_per_step_per_layer": args.batch * args.seq * args.heads,
        "median_ms": {name: 1e3 * value for name, value in median.items()},
        "ratio_to_device": {name: median[name] / median["device"] for name in VARIANTS},
        "host_sync_over_host_prefetch": median["host_sync"] / median["host_prefetch"],
        "host_tables_stayed_on": sorted(set(tables_host)),
        "prefetch_stats_layer0": dict(stats),
        "note": (
            "CUDA: host_prefetch overlaps the host gathers and copies of later layers with the compute of earlier ones"
            if cuda else
            "CPU: host and device are one memory, so there is no copy to overlap (the overlap needs CUDA); the ratios "
            "measure the host path's own overhead (sorting the indices, staging the rows)"
        ),
    }
    for name in VARIANTS:
        print(f"{name:14s} {result['median_ms'][name]:9.2f} ms   x{result['ratio_to_device'][name]:.2f} of device")
    print(f"host_sync / host_prefetch = {result['host_sync_over_host_prefetch']:.2f}; {result['note']}")
    print(f"tables: {result['table_gib']:.2f} GiB over {args.layers} layers; host tables on {tables_host[0]}; "
          f"layer 0 prefetch stats {stats}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    config = result["config"]
    lines = [
        "# Host tables: forward+backward of token-indexed layers",
        "",
        f"{result['device']}, torch {result['torch']}, {result['threads']} threads. {config['layers']} layers, each a "
        f"dim {config['dim']} → {config['hidden']} MLP plus a read of {config['heads']} hashed rows per token from its "
        f"own table of {config['rows']:,} rows ({result['table_gib']:.2f} GiB of tables in all); batch "
        f"{config['batch']} × {config['seq']} tokens; LazyAdam on the tables. Median of {config['repeats']} steps.",
        "",
        "| variant | ms / step | × device |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {result['median_ms'][name]:.2f} | {result['ratio_to_device'][name]:.2f} |"
              for name in VARIANTS]
    lines += ["", f"host_sync / host_prefetch = {result['host_sync_over_host_prefetch']:.2f}. {result['note']}.",
              "", f"    {result['command']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
