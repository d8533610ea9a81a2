"""Worker functions of the memory-parallel tests, run in 2 gloo processes forked from the test process, and
:func:`start_ranks`, which the other multi-process tests use too."""

from __future__ import annotations

import faulthandler
import os
import sys
import traceback

import torch
import torch.distributed as dist

MODEL = dict(
    vocab_size=258, dim=16, n_layers=2, n_heads=2, max_seq_len=16, block="dense",
    layers={1: {"block": "memory_plus", "pool": "memory", "heads": 2, "knn": 4, "k_dim": 8}},
    pools={"memory": {"n_keys": 8, "value_dim": 12, "update": "dense", "lr": 0.01}},
)
#: MODEL with its pool trained by row-sparse gradients and the row-wise optimizer.
SPARSE_MODEL = {**MODEL, "pools": {"memory": {**MODEL["pools"]["memory"], "update": "sparse"}}}


def launch(worker, world_size: int, *args, lightning: bool = False) -> None:
    """Runs ``worker(rank, world_size, *args)`` in ``world_size`` gloo processes (:func:`start_ranks`); re-raises a
    failure.

    ``lightning``: leave the process group to Lightning (the environment variables of an external launcher).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_run, world_size, worker, world_size, port, args, lightning)


def start_ranks(function, n_processes: int, *args) -> None:
    """Runs ``function(rank, *args)`` for rank 0..n_processes-1 in processes forked from this one, and waits for
    them; a rank's exception is raised here. Forked ranks inherit the imported torch, Lightning and memzoo, so they
    start in milliseconds where a fresh interpreter spends ~5 s of CPU importing them. Each rank runs with one torch
    thread (set before ``function`` runs).

    The parent's garbage is collected before the fork and everything the ranks inherit is frozen out of their
    collections (``gc.freeze``): a rank collecting a copied object, e.g. an earlier test's gloo process group, would
    run its destructor, which waits on threads that fork does not copy, and hang."""
    import gc

    import torch.multiprocessing as mp

    gc.collect()
    gc.freeze()
    try:
        mp.start_processes(_one_thread, args=(function, args), nprocs=n_processes, join=True, start_method="fork")
    finally:
        gc.unfreeze()


def _one_thread(rank, function, args):
    # a rank killed by a signal (SIGSEGV, SIGABRT from a heap check) prints every thread's Python stack to the
    # test's captured stderr, so a failure names the line it happened on
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    torch.set_num_threads(1)
    function(rank, *args)


def _run(rank, worker, world_size, port, args, lightning):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if lightning:
        os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        worker(rank, world_size, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            # every rank's collectives complete before any rank tears the group down (gloo aborts a process whose
            # peer closes the connection under a collective still in flight)
            dist.barrier()
            dist.destroy_process_group()


def sharded_read_equals_weighted_gather(rank: int, world_size: int, sparse_grad: bool = False) -> None:
    """``sharded_weighted_gather`` of a column-split float64 table vs ``weighted_gather`` of the whole table, with a
    different number of bags per rank (rank 0 reads 3, rank 1 reads 5 and a repeated row): outputs, and gradients
    of the table columns and of the weights. ``sparse_grad``: the column gradient is row-sparse and holds exactly
    the rows the bags read (row 0 is read by none; rank 0's padding bags must not touch it)."""
    from memzoo.ops import weighted_gather
    from memzoo.parallel.memory_parallel import sharded_weighted_gather

    generator = torch.Generator().manual_seed(5)
    table = torch.randn(32, 6, dtype=torch.float64, generator=generator)
    bags = [3, 5]
    indices = [torch.randint(1, 32, (n, 4), generator=generator) for n in bags]
    indices[1][0, 1] = indices[1][0, 0]  # a row read twice by one bag
    weights = [torch.randn(n, 4, dtype=torch.float64, generator=generator) for n in bags]
    grads_out = [torch.randn(n, 6, dtype=torch.float64, generator=generator) for n in bags]
    full = table.clone().requires_grad_()
    full_weights = [w.clone().requires_grad_() for w in weights]
    reference = [weighted_gather(full, i, w) for i, w in zip(indices, full_weights)]
    torch.autograd.backward(reference, grads_out)
    columns = slice(3 * rank, 3 * rank + 3)
    local = table[:, columns].clone().requires_grad_()
    mine = weights[rank].clone().requires_grad_()
    out = sharded_weighted_gather(local, indices[rank], mine, dist.group.WORLD, sparse_grad=sparse_grad)
    out.backward(grads_out[rank])
    torch.testing.assert_close(out, reference[rank], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.grad, full_weights[rank].grad, rtol=1e-12, atol=1e-12)
    grad = local.grad
    if sparse_grad:
        assert grad.is_sparse and grad.sparse_dim() == 1
        assert torch.equal(grad.coalesce().indices()[0], torch.cat(indices).unique())
        grad = grad.to_dense()
    torch.testing.assert_close(grad, full.grad[:, columns], rtol=1e-12, atol=1e-12)


def sharded_equals_unsharded(
    rank: int, world_size: int, steps: int, memory_parallel: int = 2, activation_checkpointing: bool = False
) -> None:
    """A model with its pool sharded 2 ways (+ FSDP2 for the rest) on 2 ranks, each on its half of a global batch,
    vs the same model in one process on the whole batch: logits, gradients, the clipped gradient norm, AdamW steps,
    and table + optimizer-state bytes per rank (float64 weights; RMSNorm computes in float32, hence tolerances).
    Applied through ``memzoo.parallel.parallelize``; ``activation_checkpointing``: the layers, sharded reads included,
    are recomputed in backward (their collectives run again)."""
    from torch.distributed.tensor import DTensor

    from memzoo.model.transformer import Transformer
    from memzoo.parallel import parallelize
    from memzoo.parallel.memory_parallel import build_mesh, reduce_table_gradients, table_bytes_per_rank
    from memzoo.training.optim import clip_dense_grad_norm_

    torch.manual_seed(0)
    memory = MODEL["layers"][1]
    config = {**MODEL, "layers": {0: memory, 1: memory}}  # two reads of one pool per step
    reference = Transformer(**config).double()
    sharded = Transformer(**config).double()
    sharded.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 64, (steps, 4, 8), generator=torch.Generator().manual_seed(1))
    mesh = build_mesh("cpu", world_size, memory_parallel)
    parallelize(sharded, mesh, activation_checkpointing=activation_checkpointing)
    table = sharded.pools["memory"].values
    assert isinstance(table, DTensor) and table.to_local().shape == (64, 12 // memory_parallel), table
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
        with _counted_all_reduces() as during_backward:
            loss.backward()
        assert during_backward == [], during_backward  # no per-read reduction of the table shard ...
        replicas = world_size // memory_parallel
        assert reduce_table_gradients(sharded) == (1 if replicas > 1 else 0)  # ... one per step, over the replicas
        ref_grads = dict(reference.named_parameters())
        for name, param in sharded.named_parameters():
            full = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            torch.testing.assert_close(full, ref_grads[name].grad, rtol=1e-5, atol=1e-8, msg=f"grad of {name}")
        norm = clip_dense_grad_norm_(list(sharded.parameters()), 0.01)  # tables and FSDP2 weights: two meshes
        torch.testing.assert_close(norm, clip_dense_grad_norm_(list(reference.parameters()), 0.01), rtol=1e-6, atol=0)
        assert norm > 0.01  # so the clipping scaled the gradients
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for name, param in sharded.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        torch.testing.assert_close(full, dict(reference.named_parameters())[name], rtol=1e-5, atol=1e-6)
    ref_total = table_bytes_per_rank(reference, ref_opt)
    total = table_bytes_per_rank(sharded, opt)
    assert table_bytes_per_rank(sharded, None) * memory_parallel == ref_bytes, (table_bytes_per_rank(sharded, None), ref_bytes)
    assert total * memory_parallel == ref_total, (total, ref_total)


class _counted_all_reduces:
    """Records the group of every ``dist.all_reduce`` called inside the ``with`` block."""

    def __enter__(self) -> list:
        self.calls, self.original = [], dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.calls.append(kwargs.get("group"))
            return self.original(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self.calls

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original


# ----------------------------------------------------------------------------------------------- Lightning runs

SAMPLES, SEQ = 8, 8  # one epoch: 2 steps of 4 sequences globally (1 process × 4, or 2 ranks × 2)


def token_data(batch_size: int):
    """A LightningDataModule over fixed random sequences, in order (no shuffling), so that the global batch of
    step k is the same set of sequences for 1 process (batch 4) and 2 ranks (batch 2 each: rank r reads
    sequences r, r + 2, ...)."""
    import lightning as L
    from torch.utils.data import DataLoader, DistributedSampler, StackDataset

    tokens = torch.randint(0, 64, (SAMPLES, SEQ + 1), generator=torch.Generator().manual_seed(3))
    rows = StackDataset(input_ids=tokens[:, :-1], labels=tokens[:, 1:])

    class TokenData(L.LightningDataModule):
        def train_dataloader(self):
            sampler = None
            if dist.is_initialized():
                sampler = DistributedSampler(rows, dist.get_world_size(), dist.get_rank(), shuffle=False)
            return DataLoader(rows, batch_size=batch_size, sampler=sampler, shuffle=False)

    return TokenData()


def language_model(architecture: dict = MODEL, **kwargs):
    from memzoo.training.module import LanguageModel

    torch.manual_seed(0)
    return LanguageModel(architecture=architecture, warmup_steps=1, lr_decay_steps=10, **kwargs)


def trainer(max_steps: int, memory_parallel: int | None, devices: int = 1, save_dir: str | None = None,
            gradient_clip_val: float | None = None):
    """A quiet CPU Trainer; ``save_dir``: a checkpoint every 2 steps there (``step=2.ckpt``, ...)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from memzoo.parallel.strategy import MemoryParallelStrategy

    strategy = MemoryParallelStrategy(memory_parallel) if memory_parallel else "auto"
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        enable_checkpointing=save_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
        gradient_clip_val=gradient_clip_val,
        callbacks=[
            ModelCheckpoint(save_dir, "{step}", every_n_train_steps=2, save_top_k=-1, save_last=False)
        ] if save_dir else [],
    )


def full_weights(module) -> dict[str, torch.Tensor]:
    """Every weight of a (possibly sharded) model as a full tensor."""
    from torch.distributed.tensor import DTensor

    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
        for name, t in module.state_dict().items()
    }


def fit(
    steps: int, memory_parallel: int | None, devices: int, batch_size: int, ckpt: str | None = None,
    save_dir: str | None = None, architecture: dict = MODEL, gradient_clip_val: float | None = None, **model_args,
):
    model = language_model(architecture, **model_args)
    run = trainer(steps, memory_parallel, devices, save_dir, gradient_clip_val)
    run.fit(model, datamodule=token_data(batch_size), ckpt_path=ckpt)
    return model, run


def one_process_reference(out: str) -> None:
    """One process, default strategy, 4 steps: out/single/step=2.ckpt and the final weights out/single_step4.pt."""
    model, _ = fit(4, None, 1, 4, save_dir=f"{out}/single")
    torch.save(full_weights(model), f"{out}/single_step4.pt")


def two_rank_runs(rank: int, world_size: int, out: str) -> None:
    """2 ranks, pools sharded 2 ways, 4 steps with sharded checkpoints at steps 2 and 4 (out/mp/step=*.ckpt);
    resumed from step 2 the run ends on exactly the same weights; 1 → 2: the one-process step-2 .ckpt resumed
    here to step 4 (out/mp_from_single_step4.pt, compared with one process by the test)."""
    straight, _ = fit(4, 2, 2, 2, save_dir=f"{out}/mp")
    resumed, _ = fit(4, 2, 2, 2, ckpt=f"{out}/mp/step=2.ckpt")
    straight_weights, resumed_weights = full_weights(straight), full_weights(resumed)
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=f"exact resume: {name}")
    from_single, _ = fit(4, 2, 2, 2, ckpt=f"{out}/single/step=2.ckpt")
    weights = full_weights(from_single)
    replicated, _ = fit(4, 1, 2, 2)  # memory_parallel 1: 2 replicas of whole tables, summed once per step
    replicated_weights = full_weights(replicated)
    if rank == 0:
        torch.save(straight_weights, f"{out}/mp_step4.pt")
        torch.save(weights, f"{out}/mp_from_single_step4.pt")
        torch.save(replicated_weights, f"{out}/mp1_step4.pt")
    sharded_equals_unsharded(rank, world_size, 2)  # the same processes, without Lightning
    sharded_equals_unsharded(rank, world_size, 2, memory_parallel=1)  # replicated tables: summed over data_parallel
    sharded_equals_unsharded(rank, world_size, 2, activation_checkpointing=True)
    sharded_read_equals_weighted_gather(rank, world_size)
    planner_counts_equal_local_shards(rank, world_size)


def in_this_process(worker, *args) -> None:
    """Runs ``worker(0, 1, *args)`` here as a 1-process Lightning job; restores the environment and destroys the
    process group afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                      NODE_RANK="0")
    try:
        worker(0, 1, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def one_rank_from_sharded(rank: int, world_size: int, out: str) -> None:
    """2 → 1: the 2-rank sharded step-2 checkpoint resumed in one process (memory_parallel 1) to step 4."""
    model, _ = fit(4, 1, 1, 4, ckpt=f"{out}/mp/step=2.ckpt")
    torch.save(full_weights(model), f"{out}/single_from_mp_step4.pt")


def planner_counts_equal_local_shards(rank: int, world_size: int) -> None:
    """For memory_parallel 2 and 1: the parameter elements ``plan_parallel`` reports for this rank (in total, for
    the dense weights on rank 0 and for the pool table) equal the local shards ``apply_memory_parallel`` made, on
    a model whose embedding rows (257) do not split evenly over the ranks."""
    from torch.distributed.tensor import DTensor

    from memzoo.model.transformer import Transformer
    from memzoo.parallel.memory_parallel import apply_memory_parallel, build_mesh
    from memzoo.parallel.planning import plan_parallel

    for memory_parallel in (2, 1):
        config = {**MODEL, "vocab_size": 257}
        with torch.device("meta"):
            plan = plan_parallel(Transformer(**config), world_size, memory_parallel, strategy="memory_parallel")
        model = Transformer(**config)
        apply_memory_parallel(model, build_mesh("cpu", world_size, memory_parallel))
        local = {name: (p.to_local() if isinstance(p, DTensor) else p).numel() for name, p in model.named_parameters()}
        table = local.pop("pools.memory.values")
        assert plan.rank_parameter_elements[rank] == sum(local.values()) + table, (rank, plan.rank_parameter_elements)
        assert plan.pools[0].parameter_elements == table == 64 * 12 // memory_parallel
        if rank == 0:
            assert plan.dense_parameter_elements == sum(local.values())
        assert local["embed.weight"] == (129 if rank == 0 else 128) * 16


# ----------------------------------------------------------------------------------------------- update: sparse

SPARSE_CLIP = 0.05  # small enough that every step's dense gradients are clipped


def sparse_fit(steps: int, memory_parallel: int | None, devices: int, batch_size: int, **kwargs):
    """``fit`` of :data:`SPARSE_MODEL` (LazyAdam on the pool, AdamW elsewhere) with gradient clipping."""
    return fit(steps, memory_parallel, devices, batch_size, architecture=SPARSE_MODEL,
               gradient_clip_val=SPARSE_CLIP, **kwargs)


def sparse_one_process_reference(out: str) -> None:
    """One process, the unsharded sparse pool, 4 steps: out/sparse_single_step4.pt (and the initial weights),
    checkpoints out/sparse_single/step=*.ckpt."""
    torch.save(full_weights(language_model(SPARSE_MODEL)), f"{out}/sparse_init.pt")
    model, _ = sparse_fit(4, None, 1, 4, save_dir=f"{out}/sparse_single")
    torch.save(full_weights(model), f"{out}/sparse_single_step4.pt")


def sparse_one_rank_from_sharded(rank: int, world_size: int, out: str) -> None:
    """2 → 1: the 2-rank sharded sparse step-2 checkpoint resumed in one process (memory_parallel 1) to step 4."""
    model, _ = sparse_fit(4, 1, 1, 4, ckpt=f"{out}/sparse_mp/step=2.ckpt")
    torch.save(full_weights(model), f"{out}/sparse_single_from_mp_step4.pt")


def sparse_two_rank_runs(rank: int, world_size: int, out: str) -> None:
    """2 ranks, the sparse pool sharded 2 ways, 4 steps with sharded checkpoints at steps 2 and 4; resumed from
    step 2 the run ends on exactly the same weights and optimizer state; memory_parallel 1 (2 replicas of the
    whole table, rows exchanged once per step) to step 4; 1 → 2: the one-process step-2 .ckpt resumed here to
    step 4. Weights saved by rank 0 for the test."""
    from torch.distributed.tensor import DTensor

    straight, run = sparse_fit(4, 2, 2, 2, save_dir=f"{out}/sparse_mp")
    table = straight.model.pools["memory"].values
    assert isinstance(table, DTensor) and table.to_local().shape == (64, 6), table
    lazy_adam = run.optimizers[0].optimizers[1]
    state = lazy_adam.state[table]
    assert type(lazy_adam).__name__ == "LazyAdam" and isinstance(state["exp_avg"], DTensor)
    assert state["exp_avg"].to_local().shape == (64, 6) and state["step"].shape == (64,)
    resumed, resumed_run = sparse_fit(4, 2, 2, 2, ckpt=f"{out}/sparse_mp/step=2.ckpt")
    straight_weights, resumed_weights = full_weights(straight), full_weights(resumed)
    for name, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=f"exact resume: {name}")
    resumed_state = resumed_run.optimizers[0].optimizers[1].state[resumed.model.pools["memory"].values]
    for key, value in state.items():
        value, again = (v.full_tensor() if isinstance(v, DTensor) else v for v in (value, resumed_state[key]))
        torch.testing.assert_close(again, value, rtol=0, atol=0, msg=f"exact resume: LazyAdam {key}")
    replicated, _ = sparse_fit(4, 1, 2, 2)
    replicated_weights = full_weights(replicated)
    from_single, _ = sparse_fit(4, 2, 2, 2, ckpt=f"{out}/sparse_single/step=2.ckpt")  # 1 → 2
    from_single_weights = full_weights(from_single)
    if rank == 0:
        torch.save(straight_weights, f"{out}/sparse_mp_step4.pt")
        torch.save(replicated_weights, f"{out}/sparse_mp1_step4.pt")
        torch.save(from_single_weights, f"{out}/sparse_mp_from_single_step4.pt")
    for sparse_optimizer in ("lazy_adam", "rowwise_adagrad"):
        sparse_sharded_equals_unsharded(rank, world_size, sparse_optimizer)
    sharded_read_equals_weighted_gather(rank, world_size, sparse_grad=True)


def sparse_sharded_equals_unsharded(rank: int, world_size: int, sparse_optimizer: str) -> None:
    """The sparse pool sharded 2 ways (Lightning-less, float64) vs one process on the whole batch, 2 steps of
    ``build_optimizer`` (AdamW + ``sparse_optimizer``): each shard's gradient is row-sparse with the rows the
    group read (the same rows on both ranks), equal to the reference's columns; clipping leaves it alone; the
    weights after the steps are equal (RowwiseAdagrad's row means are summed over the column shards)."""
    from torch.distributed.tensor import DTensor

    from memzoo.model.transformer import Transformer
    from memzoo.parallel import parallelize
    from memzoo.parallel.memory_parallel import build_mesh
    from memzoo.parallel.torch_private import local_shard
    from memzoo.training.optim import build_optimizer, clip_dense_grad_norm_

    torch.manual_seed(0)
    memory = SPARSE_MODEL["layers"][1]
    config = {**SPARSE_MODEL, "layers": {0: memory, 1: memory}}  # two reads of one pool per step
    reference = Transformer(**config).double()
    sharded = Transformer(**config).double()
    sharded.load_state_dict(reference.state_dict())
    parallelize(sharded, build_mesh("cpu", world_size, 2))

    def adamw(groups):
        return torch.optim.AdamW(groups, lr=0.01)

    ref_opt = build_optimizer(reference, adamw, sparse_optimizer)
    opt = build_optimizer(sharded, adamw, sparse_optimizer)
    tokens = torch.randint(0, 64, (2, 4, 8), generator=torch.Generator().manual_seed(1))
    columns = slice(6 * rank, 6 * rank + 6)
    for batch in tokens:
        ref_logits = reference(batch)
        torch.nn.functional.cross_entropy(ref_logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
        mine = batch[rank * 2 : (rank + 1) * 2]
        logits = sharded(mine)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), mine[:, 1:].flatten()).backward()
        grad, ref_grad = sharded.pools["memory"].values.grad, reference.pools["memory"].values.grad
        assert isinstance(grad, DTensor) and grad.is_sparse and ref_grad.is_sparse
        local = local_shard(grad).coalesce()
        rows = [torch.empty_like(local.indices()[0]) for _ in range(world_size)]
        torch.distributed.all_gather(rows, local.indices()[0])
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], ref_grad.coalesce().indices()[0])
        torch.testing.assert_close(local.to_dense(), ref_grad.to_dense()[:, columns], rtol=1e-10, atol=1e-12)
        norm = clip_dense_grad_norm_(list(sharded.parameters()), 0.01)  # the FSDP2 weights only: one mesh
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        torch.testing.assert_close(norm, clip_dense_grad_norm_(list(reference.parameters()), 0.01), rtol=1e-6, atol=0)
        assert norm > 0.01 and torch.equal(local_shard(grad).coalesce().values(), local.values())  # not clipped
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for name, param in sharded.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        torch.testing.assert_close(full, dict(reference.named_parameters())[name], rtol=1e-5, atol=1e-7, msg=name)
