"""Data-parallel benchmark on this machine's CPU with 2 gloo processes: throughput and gradient communication.

1. Throughput: a small Memory+ model (sparse-update shared pool) trained through Lightning, 1 process with batch 2B
   against 2 DDP ranks with batch B each (equal global batch), one thread per process. Tokens/s counts the global
   tokens of the timed steps (the first ``--warmup`` steps are not timed).
2. Communication: a pool of 2^20 rows of width ``--value-dim``; each rank's step touches a fraction of the rows
   (random, different per rank). Bytes each rank sends per step with the row-sparse exchange
   (``memzoo.parallel.sparse_grad_sync``, counted from the tensors it hands to the collectives) against a ring
   all-reduce of the dense table gradient (``2 (W-1)/W · N · D · 4``), and the wall time of both on gloo.

Prints JSON, then a table.  ``python tools/bench_distributed.py [--steps 30] [--value-dim 64]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")


# ----------------------------------------------------------------------------------------------- throughput
def _throughput(rank: int, world: int, port: int, args, out: str) -> None:
    import lightning as L

    from memzoo import LanguageModel
    from memzoo.data import FactsDataModule
    from memzoo.model.config import ModelConfig
    from memzoo.parallel import SparseDDPStrategy

    torch.set_num_threads(1)
    if world > 1:
        _env(rank, world, port)
    memory = {"block": "memory_plus", "pool": "memory", "knn": 16, "k_dim": 64, "gate": "silu"}  # the paper's layer
    torch.manual_seed(0)
    architecture = ModelConfig(dim=128, n_layers=4, n_heads=4, max_seq_len=128, layers={1: memory, 3: memory},
                               pools={"memory": {"n_keys": 128, "value_dim": 128, "update": "sparse"}})
    model = LanguageModel(architecture, warmup_steps=5)
    batch = args.batch * WORLD // world
    data = FactsDataModule(n_entities=2000, block_size=args.block, batch_size=batch)

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_end(self, trainer, *_):
            self.times.append(time.perf_counter())

    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=SparseDDPStrategy() if world > 1 else "auto",
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[clock])
    trainer.fit(model, data)
    if rank == 0:
        timed = args.steps - args.warmup
        seconds = clock.times[-1] - clock.times[args.warmup - 1]
        tokens = timed * args.batch * WORLD * args.block
        with open(out, "w") as f:
            json.dump({"processes": world, "batch_per_process": batch, "timed_steps": timed, "seconds": seconds,
                       "tokens_per_s": tokens / seconds}, f)
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- communication
def _communication(rank: int, port: int, args, out: str) -> None:
    from memzoo.parallel.sparse_grad_sync import all_reduce_row_sparse_, dense_all_reduce_bytes_per_rank

    torch.set_num_threads(1)
    _env(rank, WORLD, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows, width = 2**20, args.value_dim
    table = torch.nn.Parameter(torch.zeros(rows, width))
    results = []
    for fraction in args.fractions:
        touched = int(fraction * rows)
        generator = torch.Generator().manual_seed(100 + rank)
        picked = torch.randperm(rows, generator=generator)[:touched].sort().values
        grad = torch.sparse_coo_tensor(picked[None], torch.randn(touched, width, generator=generator), (rows, width))
        sparse_times, dense_times = [], []
        for _ in range(args.repeats):
            table.grad = grad.clone()
            dist.barrier()
            start = time.perf_counter()
            stats = all_reduce_row_sparse_([table])
            sparse_times.append(time.perf_counter() - start)
            dense = grad.to_dense()
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(dense)
            dense_times.append(time.perf_counter() - start)
        dense_bytes = dense_all_reduce_bytes_per_rank(rows, width, WORLD)
        results.append({
            "rows": rows, "value_dim": width, "touched_fraction": fraction, "rows_touched_per_rank": touched,
            "row_exchange_bytes_per_rank": stats.bytes_sent, "dense_all_reduce_bytes_per_rank": dense_bytes,
            "bytes_ratio_dense_over_rows": dense_bytes / stats.bytes_sent,
            "row_exchange_s": min(sparse_times), "dense_all_reduce_s": min(dense_times),
            "time_ratio_dense_over_rows": min(dense_times) / min(sparse_times),
        })
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _run(fn, nprocs: int, *args):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(fn, args=(*args, out), nprocs=nprocs, join=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="batch per rank B of the 2-rank run (default 8)")
    parser.add_argument("--block", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--value-dim", type=int, default=64, help="width of the 2^20-row pool (default 64)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.25])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per fraction, best kept (default 3)")
    args = parser.parse_args()
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"need 0 < --warmup < --steps, got {args.warmup} and {args.steps}")

    one = _run(_throughput, 1, 1, 0, args)
    two = _run(_throughput, WORLD, WORLD, _free_port(), args)
    comm = _run(_communication, WORLD, _free_port(), args)
    result = {
        "machine": f"CPU, {os.cpu_count()} cores, gloo, 1 thread per process, torch {torch.__version__}",
        "throughput": {"one_process": one, "two_ranks": two,
                       "speedup_two_over_one": two["tokens_per_s"] / one["tokens_per_s"]},
        "communication": comm,
    }
    print(json.dumps(result, indent=2))
    print()
    print(f"{'run':<34} {'tokens/s':>10} {'ratio':>7}")
    print(f"{'1 process, batch ' + str(one['batch_per_process']):<34} {one['tokens_per_s']:>10,.0f} {1.0:>7.2f}")
    print(f"{'2 ranks, batch ' + str(two['batch_per_process']) + ' each':<34} {two['tokens_per_s']:>10,.0f} "
          f"{result['throughput']['speedup_two_over_one']:>7.2f}")
    print()
    print(f"{'rows touched':>13} {'row exchange':>14} {'dense all-reduce':>17} {'bytes ratio':>12} "
          f"{'exchange s':>11} {'all-reduce s':>13} {'time ratio':>11}")
    for row in comm:
        print(f"{row['touched_fraction']:>12.0%} {row['row_exchange_bytes_per_rank'] / 2**20:>11.1f} MiB "
              f"{row['dense_all_reduce_bytes_per_rank'] / 2**20:>13.1f} MiB {row['bytes_ratio_dense_over_rows']:>11.1f}x "
              f"{row['row_exchange_s']:>11.3f} {row['dense_all_reduce_s']:>13.3f} {row['time_ratio_dense_over_rows']:>10.1f}x")
    print(f"pool: 2^20 rows x {args.value_dim} fp32, 2 ranks; bytes: sent per rank and step (ring collectives)")


if __name__ == "__main__":
    sys.exit(main())
