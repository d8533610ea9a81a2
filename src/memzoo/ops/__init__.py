"""Functional kernels of memzoo's sparse-memory blocks (no ``nn.Module`` state).

- :func:`product_key_topk`: exact top-k over ``n_keys²`` product keys in O(n_keys + k·log k) per query and head
  (:func:`candidate_pairs` says how many candidate sums it scores); a ``torch.library`` custom op whose top-k and
  merge run in C++/OpenMP on CPU (:mod:`memzoo.ops.cpu_topk`, built on first use, PyTorch fallback) and in Triton
  on CUDA (:mod:`memzoo.ops.triton_topk`), with a sparse O(k·Dk) backward.
- :func:`weighted_gather`: ``out[b] = Σ_j w[b,j] · values[idx[b,j]]``, the read of a memory layer.
- :func:`gather_dot`: ``out[b,j] = values[idx[b,j]] · x[b]``, its adjoint (PEER's ``u_i · x``).
- :func:`grouped_weighted_gather`: ``out[b, g] = Σ_{j: group[b,j]=g} w[b,j,:] ⊙ values[idx[b,j]]``, a weight per
  chunk of the row (UltraMem's grouped multi-core read), each indexed row read once.

The last three are ``torch.library`` custom ops with their own backward (optionally a row-sparse table gradient):
C++/OpenMP kernels on CPU for float32/float64 (:mod:`memzoo.ops.cpu_read`, built on first use; vectorised PyTorch,
:mod:`memzoo.ops.cpu_gather`, for other dtypes or without a compiler) and Triton on CUDA (the grouped read there,
and for other dtypes, runs its PyTorch reference, :mod:`memzoo.ops.grouped_gather`).
"""

from memzoo.ops.grouped_gather import grouped_weighted_gather
from memzoo.ops.product_keys import candidate_pairs, product_key_topk
from memzoo.ops.sparse_gather import gather_dot, weighted_gather

__all__ = ["candidate_pairs", "gather_dot", "grouped_weighted_gather", "product_key_topk", "weighted_gather"]
