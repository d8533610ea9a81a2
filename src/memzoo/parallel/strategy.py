"""``MemoryParallelStrategy``: Lightning's ``ModelParallelStrategy`` with a (data_parallel, memory_parallel) mesh.

One YAML switch::

    trainer:
      devices: 2
      strategy:
        class_path: memzoo.parallel.strategy.MemoryParallelStrategy
        init_args: {memory_parallel: 2}

What it does, on top of Lightning's strategy (process launch, DCP checkpoints, resharding on load):

- builds the mesh ``(world // M, M)`` named ``("data_parallel", "memory_parallel")`` and hands it to the
  LightningModule as ``self.device_mesh``; ``LanguageModel.configure_model`` then applies
  :func:`memzoo.parallel.parallelize` with it, which shards the Transformer
  (:func:`~memzoo.parallel.memory_parallel.apply_memory_parallel`: pools over ``memory_parallel``, FSDP2 over all
  ranks for the rest);
- gives every rank its own data (the sampler splits over all ``W`` ranks, not over ``data_parallel`` as Lightning's
  tensor-parallel default does): memory parallelism shards a table, not the batch;
- checks the sizes before anything runs (``M`` divides the world size and every pool's ``value_dim``, pools it can
  shard), and a resume checkpoint before it is loaded (complete, same global shapes);
- sums each table shard's gradient over its data-parallel replicas once per optimizer step (after the last
  backward of gradient accumulation, before clipping: :func:`~memzoo.parallel.memory_parallel.reduce_table_gradients`),
  not once per read: an all-reduce for ``update: dense`` pools, an exchange of the touched rows for
  ``update: sparse`` pools, whose shards train with row-sparse gradients and the row-wise optimizer as in one
  process;
- writes each checkpoint folder atomically (temporary name, renamed after all ranks wrote their shards);
- loads a one-process ``.ckpt`` file (1 → M) with its optimizer state keyed by parameter name.

``memory_parallel: 1`` is plain FSDP2 data parallelism with replicated pools; with ``devices: 1`` it is how a
sharded checkpoint resumes in one process (M → 1).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.constants import default_pg_timeout

from memzoo.atomic import staging_directory
from memzoo.parallel.checkpoint import (
    ShardedCheckpointError,
    check_reshardable,
    check_sharded_checkpoint,
    is_sharded_checkpoint,
    read_meta,
)
from memzoo.parallel.memory_parallel import (
    MemoryParallelError,
    build_mesh,
    check_memory_parallel,
    reduce_table_gradients,
)
from memzoo.parallel.torch_private import (
    load_full_module_state,
    set_device_mesh,
    setup_model_parallel_process_group,
)
from memzoo.safe_load import RefusedPickleError, load_data


class MemoryParallelStrategy(ModelParallelStrategy):
    """Data parallel over all ranks, pools sharded over groups of ``memory_parallel`` ranks (module docstring).

    Args:
        memory_parallel: ranks per memory-parallel group (M); must divide the world size and each pool's
            ``value_dim``.
        process_group_backend: ``None``: NCCL on CUDA, gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        memory_parallel: int = 1,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ):
        if isinstance(memory_parallel, bool) or not isinstance(memory_parallel, int) or memory_parallel < 1:
            raise MemoryParallelError(f"memory_parallel must be a positive int, got {memory_parallel!r}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.memory_parallel = memory_parallel

    # ------------------------------------------------------------------------------------------------ setup
    def setup_environment(self) -> None:
        world_size = self.num_nodes * self.num_processes
        check_memory_parallel(self.lightning_module, self.memory_parallel, world_size)  # before any collective
        setup_model_parallel_process_group(self)
        set_device_mesh(self, build_mesh(self.root_device.type, self.world_size, self.memory_parallel))

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        """The optimizer step, with the table shards' gradients summed over the data-parallel replicas right
        after the backward (once per step, whatever the number of reads and micro-batches)."""
        module = self.lightning_module

        def closure_then_reduce() -> Any:
            result = closure()
            reduce_table_gradients(module)
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # ------------------------------------------------------------------------------------------------ save
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Writes the folder ``filepath`` atomically: every rank writes into a staging folder that rank 0 renames
        onto ``filepath`` once all shards are written (an interrupted save leaves the previous checkpoint)."""
        path = Path(self.broadcast(str(filepath)))
        checkpoint["memory_parallel"] = {"world_size": self.world_size, "memory_parallel": self.memory_parallel}
        staging_context = staging_directory(path) if self.global_rank == 0 else None
        staging = staging_context.__enter__() if staging_context is not None else None
        try:
            staging = Path(self.broadcast(str(staging)))
            super().save_checkpoint(checkpoint, staging, storage_options)
            self.barrier("memzoo.save_checkpoint")
        except BaseException as err:
            if staging_context is not None:
                staging_context.__exit__(type(err), err, err.__traceback__)
            raise
        if staging_context is not None:
            staging_context.__exit__(None, None, None)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(path, 0o777 & ~umask)  # the staging folder was private (mkdtemp); the checkpoint is not
        self.barrier("memzoo.save_checkpoint.renamed")

    # ------------------------------------------------------------------------------------------------ load
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded folder (any world size: DCP reshards; checked first) or a one-process ``.ckpt`` file (the CLI
        checks files when it parses ``--ckpt_path``). Both are read as data only: the folder's index through an
        allowlist and its items weights-only (:mod:`memzoo.parallel.checkpoint_metadata`), a file with
        ``torch.load(weights_only=True)``; ``weights_only=False`` is refused (memzoo checkpoints are plain data)."""
        if weights_only is False:
            raise ShardedCheckpointError(
                "weights_only=False is refused: memzoo checkpoints are plain data and load with weights_only=True; "
                "leave weights_only unset (or True)"
            )
        path = Path(self.broadcast(str(checkpoint_path)))
        model = self.lightning_module
        expected = {
            name: (tensor.shape, tensor.dtype) for name, tensor in model.state_dict().items() if torch.is_tensor(tensor)
        }
        if is_sharded_checkpoint(path):
            check_sharded_checkpoint(path)
            check_reshardable(path, expected)
            return self._load_sharded_checkpoint(path)
        return self._load_full_checkpoint(path, expected)

    def _load_sharded_checkpoint(self, path: Path) -> dict[str, Any]:
        """Lightning's sharded load (``lightning.fabric.strategies.model_parallel._load_checkpoint``) through
        memzoo's restricted reader: weights, then each optimizer's state, then ``meta.pt``, which is returned."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from memzoo.parallel.checkpoint_metadata import UntrustedMetadataError, load_sharded_state

        module = self.model
        try:
            weights = {"state_dict": get_model_state_dict(module)}
            load_sharded_state(weights, path)
            module.load_state_dict(weights["state_dict"], strict=self.lightning_module.strict_loading)
            for index, optimizer in enumerate(self.optimizers):
                key = f"optimizer_{index}"
                state = {key: get_optimizer_state_dict(module, optimizer)}
                load_sharded_state(state, path)
                set_optimizer_state_dict(
                    module, optimizer, optim_state_dict=state[key], options=StateDictOptions(cpu_offload=True)
                )
        except UntrustedMetadataError as err:
            raise ShardedCheckpointError(str(err)) from err
        return read_meta(path)

    def _load_full_checkpoint(self, path: Path, expected: dict) -> dict[str, Any]:
        """A ``.ckpt`` of a one-process run into this sharded model; its optimizer state is re-keyed from
        positions to parameter names by this optimizer's own order (both come from the same parameter groups)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        try:
            checkpoint = load_data(path, f"checkpoint {str(path)!r}")
        except RefusedPickleError as err:
            raise ShardedCheckpointError(str(err)) from err
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise ShardedCheckpointError(
                f"checkpoint {str(path)!r} is not a Lightning checkpoint (no 'state_dict'); give a .ckpt that "
                f"memzoo fit wrote"
            )
        weights = checkpoint.pop("state_dict")
        for name, (shape, _) in expected.items():
            if name in weights and tuple(weights[name].shape) != tuple(shape):
                raise ShardedCheckpointError(
                    f"checkpoint {str(path)!r} cannot be resharded into this model: weight {name!r} has shape "
                    f"{tuple(weights[name].shape)} there but {tuple(shape)} here; resume with the model config the "
                    f"checkpoint was written with"
                )
        load_full_module_state(weights, self.lightning_module, strict=self.lightning_module.strict_loading)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            set_optimizer_state_dict(
                self.lightning_module, optimizer, optim_state_dict=self._keyed_by_name(optimizer, state),
                options=options,
            )
        return checkpoint

    def _keyed_by_name(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
        names = {id(param): name for name, param in self.lightning_module.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        if isinstance(next(iter(state["state"]), ""), str):
            return state
        return {
            "state": {order[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]],
        }
