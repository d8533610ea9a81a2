"""Scale-out of memzoo models on PyTorch distributed through Lightning's strategies (below ``training``, which applies
them; nothing here imports ``training``).

- :func:`parallelize` (:mod:`memzoo.parallel.parallelize`): activation checkpointing, compile and sharding of a
  built model, in torchtitan's order; ``LanguageModel.configure_model`` calls it.
- Data parallel: :class:`SparseDDPStrategy` (:mod:`memzoo.parallel.sparse_ddp`), Lightning's DDP plus the row
  exchange of row-sparse table gradients (:mod:`memzoo.parallel.sparse_grad_sync`); the ``memzoo`` CLI runs
  ``--trainer.strategy ddp`` with it.
- Memory parallelism: :class:`MemoryParallelStrategy` (:mod:`memzoo.parallel.strategy`) shards pool tables over a
  mesh axis (:mod:`memzoo.parallel.memory_parallel`); sharded checkpoints: :mod:`memzoo.parallel.checkpoint`, read
  as data only through :mod:`memzoo.parallel.checkpoint_metadata`.
- Planning: :mod:`memzoo.parallel.planning` (per-rank bytes and communication per step of a model on W ranks, laid
  out as ``SparseDDPStrategy`` or ``MemoryParallelStrategy`` does, from weights on the ``meta`` device).
- Private PyTorch / Lightning APIs: each behind one function in :mod:`memzoo.parallel.torch_private`.

The two strategies subclass Lightning's, so they are imported on first use (PEP 562): reading a sharded checkpoint
(:mod:`memzoo.parallel.checkpoint`) or planning needs no Lightning.
"""

from __future__ import annotations

from memzoo.lazy_exports import lazy_exports

# Eager: the function's name is also its submodule's, which would otherwise be what `from memzoo.parallel import
# parallelize` finds once the submodule is imported.
from memzoo.parallel.parallelize import parallelize

#: Public name -> the module defining it, imported when the name is first read.
_LAZY = {
    "MemoryParallelStrategy": "memzoo.parallel.strategy",
    "SparseDDPStrategy": "memzoo.parallel.sparse_ddp",
}

__all__ = ["MemoryParallelStrategy", "SparseDDPStrategy", "parallelize"]

__getattr__, __dir__ = lazy_exports(globals(), _LAZY, __all__)
