"""``parallelize(model, mesh, ...)``: everything applied to a built Transformer from outside, in torchtitan's order.

1. activation checkpointing: each decoder layer's forward recomputed in backward instead of keeping its
   activations (``torch.utils.checkpoint``, non-reentrant); same outputs and gradients, less memory, one more
   forward per layer;
2. compile: ``nn.Module.compile`` of each decoder layer in place (no wrapper module: parameter names, checkpoints and
   exports are the same as without it), tracing with dynamic output shapes captured, so a pool's row-sparse
   gradient (as many rows as the batch used) stays inside the layer's graph instead of breaking it;
3. sharding by ``mesh``: a ``(data_parallel, memory_parallel)`` mesh
   (:class:`~memzoo.parallel.strategy.MemoryParallelStrategy`) shards pool tables over ``memory_parallel`` and the
   rest with FSDP2 over all ranks (:func:`~memzoo.parallel.memory_parallel.apply_memory_parallel`); ``None`` (one
   process, or DDP, which Lightning's strategy wraps around the model afterwards) shards nothing.

Checkpointing before compile lets the compiler see the recomputation boundary; compiling before sharding keeps
FSDP2's hooks outside the compiled layers' graphs (torchtitan's ``parallelize`` does the same). ``LanguageModel``
calls it from ``configure_model`` with its settings and ``self.device_mesh``. Applied once per model: a second
call (Lightning calls ``configure_model`` per stage) does nothing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import checkpoint

from memzoo.parallel.memory_parallel import (
    DATA_PARALLEL,
    MEMORY_PARALLEL,
    MemoryParallelError,
    apply_memory_parallel,
)

__all__ = ["parallelize"]

#: Attribute a parallelized model carries (what was applied), so a second call is a no-op.
APPLIED = "memzoo_parallelized"


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    compile: bool | str = False,
    activation_checkpointing: bool = False,
) -> None:
    """Applies activation checkpointing, compile and sharding to ``model`` (a Transformer), in that order, in place.

    Args:
        model: the :class:`~memzoo.model.transformer.Transformer` (its ``layers`` are checkpointed and compiled).
        mesh: ``None``, or a mesh with axes ``("data_parallel", "memory_parallel")``
            (:func:`~memzoo.parallel.memory_parallel.build_mesh`); any other mesh is refused.
        compile: ``True`` (inductor), ``False``, or a ``torch.compile`` backend name.
        activation_checkpointing: recompute each layer's activations in backward.
    """
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be true, false or a torch.compile backend name, got {compile!r}")
    names = tuple(mesh.mesh_dim_names or ()) if mesh is not None else None
    if names is not None and names != (DATA_PARALLEL, MEMORY_PARALLEL):
        raise MemoryParallelError(
            f"parallelize got a device mesh with axes {names}; memzoo shards over a mesh with axes "
            f"{(DATA_PARALLEL, MEMORY_PARALLEL)}: train with memzoo.parallel.MemoryParallelStrategy (not Lightning's "
            f"ModelParallelStrategy)"
        )
    if getattr(model, APPLIED, None) is not None:
        return
    layers = list(getattr(model, "layers", ()))
    if activation_checkpointing:
        for layer in layers:
            layer.forward = functools.partial(_checkpointed, layer.forward)
    if compile is not False:
        for layer in layers:
            layer.compile(backend="inductor" if compile is True else compile)
            layer._compiled_call_impl = _capturing_dynamic_shapes(layer._compiled_call_impl)
    if mesh is not None:
        apply_memory_parallel(model, mesh)
    setattr(model, APPLIED, {"activation_checkpointing": activation_checkpointing, "compile": compile,
                             "mesh": names})


def _capturing_dynamic_shapes(compiled_call):
    """``compiled_call`` traced with ``capture_dynamic_output_shape_ops`` set for its own frames only: a sparse pool
    read's backward op (:mod:`memzoo.ops.sparse_gather`) returns as many rows as the batch used, which dynamo
    otherwise answers with a graph break. Scoped rather than set for the process: a graph that reads one sparse table
    twice (a whole model compiled at once) cannot add the two sparse gradients and is left to break there."""
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)(compiled_call)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
