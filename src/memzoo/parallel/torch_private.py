"""Every private PyTorch / Lightning API memzoo relies on, each behind one function (nothing else calls them).

Each exists because no public API does the same job; ``tests/test_torch_private.py`` checks each one still exists
with the signature and behaviour used here, so an upgrade that changes one fails there, by name, not deep inside a
training run.

- :func:`ignore_in_ddp`: ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` (torch). DDP has no
  public argument for parameters it must neither bucket nor broadcast; the row-sparse tables of ``update: sparse``
  pools must be left out (their exchange is :mod:`memzoo.parallel.sparse_grad_sync`).
- :func:`ddp_wrapper_kwargs`: ``DDPStrategy._ddp_kwargs`` (Lightning): the keyword arguments Lightning hands to
  ``DistributedDataParallel``; :class:`~memzoo.parallel.sparse_ddp.SparseDDPStrategy` turns on
  ``find_unused_parameters`` for MoE models once the model is known (after the strategy was built).
- :func:`flatten_mesh`: ``DeviceMesh._flatten`` (torch): one 1-D mesh over all ranks of a 2-D mesh, for FSDP2 over
  ``data_parallel × memory_parallel`` with the same process groups.
- :func:`validates_after_this_batch`: ``fit_loop.epoch_loop._should_check_val_fx`` (Lightning): whether validation
  runs right after the current training batch.
- :func:`load_full_module_state`: ``lightning.fabric.strategies.model_parallel._load_raw_module_state``: a full
  (one-process) state dict into an FSDP2-sharded module.
- :func:`all_gather_dim0` and :func:`all_to_all_dim0`: ``torch.distributed._functional_collectives`` (torch): the
  collectives of a sharded read, differentiable where asked (``torch.distributed.nn.functional`` has autograd
  collectives too, but list-based and without the traceable form these have).
- :func:`setup_model_parallel_process_group` and :func:`set_device_mesh`: ``ModelParallelStrategy._setup_distributed``
  and the ``_device_mesh`` attributes of the strategy and the LightningModule, which Lightning's own
  ``ModelParallelStrategy.setup_environment`` sets (its mesh has fixed axis names; memzoo's has its own).
- :func:`row_sparse_dtensor` and :func:`local_shard`: the ``DTensor(local, spec, requires_grad=...)`` constructor and
  ``DTensor._local_tensor`` (torch): the row-sparse COO gradient of a memory-parallel table shard as a ``DTensor``
  (``DTensor.from_local`` and ``to_local`` call ``view``, which sparse tensors lack).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "all_gather_dim0",
    "all_to_all_dim0",
    "ddp_wrapper_kwargs",
    "flatten_mesh",
    "ignore_in_ddp",
    "load_full_module_state",
    "local_shard",
    "row_sparse_dtensor",
    "set_device_mesh",
    "setup_model_parallel_process_group",
    "validates_after_this_batch",
]


def all_gather_dim0(tensor: torch.Tensor, group: Any, differentiable: bool = False) -> torch.Tensor:
    """The ranks' ``tensor`` concatenated along dim 0 in rank order (every rank's must have one shape).
    ``differentiable``: backward reduce-scatters the gradient (each rank gets the sum of its block)."""
    import torch.distributed._functional_collectives as funcol

    gather = funcol.all_gather_single_autograd if differentiable else funcol.all_gather_single
    return gather(tensor, 0, group)


def all_to_all_dim0(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Equal blocks along dim 0 exchanged: block ``i`` of the output is rank ``i``'s block for this rank.
    Differentiable (backward is the reverse all-to-all)."""
    import torch.distributed._functional_collectives as funcol

    return funcol.all_to_all_single_autograd(tensor, None, None, group)


def ignore_in_ddp(module: nn.Module, names: Iterable[str]) -> None:
    """``DistributedDataParallel(module)`` created after this call neither buckets nor broadcasts the parameters and
    buffers ``names`` (as in ``module.named_parameters()``); names set before are kept."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))


def ignored_in_ddp(module: nn.Module) -> set[str]:
    """The names :func:`ignore_in_ddp` set on ``module``."""
    return set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))


def ddp_wrapper_kwargs(strategy: Any) -> dict[str, Any]:
    """The (mutable) keyword arguments a Lightning ``DDPStrategy`` passes to ``DistributedDataParallel``."""
    return strategy._ddp_kwargs


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The 1-D mesh named ``name`` over all ranks of ``mesh`` (row-major), sharing ``mesh``'s ranks."""
    return mesh._flatten(name)


def validates_after_this_batch(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the current training batch (its own rule)."""
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def load_full_module_state(state_dict: dict, module: nn.Module, strict: bool = True) -> None:
    """Loads a full (unsharded) ``state_dict`` into ``module``, whose parameters may be FSDP2 / DTensor shards."""
    from lightning.fabric.strategies.model_parallel import _load_raw_module_state

    _load_raw_module_state(state_dict, module, strict=strict)


def setup_model_parallel_process_group(strategy: Any) -> None:
    """Lightning's process-group set-up of a ``ModelParallelStrategy`` (ranks, default group, device)."""
    strategy._setup_distributed()


def set_device_mesh(strategy: Any, mesh: DeviceMesh) -> None:
    """Makes ``mesh`` the strategy's ``device_mesh`` and its LightningModule's ``self.device_mesh``."""
    strategy._device_mesh = mesh
    strategy.lightning_module._device_mesh = mesh


def row_sparse_dtensor(local: torch.Tensor, like: Any) -> Any:
    """``local`` (a sparse COO tensor of ``like``'s local shape) as a ``DTensor`` with ``like``'s mesh, placements
    and global shape: the gradient of the ``DTensor`` parameter ``like``. Its ``layout`` is ``torch.sparse_coo``."""
    from torch.distributed.tensor import DTensor

    if tuple(local.shape) != tuple(like._local_tensor.shape):
        raise ValueError(
            f"row_sparse_dtensor: local shape {tuple(local.shape)} is not the local shard shape "
            f"{tuple(like._local_tensor.shape)} of the DTensor it belongs to"
        )
    return DTensor(local, like._spec, requires_grad=False)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ``DTensor`` (``to_local`` without autograd; also for a sparse one), the tensor itself
    otherwise. Shares storage: in-place updates of the result update ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor
