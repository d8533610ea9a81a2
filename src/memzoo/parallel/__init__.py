"""Scale-out of memzoo models on PyTorch distributed through Lightning's strategies.

Data parallel (``trainer.strategy: ddp``): :mod:`memzoo.parallel.data_parallel` (DDP set-up, sparse tables kept out
of DDP's buckets) and :mod:`memzoo.parallel.sparse_grad_sync` (the touched-row exchange of row-sparse gradients).
Planning: :mod:`memzoo.parallel.planning` (per-rank bytes and communication per step, without building weights).
"""
