"""Worker functions of the memory-parallel tests, run in 2 gloo processes (imported by the spawned processes)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

MODEL = dict(
    vocab_size=64, dim=16, n_layers=2, n_heads=2, max_seq_len=16, block="dense",
    layers={1: {"block": "product_key_memory", "pool": "memory", "heads": 2, "knn": 4, "k_dim": 8, "gate": "silu"}},
    pools={"memory": {"n_keys": 8, "value_dim": 12, "update": "dense", "lr": 0.01}},
)


def launch(worker, world_size: int, *args) -> None:
    """Runs ``worker(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; re-raises a failure."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(worker, world_size, port, args), nprocs=world_size, join=True)


def _run(rank, worker, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def sharded_equals_unsharded(rank: int, world_size: int, steps: int) -> None:
    """A model with its pool sharded 2 ways (+ FSDP2 for the rest) on 2 ranks, each on its half of a global batch,
    vs the same model in one process on the whole batch: logits, loss, gradients, optimizer steps (float64 tables;
    RMSNorm computes in float32, hence the tolerances)."""
    from torch.distributed.tensor import DTensor

    from memzoo.model.transformer import Transformer
    from memzoo.parallel.memory_parallel import apply_memory_parallel, build_mesh, table_bytes_per_rank

    torch.manual_seed(0)
    reference = Transformer(**MODEL).double()
    sharded = Transformer(**MODEL).double()
    sharded.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 64, (steps, 4, 8), generator=torch.Generator().manual_seed(1))
    mesh = build_mesh("cpu", world_size, 2)
    apply_memory_parallel(sharded, mesh)
    table = sharded.pools["memory"].values
    assert isinstance(table, DTensor) and table.to_local().shape == (64, 6), table
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    opt = torch.optim.AdamW(sharded.parameters(), lr=0.01)
    ref_bytes = table_bytes_per_rank(reference, None)
    half = 4 // world_size
    for step in range(steps):
        batch = tokens[step]
        ref_logits = reference(batch)
        ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        ref_loss.backward()
        mine = batch[rank * half : (rank + 1) * half]
        logits = sharded(mine)
        torch.testing.assert_close(logits, ref_logits[rank * half : (rank + 1) * half], rtol=1e-10, atol=1e-10)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), mine[:, 1:].flatten())
        loss.backward()
        ref_grads = dict(reference.named_parameters())
        for name, param in sharded.named_parameters():
            full = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            torch.testing.assert_close(full, ref_grads[name].grad, rtol=1e-5, atol=1e-8, msg=f"grad of {name}")
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for name, param in sharded.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        torch.testing.assert_close(full, dict(reference.named_parameters())[name], rtol=1e-5, atol=1e-6)
    ref_total = table_bytes_per_rank(reference, ref_opt)
    total = table_bytes_per_rank(sharded, opt)
    assert table_bytes_per_rank(sharded, None) * 2 == ref_bytes, (table_bytes_per_rank(sharded, None), ref_bytes)
    assert total * 2 == ref_total, (total, ref_total)
