"""A memory-parallel ``update: sparse`` pool in one process (a 1-rank mesh; the 2-rank runs are in
test_memory_parallel.py): the sharded read's row-sparse shard gradient against a dense reference, its accumulation
over reads and micro-batches, the row-wise optimizers' steps of the shard against the plain table, clipping."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from memzoo.ops import weighted_gather
from memzoo.parallel.memory_parallel import ShardedRead, check_memory_parallel
from memzoo.parallel.torch_private import local_shard
from memzoo.training.optim import LazyAdam, RowwiseAdagrad, clip_dense_grad_norm_


@pytest.fixture
def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded(table: torch.Tensor, mesh) -> torch.nn.Parameter:
    from torch.distributed.tensor import Shard, distribute_tensor

    return torch.nn.Parameter(distribute_tensor(table.detach().clone(), mesh, [Shard(1)]))


def _reads(generator: torch.Generator, bags: int = 5):
    """Two reads per micro-batch (as two layers sharing a pool), a row read twice in one bag, rows 0-1 unread."""
    indices = [torch.randint(2, 16, (bags, 3), generator=generator) for _ in range(2)]
    indices[0][0, 1] = indices[0][0, 0]
    weights = [torch.randn(bags, 3, dtype=torch.float64, generator=generator) for _ in range(2)]
    grads_out = [torch.randn(bags, 4, dtype=torch.float64, generator=generator) for _ in range(2)]
    return indices, weights, grads_out


def test_sharded_sparse_read_gradient_equals_the_dense_reference(mesh):
    """Two micro-batches of two reads: the table's gradient is a DTensor around a row-sparse (COO, sparse_dim 1)
    local shard gradient holding exactly the rows read, equal (to_dense) to the dense reference's, scaled by
    grad_scale; the weights' gradients equal the reference's; without grad (eval) the read is the same."""
    from torch.distributed.tensor import DTensor

    generator = torch.Generator().manual_seed(0)
    full = torch.randn(16, 4, dtype=torch.float64, generator=generator).requires_grad_()
    table = _sharded(full, mesh)
    read = ShardedRead(mesh.get_group(), None, grad_scale=0.5, sparse=True)
    read_rows = []
    for _ in range(2):
        indices, weights, grads_out = _reads(generator)
        read_rows += indices
        ref_weights = [w.clone().requires_grad_() for w in weights]
        mine = [w.clone().requires_grad_() for w in weights]
        reference = [weighted_gather(full, i, w) for i, w in zip(indices, ref_weights)]
        outputs = [read(table, i, w) for i, w in zip(indices, mine)]
        for out, ref in zip(outputs, reference):
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.autograd.backward(reference, grads_out)
        torch.autograd.backward(outputs, grads_out)
        for w, ref_w in zip(mine, ref_weights):
            torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-12, atol=1e-12)
    grad = table.grad
    assert isinstance(grad, DTensor) and grad.is_sparse and grad.shape == (16, 4)
    local = local_shard(grad)
    assert local.is_sparse and local.sparse_dim() == 1
    assert torch.equal(local.coalesce().indices()[0], torch.cat(read_rows).unique())
    torch.testing.assert_close(local.to_dense(), 0.5 * full.grad, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(read(table, indices[0], weights[0]), weighted_gather(full, indices[0], weights[0]))


@pytest.mark.parametrize("optimizer", [LazyAdam, RowwiseAdagrad])
def test_rowwise_optimizers_step_the_shard_as_the_plain_table(mesh, optimizer):
    """Three steps of sparse reads: the DTensor table ends on the plain table's values; untouched rows (0, 1) do
    not move; LazyAdam's moments are DTensors of the table's layout (sharded checkpoints hold each rank's part)."""
    from torch.distributed.tensor import DTensor

    generator = torch.Generator().manual_seed(1)
    plain = torch.nn.Parameter(torch.randn(16, 4, dtype=torch.float64, generator=generator))
    table = _sharded(plain, mesh)
    start = plain.detach().clone()
    read = ShardedRead(mesh.get_group(), None, grad_scale=1.0, sparse=True)
    plain_opt, sharded_opt = optimizer([plain], lr=0.05, weight_decay=0.1), optimizer([table], lr=0.05,
                                                                                       weight_decay=0.1)
    for _ in range(3):
        indices, weights, grads_out = _reads(generator)
        torch.autograd.backward([weighted_gather(plain, i, w, sparse_grad=True) for i, w in zip(indices, weights)],
                                grads_out)
        torch.autograd.backward([read(table, i, w) for i, w in zip(indices, weights)], grads_out)
        norm = clip_dense_grad_norm_([table], 1e-3)  # no dense gradient: nothing to clip, the sparse one kept
        assert float(norm) == 0.0 and table.grad.is_sparse
        plain_opt.step()
        sharded_opt.step()
        plain_opt.zero_grad()
        sharded_opt.zero_grad()
    torch.testing.assert_close(table.full_tensor(), plain.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(table.full_tensor()[:2], start[:2], rtol=0, atol=0)
    for key, value in sharded_opt.state[table].items():
        if value.dim() == 2:
            assert isinstance(value, DTensor) and value.placements == table.placements, key
        torch.testing.assert_close(value.full_tensor() if isinstance(value, DTensor) else value,
                                   plain_opt.state[plain][key], rtol=1e-12, atol=1e-12, msg=key)


def test_memory_parallel_accepts_sparse_pools():
    from memzoo.model.transformer import Transformer

    model = Transformer(
        vocab_size=32, dim=16, n_layers=1, n_heads=2, block="memory_plus",
        block_args={"pool": "memory", "heads": 2, "knn": 2, "k_dim": 8},
        pools={"memory": {"n_keys": 4, "value_dim": 8, "update": "sparse"}},
    )
    for memory_parallel, world_size in ((1, 1), (1, 2), (2, 2), (4, 8)):
        check_memory_parallel(model, memory_parallel, world_size)
