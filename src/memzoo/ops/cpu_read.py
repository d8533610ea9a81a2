"""The C++/OpenMP CPU kernels of the sparse read path: table reads, their fused backward, and the row-wise Adam step.

For a table ``values (N, D)`` and ``B`` bags of ``K`` row indices (``P = B·K`` positions ``p = b·K + j``):

- :func:`gather_dot` ``out[p] = values[idx[p]] · x[b]``: bags in parallel, ``x[b]`` in L1 over its ``K`` rows,
  the table row a few positions ahead prefetched, dot products in four vector partial sums (a fixed order).
  (``weighted_gather``'s forward stays on PyTorch's ``embedding_bag``, which is faster there.) With ``groups``
  (the grouped read's weights' gradient) ``out[p, c] = values[idx[p]] · x[b, group[p]]`` chunk by chunk.
- :func:`scatter_dot`, the backward of both reads in one call: the positions are sorted by row (a stable counting
  sort when ``N <= 4·P``, else a sort of ``row·P + p`` keys), then each distinct row ``r`` (rows in parallel) sums
  ``G[r] = Σ_{idx[p]=r} w[p] · src[b]`` in position order (deterministic; in vector registers when ``D``, or each
  chunk of the grouped read's, is a whole number of up to 16 vectors, 8 without AVX-512; the weights and the source
  rows a few positions on prefetched) and, in the same pass, optionally ``dots[p] = values[r] · src[b]`` (the row
  ``values[r]`` is read once per distinct row, ``src[b]`` once for both).
  For ``weighted_gather`` (``src = grad_out``) ``G`` is the table's gradient and ``dots`` the weights' gradient;
  for ``gather_dot`` (``src = x``, ``w = grad_out``) ``G`` is the table's gradient. ``G`` comes out row-sparse
  (the ``U`` distinct rows ascending and their sums) or as a dense ``(N, D)`` tensor whose untouched rows the
  kernel zeroes (no zero-fill of the whole table first); no ``(B, K, D)`` tensor and no sort or bag bookkeeping
  tensors beyond ``2·P`` int64.
- :func:`grouped_gather` ``out[b, g] = Σ_{j: group[b,j]=g} w[b,j,:] ⊙ values[idx[b,j]]`` (a weight per chunk of
  ``M``; UltraMem's grouped multi-core read, :mod:`memzoo.ops.grouped_gather`): bags in parallel, each indexed row
  read once into its group's accumulator; its backward is :func:`scatter_dot` with ``groups``.
- :func:`adam_rows_`: :class:`memzoo.training.rowwise_optim.LazyAdam`'s update of the touched rows in place, one pass per
  row (weight decay, both moments, bias corrections from the row's own step count in float64), rows in parallel;
  no gathered copies of the table or its moments.

float32 and float64 only (callers keep their PyTorch path for other dtypes). Every entry point checks its
arguments' layouts (contiguous, dtypes, shapes: O(1), ``ValueError``) and, in the kernel, its indices and groups
(O(B·K), ``IndexError`` naming the value) before it reads or writes anything: an index outside the table would
otherwise touch memory that is not the table's. The source has no torch headers; it is compiled with
``torch.utils.cpp_extension.load`` on first use and called through ``ctypes``, as :mod:`memzoo.ops.cpu_topk` (same
cache, same ``MEMZOO_CPU_KERNELS=0`` switch, one warning when it cannot be built).
"""

from __future__ import annotations

import ctypes

import torch

from memzoo.ops.cpu_build import (
    DIVIDER_CPP,
    FLOAT_SUFFIX,
    CompiledLibrary,
    compile_library,
    declare_float_kernels,
)

__all__ = ["adam_rows_", "available", "gather_dot", "grouped_gather", "library", "scatter_dot", "supports"]

SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <vector>
#include <algorithm>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {
// Asks for transparent huge pages on the 2 MiB-aligned part of a large buffer the kernel is about to write for the
// first time (a fresh gradient of millions of elements): a few faults instead of one per 4 KiB page. Where huge
// pages are off (or already mapped pages) the call changes nothing.
inline void huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = ((uintptr_t)data + huge - 1) & ~(huge - 1), end = ((uintptr_t)data + bytes) & ~(huge - 1);
  if (end > begin) madvise((void*)begin, end - begin, MADV_HUGEPAGE);
#else
  (void)data; (void)bytes;
#endif
}

// Vectors of the GCC/Clang vector extension: 32 bytes where the build has AVX, else 16 (SSE2, NEON, VSX); unaligned,
// and they may alias their element type.
#if defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif
typedef float vf32 __attribute__((vector_size(VBYTES), aligned(4), may_alias));
typedef double vf64 __attribute__((vector_size(VBYTES), aligned(8), may_alias));
template <typename T> struct Simd;
template <> struct Simd<float> { typedef vf32 V; static constexpr int L = VBYTES / 4; };
template <> struct Simd<double> { typedef vf64 V; static constexpr int L = VBYTES / 8; };

// Four independent vector partial sums (no long dependency chain), added in a fixed tree, then the tail: a fixed
// order, so results are deterministic.
template <typename T> inline T dot(const T* __restrict a, const T* __restrict b, int64_t d) {
  typedef typename Simd<T>::V V;
  constexpr int L = Simd<T>::L;
  V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t i = 0;
  for (; i + 4 * L <= d; i += 4 * L) {
    acc0 += *(const V*)(a + i) * *(const V*)(b + i);
    acc1 += *(const V*)(a + i + L) * *(const V*)(b + i + L);
    acc2 += *(const V*)(a + i + 2 * L) * *(const V*)(b + i + 2 * L);
    acc3 += *(const V*)(a + i + 3 * L) * *(const V*)(b + i + 3 * L);
  }
  for (; i + L <= d; i += L) acc0 += *(const V*)(a + i) * *(const V*)(b + i);
  V v = (acc0 + acc1) + (acc2 + acc3);
  for (int width = L / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) v[l] += v[l + width];
  T sum = v[0];
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// y = a·x (Overwrite) or y += a·x over d elements, in whole vectors then the tail.
template <bool Overwrite, typename T> inline void axpy(T* __restrict y, T a, const T* __restrict x, int64_t d) {
  typedef typename Simd<T>::V V;
  constexpr int L = Simd<T>::L;
  int64_t i = 0;
  for (; i + L <= d; i += L) {
    if (Overwrite) *(V*)(y + i) = a * *(const V*)(x + i);
    else *(V*)(y + i) += a * *(const V*)(x + i);
  }
  for (; i < d; ++i) y[i] = Overwrite ? a * x[i] : y[i] + a * x[i];
}

// Prefetches the first `bytes` of a row that is likely not cached (a random table row, or a gradient row visited in
// row-sorted order); the hardware streams the rest of a longer row.
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch((const char*)row + byte);
}

// out[p] = values[idx[p]] . x[b]; grouped (the grouped read's weights' gradient): out[p·M + c] is chunk c's
// (width D/M) dot of values[idx[p]] with x[b·G + group[p]].
template <typename T, bool Grouped>
void gather_dot(const T* values, const int64_t* idx, const T* x, int64_t B, int64_t K, int64_t D, T* out,
                const int64_t* group, int64_t G, int64_t M, int threads) {
  const int64_t P = B * K, ahead = 8;  // prefetch the table row `ahead` positions on: random rows, rarely cached
  const int64_t prefetch_bytes = std::min<int64_t>(D * (int64_t)sizeof(T), 512);  // the hardware streams the rest
  const int64_t width = Grouped ? D / M : D;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && B > 1)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = b * K + j;
      if (p + ahead < P) prefetch_row(values + idx[p + ahead] * D, prefetch_bytes);
      if (!Grouped) {
        out[p] = dot(values + idx[p] * D, x + b * D, D);
        continue;
      }
      const T* row = values + idx[p] * D;
      const T* src = x + (b * G + group[p]) * D;
      for (int64_t c = 0; c < M; ++c) out[p * M + c] = dot(row + c * width, src + c * width, width);
    }
}

// out[d0 + v·L ...] for NV vectors of columns = Σ over the group's positions j of w[j, chunk] · values[idx[j]] there
// (members: the group's positions in the bag, w: the bag's (K, M) weights), summed in NV vector registers; with
// prefetch_bytes > 0 the row two members ahead is prefetched.
template <int NV, typename T>
inline void group_columns(const T* values, const int64_t* idx, const int64_t* members, int64_t count, const T* w,
                          int64_t M, int64_t width, int64_t D, int64_t d0, int64_t prefetch_bytes, T* out) {
  typedef typename Simd<T>::V V;
  constexpr int L = Simd<T>::L;
  V acc[NV] = {};
  int64_t chunk[NV];
  for (int v = 0; v < NV; ++v) chunk[v] = (d0 + v * L) / width;
  for (int64_t m = 0; m < count; ++m) {
    const int64_t j = members[m];
    if (prefetch_bytes > 0 && m + 2 < count) prefetch_row(values + idx[members[m + 2]] * D, prefetch_bytes);
    const T* row = values + idx[j] * D + d0;
    for (int v = 0; v < NV; ++v) acc[v] += w[j * M + chunk[v]] * *(const V*)(row + v * L);
  }
  for (int v = 0; v < NV; ++v) *(V*)(out + d0 + v * L) = acc[v];
}

// Grouped multi-chunk read, bags in parallel: the bag's K positions are bucketed by group (a counting sort of
// K), then each group's output is summed in vector registers tile by tile (8 vectors of columns at a time) over
// its positions, chunk c (width D/M) of a row weighted by w[p, c]; a group no position names is written as zeros.
// Each table row is read once, the row a few positions ahead prefetched.
template <typename T>
void grouped_gather(const T* values, const int64_t* idx, const int64_t* group, const T* w, int64_t B, int64_t K,
                    int64_t G, int64_t M, int64_t D, T* out, int threads) {
  constexpr int L = Simd<T>::L, TILE = 8;
  const int64_t width = D / M;
  const bool vector_chunks = width % L == 0;  // every vector of a row lies in one chunk
  const int64_t prefetch_bytes = std::min<int64_t>(D * (int64_t)sizeof(T), 512);
#pragma omp parallel num_threads(threads) if (threads > 1 && B > 1)
  {
    std::vector<int64_t> start(G + 1), members(K);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t* g_b = group + b * K;
      std::fill(start.begin(), start.end(), 0);
      for (int64_t j = 0; j < K; ++j) ++start[g_b[j] + 1];
      for (int64_t s = 0; s < G; ++s) start[s + 1] += start[s];
      for (int64_t j = 0; j < K; ++j) members[start[g_b[j]]++] = j;  // start[s] is now group s's end
      for (int64_t s = G; s > 0; --s) start[s] = start[s - 1];
      start[0] = 0;
      for (int64_t s = 0; s < G; ++s) {
        T* o = out + (b * G + s) * D;
        const int64_t first = start[s], last = start[s + 1];
        int64_t d0 = 0;
        if (vector_chunks) {
          for (; d0 + TILE * L <= D; d0 += TILE * L)  // whole tiles of TILE vectors, then single vectors
            group_columns<TILE>(values, idx + b * K, members.data() + first, last - first, w + b * K * M, M, width, D,
                                d0, d0 == 0 ? prefetch_bytes : 0, o);
          for (; d0 + L <= D; d0 += L)
            group_columns<1>(values, idx + b * K, members.data() + first, last - first, w + b * K * M, M, width, D,
                             d0, 0, o);
        }
        for (int64_t d = d0; d < D; ++d) {  // the columns left (all of them when chunks split vectors)
          const int64_t chunk = d / width;
          T acc = T(0);
          for (int64_t m = first; m < last; ++m) {
            const int64_t p = b * K + members[m];
            acc += w[p * M + chunk] * values[idx[p] * D + d];
          }
          o[d] = acc;
        }
      }
    }
  }
}

// Whether every idx[0..n) lies in [0, limit): the kernels read and write table rows (and sort buckets) at these
// indices, so one outside would touch memory that is not theirs. Branch-free; O(n) next to the kernels' O(n·D).
inline bool all_below(const int64_t* idx, int64_t n, int64_t limit) {
  uint64_t outside = 0;
  for (int64_t p = 0; p < n; ++p) outside |= (uint64_t)(uint64_t(idx[p]) >= uint64_t(limit));
  return outside == 0;
}

// order (P,): positions sorted by row, stable; run_start (P+1,): where each distinct row's run starts. Returns U.
int64_t sort_by_row(const int64_t* idx, int64_t P, int64_t N, int64_t* order, int64_t* run_start) {
  if (P == 0) { run_start[0] = 0; return 0; }
  if (N <= 4 * P) {  // counting sort; the runs are the rows counted, read off the prefix sums in row order
    std::vector<int64_t> start(N + 1, 0);
    for (int64_t p = 0; p < P; ++p) ++start[idx[p] + 1];
    int64_t U = 0;
    for (int64_t r = 0; r < N; ++r) {
      if (start[r + 1] != 0) run_start[U++] = start[r];
      start[r + 1] += start[r];
    }
    run_start[U] = P;
    for (int64_t p = 0; p < P; ++p) order[start[idx[p]]++] = p;
    return U;
  } else {
    std::vector<int64_t> key(P);
    for (int64_t p = 0; p < P; ++p) key[p] = idx[p] * P + p;
    std::sort(key.begin(), key.end());
    for (int64_t p = 0; p < P; ++p) order[p] = key[p] % P;
  }
  int64_t U = 0;
  for (int64_t q = 0; q < P; ++q)
    if (q == 0 || idx[order[q]] != idx[order[q - 1]]) run_start[U++] = q;
  run_start[U] = P;
  return U;
}

""" + DIVIDER_CPP + r"""
// The source row of position p in scatter_dot: src[p/K], or Grouped src[(p/K)·Gs + group[p]] (D wide).
template <bool Grouped, typename T>
inline const T* source_row(const T* src, const Divider& bag, const int64_t* group, int64_t Gs, int64_t D, int64_t p) {
  return src + (Grouped ? bag.div(p) * Gs + group[p] : bag.div(p)) * D;
}

// How many positions ahead scatter_dot prefetches a source row (positions sorted by row visit the bags at random:
// rows of a gradient of a few MiB, from L3). Plain: 8 (5-15% faster than none at D 96 and 128, 196k positions; 4
// to 16 alike; no change at D 512); Grouped: 4.
template <bool Grouped> constexpr int64_t source_ahead() { return Grouped ? 4 : 8; }

// Chunk c (width W = NV vectors) of one run of scatter_dot (positions q0..q1 of one row): the chunk's sum held in
// NV vector registers over the run (no load and store of it per position), the source chunk read once for both
// the sum and the dot; the same additions in the same order as the run loop of scatter_dot below. Plain: one chunk,
// the source row src[p/K]; Grouped: the source row src[(p/K)·Gs + group[p]] (D wide) and the weight w[p·M + c].
// The weight 16 positions on (q_end: where all runs end) is prefetched: positions sorted by row visit the weights
// (and the bags) in random order; in the first chunk's pass also the source row source_ahead() positions on, whose
// later chunks (Grouped) the run's other passes then find in L1.
template <typename T, int NV, bool Grouped>
inline void run_chunk_in_registers(const T* __restrict src, const T* __restrict w, const T* __restrict row,
                                   const int64_t* __restrict order, int64_t q0, int64_t q1, int64_t q_end,
                                   const Divider& bag, const int64_t* __restrict group, int64_t Gs, int64_t D,
                                   int64_t M, int64_t c, T* __restrict out, T* __restrict dots, int64_t dots_from) {
  typedef typename Simd<T>::V V;
  constexpr int L = Simd<T>::L, W = NV * L;
  const int64_t chunk = Grouped ? c : 0, lo = chunk * W, chunks = Grouped ? M : 1;  // plain: constants
  const int64_t prefetch_bytes = std::min<int64_t>(D * (int64_t)sizeof(T), 512);
  const int64_t source_width = Grouped ? D : W;  // plain: W == D, a constant here
  constexpr int64_t ahead = source_ahead<Grouped>();
  V acc[NV];
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t p = order[q];
    const T* __restrict s = source_row<Grouped>(src, bag, group, Gs, source_width, p) + lo;
    if (q + 16 < q_end) __builtin_prefetch(w + order[q + 16] * chunks);
    if (chunk == 0 && q + ahead < q_end)
      prefetch_row(source_row<Grouped>(src, bag, group, Gs, source_width, order[q + ahead]), prefetch_bytes);
    const V wv = w[p * chunks + chunk] - V{};  // w - (+0) is w, -0 included
    if (q == q0) for (int v = 0; v < NV; ++v) acc[v] = wv * *(const V*)(s + v * L);
    else for (int v = 0; v < NV; ++v) acc[v] += wv * *(const V*)(s + v * L);
    if (row != nullptr && p >= dots_from) dots[(p - dots_from) * chunks + chunk] = dot(row + lo, s, W);
  }
  for (int v = 0; v < NV; ++v) *(V*)(out + lo + v * L) = acc[v];
}

// A run in registers, chunk by chunk, when a chunk (D, or D/M Grouped) is a whole number of at most REGISTER_SUMS
// vectors (16 with AVX-512's 32 vector registers, 8 with 16); false where it does not apply (the caller takes the
// loop in memory).
#if defined(__AVX512F__)
constexpr int REGISTER_SUMS = 16;
#else
constexpr int REGISTER_SUMS = 8;
#endif
template <typename T, bool Grouped>
inline bool run_in_registers(const T* src, const T* w, const T* row, const int64_t* order, int64_t q0, int64_t q1,
                             int64_t q_end, const Divider& bag, const int64_t* group, int64_t Gs, int64_t D,
                             int64_t M, T* out, T* dots, int64_t dots_from) {
  constexpr int L = Simd<T>::L;
  const int64_t chunks = Grouped ? M : 1, width = D / chunks;
  if (width % L != 0 || width / L > REGISTER_SUMS) return false;
  for (int64_t c = 0; c < chunks; ++c) {
    switch (width / L) {
#define MEMZOO_RUN_NV(NV)                                                                                         \
      case NV:                                                                                                    \
        run_chunk_in_registers<T, NV, Grouped>(src, w, row, order, q0, q1, q_end, bag, group, Gs, D, M, c, out, \
                                               dots, dots_from);                                                  \
        break;
      MEMZOO_RUN_NV(1) MEMZOO_RUN_NV(2) MEMZOO_RUN_NV(3) MEMZOO_RUN_NV(4) MEMZOO_RUN_NV(5) MEMZOO_RUN_NV(6)
      MEMZOO_RUN_NV(7) MEMZOO_RUN_NV(8) MEMZOO_RUN_NV(9) MEMZOO_RUN_NV(10) MEMZOO_RUN_NV(11) MEMZOO_RUN_NV(12)
      MEMZOO_RUN_NV(13) MEMZOO_RUN_NV(14) MEMZOO_RUN_NV(15) MEMZOO_RUN_NV(16)
#undef MEMZOO_RUN_NV
      default: return false;
    }
  }
  return true;
}

// For each run u (row r), rows in parallel: G[r] = sum_p w[p] src[p/K] into sums[u] (or dense[r]), positions in
// order, the first one writing (no zero pass); with values, dots[p - dots_from] = values[r] . src[p/K] for
// p >= dots_from in the same pass (the row values[r] stays in L1 over its run, src[p/K] is read once for both).
// A dense G gets zeros only in the rows no run touches.
// Grouped (grouped_gather's backward): the source row of p is src[(p/K)·Gs + group[p]] and its M chunks of width
// D/M have their own weights w[p·M + c] and dots dots[(p - dots_from)·M + c].
template <typename T, bool Grouped>
void scatter_dot(const T* src, const int64_t* idx, const T* w, const T* values, const int64_t* order,
                 const int64_t* run_start, int64_t U, int64_t K, int64_t D, int64_t N, int64_t* rows, T* sums,
                 T* dense, T* dots, int64_t dots_from, const int64_t* group, int64_t Gs, int64_t M, int threads) {
  const Divider bag(K);
  const int64_t chunks = Grouped ? M : 1, width = D / chunks;  // plain: one chunk, a constant the loops fold
  if (dense != nullptr) huge_pages(dense, N * D * (int64_t)sizeof(T));
  else huge_pages(sums, U * D * (int64_t)sizeof(T));
  const int64_t prefetch_bytes = std::min<int64_t>(D * (int64_t)sizeof(T), 512);  // the hardware streams the rest
#pragma omp parallel num_threads(threads) if (threads > 1 && U > 1)
  {
#pragma omp for schedule(dynamic, 64) nowait
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = idx[order[run_start[u]]];
      if (rows != nullptr) rows[u] = r;
      T* __restrict acc = dense != nullptr ? dense + r * D : sums + u * D;
      const T* __restrict row = values != nullptr ? values + r * D : nullptr;
      if (values != nullptr && u + 2 < U)  // the table row two runs ahead: a random row, likely not cached
        prefetch_row(values + idx[order[run_start[u + 2]]] * D, prefetch_bytes);
      if (run_in_registers<T, Grouped>(src, w, row, order, run_start[u], run_start[u + 1], run_start[U], bag, group,
                                       Gs, D, M, acc, dots, dots_from))
        continue;
      for (int64_t q = run_start[u]; q < run_start[u + 1]; ++q) {
        const int64_t p = order[q];
        constexpr int64_t ahead = source_ahead<Grouped>();
        if (q + ahead < run_start[U])  // a source row a few positions on
          prefetch_row(source_row<Grouped>(src, bag, group, Gs, D, order[q + ahead]), prefetch_bytes);
        const T* s = source_row<Grouped>(src, bag, group, Gs, D, p);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t lo = c * width;
          if (q == run_start[u]) axpy<true>(acc + lo, w[p * chunks + c], s + lo, width);
          else axpy<false>(acc + lo, w[p * chunks + c], s + lo, width);
          if (row != nullptr && p >= dots_from) dots[(p - dots_from) * chunks + c] = dot(row + lo, s + lo, width);
        }
      }
    }
    if (dense != nullptr) {  // the gaps between consecutive touched rows (ascending), and after the last
#pragma omp for schedule(static)
      for (int64_t u = 0; u <= U; ++u) {
        const int64_t first = u == 0 ? 0 : idx[order[run_start[u - 1]]] + 1;
        const int64_t last = u == U ? N : idx[order[run_start[u]]];
        for (int64_t j = first * D; j < last * D; ++j) dense[j] = T(0);
      }
    }
  }
}

// LazyAdam on rows (or every row when rows == nullptr), in place; grad (U, D) row u belongs to table row rows[u].
template <typename T>
void adam_rows(T* param, T* m, T* v, int64_t* step, const int64_t* rows, const T* grad, int64_t U, int64_t D,
               double lr, double beta1, double beta2, double eps, double wd, int threads) {
  const T decay = T(1.0 - lr * wd), one_minus_b1 = T(1.0 - beta1), b2 = T(beta2), one_minus_b2 = T(1.0 - beta2);
#pragma omp parallel num_threads(threads) if (threads > 1 && U > 1)
  {
    // the bias corrections of the last step count seen: rows touched together share it, so pow runs once per
    // distinct count rather than twice per row
    int64_t seen = -1;
    T eps_c = T(0), scale = T(0);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < U; ++u) {
      const int64_t r = rows != nullptr ? rows[u] : u;
      const int64_t t = ++step[r];
      if (t != seen) {
        const double c1 = 1.0 - std::pow(beta1, (double)t), c2 = std::sqrt(1.0 - std::pow(beta2, (double)t));
        eps_c = T(eps * c2);
        scale = T(c1 / (lr * c2));
        seen = t;
      }
      T* p = param + r * D; T* mr = m + r * D; T* vr = v + r * D;
      const T* g = grad + u * D;
      for (int64_t d = 0; d < D; ++d) {
        T pd = wd != 0.0 ? p[d] * decay : p[d];
        const T gd = g[d];
        const T md = mr[d] + one_minus_b1 * (gd - mr[d]);
        const T vd = vr[d] * b2 + one_minus_b2 * gd * gd;
        mr[d] = md; vr[d] = vd;
        p[d] = pd - md / ((std::sqrt(vd) + eps_c) * scale);
      }
    }
  }
}
}  // namespace

// The entry points return 0, or without touching any output OUT_OF_RANGE when an index is outside [0, N) and
// GROUP_OUT_OF_RANGE when a group is outside [0, G) (the caller names the value; see all_below). scatter_dot's
// indices were checked by memzoo_sort_by_row, whose order and runs it takes.
constexpr int OUT_OF_RANGE = 1, GROUP_OUT_OF_RANGE = 2;
#define MEMZOO_READ_KERNELS(T, S)                                                                                  \
  extern "C" int memzoo_gather_dot_##S(const T* v, int64_t N, const int64_t* i, const T* x, int64_t B, int64_t K,  \
                                       int64_t D, T* o, const int64_t* g, int64_t G, int64_t M, int th) {          \
    if (!all_below(i, B * K, N)) return OUT_OF_RANGE;                                                              \
    if (g != nullptr && !all_below(g, B * K, G)) return GROUP_OUT_OF_RANGE;                                        \
    if (g == nullptr) gather_dot<T, false>(v, i, x, B, K, D, o, g, 1, 1, th);                                      \
    else gather_dot<T, true>(v, i, x, B, K, D, o, g, G, M, th);                                                    \
    return 0; }                                                                                                    \
  extern "C" int memzoo_scatter_dot_##S(const T* s, const int64_t* i, const T* w, const T* v, const int64_t* o,    \
                                        const int64_t* rs, int64_t U, int64_t K, int64_t D, int64_t N, int64_t* rows, \
                                        T* sums, T* dense, T* dots, int64_t df, const int64_t* g, int64_t G,       \
                                        int64_t M, int th) {                                                       \
    if (g != nullptr && !all_below(g, rs[U], G)) return GROUP_OUT_OF_RANGE;                                        \
    if (g == nullptr) scatter_dot<T, false>(s, i, w, v, o, rs, U, K, D, N, rows, sums, dense, dots, df, g, 1, 1, th); \
    else scatter_dot<T, true>(s, i, w, v, o, rs, U, K, D, N, rows, sums, dense, dots, df, g, G, M, th);            \
    return 0; }                                                                                                    \
  extern "C" int memzoo_grouped_gather_##S(const T* v, int64_t N, const int64_t* i, const int64_t* g, const T* w,  \
                                           int64_t B, int64_t K, int64_t G, int64_t M, int64_t D, T* o, int th) {   \
    if (!all_below(i, B * K, N)) return OUT_OF_RANGE;                                                              \
    if (!all_below(g, B * K, G)) return GROUP_OUT_OF_RANGE;                                                        \
    grouped_gather<T>(v, i, g, w, B, K, G, M, D, o, th); return 0; }                                               \
  extern "C" int memzoo_adam_rows_##S(T* p, int64_t N, T* m, T* v, int64_t* st, const int64_t* rows, const T* g,   \
                                      int64_t U, int64_t D, double lr, double b1, double b2, double eps, double wd, \
                                      int th) {                                                                    \
    if (rows != nullptr ? !all_below(rows, U, N) : U != N) return OUT_OF_RANGE;                                    \
    adam_rows<T>(p, m, v, st, rows, g, U, D, lr, b1, b2, eps, wd, th); return 0; }

MEMZOO_READ_KERNELS(float, f32)
MEMZOO_READ_KERNELS(double, f64)

// U, or -1 (nothing written) when an index is outside [0, N).
extern "C" int64_t memzoo_sort_by_row(const int64_t* idx, int64_t P, int64_t N, int64_t* order, int64_t* rs) {
  if (!all_below(idx, P, N)) return -1;
  return sort_by_row(idx, P, N, order, rs);
}
"""

_KERNELS = CompiledLibrary("the C++ sparse-read kernels", lambda: _build())
available = _KERNELS.available
library = _KERNELS.library


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the compiled path: all on CPU, one dtype (float32 or float64), and the
    kernels built."""
    dtype = tensors[0].dtype
    if dtype not in FLOAT_SUFFIX or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return available()


def _build() -> ctypes.CDLL:
    lib = compile_library("memzoo_sparse_read", "sparse_read.cpp", SOURCE, ["-fno-math-errno"])
    i64, ptr, f64, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    declare_float_kernels(lib, {
        "gather_dot": [ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, cint],
        "scatter_dot": [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, i64, i64, cint],
        "grouped_gather": [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, cint],
        "adam_rows": [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, f64, f64, f64, f64, f64, cint],
    })
    lib.memzoo_sort_by_row.argtypes, lib.memzoo_sort_by_row.restype = [ptr, i64, i64, ptr, ptr], i64
    return lib


def _kernel(name: str, dtype: torch.dtype):
    return _KERNELS.float_kernel(name, dtype)


def _ptr(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.data_ptr()


def _check_layout(op: str, dtype: torch.dtype, shapes: dict[str, tuple[torch.Tensor | None, tuple[int, ...]]],
                  floats: tuple[str, ...]) -> None:
    """What the kernels assume of their arguments, in O(1): each ``shapes[name] = (tensor, shape)`` (``None``
    tensors skipped) a contiguous CPU tensor of exactly ``shape``, of ``dtype`` (float32 or float64) when its name
    is in ``floats``, else int64. A ``ValueError`` naming the argument otherwise: the kernels read and write raw
    row-major memory, so another layout would touch memory that is not the tensor's."""
    where = f"memzoo.ops.cpu_read.{op}"
    if dtype not in FLOAT_SUFFIX:
        raise ValueError(f"{where}: float32 or float64 tensors only, got {dtype}")
    for name, (tensor, shape) in shapes.items():
        if tensor is None:
            continue
        want = dtype if name in floats else torch.int64
        if tensor.dtype != want:
            raise ValueError(f"{where}: {name} must be {want}, got {tensor.dtype}")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{where}: {name} must be a contiguous CPU tensor (got device {tensor.device}, strides "
                             f"{tensor.stride()}); call .contiguous() first")
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def _raise_out_of_range(op: str, status: int, indices: torch.Tensor, limit: int,
                        groups: torch.Tensor | None = None, n_groups: int = 0, name: str = "indices") -> None:
    """A kernel's refusal (status 1: an index outside ``[0, limit)``, 2: a group outside ``[0, n_groups)``; it
    wrote nothing) as an ``IndexError`` naming the first such value; nothing for status 0."""
    if status == 0:
        return
    tensor, bound, what = (indices, limit, name) if status == 1 else (groups, n_groups, "groups")
    flat = tensor.reshape(-1)
    bad = int(flat[(flat < 0) | (flat >= bound)][0])
    raise IndexError(f"memzoo.ops.cpu_read.{op}: {what} holds {bad}, outside [0, {bound})")


def gather_dot(values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor,
               groups: torch.Tensor | None = None, chunks: int = 1) -> torch.Tensor:
    """``values (N, D)``, ``indices (B, K)`` int64 in ``[0, N)``, ``x (B, D)``, contiguous, one dtype → ``(B, K)``:
    ``values[idx[b,j]] · x[b]``.

    With ``groups (B, K)`` int64 in ``[0, S)`` (the weights' gradient of :func:`grouped_gather`): ``x (B, S, D)`` →
    ``(B, K, chunks)``, chunk ``c``'s (width ``D/chunks``) dot of ``values[idx[b,j]]`` with ``x[b, groups[b,j]]``.
    Time ``O(B·K·D)``. Every kernel here checks its layouts (``ValueError``) and its indices and groups
    (``IndexError``, in the kernel: O(B·K)) before it reads or writes anything."""
    n_bags, n_per_bag = indices.shape
    n_rows, dim = values.shape
    n_groups = 1 if groups is None else x.shape[1]
    _check_layout("gather_dot", values.dtype, {
        "values": (values, (n_rows, dim)), "indices": (indices, (n_bags, n_per_bag)),
        "groups": (groups, (n_bags, n_per_bag)), "x": (x, (n_bags, dim) if groups is None else (n_bags, n_groups, dim)),
    }, floats=("values", "x"))
    out = values.new_empty(n_bags, n_per_bag, *(() if groups is None else (chunks,)))
    status = _kernel("gather_dot", values.dtype)(
        values.data_ptr(), n_rows, indices.data_ptr(), x.data_ptr(), n_bags, n_per_bag, dim, out.data_ptr(),
        _ptr(groups), n_groups, chunks, torch.get_num_threads(),
    )
    _raise_out_of_range("gather_dot", status, indices, n_rows, groups, n_groups)
    return out


def scatter_dot(
    src: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, values: torch.Tensor | None, num_rows: int,
    dense: bool, dots_from_bag: int = 0, groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """``src (B, D)``, ``indices (B, K)`` int64 in ``[0, num_rows)``, ``weights (B, K)``, ``values (num_rows, D)``
    or ``None``; contiguous, one dtype → ``(rows, G, dots)``:

    - ``G[r] = Σ_{idx[b,j]=r} weights[b,j] · src[b]``: with ``dense`` a ``(num_rows, D)`` tensor (zero in rows not
      indexed) and ``rows = None``; else the ``U`` distinct rows ascending ``rows (U,)`` and ``G (U, D)``;
    - ``dots[b,j] = values[idx[b,j]] · src[b]`` ``(B, K)`` (``None`` when ``values`` is ``None``); only for the
      bags from ``dots_from_bag`` on: ``(B - dots_from_bag, K)``.

    With ``groups (B, K)`` int64 in ``[0, S)`` (:func:`grouped_gather`'s backward): ``src (B, S, D)`` and ``weights
    (B, K, M)``, one weight per chunk of width ``D/M``; position ``(b, j)`` takes ``src[b, groups[b,j]]`` and chunk
    ``c`` of ``G[r]`` sums ``weights[b,j,c]`` times its chunk ``c``; ``dots (B - dots_from_bag, K, M)`` are the
    chunks' dot products.

    One pass over the ``B·K`` positions sorted by row; time ``O(B·K·D)`` plus the sort.
    """
    n_bags, n_per_bag = indices.shape
    n_positions, dim = n_bags * n_per_bag, src.shape[-1]
    chunks = 1 if groups is None else weights.shape[2]
    n_groups = 1 if groups is None else src.shape[1]
    if not 0 <= dots_from_bag <= n_bags:
        raise ValueError(f"memzoo.ops.cpu_read.scatter_dot: dots_from_bag={dots_from_bag} outside [0, {n_bags}]")
    bag_shape = (n_bags, n_per_bag)
    _check_layout("scatter_dot", src.dtype, {
        "src": (src, (n_bags, dim) if groups is None else (n_bags, n_groups, dim)), "indices": (indices, bag_shape),
        "weights": (weights, bag_shape if groups is None else (*bag_shape, chunks)), "groups": (groups, bag_shape),
        "values": (values, (num_rows, dim)),
    }, floats=("src", "weights", "values"))
    order = torch.empty(n_positions, dtype=torch.int64)
    run_start = torch.empty(n_positions + 1, dtype=torch.int64)
    library_ = _KERNELS.require()
    n_runs = library_.memzoo_sort_by_row(indices.data_ptr(), n_positions, num_rows, order.data_ptr(),
                                         run_start.data_ptr())
    _raise_out_of_range("scatter_dot", 1 if n_runs < 0 else 0, indices, num_rows)
    if dense:  # the kernel writes every row: its sums, or zeros where no index points
        rows, grad = None, src.new_empty(num_rows, dim)
    else:
        rows, grad = torch.empty(n_runs, dtype=torch.int64), src.new_empty(n_runs, dim)
    dots = None
    if values is not None:
        dots = src.new_empty(n_bags - dots_from_bag, n_per_bag, *(() if groups is None else (chunks,)))
    status = _kernel("scatter_dot", src.dtype)(
        src.data_ptr(), indices.data_ptr(), weights.data_ptr(), _ptr(values), order.data_ptr(),
        run_start.data_ptr(), n_runs, n_per_bag, dim, num_rows, _ptr(rows), None if dense else grad.data_ptr(),
        grad.data_ptr() if dense else None, _ptr(dots), dots_from_bag * n_per_bag, _ptr(groups), n_groups, chunks,
        torch.get_num_threads(),
    )
    _raise_out_of_range("scatter_dot", status, indices, num_rows, groups, n_groups)
    return rows, grad, dots


def grouped_gather(values: torch.Tensor, indices: torch.Tensor, groups: torch.Tensor, weights: torch.Tensor,
                   n_groups: int) -> torch.Tensor:
    """``values (N, D)``, ``indices, groups (B, K)`` int64 (indices in ``[0, N)``, groups in ``[0, n_groups)``),
    ``weights (B, K, M)`` with ``M`` dividing ``D``; contiguous, one dtype → ``out (B, n_groups, D)``: chunk ``c``
    (width ``D/M``) of ``out[b, g]`` is ``Σ_{j: groups[b,j]=g} weights[b,j,c] · values[indices[b,j]]``'s chunk
    ``c``. One read of each indexed row; time ``O(B·K·D + B·n_groups·D)``."""
    n_bags, n_per_bag = indices.shape
    n_rows, dim = values.shape
    chunks = weights.shape[-1]
    if chunks < 1 or dim % chunks:
        raise ValueError(f"memzoo.ops.cpu_read.grouped_gather: {chunks} weights a position do not divide D={dim}")
    _check_layout("grouped_gather", values.dtype, {
        "values": (values, (n_rows, dim)), "indices": (indices, (n_bags, n_per_bag)),
        "groups": (groups, (n_bags, n_per_bag)), "weights": (weights, (n_bags, n_per_bag, chunks)),
    }, floats=("values", "weights"))
    out = values.new_empty(n_bags, n_groups, dim)
    status = _kernel("grouped_gather", values.dtype)(
        values.data_ptr(), n_rows, indices.data_ptr(), groups.data_ptr(), weights.data_ptr(), n_bags, n_per_bag,
        n_groups, chunks, dim, out.data_ptr(), torch.get_num_threads(),
    )
    _raise_out_of_range("grouped_gather", status, indices, n_rows, groups, n_groups)
    return out


def adam_rows_(
    param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: torch.Tensor,
    rows: torch.Tensor | None, grad: torch.Tensor, lr: float, betas: tuple[float, float], eps: float,
    weight_decay: float,
) -> None:
    """LazyAdam's update (:class:`memzoo.training.rowwise_optim.LazyAdam`) in place on ``param, exp_avg, exp_avg_sq (N, D)``
    and ``step (N,)`` int64 for the rows ``rows (U,)`` int64 (distinct, in ``[0, N)``; ``None``: every row,
    ``U = N``) with their gradients ``grad (U, D)``; all contiguous, one float dtype on CPU. Rows in parallel, one
    pass each. Layouts and rows are checked first, as :func:`gather_dot`'s."""
    n_table_rows, dim = param.shape
    n_rows = grad.shape[0]
    table = (n_table_rows, dim)
    _check_layout("adam_rows_", param.dtype, {
        "param": (param, table), "exp_avg": (exp_avg, table), "exp_avg_sq": (exp_avg_sq, table),
        "step": (step, (n_table_rows,)), "rows": (rows, (n_rows,)),
        "grad": (grad, (n_rows if rows is not None else n_table_rows, dim)),
    }, floats=("param", "exp_avg", "exp_avg_sq", "grad"))
    if rows is not None and n_rows == 0:  # no row touched (an empty tensor's data pointer is NULL: "every row")
        return
    status = _kernel("adam_rows", param.dtype)(
        param.data_ptr(), n_table_rows, exp_avg.data_ptr(), exp_avg_sq.data_ptr(), step.data_ptr(), _ptr(rows),
        grad.data_ptr(), n_rows, dim, float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay),
        torch.get_num_threads(),
    )
    if rows is not None:
        _raise_out_of_range("adam_rows_", status, rows, n_table_rows, name="rows")
