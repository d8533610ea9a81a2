"""The CPU kernel behind :func:`memzoo.ops.product_key_topk`: per-half top-k and the pruned merge, in C++/OpenMP.

(Over 500 lines because the kernel's C++ source is one string here, beside the binding that builds and calls it.)

Given the half scores of ``R = T·H`` (token, head) rows, ``s1, s2`` of ``n_keys`` each, one pass per row:

1. **A lower bound on the k-th best sum, branch-free.** The maxima of ``C`` strided chunks of each half
   (``j mod C``, one vectorised pass that also tests finiteness; ``C = 8`` for ``k <= 8``, 16 for ``k <= 32`` when
   ``n_keys · k <= 4096``, else 32: the fastest of the three per shape on random rows) are ``C``
   distinct elements per half; sorted, any
   ``A × B >= k`` rectangle of them gives ``A·B`` distinct pairs all summing to at least ``r1[A-1] + r2[B-1]``, so
   the best such corner ``L`` is at most the k-th best sum.
2. **Candidates.** Only elements with ``s1[j] + max(s2) >= L`` can be in a top-k pair (the same for ``s2``): both
   halves are filtered with that test (one vector test per 16 elements; with AVX2 the passing lanes are moved to the
   front by a permutation from a table and stored whole, no branch per element), leaving a few dozen of
   ``n_keys`` on random data, each list a prefix of its sorted half.
3. **Sort the candidates** (the chunk maxima of 1. too): float32 lists of up to 64 with AVX-512 by a bitonic
   sorting network over packed 64-bit keys (the value's order-preserving bits above the position, so one signed
   max/min ranks by value and then position), others by counting ranks (``#better + #equal before``: a whole
   vector of candidates against one broadcast candidate at a time, branch-free), both branch-free and in the same
   order (best first, ties by position); a partial sort when there are more than 128, as under wide ties. The best
   ``k`` of each half are kept (a pair of ranks ``(a, b)`` in a top-k set closed under "beaten or tied by" has
   ``(a+1)(b+1) <= k``).
4. **A tighter bound** from the sorted candidates (the best ``A × B >= k`` rectangle, as in 1.), then the
   **candidate pairs**: ranks with ``(a+1)(b+1) <= k`` and a sum at least the bound (about 60 of the 119 for
   ``k = 32`` on random data). They hold a whole top-k.
5. **Select**: pairs that the network of 3. takes (up to 64) are ranked at once; more are first cut by raising the
   bound in a few bisection steps while at least ``k`` pairs stay above it (each count is one vectorised pass), and
   the pairs above it are ranked as in 3.; ranks below ``k`` are written.

Exact (every filter keeps all elements tied at its bound, and the sums are the same IEEE additions the reference
makes; ties come out in any order, as in ``torch.topk``). A row holding NaN or an infinity, ``k > 64`` or
``n_keys < C`` takes the plain route: a size-``k`` min-heap top-k of each half, then a merge by the staircase
frontier with a max-heap of at most ``k + 1`` pairs (NaN ranks above every number, as in ``torch.topk``). Cost per
row ``O(n_keys + m² + P²)`` for ``m`` candidates and ``P`` pairs (``O(m log² m)`` by the network),
``O(n_keys)`` memory per thread; rows run in parallel over ``torch.get_num_threads()`` OpenMP threads (the runtime
torch has loaded). The vector code uses the GCC/Clang vector extension (32-byte vectors with AVX, 16-byte ones
elsewhere) and, for the networks, AVX-512 intrinsics where the build has them.

The source has no torch headers: it compiles in about a second with ``torch.utils.cpp_extension.load`` into
torch's extension cache (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, one build per source and CPU
capability) and is called through ``ctypes``. :func:`library` builds it on first use; when that fails (no
compiler), it returns ``None`` after one warning, and with ``MEMZOO_CPU_KERNELS=0`` it is never built; callers
then take the vectorised PyTorch path.
"""

from __future__ import annotations

import ctypes

import torch

from memzoo.ops.cpu_build import DIVIDER_CPP, CompiledLibrary, compile_library

__all__ = ["available", "backward", "half_topk_merge", "library"]

SOURCE = r"""
#include <cstdint>
#include <vector>
#include <algorithm>
#include <limits>
#if defined(__SSE2__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace pk {

// a ranks before b: larger, NaN above every number (as torch.topk)
template <typename T> inline bool before(T a, T b) { return a > b || (a != a && b == b); }

// ---------------------------------------------------------------- exact general path (any data, any k)
template <typename T>
void row_topk(const T* row, int64_t n, int64_t k, T* val, int32_t* idx) {
  auto sift_down = [&](int64_t pos, int64_t size) {
    T v = val[pos];
    int32_t i = idx[pos];
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= size) break;
      if (child + 1 < size && before(val[child], val[child + 1])) ++child;
      if (!before(v, val[child])) break;
      val[pos] = val[child]; idx[pos] = idx[child];
      pos = child;
    }
    val[pos] = v; idx[pos] = i;
  };
  for (int64_t j = 0; j < k; ++j) { val[j] = row[j]; idx[j] = (int32_t)j; }
  for (int64_t j = k / 2 - 1; j >= 0; --j) sift_down(j, k);
  for (int64_t j = k; j < n; ++j)
    if (before(row[j], val[0])) { val[0] = row[j]; idx[0] = (int32_t)j; sift_down(0, k); }
  for (int64_t size = k - 1; size > 0; --size) {
    T v = val[0]; int32_t i = idx[0];
    val[0] = val[size]; idx[0] = idx[size];
    val[size] = v; idx[size] = i;
    sift_down(0, size);
  }
}

// Top-k of sums v1[a] + v2[b], a < m1, b < m2, of two best-first lists, by the staircase frontier (max-heap).
template <typename T>
void merge_heap(const T* v1, const int32_t* i1, int64_t m1, const T* v2, const int32_t* i2, int64_t m2,
                int64_t k, int64_t n_keys, T* out_s, int64_t* out_i, T* hs, int32_t* ha, int32_t* hb) {
  int64_t size = 0;
  auto push = [&](T s, int32_t a, int32_t b) {
    int64_t pos = size++;
    while (pos > 0) {
      int64_t parent = (pos - 1) / 2;
      if (!before(s, hs[parent])) break;
      hs[pos] = hs[parent]; ha[pos] = ha[parent]; hb[pos] = hb[parent];
      pos = parent;
    }
    hs[pos] = s; ha[pos] = a; hb[pos] = b;
  };
  auto pop = [&]() {
    --size;
    T s = hs[size]; int32_t a = ha[size], b = hb[size];
    int64_t pos = 0;
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= size) break;
      if (child + 1 < size && before(hs[child + 1], hs[child])) ++child;
      if (!before(hs[child], s)) break;
      hs[pos] = hs[child]; ha[pos] = ha[child]; hb[pos] = hb[child];
      pos = child;
    }
    hs[pos] = s; ha[pos] = a; hb[pos] = b;
  };
  push(v1[0] + v2[0], 0, 0);
  for (int64_t j = 0; j < k; ++j) {
    T s = hs[0]; int32_t a = ha[0], b = hb[0];
    pop();
    out_s[j] = s;
    out_i[j] = (int64_t)i1[a] * n_keys + i2[b];
    if (b + 1 < m2) push(v1[a] + v2[b + 1], a, b + 1);
    if (b == 0 && a + 1 < m1) push(v1[a + 1] + v2[0], a + 1, 0);
  }
}


// ---------------------------------------------------------------- fast path (finite rows, k <= 64, n >= CM)
constexpr int CH = 16;  // elements per block of the candidate filter
// CM: strided chunks whose maxima bound the k-th best sum from below (a template argument, chunks_for(n, k)): more
// chunks give a tighter bound (fewer candidates to rank) but more maxima to sort, so the best count grows with k and
// with the elements a chunk holds. Measured on random rows, 1 thread, n_keys 64-1024, k 8-64: 8 for k <= 8; 16 for
// k <= 32 while n·k <= 4096 (5-9% faster than 32 at n_keys 64-128, k 16-32, 7-13% than 8 at k 16); else 32.
inline int chunks_for(int64_t n, int64_t k) { return k <= 8 ? 8 : (k <= 32 && n * k <= 4096) ? 16 : 32; }

// Vectors of the GCC/Clang vector extension: 32 bytes where the build has AVX, else 16 (SSE2, NEON, VSX); unaligned,
// and they may alias their element type.
#if defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif
typedef float vf32 __attribute__((vector_size(VBYTES), aligned(4), may_alias));
typedef int32_t vi32 __attribute__((vector_size(VBYTES), aligned(4), may_alias));
typedef double vf64 __attribute__((vector_size(VBYTES), aligned(8), may_alias));
typedef int64_t vi64 __attribute__((vector_size(VBYTES), aligned(8), may_alias));
template <typename T> struct Simd;  // (specialisations: template arguments would drop the typedefs' attributes)
template <> struct Simd<float> {
  typedef vf32 V; typedef vi32 M; typedef int32_t I; static constexpr int L = VBYTES / 4;
  static M iota() { M m = {}; for (int l = 0; l < L; ++l) m[l] = l; return m; }
};
template <> struct Simd<double> {
  typedef vf64 V; typedef vi64 M; typedef int64_t I; static constexpr int L = VBYTES / 8;
  static M iota() { M m = {}; for (int l = 0; l < L; ++l) m[l] = l; return m; }
};
template <typename T> constexpr int64_t padded(int64_t m) { return (m + Simd<T>::L - 1) / Simd<T>::L * Simd<T>::L; }

// Rank of every v[p], p < m, best first (#better + #equal before: distinct ranks, ties in index order), and
// emit(rank, p) for those ranked below `limit`. v must hold -inf from m up to padded(m) (the values are finite).
// Branch-free: a whole vector of elements against one broadcast element at a time.
template <typename T, typename Emit>
inline void rank_select(const T* v, int64_t m, int64_t limit, Emit emit) {
  typedef Simd<T> S;
  typedef typename S::V V;
  typedef typename S::M M;
  typedef typename S::I I;
  for (int64_t b = 0; b < m; b += S::L) {
    const V x = *(const V*)(v + b);
    const M index = S::iota() + (I)b;
    M acc = {};  // comparisons give -1 where true; an equal element counts when it comes first (q < index)
    const int64_t e = std::min(b + S::L, m);
    for (int64_t q = 0; q < b; ++q) acc -= (V{} + v[q]) >= x;
    for (int64_t q = b; q < e; ++q) {
      const V y = V{} + v[q];
      acc -= (y > x) | ((y == x) & (index > (I)q));
    }
    for (int64_t q = e; q < m; ++q) acc -= (V{} + v[q]) > x;
    for (int l = 0; l < S::L && b + l < m; ++l)
      if (acc[l] < limit) emit((int64_t)acc[l], b + l);
  }
}

// How many of v[0..m) (padded with -inf to padded(m)) are >= t.
template <typename T>
inline int64_t count_at_least(const T* v, int64_t m, T t) {
  typedef Simd<T> S;
  typename S::M acc = {};
  const typename S::V tv = typename S::V{} + t;
  for (int64_t q = 0; q < padded<T>(m); q += S::L) acc -= (*(const typename S::V*)(v + q) >= tv);
  int64_t c = 0;
  for (int l = 0; l < S::L; ++l) c += acc[l];
  return c;
}

template <typename T> inline void pad_inf(T* v, int64_t m) {
  for (int64_t j = m; j < padded<T>(m); ++j) v[j] = -std::numeric_limits<T>::infinity();
}

#if defined(__AVX512F__)
// Sorting networks for the small rankings of float rows (up to 64 elements) on AVX-512: each element one int64, its
// value's order-preserving int32 above its position complemented, so a signed 64-bit max ranks by value and then by
// position (the smaller first): the order rank_select gives, with no mask work. A bitonic network over NR vectors of
// 8 keys; O(m log² m) compare-exchanges, branch-free.
namespace net {
#define MEMZOO_NET_INLINE __attribute__((always_inline)) inline
// The order-preserving int32 of each float lane: bits for x >= +0, bits ^ 0x7FFFFFFF below; -0 is first made +0
// (x + 0), so that it ties with +0 as in a float comparison.
MEMZOO_NET_INLINE __m256i ordered(__m256 x) {
  const __m256i b = _mm256_castps_si256(_mm256_add_ps(x, _mm256_setzero_ps()));
  return _mm256_xor_si256(b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1));
}
// The lanes of vector r that keep the better key of their pair at stage (block S, distance D < 8): the lower lane of
// a pair in a block sorted best first, the upper one in a block sorted worst first.
constexpr __mmask8 keeps_better(int r, int s, int d) {
  unsigned mask = 0;
  for (int l = 0; l < 8; ++l) {
    const int g = 8 * r + l;
    mask |= (unsigned)(((g & d) == 0) != ((g & s) != 0)) << l;
  }
  return (__mmask8)mask;
}
// One compare-exchange stage: across vectors (r against r ^ D/8) or within each (lane l against l ^ D).
template <int NR, int S, int D>
MEMZOO_NET_INLINE void stage(__m512i* v) {
  if constexpr (D >= 8) {
    constexpr int step = D / 8;
    for (int r = 0; r < NR; ++r) {
      if (r & step) continue;
      const int o = r ^ step;
      const __m512i hi = _mm512_max_epi64(v[r], v[o]), lo = _mm512_min_epi64(v[r], v[o]);
      if (((8 * r) & S) == 0) { v[r] = hi; v[o] = lo; } else { v[r] = lo; v[o] = hi; }
    }
  } else {
    const __m512i partner = _mm512_xor_si512(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(D));
    for (int r = 0; r < NR; ++r) {
      const __m512i p = _mm512_permutexvar_epi64(partner, v[r]);
      v[r] = _mm512_mask_blend_epi64(keeps_better(r, S, D), _mm512_min_epi64(v[r], p), _mm512_max_epi64(v[r], p));
    }
  }
}
template <int NR, int S, int D>
MEMZOO_NET_INLINE void merge(__m512i* v) {
  stage<NR, S, D>(v);
  if constexpr (D > 1) merge<NR, S, D / 2>(v);
}
template <int NR, int S = 2>
MEMZOO_NET_INLINE void sort(__m512i* v) {
  merge<NR, S, S / 2>(v);
  if constexpr (S < 8 * NR) sort<NR, S * 2>(v);
}
// x[0..m), m <= 8·NR, ranked: emit(rank, p) for the best min(m, limit), best first.
template <int NR, typename Emit>
MEMZOO_NET_INLINE void rank(const float* x, int64_t m, int64_t limit, Emit emit) {
  __m512i v[NR];
  const __m256 worst = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < NR; ++r) {  // lanes past m: -inf at positions >= m, so after every element of x
    const int64_t left = m - 8 * r;
    const __mmask8 in = left >= 8 ? (__mmask8)0xFF : left <= 0 ? (__mmask8)0 : (__mmask8)((1u << left) - 1);
    const __m256i value = ordered(_mm256_mask_loadu_ps(worst, in, x + 8 * r));
    const __m256i position = _mm256_add_epi32(_mm256_set1_epi32(8 * r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    v[r] = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepi32_epi64(value), 32),
                           _mm512_cvtepu32_epi64(_mm256_xor_si256(position, _mm256_set1_epi32(-1))));
  }
  sort<NR>(v);
  alignas(32) int32_t position[8 * NR];
  for (int r = 0; r < NR; ++r)
    _mm256_store_si256((__m256i*)(position + 8 * r), _mm256_xor_si256(_mm512_cvtepi64_epi32(v[r]), _mm256_set1_epi32(-1)));
  const int64_t n = std::min(m, limit);
  for (int64_t j = 0; j < n; ++j) emit(j, (int64_t)position[j]);
}
#undef MEMZOO_NET_INLINE
}  // namespace net
#endif

// Whether rank_best ranks m elements of type T with a sorting network here (float, m <= 64, AVX-512).
template <typename T> inline bool by_network(int64_t m) {
#if defined(__AVX512F__)
  return sizeof(T) == 4 && m <= 64;
#else
  (void)m;
  return false;
#endif
}

// rank_select's ranking of v[0..m) (emit(rank, p) for the ranks below `limit`; best first, ties in index order) by
// a sorting network where by_network says so, else by counting (v then needs room up to padded(m), which it pads).
template <typename T, typename Emit>
inline void rank_best(T* v, int64_t m, int64_t limit, Emit emit) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4) {
    if (by_network<T>(m)) {
      if (m <= 8) net::rank<1>(v, m, limit, emit);
      else if (m <= 16) net::rank<2>(v, m, limit, emit);
      else if (m <= 32) net::rank<4>(v, m, limit, emit);
      else net::rank<8>(v, m, limit, emit);
      return;
    }
  }
#endif
  pad_inf(v, m);
  rank_select(v, m, limit, emit);
}

// Candidate pair sums of the merge: the rank pairs (a, b) with (a+1)(b+1) <= k, sum_{a=1..k} floor(k / a).
inline int64_t candidate_pairs(int64_t k) {
  int64_t s = 0;
  for (int64_t a = 1; a <= k; ++a) s += k / a;
  return s;
}

template <typename T>
struct Work {
  std::vector<T> cv1, cv2, sv1, sv2, hs, ps;
  std::vector<int32_t> ci1, ci2, si1, si2, ha, hb, pa, pb, order;
  std::vector<int64_t> cdiv, fdiv;  // ceil(k / a) for a >= 1, floor(k / (a + 1)): no integer division per row
  Work(int64_t n, int64_t k) : cv1(n + 8), cv2(n + 8), sv1(n + 8), sv2(n + 8), hs(k + 2), ps(candidate_pairs(k) + 8),
                               ci1(n + 8), ci2(n + 8), si1(n + 8), si2(n + 8), ha(k + 2), hb(k + 2),
                               pa(candidate_pairs(k) + 8), pb(candidate_pairs(k) + 8), order(n),
                               cdiv(std::max<int64_t>(k, 64) + 2), fdiv(k + 1) {
    for (int64_t a = 1; a < (int64_t)cdiv.size(); ++a) cdiv[a] = (k + a - 1) / a;
    for (int64_t a = 0; a <= k; ++a) fdiv[a] = k / (a + 1);
  }
};

// The maxima of CM strided chunks (j mod CM, CM a multiple of the vector length); ``bad`` is set when the row holds a NaN or an infinity (such rows
// take the plain route: a sum of infinities may be NaN). One vectorised pass: x - x is 0 for a finite x and NaN
// otherwise, so a running sum of it is 0 exactly when the row is finite.
template <int CM, typename T>
inline void chunk_max(const T* s, int64_t n, T* m, int& bad) {
  typedef Simd<T> S;
  typedef typename S::V V;
  typedef typename S::M M;
  constexpr int NV = CM / S::L;
  V acc[NV], z[NV];
  for (int v = 0; v < NV; ++v) { acc[v] = *(const V*)(s + v * S::L); z[v] = acc[v] - acc[v]; }
  const int64_t full = n / CM * CM;
  for (int64_t j = CM; j < full; j += CM)
    for (int v = 0; v < NV; ++v) {
      const V x = *(const V*)(s + j + v * S::L);
      const M gt = x > acc[v];
      acc[v] = (V)(((M)x & gt) | ((M)acc[v] & ~gt));
      z[v] += x - x;
    }
  T tail = T(0);
  for (int v = 0; v < NV; ++v) *(V*)(m + v * S::L) = acc[v];
  for (int64_t j = full; j < n; ++j) { T x = s[j]; m[j - full] = x > m[j - full] ? x : m[j - full]; tail += x - x; }
  int nonfinite = !(tail == T(0));
  for (int v = 0; v < NV; ++v)
    for (int l = 0; l < S::L; ++l) nonfinite |= !(z[v][l] == T(0));
  bad |= nonfinite;
}

// Lane mask of a vector comparison as bits (lane l -> bit l).
inline unsigned lane_bits(vi32 m) {
#if defined(__AVX__)
  return (unsigned)_mm256_movemask_ps((__m256)m);
#elif defined(__SSE2__)
  return (unsigned)_mm_movemask_ps((__m128)m);
#else
  unsigned r = 0;
  for (int l = 0; l < Simd<float>::L; ++l) r |= (unsigned)(m[l] != 0) << l;
  return r;
#endif
}
inline unsigned lane_bits(vi64 m) {
#if defined(__AVX__)
  return (unsigned)_mm256_movemask_pd((__m256d)m);
#elif defined(__SSE2__)
  return (unsigned)_mm_movemask_pd((__m128d)m);
#else
  unsigned r = 0;
  for (int l = 0; l < Simd<double>::L; ++l) r |= (unsigned)(m[l] != 0) << l;
  return r;
#endif
}

// For every 8-lane mask, the lanes that are set, in order (then zeros): the permutation that moves them to the front.
struct CompressLut {
  int32_t p[256][8];
  CompressLut() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int l = 0; l < 8; ++l) if (mask >> l & 1) p[mask][n++] = l;
      for (; n < 8; ++n) p[mask][n] = 0;
    }
  }
};
inline const CompressLut& compress_lut() { static const CompressLut lut; return lut; }

// Elements with x + other_max >= bound (the only ones that can be in a top-k pair), in row order: one vector test
// per CH elements, and the passing lanes written one by one from the test's bit mask (a few dozen per row).
template <typename T>
inline int64_t compact(const T* s, int64_t n, T other_max, T bound, T* cv, int32_t* ci) {
  typedef Simd<T> S;
  typedef typename S::V V;
  constexpr int NV = CH / S::L;
  const V o = V{} + other_max, b = V{} + bound;
  int64_t m = 0, j = 0;
  for (; j + CH <= n; j += CH) {
    unsigned bits = 0;
    for (int v = 0; v < NV; ++v) bits |= lane_bits((*(const V*)(s + j + v * S::L) + o) >= b) << (v * S::L);
    if (!bits) continue;
#if defined(__AVX2__)
    if (sizeof(T) == 4) {  // branch-free: each vector's passing lanes moved to its front by a permutation, stored whole
      for (int v = 0; v < NV; ++v) {
        const unsigned lanes = (bits >> (v * 8)) & 0xFF;
        const __m256i perm = _mm256_loadu_si256((const __m256i*)compress_lut().p[lanes]);
        const __m256i x = _mm256_loadu_si256((const __m256i*)(s + j + v * 8));
        const __m256i at = _mm256_add_epi32(_mm256_set1_epi32((int32_t)(j + v * 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        _mm256_storeu_si256((__m256i*)(cv + m), _mm256_permutevar8x32_epi32(x, perm));
        _mm256_storeu_si256((__m256i*)(ci + m), _mm256_permutevar8x32_epi32(at, perm));
        m += __builtin_popcount(lanes);
      }
      continue;
    }
#endif
    while (bits) {
      const int c = __builtin_ctz(bits);
      bits &= bits - 1;
      cv[m] = s[j + c]; ci[m] = (int32_t)(j + c); ++m;
    }
  }
  for (; j < n; ++j) {
    T x = s[j];
    cv[m] = x; ci[m] = (int32_t)j;
    m += (x + other_max >= bound);
  }
  return m;
}

// The best min(m, k) candidates, best first (ties in row order): a pair of a top-k set closed under "beaten or
// tied by" has ranks (a+1)(b+1) <= k, so a, b < k. Returns how many.
template <typename T>
inline int64_t best_candidates(T* cv, const int32_t* ci, int64_t m, int64_t k, T* sv, int32_t* si,
                               int32_t* order) {
  if (m <= 128) {  // a sorting network (up to 64 floats), else counting ranks: O(m²), branch-free
    rank_best(cv, m, k, [&](int64_t r, int64_t p) { sv[r] = cv[p]; si[r] = ci[p]; });
    return std::min(m, k);
  }
  // many candidates (wide ties, e.g. equal scores everywhere): a partial sort, O(m log k)
  const int64_t keep = std::min(m, k);
  for (int64_t j = 0; j < m; ++j) order[j] = (int32_t)j;
  std::partial_sort(order, order + keep, order + m,
                    [&](int32_t a, int32_t b) { return cv[a] > cv[b] || (cv[a] == cv[b] && a < b); });
  for (int64_t j = 0; j < keep; ++j) { sv[j] = cv[order[j]]; si[j] = ci[order[j]]; }
  return keep;
}

// The pairs (a, b), b < nb, with x + v2[b] >= bound (a prefix: v2 is descending), written from ps, pa, pb on;
// returns how many. Whole vectors are stored (room for a vector past the last pair; v2 readable that far).
inline int64_t pair_prefix(float x, const float* v2, int64_t nb, float bound, int32_t a, float* ps, int32_t* pa,
                           int32_t* pb) {
  typedef Simd<float> S;
  const vf32 xv = x - vf32{}, bv = bound - vf32{};  // x - (+0) is x, -0 included
  int64_t c = 0;
  for (int64_t b = 0; b < nb; b += S::L) {
    const vf32 s = xv + *(const vf32*)(v2 + b);
    const vi32 lane = S::iota() + (int32_t)b;
    *(vf32*)(ps + c) = s;
    *(vi32*)(pa + c) = vi32{} + a;
    *(vi32*)(pb + c) = lane;
    const int got = __builtin_popcount(lane_bits((s >= bv) & (lane < (int32_t)nb)));
    c += got;
    if (got < S::L) break;
  }
  return c;
}
inline int64_t pair_prefix(double x, const double* v2, int64_t nb, double bound, int32_t a, double* ps, int32_t* pa,
                           int32_t* pb) {
  int64_t b = 0;
  for (; b < nb; ++b) {
    const double s = x + v2[b];
    if (s < bound) break;
    ps[b] = s; pa[b] = a; pb[b] = (int32_t)b;
  }
  return b;
}

template <int CM, typename T>
void row_pk(const T* s1, const T* s2, int64_t n, int64_t k, T* out_s, int64_t* out_i, Work<T>& w) {
  int bad = 0;
  T m1[CM + 8] = {}, m2[CM + 8] = {}, r1[CM], r2[CM];
  bool fast = n >= CM && k <= 64 && k <= CM * CM;
  if (fast) {
    chunk_max<CM>(s1, n, m1, bad);
    chunk_max<CM>(s2, n, m2, bad);
    fast = !bad;
  }
  if (!fast) {
    const int64_t m = std::min(k, n);  // k > n (up to n²) keeps every element of each half
    row_topk(s1, n, m, w.sv1.data(), w.si1.data());
    row_topk(s2, n, m, w.sv2.data(), w.si2.data());
    merge_heap(w.sv1.data(), w.si1.data(), m, w.sv2.data(), w.si2.data(), m, k, n, out_s, out_i, w.hs.data(),
               w.ha.data(), w.hb.data());
    return;
  }
  rank_best(m1, CM, CM, [&](int64_t r, int64_t p) { r1[r] = m1[p]; });
  rank_best(m2, CM, CM, [&](int64_t r, int64_t p) { r2[r] = m2[p]; });
  // A·B >= k distinct pairs (chunk maxima are distinct elements) all sum to at least r1[A-1] + r2[B-1].
  T bound = -std::numeric_limits<T>::infinity();
  const int64_t* cdiv = w.cdiv.data();
  for (int64_t a = 1; a <= CM; ++a) {
    int64_t b = cdiv[a];
    if (b <= CM) { T s = r1[a - 1] + r2[b - 1]; bound = s > bound ? s : bound; }
  }
  const int64_t c1 = compact(s1, n, r2[0], bound, w.cv1.data(), w.ci1.data());
  const int64_t c2 = compact(s2, n, r1[0], bound, w.cv2.data(), w.ci2.data());
  const int64_t n1 = best_candidates(w.cv1.data(), w.ci1.data(), c1, k, w.sv1.data(), w.si1.data(), w.order.data());
  const int64_t n2 = best_candidates(w.cv2.data(), w.ci2.data(), c2, k, w.sv2.data(), w.si2.data(), w.order.data());
  const T* v1 = w.sv1.data();
  const T* v2 = w.sv2.data();
  // The same bound from the sorted candidates (tighter than the chunk maxima's): an A×B >= k rectangle.
  for (int64_t a = 1; a <= n1; ++a) {
    const int64_t b = cdiv[a];
    if (b <= n2) { T s = v1[a - 1] + v2[b - 1]; bound = s > bound ? s : bound; }
  }
  // Candidate pairs: (a+1)(b+1) <= k and sum >= bound (both lists descending: stop at the first one below). They
  // hold a whole top-k: its down-closed choice has such ranks and sums >= the k-th best >= bound.
  T* ps = w.ps.data();
  int32_t* pa = w.pa.data();
  int32_t* pb = w.pb.data();
  int64_t P = 0;
  for (int64_t a = 0; a < n1; ++a) {
    const int64_t got = pair_prefix(v1[a], v2, std::min(n2, w.fdiv[a]), bound, (int32_t)a, ps + P, pa + P, pb + P);
    P += got;
    if (got == 0) break;  // x + v2[0] < bound: no later a (smaller x) has a pair either
  }
  const int32_t* i1 = w.si1.data();
  const int32_t* i2 = w.si2.data();
  auto write = [&](int64_t r, int64_t p) { out_s[r] = ps[p]; out_i[r] = (int64_t)i1[pa[p]] * n + i2[pb[p]]; };
  if (by_network<T>(P)) {  // few enough pairs to rank them all in one network
    rank_best(ps, P, k, write);
    return;
  }
  // A threshold t with at least k pairs >= t, raised by bisection (the count is one vectorised pass), then the
  // pairs >= t ranked: every pair above the k-th best sum is >= t, so they hold a whole top-k.
  pad_inf(ps, P);
  T lo = bound, hi = ps[0];  // the best pair is (0, 0)
  if (count_at_least(ps, P, hi) >= k) lo = hi;
  for (int it = 0; it < 8 && lo < hi; ++it) {
    const T mid = lo + (hi - lo) / 2;
    if (!(mid > lo && mid < hi)) break;
    const int64_t c = count_at_least(ps, P, mid);
    if (c >= k) lo = mid; else hi = mid;
    if (c == k) break;
  }
  int64_t kept = 0;
  for (int64_t p = 0; p < P; ++p) {
    const T x = ps[p];
    ps[kept] = x; pa[kept] = pa[p]; pb[kept] = pb[p];
    kept += (x >= lo);
  }
  rank_best(ps, kept, k, write);
}

}  // namespace pk

namespace {
template <typename T>
void topk_rows(const T* scores, int64_t n_tokens, int64_t heads, int64_t n_keys, int64_t k, int64_t stride_token,
               int64_t stride_head, int64_t stride_side, T* out_s, int64_t* out_i, int n_threads) {
  const int64_t rows = n_tokens * heads;
  const int chunks = pk::chunks_for(n_keys, k);
#pragma omp parallel num_threads(n_threads) if (n_threads > 1 && rows > 1)
  {
    pk::Work<T> work(n_keys, k);
    // rows in memory order (head-major for the (2, H, T, n_keys) layout), the next row's halves prefetched: a row
    // is read once, mostly from memory, and each row of n_keys = 1024 floats is its own 4 KiB page
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = (i % n_tokens) * heads + i / n_tokens;
      const T* s1 = scores + (i % n_tokens) * stride_token + (i / n_tokens) * stride_head;
      if (i + 1 < rows) {
        const char* next = (const char*)(scores + ((i + 1) % n_tokens) * stride_token + ((i + 1) / n_tokens) * stride_head);
        for (int64_t b = 0; b < n_keys * (int64_t)sizeof(T); b += 64) {
          __builtin_prefetch(next + b);
          __builtin_prefetch(next + stride_side * (int64_t)sizeof(T) + b);
        }
      }
      if (chunks == 8) pk::row_pk<8>(s1, s1 + stride_side, n_keys, k, out_s + r * k, out_i + r * k, work);
      else if (chunks == 16) pk::row_pk<16>(s1, s1 + stride_side, n_keys, k, out_s + r * k, out_i + r * k, work);
      else pk::row_pk<32>(s1, s1 + stride_side, n_keys, k, out_s + r * k, out_i + r * k, work);
    }
  }
}

""" + DIVIDER_CPP + r"""
// The one-thread backward below with half = NV vectors: grad_q's row accumulated in 2·NV vector registers (the same
// additions in the same order: bitwise the same results).
template <typename T, int NV>
void backward_one_pass(const T* grad, const int64_t* idx, const T* q, const T* c, int64_t rows, int64_t heads,
                       int64_t n_keys, int64_t k, const Divider& div, T* gq, T* gc) {
  typedef pk::Simd<T> S;
  typedef typename S::V V;
  constexpr int64_t half = NV * S::L;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = r % heads;
    const T* q1 = q + r * 2 * half;
    const T* q2 = q1 + half;
    V a1[NV], a2[NV], x1[NV], x2[NV];
    for (int v = 0; v < NV; ++v) {
      a1[v] = V{}; a2[v] = V{};
      x1[v] = *(const V*)(q1 + v * S::L); x2[v] = *(const V*)(q2 + v * S::L);
    }
    for (int64_t j = 0; j < k; ++j) {
      const T g = grad[r * k + j];
      const V gv = g - V{};
      const int64_t index = idx[r * k + j], i1 = div.div(index);
      const int64_t row1 = (2 * h) * n_keys + i1, row2 = (2 * h + 1) * n_keys + index - i1 * n_keys;
      const T* c1 = c + row1 * half;
      const T* c2 = c + row2 * half;
      T* g1 = gc + row1 * half;
      T* g2 = gc + row2 * half;
      for (int v = 0; v < NV; ++v) {
        a1[v] += gv * *(const V*)(c1 + v * S::L);
        *(V*)(g1 + v * S::L) += gv * x1[v];
      }
      for (int v = 0; v < NV; ++v) {
        a2[v] += gv * *(const V*)(c2 + v * S::L);
        *(V*)(g2 + v * S::L) += gv * x2[v];
      }
    }
    for (int v = 0; v < NV; ++v) {
      *(V*)(gq + r * 2 * half + v * S::L) = a1[v];
      *(V*)(gq + r * 2 * half + half + v * S::L) = a2[v];
    }
  }
}

// scores[r, j] = q[r, 0] · c[h, 0, i1] + q[r, 1] · c[h, 1, i2] for r = t·H + h and index = i1 · n_keys + i2:
// grad_q[r, s] = Σ_j g[r, j] · c[h, s, i_s] (rows in parallel) and grad_c[h, s, i] += g[r, j] · q[r, s]
// ((head, side) pairs in parallel, tokens in order: deterministic). grad_c must come zeroed.
template <typename T>
void backward_rows(const T* grad, const int64_t* idx, const T* q, const T* c, int64_t n_tokens, int64_t heads,
                   int64_t n_keys, int64_t half, int64_t k, T* gq, T* gc, int n_threads) {
  const int64_t rows = n_tokens * heads;
  const Divider div(n_keys);
  if (n_threads <= 1 && gq != nullptr && gc != nullptr && half % pk::Simd<T>::L == 0) {
    switch (half / pk::Simd<T>::L) {  // the query's gradient row held in registers
      case 1: return backward_one_pass<T, 1>(grad, idx, q, c, rows, heads, n_keys, k, div, gq, gc);
      case 2: return backward_one_pass<T, 2>(grad, idx, q, c, rows, heads, n_keys, k, div, gq, gc);
      case 3: return backward_one_pass<T, 3>(grad, idx, q, c, rows, heads, n_keys, k, div, gq, gc);
      case 4: return backward_one_pass<T, 4>(grad, idx, q, c, rows, heads, n_keys, k, div, gq, gc);
      case 5: return backward_one_pass<T, 5>(grad, idx, q, c, rows, heads, n_keys, k, div, gq, gc);
      case 6: return backward_one_pass<T, 6>(grad, idx, q, c, rows, heads, n_keys, k, div, gq, gc);
      default: break;
    }
  }
  if (n_threads <= 1 && gq != nullptr && gc != nullptr) {  // one pass: each pick's index, sub-key rows read once
    // (the same additions in the same order as the two parallel passes below: bitwise the same results)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r % heads;
      T* __restrict out1 = gq + r * 2 * half;
      T* __restrict out2 = out1 + half;
      const T* __restrict q1 = q + r * 2 * half;
      const T* __restrict q2 = q1 + half;
      for (int64_t d = 0; d < 2 * half; ++d) out1[d] = T(0);
      for (int64_t j = 0; j < k; ++j) {
        const T g = grad[r * k + j];
        const int64_t index = idx[r * k + j], i1 = div.div(index);
        const int64_t row1 = (2 * h) * n_keys + i1, row2 = (2 * h + 1) * n_keys + index - i1 * n_keys;
        const T* __restrict c1 = c + row1 * half;
        const T* __restrict c2 = c + row2 * half;
        T* __restrict g1 = gc + row1 * half;
        T* __restrict g2 = gc + row2 * half;
        for (int64_t d = 0; d < half; ++d) { out1[d] += g * c1[d]; g1[d] += g * q1[d]; }
        for (int64_t d = 0; d < half; ++d) { out2[d] += g * c2[d]; g2[d] += g * q2[d]; }
      }
    }
    return;
  }
  if (gq != nullptr) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r % heads;
      T* __restrict out1 = gq + r * 2 * half;
      T* __restrict out2 = out1 + half;
      for (int64_t d = 0; d < 2 * half; ++d) out1[d] = T(0);
      for (int64_t j = 0; j < k; ++j) {
        const T g = grad[r * k + j];
        const int64_t index = idx[r * k + j], i1 = div.div(index);
        const T* __restrict c1 = c + ((2 * h) * n_keys + i1) * half;
        const T* __restrict c2 = c + ((2 * h + 1) * n_keys + index - i1 * n_keys) * half;
        for (int64_t d = 0; d < half; ++d) out1[d] += g * c1[d];
        for (int64_t d = 0; d < half; ++d) out2[d] += g * c2[d];
      }
    }
  }
  if (gc != nullptr) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1)
    for (int64_t hs = 0; hs < 2 * heads; ++hs) {
      const int64_t h = hs / 2, s = hs % 2;
      for (int64_t t = 0; t < n_tokens; ++t) {
        const int64_t r = t * heads + h;
        const T* __restrict qv = q + (r * 2 + s) * half;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t index = idx[r * k + j], i1 = div.div(index);
          const T g = grad[r * k + j];
          T* __restrict dst = gc + (hs * n_keys + (s == 0 ? i1 : index - i1 * n_keys)) * half;
          for (int64_t d = 0; d < half; ++d) dst[d] += g * qv[d];
        }
      }
    }
  }
}
}  // namespace

extern "C" {
int memzoo_pk_topk_f32(const float* s, int64_t t, int64_t h, int64_t n, int64_t k, int64_t st, int64_t sh,
                       int64_t ss, float* os, int64_t* oi, int threads) {
  topk_rows<float>(s, t, h, n, k, st, sh, ss, os, oi, threads);
  return 0;
}
int memzoo_pk_topk_f64(const double* s, int64_t t, int64_t h, int64_t n, int64_t k, int64_t st, int64_t sh,
                       int64_t ss, double* os, int64_t* oi, int threads) {
  topk_rows<double>(s, t, h, n, k, st, sh, ss, os, oi, threads);
  return 0;
}
int memzoo_pk_backward_f32(const float* g, const int64_t* idx, const float* q, const float* c, int64_t t, int64_t h,
                           int64_t n, int64_t half, int64_t k, float* gq, float* gc, int threads) {
  backward_rows<float>(g, idx, q, c, t, h, n, half, k, gq, gc, threads);
  return 0;
}
int memzoo_pk_backward_f64(const double* g, const int64_t* idx, const double* q, const double* c, int64_t t,
                           int64_t h, int64_t n, int64_t half, int64_t k, double* gq, double* gc, int threads) {
  backward_rows<double>(g, idx, q, c, t, h, n, half, k, gq, gc, threads);
  return 0;
}
}
"""

_KERNELS = CompiledLibrary("the C++ product-key top-k kernel", lambda: _build())
available = _KERNELS.available
library = _KERNELS.library


def _build() -> ctypes.CDLL:
    lib = compile_library("memzoo_pk_topk", "product_key_topk.cpp", SOURCE, [])
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.memzoo_pk_topk_f32, lib.memzoo_pk_topk_f64):
        fn.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
    for fn in (lib.memzoo_pk_backward_f32, lib.memzoo_pk_backward_f64):
        fn.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def half_topk_merge(half_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``half_scores (2, H, T, n_keys)`` or any layout with those sizes and a unit stride over ``n_keys``, float32
    or float64 on CPU → ``scores (T, H, k)`` (same dtype, best first) and ``indices (T, H, k)`` int64 with
    ``index = i1 · n_keys + i2``: the exact top-k of ``half_scores[0, h, t, i1] + half_scores[1, h, t, i2]``.
    Needs :func:`library` to be available."""
    lib = _KERNELS.require()
    _, heads, n_tokens, n_keys = half_scores.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_keys**2:
        raise ValueError(f"half_topk_merge: k must be an int in [1, n_keys² = {n_keys**2}], got {k!r}")
    if half_scores.stride(-1) != 1:
        half_scores = half_scores.contiguous()
    scores = half_scores.new_empty(n_tokens, heads, k)
    indices = torch.empty(n_tokens, heads, k, dtype=torch.int64)
    if scores.numel() == 0:
        return scores, indices
    kernel = lib.memzoo_pk_topk_f64 if half_scores.dtype == torch.float64 else lib.memzoo_pk_topk_f32
    side, head, token, _ = half_scores.stride()
    kernel(
        half_scores.data_ptr(), n_tokens, heads, n_keys, k, token, head, side,
        scores.data_ptr(), indices.data_ptr(), torch.get_num_threads(),
    )
    return scores, indices


def backward(
    grad_scores: torch.Tensor, indices: torch.Tensor, query: torch.Tensor, sub_keys: torch.Tensor,
    need_query: bool = True, need_keys: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``scores = q1 · c1[i1] + q2 · c2[i2]`` (the scores of :func:`half_topk_merge`):
    ``grad_scores (T, H, k)``, ``indices (T, H, k)``, ``query (T, H, Dk)``, ``sub_keys (H, 2, n_keys, Dk/2)``, one
    dtype (float32 or float64) → ``grad_query (T, H, Dk)``, ``grad_sub_keys`` (dense, duplicates summed), each
    ``None`` when not needed. ``O(T·H·k·Dk)`` work. Needs :func:`library` to be available."""
    lib = _KERNELS.require()
    grad_scores, indices = grad_scores.contiguous(), indices.contiguous()
    query, sub_keys = query.contiguous(), sub_keys.contiguous()
    n_tokens, heads, k = indices.shape
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    grad_query = torch.empty_like(query) if need_query else None
    grad_keys = torch.zeros_like(sub_keys) if need_keys else None
    if indices.numel() == 0 or half == 0:
        return (grad_query.zero_() if grad_query is not None else None), grad_keys
    kernel = lib.memzoo_pk_backward_f64 if query.dtype == torch.float64 else lib.memzoo_pk_backward_f32
    kernel(
        grad_scores.data_ptr(), indices.data_ptr(), query.data_ptr(), sub_keys.data_ptr(), n_tokens, heads, n_keys,
        half, k, grad_query.data_ptr() if grad_query is not None else None,
        grad_keys.data_ptr() if grad_keys is not None else None, torch.get_num_threads(),
    )
    return grad_query, grad_keys
