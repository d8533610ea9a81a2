"""Per-rank peak memory of a Memory+ model with its value table sharded over 2 processes vs replicated on both.

Both runs use 2 gloo processes on the CPU and the same code path (``apply_memory_parallel`` on a
``(data_parallel, memory_parallel)`` mesh; FSDP2 shards the dense weights over both ranks in both runs), so the
ratio isolates the pool: ``memory_parallel=2`` (each rank: all rows × value_dim/2, and half of the AdamW state) vs
``memory_parallel=1`` (each rank: the whole table and its state). Each rank trains on its own batch.

Peak memory of a rank: the highest resident set size (Linux ``VmHWM``) during training steps 2..n (after the
first step allocated the optimizer state; ``/proc/self/clear_refs`` resets the mark), minus the RSS before the
model was built (Python, torch, the process group). Also reported: the table + optimizer-state bytes a rank holds
(exact, from the tensors) and the bytes one rank sends per step for the sharded reads (module formula).

    python tools/bench_memory_parallel.py                 # JSON line, then a table
    python tools/bench_memory_parallel.py --n-keys 256    # smaller table
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rss_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def model_config(args) -> dict:
    memory = {"block": "memory_plus", "pool": "memory", "knn": args.knn, "k_dim": 64, "gate": "silu"}  # the paper's
    return dict(
        vocab_size=258, dim=args.dim, n_layers=4, n_heads=4, max_seq_len=args.seq, block="dense",
        layers={1: memory, 3: memory},
        pools={"memory": {"n_keys": args.n_keys, "value_dim": args.value_dim, "update": "dense", "lr": 1e-3}},
    )


def rank_main(rank: int, world: int, port: int, memory_parallel: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from memzoo.model.transformer import Transformer
    from memzoo.parallel.memory_parallel import apply_memory_parallel, build_mesh, table_bytes_per_rank
    from memzoo.training.optim import build_optimizer

    mesh = build_mesh("cpu", world, memory_parallel)
    dist.barrier()
    baseline = rss_bytes("VmRSS")
    torch.manual_seed(0)
    model = Transformer(**model_config(args))
    apply_memory_parallel(model, mesh)
    optimizer = build_optimizer(model, lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    tokens = torch.randint(0, 258, (args.steps, args.batch, args.seq + 1), generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(args.steps):
        if step == 1:
            reset_peak()
        start = time.perf_counter()
        logits = model(tokens[step, :, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[step, :, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:
            times.append(time.perf_counter() - start)
    peak = rss_bytes("VmHWM") - baseline
    results[rank] = {
        "peak_bytes": peak,
        "table_and_optimizer_bytes": table_bytes_per_rank(model, optimizer),
        "step_seconds": sum(times) / len(times),
    }
    dist.barrier()
    dist.destroy_process_group()


def run(memory_parallel: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(2, port, memory_parallel, args, results), nprocs=2, join=True)
        per_rank = [dict(results[r]) for r in range(2)]
    return {
        "memory_parallel": memory_parallel,
        "peak_bytes_per_rank": max(r["peak_bytes"] for r in per_rank),
        "table_and_optimizer_bytes_per_rank": max(r["table_and_optimizer_bytes"] for r in per_rank),
        "step_seconds": max(r["step_seconds"] for r in per_rank),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-keys", type=int, default=384, help="pool rows = n_keys² (default 384² = 147456)")
    parser.add_argument("--value-dim", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--knn", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    from memzoo.parallel.memory_parallel import read_bytes_per_step

    replicated, sharded = run(1, args), run(2, args)
    reads_per_step = 2  # memory layers reading the pool
    report = {
        "benchmark": "memory_parallel_peak_memory",
        "machine": "CPU, 2 gloo processes, 1 thread each",
        "rows": args.n_keys**2,
        "value_dim": args.value_dim,
        "replicated": replicated,
        "sharded": sharded,
        "peak_ratio": sharded["peak_bytes_per_rank"] / replicated["peak_bytes_per_rank"],
        "table_and_optimizer_ratio": sharded["table_and_optimizer_bytes_per_rank"]
        / replicated["table_and_optimizer_bytes_per_rank"],
        "step_time_ratio": sharded["step_seconds"] / replicated["step_seconds"],
        "sharded_read_bytes_sent_per_rank_per_step": reads_per_step
        * read_bytes_per_step(args.batch * args.seq, 4 * args.knn, args.value_dim, 2),
        "target_peak_ratio": 0.55,
    }
    print(json.dumps(report))
    mib = 2**20
    print(f"\n{'pool':<12}{'peak/rank MiB':>15}{'table+opt MiB':>15}{'step s':>10}")
    for name in ("replicated", "sharded"):
        row = report[name]
        print(f"{name:<12}{row['peak_bytes_per_rank'] / mib:>15.1f}"
              f"{row['table_and_optimizer_bytes_per_rank'] / mib:>15.1f}{row['step_seconds']:>10.3f}")
    print(f"{'ratio':<12}{report['peak_ratio']:>15.3f}{report['table_and_optimizer_ratio']:>15.3f}"
          f"{report['step_time_ratio']:>10.3f}   (target peak ratio <= 0.55)")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["peak_ratio"] <= 0.55 else 1)
