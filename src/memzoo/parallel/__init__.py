"""Scale-out of memzoo models on PyTorch distributed through Lightning's strategies (a layer above ``training``).

- Memory parallelism: :mod:`memzoo.parallel.memory_parallel` shards pool tables over a mesh axis, applied to a
  built model from outside (``LanguageModel.configure_model`` calls the strategy's ``parallelize``); sharded
  checkpoints: :mod:`memzoo.parallel.checkpoint`, read as data only through
  :mod:`memzoo.parallel.checkpoint_metadata`.
- Planning: :mod:`memzoo.parallel.planning` (per-rank bytes and communication per step of a model on W ranks, laid
  out as the ``ddp`` strategy or ``MemoryParallelStrategy`` does, from weights on the ``meta`` device).
- Data parallel (``trainer.strategy: ddp``) is part of training itself, so a plain ``LanguageModel`` runs under DDP:
  :mod:`memzoo.training.data_parallel` and :mod:`memzoo.parallel.sparse_grad_sync`.
"""
