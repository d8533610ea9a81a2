"""The CPU kernel behind :func:`memzoo.ops.product_key_topk`: per-half top-k and the pruned merge, in C++/OpenMP.

Given the half scores of ``R = T·H`` (token, head) rows, ``s1, s2`` of ``n_keys`` each, one pass per row:

1. **A lower bound on the k-th best sum, branch-free.** The maxima of 16 strided chunks of each half
   (``j mod 16``) are 16 distinct elements per half; sorted, any ``A × B >= k`` rectangle of them gives ``A·B``
   distinct pairs all summing to at least ``r1[A-1] + r2[B-1]``, so the best such corner ``L`` is at most the
   k-th best sum.
2. **Candidates.** Only elements with ``s1[j] + max(s2) >= L`` can be in a top-k pair (the same for ``s2``): both
   halves are filtered with that test (blocks of 16 without a candidate are skipped), leaving a few dozen of
   ``n_keys`` on random data, each list a prefix of its sorted half.
3. **Sort the candidates** by counting ranks (``#better + #equal before``: branch-free and vectorised; a stable
   sort when there are more than 96).
4. **Merge** by the staircase frontier with a max-heap of at most ``k + 1`` pairs: popping ``(a, b)`` pushes
   ``(a, b+1)``, and ``(a+1, 0)`` when ``b = 0``, so each pair is pushed once, after a pair that beats or ties it;
   ``k`` pops, only pairs with ``(a+1)(b+1) <= k`` are ever popped.

Exact (every filter keeps all elements tied at its bound, and the sums are the same IEEE additions the reference
makes; ties come out in any order, as in ``torch.topk``). A row holding NaN, ``k > 64`` or ``n_keys < 16`` takes
the plain route: a size-``k`` min-heap top-k of each half, then the same merge (NaN ranks above every number, as
in ``torch.topk``). Cost per row ``O(n_keys + m² + k·log k)`` for ``m`` candidates, ``O(n_keys)`` memory per
thread; rows run in parallel over ``torch.get_num_threads()`` OpenMP threads (the runtime torch has loaded).

The source has no torch headers: it compiles in about a second with ``torch.utils.cpp_extension.load`` into
torch's extension cache (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, one build per source and CPU
capability) and is called through ``ctypes``. :func:`library` builds it on first use; when that fails (no
compiler), it returns ``None`` after one warning, and with ``MEMZOO_CPU_KERNELS=0`` it is never built; callers
then take the vectorised PyTorch path.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from memzoo.ops.cpu_build import compile_library, load_once

__all__ = ["available", "backward", "half_topk_merge", "library"]

SOURCE = r"""
#include <cstdint>
#include <vector>
#include <algorithm>
#include <limits>

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


// ---------------------------------------------------------------- fast path (no NaN, k <= 64, n >= 16)
constexpr int CH = 16;  // strided chunks whose maxima bound the k-th best sum from below

// Best-first order of v[0..m) by counting (branch-free, vectorised): rank = #better + #equal before.
template <typename T>
void rank_sort(const T* v, const int32_t* id, int64_t m, T* out_v, int32_t* out_id) {
  for (int64_t p = 0; p < m; ++p) {
    const T x = v[p];
    int32_t r = 0;
    for (int64_t q = 0; q < p; ++q) r += (v[q] >= x);
    for (int64_t q = p + 1; q < m; ++q) r += (v[q] > x);
    out_v[r] = x; out_id[r] = id[p];
  }
}

template <typename T>
struct Work {
  std::vector<T> cv1, cv2, sv1, sv2, hs;
  std::vector<int32_t> ci1, ci2, si1, si2, ha, hb;
  Work(int64_t n, int64_t k) : cv1(n), cv2(n), sv1(n), sv2(n), hs(k + 2), ci1(n), ci2(n), si1(n), si2(n),
                               ha(k + 2), hb(k + 2) {}
};

template <typename T>
inline void chunk_max(const T* s, int64_t n, T* m, int& nan) {
  T acc[CH];
  for (int c = 0; c < CH; ++c) acc[c] = s[c];
  int bad = 0;
  const int64_t full = n / CH * CH;
  for (int64_t j = CH; j < full; j += CH)
    for (int c = 0; c < CH; ++c) { T x = s[j + c]; acc[c] = x > acc[c] ? x : acc[c]; }
  for (int64_t j = full; j < n; ++j) { T x = s[j]; acc[j - full] = x > acc[j - full] ? x : acc[j - full]; }
  for (int64_t j = 0; j < n; ++j) bad |= (s[j] != s[j]);
  nan |= bad;
  for (int c = 0; c < CH; ++c) m[c] = acc[c];
}

// Elements with x + other_max >= bound (the only ones that can be in a top-k pair), in row order.
template <typename T>
inline int64_t compact(const T* s, int64_t n, T other_max, T bound, T* cv, int32_t* ci) {
  int64_t m = 0, j = 0;
  for (; j + CH <= n; j += CH) {  // most blocks of a long row hold no candidate: test the block first
    int any = 0;
    for (int c = 0; c < CH; ++c) any |= (s[j + c] + other_max >= bound);
    if (!any) continue;
    for (int c = 0; c < CH; ++c) {
      T x = s[j + c];
      cv[m] = x; ci[m] = (int32_t)(j + c);
      m += (x + other_max >= bound);
    }
  }
  for (; j < n; ++j) {
    T x = s[j];
    cv[m] = x; ci[m] = (int32_t)j;
    m += (x + other_max >= bound);
  }
  return m;
}

template <typename T>
void sort_candidates(const T* cv, const int32_t* ci, int64_t m, T* sv, int32_t* si) {
  if (m <= 96) { rank_sort(cv, ci, m, sv, si); return; }
  std::vector<int32_t> order(m);
  for (int64_t j = 0; j < m; ++j) order[j] = (int32_t)j;
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return cv[a] > cv[b]; });
  for (int64_t j = 0; j < m; ++j) { sv[j] = cv[order[j]]; si[j] = ci[order[j]]; }
}

template <typename T>
void row_pk(const T* s1, const T* s2, int64_t n, int64_t k, T* out_s, int64_t* out_i, Work<T>& w) {
  int nan = 0;
  T m1[CH], m2[CH], r1[CH], r2[CH];
  int32_t id[CH], dummy[CH];
  bool fast = n >= CH && k <= 64;
  if (fast) {
    chunk_max(s1, n, m1, nan);
    chunk_max(s2, n, m2, nan);
    fast = !nan;
  }
  if (!fast) {
    row_topk(s1, n, k, w.sv1.data(), w.si1.data());
    row_topk(s2, n, k, w.sv2.data(), w.si2.data());
    merge_heap(w.sv1.data(), w.si1.data(), k, w.sv2.data(), w.si2.data(), k, k, n, out_s, out_i, w.hs.data(),
               w.ha.data(), w.hb.data());
    return;
  }
  for (int c = 0; c < CH; ++c) id[c] = c;
  rank_sort(m1, id, CH, r1, dummy);
  rank_sort(m2, id, CH, r2, dummy);
  // A·B >= k distinct pairs (chunk maxima are distinct elements) all sum to at least r1[A-1] + r2[B-1].
  T bound = -std::numeric_limits<T>::infinity();
  for (int64_t a = 1; a <= CH; ++a) {
    int64_t b = (k + a - 1) / a;
    if (b <= CH) { T s = r1[a - 1] + r2[b - 1]; bound = s > bound ? s : bound; }
  }
  const int64_t c1 = compact(s1, n, r2[0], bound, w.cv1.data(), w.ci1.data());
  const int64_t c2 = compact(s2, n, r1[0], bound, w.cv2.data(), w.ci2.data());
  sort_candidates(w.cv1.data(), w.ci1.data(), c1, w.sv1.data(), w.si1.data());
  sort_candidates(w.cv2.data(), w.ci2.data(), c2, w.sv2.data(), w.si2.data());
  merge_heap(w.sv1.data(), w.si1.data(), std::min(c1, k), w.sv2.data(), w.si2.data(), std::min(c2, k), k, n,
             out_s, out_i, w.hs.data(), w.ha.data(), w.hb.data());
}

}  // namespace pk

namespace {
template <typename T>
void topk_rows(const T* scores, int64_t n_tokens, int64_t heads, int64_t n_keys, int64_t k, int64_t stride_token,
               int64_t stride_head, int64_t stride_side, T* out_s, int64_t* out_i, int n_threads) {
  const int64_t rows = n_tokens * heads;
#pragma omp parallel num_threads(n_threads) if (n_threads > 1 && rows > 1)
  {
    pk::Work<T> work(n_keys, k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* s1 = scores + (r / heads) * stride_token + (r % heads) * stride_head;
      pk::row_pk(s1, s1 + stride_side, n_keys, k, out_s + r * k, out_i + r * k, work);
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
  if (gq != nullptr) {
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = r % heads;
      T* out1 = gq + r * 2 * half;
      T* out2 = out1 + half;
      for (int64_t d = 0; d < 2 * half; ++d) out1[d] = T(0);
      for (int64_t j = 0; j < k; ++j) {
        const T g = grad[r * k + j];
        const int64_t index = idx[r * k + j];
        const T* c1 = c + ((2 * h) * n_keys + index / n_keys) * half;
        const T* c2 = c + ((2 * h + 1) * n_keys + index % n_keys) * half;
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
        const T* qv = q + (r * 2 + s) * half;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t index = idx[r * k + j];
          const T g = grad[r * k + j];
          T* dst = gc + (hs * n_keys + (s == 0 ? index / n_keys : index % n_keys)) * half;
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

#: Compiler flags per ``torch.backends.cpu.get_cpu_capability()``: the vector units torch itself uses here.
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded CDLL or None after a failure; "error": why


def available() -> bool:
    """Whether the compiled kernel is in use (builds it on first call)."""
    return library() is not None


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, built and loaded on first call; ``None`` (after one warning) if it cannot be
    built, or without a warning when ``MEMZOO_CPU_KERNELS=0``."""
    return load_once(_state, _lock, lambda: _build(), "the C++ product-key top-k kernel")


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
    lib = library()
    if lib is None:
        raise RuntimeError(f"memzoo: the C++ product-key top-k kernel is unavailable ({_state.get('error')})")
    _, heads, n_tokens, n_keys = half_scores.shape
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
    lib = library()
    if lib is None:
        raise RuntimeError(f"memzoo: the C++ product-key top-k kernel is unavailable ({_state.get('error')})")
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
