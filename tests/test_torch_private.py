"""Every private PyTorch / Lightning API memzoo uses (:mod:`memzoo.parallel.torch_private`) still exists with the
signature and behaviour memzoo relies on: an upgrade that changes one fails here, naming it."""

from __future__ import annotations

import inspect
import os
import socket

import pytest
import torch
import torch.distributed as dist

from memzoo.parallel import torch_private


@pytest.fixture
def world_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_every_private_api_is_listed_and_tested():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert set(torch_private.__all__) <= tested | {"ignored_in_ddp"}, set(torch_private.__all__) - tested


def test_ignore_in_ddp(world_of_one):
    from torch.nn.parallel import DistributedDataParallel

    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    torch_private.ignore_in_ddp(module, ["0.weight"])
    torch_private.ignore_in_ddp(module, ["1.bias"])  # names set before are kept
    assert torch_private.ignored_in_ddp(module) == {"0.weight", "1.bias"}
    wrapped = DistributedDataParallel(module)
    assert {"0.weight", "1.bias"} <= set(wrapped.parameters_to_ignore)
    wrapped(torch.randn(2, 3)).sum().backward()  # the ignored parameters still get their local gradients
    assert module[0].weight.grad is not None and module[1].bias.grad is not None


def test_ddp_wrapper_kwargs():
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(find_unused_parameters=True, gradient_as_bucket_view=True)
    kwargs = torch_private.ddp_wrapper_kwargs(strategy)
    assert kwargs == {"find_unused_parameters": True, "gradient_as_bucket_view": True}
    assert "self._ddp_kwargs" in inspect.getsource(DDPStrategy._setup_model)  # what Lightning hands to DDP


def test_flatten_mesh(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("a", "b"))
    flat = torch_private.flatten_mesh(mesh, "a_b")
    assert flat.ndim == 1 and flat.size() == 1 and flat.mesh_dim_names == ("a_b",)


def test_validates_after_this_batch(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(torch_private.validates_after_this_batch(trainer))

    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Probe()], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    assert seen == [False, True, False, True]


def test_load_full_module_state():
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state

    parameters = list(inspect.signature(_load_raw_module_state).parameters)
    assert parameters[:2] == ["state_dict", "module"] and "strict" in parameters, parameters
    source, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    torch_private.load_full_module_state(source.state_dict(), target)
    torch.testing.assert_close(target.weight, source.weight)
    with pytest.raises(RuntimeError):
        torch_private.load_full_module_state({"weight": source.weight}, target, strict=True)


def test_setup_model_parallel_process_group():
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert callable(getattr(ModelParallelStrategy, "_setup_distributed", None))
    assert not [p for p in inspect.signature(ModelParallelStrategy._setup_distributed).parameters if p != "self"]


def test_set_device_mesh():
    from lightning.pytorch import LightningModule

    class Strategy:
        lightning_module = LightningModule()

    strategy, mesh = Strategy(), object()
    torch_private.set_device_mesh(strategy, mesh)
    assert strategy.lightning_module.device_mesh is mesh and strategy._device_mesh is mesh
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert ModelParallelStrategy.device_mesh.fget(strategy) is mesh  # the property reads that attribute


def test_all_gather_dim0(world_of_one):
    tensor = torch.arange(6.0).view(3, 2).requires_grad_()
    out = torch_private.all_gather_dim0(tensor, dist.group.WORLD, differentiable=True)
    torch.testing.assert_close(out, tensor.detach())
    (out * 2).sum().backward()
    torch.testing.assert_close(tensor.grad, torch.full((3, 2), 2.0))
    torch.testing.assert_close(torch_private.all_gather_dim0(torch.tensor([4]), dist.group.WORLD), torch.tensor([4]))


def test_all_to_all_dim0(world_of_one):
    tensor = torch.arange(4.0).requires_grad_()
    out = torch_private.all_to_all_dim0(tensor, dist.group.WORLD)
    torch.testing.assert_close(out, tensor.detach())
    out.sum().backward()
    torch.testing.assert_close(tensor.grad, torch.ones(4))


def test_row_sparse_dtensor(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    table = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(1)]))
    local = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.randn(2, 4), (8, 4), check_invariants=True)
    grad = torch_private.row_sparse_dtensor(local, table)
    table.grad = grad  # a DTensor parameter takes it as its gradient
    assert isinstance(table.grad, DTensor) and table.grad.is_sparse and table.grad.shape == (8, 4)
    assert table.grad.placements == table.placements and table.grad.device_mesh is mesh
    assert torch_private.local_shard(table.grad) is local
    with pytest.raises(ValueError, match=r"local shape \(8, 3\) is not the local shard shape \(8, 4\)"):
        torch_private.row_sparse_dtensor(torch.zeros(8, 3).to_sparse(1), table)
    with pytest.raises(NotImplementedError):  # why the constructor: the public path views the local tensor
        DTensor.from_local(local, mesh, [Shard(1)])


def test_local_shard(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    table = distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(1)])
    torch_private.local_shard(table).add_(1.0)  # shares storage
    torch.testing.assert_close(torch_private.local_shard(table), table.to_local())
    assert torch_private.local_shard(table).data_ptr() == table.to_local().data_ptr()
    plain = torch.zeros(2)
    assert torch_private.local_shard(plain) is plain


def test_no_private_api_outside_this_module():
    """The distributed code calls these private APIs only through torch_private."""
    root = os.path.dirname(torch_private.__file__)
    patterns = ["_set_params_and_buffers_to_ignore_for_model", "_ddp_kwargs", "._flatten(", "_should_check_val_fx",
                "_load_raw_module_state", "_setup_distributed", "_functional_collectives", "._device_mesh =",
                "_local_tensor", "DTensor(local"]
    package = os.path.dirname(root)
    found = []
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != torch_private.__file__:
                text = open(path, encoding="utf-8").read()
                found += [f"{os.path.relpath(path, package)}: {p}" for p in patterns if p in text]
    assert not found, found
