"""The C++/OpenMP CPU kernels of :func:`memzoo.ops.tucker_topk`: the selection (which ``knn`` cells of a Tucker grid
a query keeps, one pass per query) and the kept cells' per-core scores with their backward.

For query ``q``: ``rows, cols (n, r)``, the core sum ``S (r, r)`` and its top singular vectors ``u, v (r,)``:

1. ``row_proj[i] = rows[i] · u`` and ``col_proj[j] = cols[j] · v``; the ``m`` best of each (``m = candidates``);
2. ``ranking[a, b] = rows[i_a] · S · cols[j_b]`` over those ``m × m`` cells (``rows[i_a] · S`` once per row);
3. the ``knn`` best cells, best first: ``i = i_a``, ``j = j_b``.

The same steps as the PyTorch path of :func:`~memzoo.ops.tucker_topk.tucker_topk` (three ``topk`` calls and four
batched matmuls with inner sizes of ``r`` and ``m``, each a separate pass over ``(Q, ...)`` buffers), here in
registers and a few ``m``-sized arrays per query: ``O(n·r + m·r² + m²·r + m²)`` work per query, no ``(Q, m, m)``
buffer. Each "best of" (m of n, knn of m²) bisects on the values' order-preserving integer keys with vectorised
counts until few enough remain, keeps those in one (AVX-512 compress) pass and ranks them by counting (8 against
one at a time; a sort past 128 of them): about ``2n`` plus ``m²/8`` or ``knn²/8`` compares, no insertion moves.
Selections use NaN-first order as ``torch.topk`` (a NaN ranks above every number; a NaN takes an insertion buffer or
partial sort instead); equal values keep the lower index first. Sums are
taken in index order, so a ranking that differs from PyTorch's only in the last bit can choose the other of two
near-tied cells (either is a top-``knn`` cell under float rounding).

The kept cells' scores (:func:`cell_scores`, :func:`cell_scores_backward`): ``rows[i] · C_c · cols[j]`` for each cell
and core, and the gradients in rows, cols and cores, in one pass over the ``Q·knn`` cells each; in PyTorch ops they
are a gather, a broadcast outer product with inner size ``r`` (2 in UltraMem) and a matmul, whose backward is as
many passes again, each dominated by per-call overhead at these sizes.

float32 and float64, contiguous CPU tensors. Built with ``torch.utils.cpp_extension.load`` on first use and called
through ``ctypes``, as the other kernels of :mod:`memzoo.ops` (same cache, same ``MEMZOO_CPU_KERNELS=0`` switch, one
warning when it cannot be built).
"""

from __future__ import annotations

import ctypes

import torch

from memzoo.ops.cpu_build import FLOAT_SUFFIX, CompiledLibrary, compile_library, declare_float_kernels

__all__ = ["available", "cell_scores", "cell_scores_backward", "library", "supports", "tucker_select"]

SOURCE = r"""
#include <cstdint>
#include <vector>
#include <algorithm>
#include <limits>
#include <type_traits>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
// a ranks before b: larger, NaN above every number (as torch.topk); ties: the lower index first
template <typename T> inline bool before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

// the m best of v[0..n), best first, into idx (m <= n): a sorted insertion buffer for m <= 64 (on random data about
// m·ln(n/m) insertions; at most n·m moves), else a partial sort
template <typename T>
void best_of(const T* v, int64_t n, int64_t m, int32_t* idx, std::vector<int32_t>& order) {
  if (m <= 64) {
    int64_t size = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (size == m && !before(v[i], i, v[idx[m - 1]], (int64_t)idx[m - 1])) continue;
      int64_t pos = size < m ? size++ : m - 1;
      while (pos > 0 && before(v[i], i, v[idx[pos - 1]], (int64_t)idx[pos - 1])) { idx[pos] = idx[pos - 1]; --pos; }
      idx[pos] = (int32_t)i;
    }
    return;
  }
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) order[i] = (int32_t)i;
  std::partial_sort(order.begin(), order.begin() + m, order.end(),
                    [&](int32_t a, int32_t b) { return before(v[a], (int64_t)a, v[b], (int64_t)b); });
  std::copy(order.begin(), order.begin() + m, idx);
}

// Order-preserving integer keys: a > b as numbers iff key(a) > key(b), and -0 == +0 (the caller adds +0 first).
inline int32_t order_key(float x) {
  const int32_t i = __builtin_bit_cast(int32_t, x);
  return i >= 0 ? i : i ^ 0x7fffffff;
}
inline int64_t order_key(double x) {
  const int64_t i = __builtin_bit_cast(int64_t, x);
  return i >= 0 ? i : i ^ 0x7fffffffffffffffLL;
}

// The positions c < n with key[c] >= bound into out (ascending; room for n + 16), returned: their count. 32-bit
// keys with AVX-512: 16 a step (compressed in a register and stored whole: a compressing store to memory is slow on
// some CPUs, microcoded on AMD Zen 4); the rest by a branch-free scalar loop.
template <typename K> inline int64_t keep_at_least(const K* key, int64_t n, K bound, int32_t* out) {
  int64_t size = 0, c = 0;
#if defined(__AVX512F__)
  if constexpr (sizeof(K) == 4) {
    const __m512i b = _mm512_set1_epi32(bound), step = _mm512_set1_epi32(16);
    __m512i position = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; c + 16 <= n; c += 16) {
      const __mmask16 keep = _mm512_cmpge_epi32_mask(_mm512_loadu_si512(key + c), b);
      _mm512_storeu_si512(out + size, _mm512_maskz_compress_epi32(keep, position));
      size += __builtin_popcount((unsigned)keep);
      position = _mm512_add_epi32(position, step);
    }
  }
#endif
  for (; c < n; ++c) { out[size] = (int32_t)c; size += key[c] >= bound; }
  return size;
}

// Vectors of 8 unsigned 64-bit lanes (GCC/Clang vector extension; unaligned, may alias).
typedef uint64_t vu64 __attribute__((vector_size(64), aligned(8), may_alias));
typedef int64_t vi64x8 __attribute__((vector_size(64), aligned(8), may_alias));

// idx[0..m) = the m best of the candidates cand[0..size) (size >= m), best first: by key desc, then index asc.
// 32-bit keys sort as packed 64-bit integers (key flipped above, index below: one integer compare each, all
// distinct). Up to 128 candidates (the bisection leaves at most m + 4 but for ties) are ranked by counting, 8 of
// them against one broadcast candidate at a time (no branch per compare), and those ranked below m written to their
// place; more take a sort.
inline void sort_best_first(const int32_t* key, int32_t* cand, int64_t size, int64_t m, int32_t* idx) {
  thread_local std::vector<uint64_t> packed;
  const int64_t padded = (size + 7) / 8 * 8;
  packed.resize(padded);
  for (int64_t c = 0; c < size; ++c)
    packed[c] = ((uint64_t)~((uint32_t)key[cand[c]] ^ 0x80000000u) << 32) | (uint32_t)cand[c];
  if (size > 128) {
    std::sort(packed.begin(), packed.begin() + size);
    for (int64_t t = 0; t < m; ++t) idx[t] = (int32_t)(packed[t] & 0xffffffffu);
    return;
  }
  for (int64_t c = size; c < padded; ++c) packed[c] = ~(uint64_t)0;  // padding ranks after every candidate
  const uint64_t* p = packed.data();
  for (int64_t b = 0; b < size; b += 8) {
    const vu64 x = *(const vu64*)(p + b);
    vi64x8 rank = {};  // comparisons give -1 where true: rank = how many candidates sort before x
    for (int64_t q = 0; q < size; ++q) rank -= (vi64x8)((vu64{} + p[q]) < x);
    for (int l = 0; l < 8 && b + l < size; ++l)
      if (rank[l] < m) idx[rank[l]] = (int32_t)(p[b + l] & 0xffffffffu);
  }
}
inline void sort_best_first(const int64_t* key, int32_t* cand, int64_t size, int64_t m, int32_t* idx) {
  std::sort(cand, cand + size, [&](int32_t a, int32_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
  std::copy(cand, cand + m, idx);
}

// The same m best as best_of, best first, found by value: bisection over the order-preserving keys (each step one
// vectorised count over all n) until at most m + 4 keys are >= the bound (or the bound is exact), one compaction
// pass that keeps those, and their ranks by (key desc, index asc). A NaN anywhere takes best_of.
template <typename T>
void top_m(const T* v, int64_t n, int64_t m, int32_t* idx, std::vector<int32_t>& order) {
  typedef decltype(order_key(T(0))) K;
  typedef typename std::make_unsigned<K>::type U;
  int32_t nans = 0;
  for (int64_t i = 0; i < n; ++i) nans += v[i] != v[i];
  if (nans || m >= n) { best_of(v, n, m, idx, order); return; }
  thread_local std::vector<K> keys;
  keys.resize(n);
  K lo = std::numeric_limits<K>::max(), hi = std::numeric_limits<K>::min();
  for (int64_t i = 0; i < n; ++i) {
    const K k = order_key(v[i] + T(0));
    keys[i] = k;
    lo = std::min(lo, k);
    hi = std::max(hi, k);
  }
  const K* key = keys.data();
  while (lo < hi) {  // invariant: at least m keys are >= lo, fewer than m are > hi
    const K mid = (K)(lo + (K)(((U)hi - (U)lo + 1) / 2));
    int32_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += key[i] >= mid;
    if (count < m) { hi = mid - 1; continue; }
    lo = mid;
    if (count <= m + 4) break;
  }
  order.resize(n + 16);
  int32_t* cand = order.data();
  const int64_t size = keep_at_least(key, n, lo, cand);
  sort_best_first(key, cand, size, m, idx);
}

// Calls body(std::integral_constant<int, r>) for a rank r of 1 to 4, else body(std::integral_constant<int, 0>) (the
// rank known only at run time): the loops below then vectorise with a constant stride and keep their sums in
// registers.
template <typename Body> inline void with_rank(int64_t r, Body&& body) {
  switch (r) {
    case 1: body(std::integral_constant<int, 1>{}); return;
    case 2: body(std::integral_constant<int, 2>{}); return;
    case 3: body(std::integral_constant<int, 3>{}); return;
    case 4: body(std::integral_constant<int, 4>{}); return;
    default: body(std::integral_constant<int, 0>{});
  }
}

// out[i] = X[i, :] . w for X (n, r) row-major, summed in order a = 0..r-1 from +0 (Rank: r, or 0 for a run-time r).
template <int Rank, typename T> inline void project(const T* X, const T* w, int64_t n, int64_t r_any, T* out) {
  const int64_t r = Rank > 0 ? Rank : r_any;
  for (int64_t i = 0; i < n; ++i) {
    T s = T(0);
    for (int64_t a = 0; a < r; ++a) s += X[i * r + a] * w[a];
    out[i] = s;
  }
}

// rank[a, b] = sum over c = 0..r-1 in order (from +0) of rs[a, c] * ct[c, b], for rs (m, r) and ct (r, m).
template <int Rank, typename T> inline void rank_cells(const T* rs, const T* ct, int64_t m, int64_t r_any, T* rank) {
  const int64_t r = Rank > 0 ? Rank : r_any;
  for (int64_t a = 0; a < m; ++a)
    for (int64_t b = 0; b < m; ++b) {
      T acc = T(0);
      for (int64_t c = 0; c < r; ++c) acc += rs[a * r + c] * ct[c * m + b];
      rank[a * m + b] = acc;
    }
}

template <typename T>
void select(const T* rows, const T* cols, const T* S, const T* u, const T* v, int64_t Q, int64_t n, int64_t r,
            int64_t m, int64_t knn, int64_t* out_i, int64_t* out_j, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1 && Q > 1)
  {
    std::vector<T> proj(n), rs(m * r), rank(m * m), ct(r * m);
    std::vector<int32_t> bi(m), bj(m), best(knn), order;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      const T* R = rows + q * n * r;
      const T* C = cols + q * n * r;
      const T* Sq = S + q * r * r;
      const T* uq = u + q * r;
      const T* vq = v + q * r;
      with_rank(r, [&](auto k) { project<decltype(k)::value>(R, uq, n, r, proj.data()); });
      top_m(proj.data(), n, m, bi.data(), order);
      with_rank(r, [&](auto k) { project<decltype(k)::value>(C, vq, n, r, proj.data()); });
      top_m(proj.data(), n, m, bj.data(), order);
      for (int64_t a = 0; a < m; ++a)  // rows[i_a] · S
        for (int64_t b = 0; b < r; ++b) {
          T s = T(0);
          for (int64_t c = 0; c < r; ++c) s += R[bi[a] * r + c] * Sq[c * r + b];
          rs[a * r + b] = s;
        }
      for (int64_t c = 0; c < r; ++c)  // the kept columns transposed, (r, m): the ranking's loop over b vectorises
        for (int64_t b = 0; b < m; ++b) ct[c * m + b] = C[bj[b] * r + c];
      with_rank(r, [&](auto k) { rank_cells<decltype(k)::value>(rs.data(), ct.data(), m, r, rank.data()); });
      top_m(rank.data(), m * m, knn, best.data(), order);
      for (int64_t t = 0; t < knn; ++t) {
        out_i[q * knn + t] = bi[best[t] / m];
        out_j[q * knn + t] = bj[best[t] % m];
      }
    }
  }
}

// scores[q, t, c] = rows[q, I[q,t]] . cores[q % H, c] . cols[q, J[q,t]]: each kept cell's score under each core
// (Rank: r, or 0 for a run-time r, as with_rank hands it)
template <int Rank, typename T>
void cell_scores_ranked(const T* __restrict rows, const T* __restrict cols, const T* __restrict cores,
                        const int64_t* __restrict I, const int64_t* __restrict J, int64_t Q, int64_t n,
                        int64_t r_any, int64_t H, int64_t M, int64_t K, T* __restrict out, int threads) {
  const int64_t r = Rank > 0 ? Rank : r_any;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && Q > 1)
  for (int64_t q = 0; q < Q; ++q) {
    const T* C = cores + (q % H) * M * r * r;
    for (int64_t t = 0; t < K; ++t) {
      const T* row = rows + (q * n + I[q * K + t]) * r;
      const T* col = cols + (q * n + J[q * K + t]) * r;
      for (int64_t c = 0; c < M; ++c) {
        T s = T(0);
        for (int64_t a = 0; a < r; ++a) {
          T inner = T(0);
          for (int64_t b = 0; b < r; ++b) inner += C[(c * r + a) * r + b] * col[b];
          s += row[a] * inner;
        }
        out[(q * K + t) * M + c] = s;
      }
    }
  }
}

template <typename T>
void cell_scores(const T* rows, const T* cols, const T* cores, const int64_t* I, const int64_t* J, int64_t Q,
                 int64_t n, int64_t r, int64_t H, int64_t M, int64_t K, T* out, int threads) {
  with_rank(r, [&](auto k) {
    cell_scores_ranked<decltype(k)::value>(rows, cols, cores, I, J, Q, n, r, H, M, K, out, threads);
  });
}

// The adjoint of cell_scores for grad (Q, K, M): grad_rows, grad_cols (Q, n, r), zero where no kept cell reads,
// and grad_cores (H, M, r, r), summed per thread in the static schedule's order and then over threads in order
// (deterministic at a fixed thread count). Per cell, its row's and column's gradients are summed over the cores in
// registers and added once; per query, the cores' gradient is summed in a local array (up to 64 entries) and added
// once. Rank: r, or 0 for a run-time r (with_rank).
template <int Rank, typename T>
void cell_scores_backward_ranked(const T* __restrict grad, const T* __restrict rows, const T* __restrict cols,
                                 const T* __restrict cores, const int64_t* __restrict I,
                                 const int64_t* __restrict J, int64_t Q, int64_t n, int64_t r_any, int64_t H,
                                 int64_t M, int64_t K, T* __restrict grad_rows, T* __restrict grad_cols,
                                 T* __restrict grad_cores, int threads) {
  const int64_t r = Rank > 0 ? Rank : r_any, core_size = H * M * r * r, per_query = M * r * r;
  constexpr int64_t LOCAL = 64, MAX_R = Rank > 0 ? Rank : 8;
  const bool local = per_query <= LOCAL, fits = r <= MAX_R;
  const int used = (threads > 1 && Q > 1) ? threads : 1;
  std::vector<T> partial((size_t)used * core_size, T(0));
#pragma omp parallel num_threads(used) if (used > 1)
  {
    T* mine = partial.data() + (size_t)omp_get_thread_num() * core_size;
    T sums[LOCAL];
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      const T* C = cores + (q % H) * per_query;
      T* GC = mine + (q % H) * per_query;
      T* G = local ? sums : GC;
      if (local) for (int64_t e = 0; e < per_query; ++e) sums[e] = T(0);
      T* gr = grad_rows + q * n * r;
      T* gc = grad_cols + q * n * r;
      for (int64_t e = 0; e < n * r; ++e) { gr[e] = T(0); gc[e] = T(0); }
      for (int64_t t = 0; t < K; ++t) {
        const int64_t i = I[q * K + t], j = J[q * K + t];
        const T* row = rows + (q * n + i) * r;
        const T* col = cols + (q * n + j) * r;
        // the cell's row and column gradients: in locals when r fits (always at a compile-time rank), else in place
        T cell_row[MAX_R] = {}, cell_col[MAX_R] = {};
        T* ri = fits ? cell_row : gr + i * r;
        T* cj = fits ? cell_col : gc + j * r;
        for (int64_t c = 0; c < M; ++c) {
          const T g = grad[(q * K + t) * M + c];
          for (int64_t a = 0; a < r; ++a)
            for (int64_t b = 0; b < r; ++b) {
              const T w = C[(c * r + a) * r + b];
              ri[a] += g * w * col[b];
              cj[b] += g * w * row[a];
              G[(c * r + a) * r + b] += g * row[a] * col[b];
            }
        }
        if (fits) {
          for (int64_t a = 0; a < r; ++a) gr[i * r + a] += cell_row[a];
          for (int64_t b = 0; b < r; ++b) gc[j * r + b] += cell_col[b];
        }
      }
      if (local) for (int64_t e = 0; e < per_query; ++e) GC[e] += sums[e];
    }
  }
  for (int64_t e = 0; e < core_size; ++e) {
    T s = T(0);
    for (int th = 0; th < used; ++th) s += partial[(size_t)th * core_size + e];
    grad_cores[e] = s;
  }
}

template <typename T>
void cell_scores_backward(const T* grad, const T* rows, const T* cols, const T* cores, const int64_t* I,
                          const int64_t* J, int64_t Q, int64_t n, int64_t r, int64_t H, int64_t M, int64_t K,
                          T* grad_rows, T* grad_cols, T* grad_cores, int threads) {
  with_rank(r, [&](auto k) {
    cell_scores_backward_ranked<decltype(k)::value>(grad, rows, cols, cores, I, J, Q, n, r, H, M, K, grad_rows,
                                                    grad_cols, grad_cores, threads);
  });
}
}  // namespace

#define MEMZOO_TUCKER_KERNELS(T, S_)                                                                                \
  extern "C" int memzoo_tucker_select_##S_(const T* rows, const T* cols, const T* S, const T* u, const T* v,       \
                                           int64_t Q, int64_t n, int64_t r, int64_t m, int64_t knn, int64_t* oi,  \
                                           int64_t* oj, int th) {                                                  \
    select<T>(rows, cols, S, u, v, Q, n, r, m, knn, oi, oj, th); return 0; }                                \
  extern "C" int memzoo_tucker_cell_scores_##S_(const T* rows, const T* cols, const T* C, const int64_t* I,       \
                                                const int64_t* J, int64_t Q, int64_t n, int64_t r, int64_t H,    \
                                                int64_t M, int64_t K, T* out, int th) {                          \
    cell_scores<T>(rows, cols, C, I, J, Q, n, r, H, M, K, out, th); return 0; }                                 \
  extern "C" int memzoo_tucker_cell_scores_backward_##S_(const T* g, const T* rows, const T* cols, const T* C,    \
                                                         const int64_t* I, const int64_t* J, int64_t Q, int64_t n,\
                                                         int64_t r, int64_t H, int64_t M, int64_t K, T* gr,       \
                                                         T* gc, T* gC, int th) {                                  \
    cell_scores_backward<T>(g, rows, cols, C, I, J, Q, n, r, H, M, K, gr, gc, gC, th); return 0; }

MEMZOO_TUCKER_KERNELS(float, f32)
MEMZOO_TUCKER_KERNELS(double, f64)
"""

_KERNELS = CompiledLibrary("the C++ Tucker top-k selection kernel", lambda: _build())
available = _KERNELS.available
library = _KERNELS.library


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the compiled path: plain CPU tensors (subclasses such as DTensor and fake
    tensors keep the PyTorch path) of one dtype, float32 or float64, and the kernel built."""
    dtype = tensors[0].dtype
    return (dtype in FLOAT_SUFFIX and all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu"
                                          and t.dtype == dtype for t in tensors) and available())


def _build() -> ctypes.CDLL:
    lib = compile_library("memzoo_tucker", "tucker.cpp", SOURCE, [])
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    return declare_float_kernels(lib, {
        "tucker_select": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, cint],
        "tucker_cell_scores": [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, cint],
        "tucker_cell_scores_backward": [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr,
                                        cint],
    })


def tucker_select(rows: torch.Tensor, cols: torch.Tensor, core_sum: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                  knn: int, candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i, j)``, each ``(..., knn)`` int64 and best first: the kept cells of every query (module docstring).

    ``rows, cols (..., n, r)``; ``core_sum (..., r, r)``, ``u, v (..., r)`` broadcast against the queries' leading
    dims ``...``; one dtype. ``1 <= candidates <= n`` and ``1 <= knn <= candidates²`` (the caller checks)."""
    n, r = rows.shape[-2:]
    lead = rows.shape[:-2]
    rows, cols = rows.contiguous(), cols.contiguous()
    core_sum = core_sum.expand(*lead, r, r).contiguous()
    u, v = u.expand(*lead, r).contiguous(), v.expand(*lead, r).contiguous()
    queries = rows.numel() // (n * r) if n * r else 0
    i = torch.empty(*lead, knn, dtype=torch.int64)
    j = torch.empty(*lead, knn, dtype=torch.int64)
    if queries:
        _KERNELS.float_kernel("tucker_select", rows.dtype)(
            rows.data_ptr(), cols.data_ptr(), core_sum.data_ptr(), u.data_ptr(), v.data_ptr(), queries, n, r,
            candidates, knn, i.data_ptr(), j.data_ptr(), torch.get_num_threads(),
        )
    return i, j


def cell_scores(rows: torch.Tensor, cols: torch.Tensor, cores: torch.Tensor, i: torch.Tensor,
                j: torch.Tensor) -> torch.Tensor:
    """``scores (Q, K, M)``: ``scores[q, t, c] = rows[q, i[q, t]] · cores[q mod H, c] · cols[q, j[q, t]]``.

    ``rows, cols (Q, n, r)``, ``cores (H, M, r, r)`` (query ``q`` uses head ``q mod H``: queries laid out
    ``(..., H)``), ``i, j (Q, K)`` int64 in ``[0, n)``; contiguous, one float dtype. ``O(Q·K·M·r²)``."""
    n_queries, n, r = rows.shape
    heads, n_cores = cores.shape[:2]
    knn = i.shape[1]
    out = rows.new_empty(n_queries, knn, n_cores)
    if out.numel():
        _KERNELS.float_kernel("tucker_cell_scores", rows.dtype)(
            rows.data_ptr(), cols.data_ptr(), cores.data_ptr(), i.data_ptr(), j.data_ptr(), n_queries, n, r, heads,
            n_cores, knn, out.data_ptr(), torch.get_num_threads(),
        )
    return out


def cell_scores_backward(grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cores: torch.Tensor,
                         i: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`cell_scores` for ``grad (Q, K, M)``: ``grad_rows, grad_cols (Q, n, r)`` (zero in rows
    no kept cell reads) and ``grad_cores (H, M, r, r)``; one pass over the ``Q·K`` cells, no ``(Q, K, r)`` buffer.
    ``grad_cores`` sums each thread's queries, then the threads in order: the same bits at a fixed thread count."""
    n_queries, n, r = rows.shape
    heads, n_cores = cores.shape[:2]
    grad_rows, grad_cols = torch.empty_like(rows), torch.empty_like(cols)
    grad_cores = torch.empty_like(cores)  # the kernel writes every element (zeros without queries)
    _KERNELS.float_kernel("tucker_cell_scores_backward", rows.dtype)(
        grad.data_ptr(), rows.data_ptr(), cols.data_ptr(), cores.data_ptr(), i.data_ptr(), j.data_ptr(),
        n_queries, n, r, heads, n_cores, i.shape[1], grad_rows.data_ptr(), grad_cols.data_ptr(),
        grad_cores.data_ptr(), torch.get_num_threads(),
    )
    return grad_rows, grad_cols, grad_cores
