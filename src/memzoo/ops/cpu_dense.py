"""The C++/OpenMP CPU kernels of the dense decoder's elementwise work: RMSNorm, SwiGLU and the rotary embedding of
a fused query/key/value projection, forward and backward, each one pass over its rows.

For ``x (N, D)`` rows and a gain ``w (D,)``, with ``r[n] = 1 / sqrt(mean_d x[n]² + eps)`` and ``x̂ = x · r``:

- :func:`rms_norm_forward` ``y = x̂ · w`` and ``r (N,)`` (the backward recomputes ``x̂`` from ``x`` and ``r``, so no
  ``x̂`` tensor is kept);
- :func:`rms_norm_backward` ``dx = r · (g·w − x̂ · mean_d(g·w·x̂))`` and ``dw = Σ_n g·x̂`` (rows split into one
  contiguous chunk per thread, the chunks' partial sums added in thread order: deterministic for a thread count).

For ``a, b`` of one shape (the gate and up projections of a SwiGLU MLP), ``s = sigmoid(a)``:

- :func:`swiglu_forward` ``h = a · s · b`` (``silu(a) · b``);
- :func:`swiglu_backward` ``da = g · b · s · (1 + a · (1 − s))`` and ``db = g · a · s``, both from one read of
  ``g, a, b``.

For a fused projection ``qkv (B, T, (Hq + Hk + Hv)·hd)`` and tables ``cos, sin (T, hd/2)``:

- :func:`rope_qkv_forward` ``q (B, T, Hq, hd)``, ``k (B, T, Hk, hd)`` rotated ("rotate half") and ``v`` copied out;
- :func:`rope_qkv_backward` the projection's gradient, the query and key gradients rotated back and the value
  gradient copied into one tensor (no zero-filled slices, no ``cat`` of the three parts).

Against the same formulas through PyTorch's separate kernels, each saves the intermediate tensors (``silu(a)``, ``x̂``,
``g·b``...) that a fresh allocation and a pass each would cost: on the 2-core CPU most of an elementwise kernel's
time at these sizes is the first touch of its freshly allocated output.

float32 and float64 only, contiguous CPU tensors of one dtype (callers keep their PyTorch path otherwise, and under
``torch.compile``, which fuses the PyTorch path itself). Built with ``torch.utils.cpp_extension.load`` on first use
and called through ``ctypes``, as :mod:`memzoo.ops.cpu_read` (same cache, same ``MEMZOO_CPU_KERNELS=0`` switch, one
warning when it cannot be built).
"""

from __future__ import annotations

import ctypes

import torch

from memzoo.ops.cpu_build import (
    EXP_CPP,
    FLOAT_SUFFIX,
    CompiledLibrary,
    compile_library,
    declare_float_kernels,
)

__all__ = ["available", "library", "rms_norm_backward", "rms_norm_forward", "rope_qkv_backward", "rope_qkv_forward",
           "supports", "swiglu_backward", "swiglu_forward"]

SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <vector>
#include <omp.h>

namespace {
template <typename T> struct Acc { typedef T type; };
template <> struct Acc<float> { typedef float type; };

template <typename T>
void rms_norm_fwd(const T* __restrict x, const T* __restrict w, T* __restrict y, T* __restrict r, int64_t N,
                  int64_t D, double eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && N > 1)
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * D;
    T* yr = y + n * D;
    T ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += xr[d] * xr[d];
    const T rn = T(1) / std::sqrt(ss / T(D) + T(eps));
    r[n] = rn;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * rn * w[d];
  }
}

template <typename T>
void rms_norm_bwd(const T* __restrict g, const T* __restrict x, const T* __restrict r, const T* __restrict w,
                  T* __restrict dx, double* __restrict dw_parts, int64_t N, int64_t D, int threads) {
  // dw_parts: (threads, D) doubles, each thread's sum over its contiguous chunk of rows (or nullptr: no dw)
#pragma omp parallel num_threads(threads) if (threads > 1 && N > 1)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t begin = N * t / nt, end = N * (t + 1) / nt;
    double* part = dw_parts ? dw_parts + (int64_t)t * D : nullptr;
    for (int64_t n = begin; n < end; ++n) {
      const T* gr = g + n * D;
      const T* xr = x + n * D;
      const T rn = r[n];
      if (dx) {
        T c = 0;
#pragma omp simd reduction(+ : c)
        for (int64_t d = 0; d < D; ++d) c += gr[d] * w[d] * xr[d];
        c = c * rn / T(D);  // mean(g·w·x̂)
        T* dxr = dx + n * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dxr[d] = rn * (gr[d] * w[d] - xr[d] * rn * c);
      }
      if (part) {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) part[d] += double(gr[d] * (xr[d] * rn));
      }
    }
  }
}

""" + EXP_CPP + r"""
constexpr int64_t BLOCK = 1024;  // elements per block: a block with any element out of range is redone exactly

template <typename T>
inline void swiglu_fwd_block(const T* __restrict a, const T* __restrict b, T* __restrict h, int64_t n, bool exact) {
  if (exact) {
    for (int64_t i = 0; i < n; ++i) h[i] = a[i] / (T(1) + std::exp(-a[i])) * b[i];
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) h[i] = a[i] / (T(1) + exp_small(-a[i])) * b[i];
}

template <typename T>
inline void swiglu_bwd_block(const T* __restrict g, const T* __restrict a, const T* __restrict b, T* __restrict da,
                             T* __restrict db, int64_t n, bool exact) {
  if (exact) {
    for (int64_t i = 0; i < n; ++i) {
      const T s = T(1) / (T(1) + std::exp(-a[i])), as = a[i] * s;
      db[i] = g[i] * as;
      da[i] = g[i] * b[i] * (s + as * (T(1) - s));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T s = T(1) / (T(1) + exp_small(-a[i])), as = a[i] * s;
    db[i] = g[i] * as;
    da[i] = g[i] * b[i] * (s + as * (T(1) - s));
  }
}

template <typename T>
inline bool block_in_range(const T* __restrict a, int64_t n) {
  int ok = 1;
#pragma omp simd reduction(& : ok)
  for (int64_t i = 0; i < n; ++i) ok &= in_range(a[i]);
  return ok;
}

template <typename T>
void swiglu_fwd(const T* __restrict a, const T* __restrict b, T* __restrict h, int64_t n, int threads) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks > 4)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t i = k * BLOCK, m = n - i < BLOCK ? n - i : BLOCK;
    swiglu_fwd_block(a + i, b + i, h + i, m, !block_in_range(a + i, m));
  }
}

template <typename T>
void swiglu_bwd(const T* __restrict g, const T* __restrict a, const T* __restrict b, T* __restrict da,
                T* __restrict db, int64_t n, int threads) {
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && blocks > 4)
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t i = k * BLOCK, m = n - i < BLOCK ? n - i : BLOCK;
    swiglu_bwd_block(g + i, a + i, b + i, da + i, db + i, m, !block_in_range(a + i, m));
  }
}
// One head's rotation: (x1, x2) -> (x1·c − sign·x2·s, x2·c + sign·x1·s) over the hd/2 pairs.
template <typename T>
inline void rotate_head(const T* __restrict x, T* __restrict out, const T* __restrict c, const T* __restrict s,
                        int64_t half, T sign) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const T x1 = x[i], x2 = x[half + i];
    out[i] = x1 * c[i] - sign * x2 * s[i];
    out[half + i] = x2 * c[i] + sign * x1 * s[i];
  }
}

template <typename T>
void rope_qkv_fwd(const T* __restrict x, int64_t rows, int64_t T_, int64_t hq, int64_t hk, int64_t hv, int64_t hd,
                  const T* __restrict cos, const T* __restrict sin, T* __restrict q, T* __restrict k,
                  T* __restrict v, int threads) {
  const int64_t half = hd / 2, width = (hq + hk + hv) * hd;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    const T* c = cos + (r % T_) * half;
    const T* s = sin + (r % T_) * half;
    for (int64_t h = 0; h < hq; ++h) rotate_head(xr + h * hd, q + (r * hq + h) * hd, c, s, half, T(1));
    for (int64_t h = 0; h < hk; ++h) rotate_head(xr + (hq + h) * hd, k + (r * hk + h) * hd, c, s, half, T(1));
    const T* xv = xr + (hq + hk) * hd;
    T* vr = v + r * hv * hd;
#pragma omp simd
    for (int64_t i = 0; i < hv * hd; ++i) vr[i] = xv[i];
  }
}

// Strides of a gradient (B, T, H, hd) in elements: batch, position, head (the last dim is contiguous).
struct Strides { int64_t b, t, h; };

template <typename T>
void rope_qkv_bwd(const T* __restrict gq, Strides sq, const T* __restrict gk, Strides sk, const T* __restrict gv,
                  Strides sv, int64_t rows, int64_t T_, int64_t hq, int64_t hk, int64_t hv, int64_t hd,
                  const T* __restrict cos, const T* __restrict sin, T* __restrict gx, int threads) {
  const int64_t half = hd / 2, width = (hq + hk + hv) * hd;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / T_, t = r % T_;
    T* gr = gx + r * width;
    const T* c = cos + t * half;
    const T* s = sin + t * half;
    for (int64_t h = 0; h < hq; ++h) rotate_head(gq + b * sq.b + t * sq.t + h * sq.h, gr + h * hd, c, s, half, T(-1));
    for (int64_t h = 0; h < hk; ++h)
      rotate_head(gk + b * sk.b + t * sk.t + h * sk.h, gr + (hq + h) * hd, c, s, half, T(-1));
    for (int64_t h = 0; h < hv; ++h) {
      const T* src = gv + b * sv.b + t * sv.t + h * sv.h;
      T* dst = gr + (hq + hk + h) * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) dst[i] = src[i];
    }
  }
}
}  // namespace

#define MEMZOO_DENSE_KERNELS(T, S)                                                                                 \
  extern "C" int memzoo_rms_norm_fwd_##S(const T* x, const T* w, T* y, T* r, int64_t N, int64_t D, double eps,     \
                                         int th) {                                                                 \
    rms_norm_fwd<T>(x, w, y, r, N, D, eps, th); return 0; }                                                        \
  extern "C" int memzoo_rms_norm_bwd_##S(const T* g, const T* x, const T* r, const T* w, T* dx, double* dw,        \
                                         int64_t N, int64_t D, int th) {                                           \
    rms_norm_bwd<T>(g, x, r, w, dx, dw, N, D, th); return 0; }                                                     \
  extern "C" int memzoo_swiglu_fwd_##S(const T* a, const T* b, T* h, int64_t n, int th) {                          \
    swiglu_fwd<T>(a, b, h, n, th); return 0; }                                                                     \
  extern "C" int memzoo_swiglu_bwd_##S(const T* g, const T* a, const T* b, T* da, T* db, int64_t n, int th) {      \
    swiglu_bwd<T>(g, a, b, da, db, n, th); return 0; }                                                             \
  extern "C" int memzoo_rope_qkv_fwd_##S(const T* x, int64_t rows, int64_t t, int64_t hq, int64_t hk, int64_t hv,  \
                                         int64_t hd, const T* c, const T* s, T* q, T* k, T* v, int th) {          \
    rope_qkv_fwd<T>(x, rows, t, hq, hk, hv, hd, c, s, q, k, v, th); return 0; }                                   \
  extern "C" int memzoo_rope_qkv_bwd_##S(const T* gq, const int64_t* sq, const T* gk, const int64_t* sk,           \
                                         const T* gv, const int64_t* sv, int64_t rows, int64_t t, int64_t hq,      \
                                         int64_t hk, int64_t hv, int64_t hd, const T* c, const T* s, T* gx,        \
                                         int th) {                                                                 \
    rope_qkv_bwd<T>(gq, Strides{sq[0], sq[1], sq[2]}, gk, Strides{sk[0], sk[1], sk[2]}, gv,                        \
                    Strides{sv[0], sv[1], sv[2]}, rows, t, hq, hk, hv, hd, c, s, gx, th); return 0; }

MEMZOO_DENSE_KERNELS(float, f32)
MEMZOO_DENSE_KERNELS(double, f64)
"""

_KERNELS = CompiledLibrary("the C++ dense-layer kernels", lambda: _build())
available = _KERNELS.available
library = _KERNELS.library


def supports(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can take the compiled path: plain tensors or parameters (subclasses such as
    DTensor and fake tensors keep the PyTorch path), contiguous on the CPU, one dtype (float32 or float64), and the
    kernels built."""
    dtype = tensors[0].dtype
    if dtype not in FLOAT_SUFFIX or any(type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu"
                                   or t.dtype != dtype or not t.is_contiguous() for t in tensors):
        return False
    return available()


def _build() -> ctypes.CDLL:
    lib = compile_library("memzoo_dense", "dense.cpp", SOURCE, ["-fno-math-errno", "-fno-trapping-math"])
    i64, ptr, f64, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    return declare_float_kernels(lib, {
        "rms_norm_fwd": [ptr, ptr, ptr, ptr, i64, i64, f64, cint],
        "rms_norm_bwd": [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, cint],
        "swiglu_fwd": [ptr, ptr, ptr, i64, cint],
        "swiglu_bwd": [ptr, ptr, ptr, ptr, ptr, i64, cint],
        "rope_qkv_fwd": [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, cint],
        "rope_qkv_bwd": [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, cint],
    })


def _kernel(name: str, dtype: torch.dtype):
    return _KERNELS.float_kernel(name, dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (..., D)``, ``weight (D,)`` → ``(y, r)``: ``y`` like ``x``, ``r`` of shape ``x.shape[:-1]``."""
    d = x.shape[-1]
    y = torch.empty_like(x)
    r = x.new_empty(x.shape[:-1])
    _kernel("rms_norm_fwd", x.dtype)(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), x.numel() // d, d,
                                     float(eps), torch.get_num_threads())
    return y, r


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, need_x: bool,
                      need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dw)`` of :func:`rms_norm_forward` for ``grad`` like ``x`` (each ``None`` unless asked for); ``dw`` in
    ``weight``'s dtype, summed in float64."""
    d = x.shape[-1]
    threads = torch.get_num_threads()
    dx = torch.empty_like(x) if need_x else None
    # zeros: OpenMP may run fewer threads than asked (one row, nested regions), leaving some rows unwritten
    parts = torch.zeros(threads, d, dtype=torch.float64) if need_weight else None
    _kernel("rms_norm_bwd", x.dtype)(grad.data_ptr(), x.data_ptr(), r.data_ptr(), weight.data_ptr(),
                                     None if dx is None else dx.data_ptr(),
                                     None if parts is None else parts.data_ptr(), x.numel() // d, d, threads)
    dw = parts.sum(dim=0).to(weight.dtype) if parts is not None else None
    return dx, dw


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) · b`` for ``a, b`` of one shape."""
    h = torch.empty_like(a)
    _kernel("swiglu_fwd", a.dtype)(a.data_ptr(), b.data_ptr(), h.data_ptr(), a.numel(), torch.get_num_threads())
    return h


def swiglu_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(da, db)`` of :func:`swiglu_forward` for ``grad`` of the same shape."""
    da, db = torch.empty_like(a), torch.empty_like(b)
    _kernel("swiglu_bwd", a.dtype)(grad.data_ptr(), a.data_ptr(), b.data_ptr(), da.data_ptr(), db.data_ptr(),
                                   a.numel(), torch.get_num_threads())
    return da, db


def rope_qkv_forward(qkv: torch.Tensor, heads: tuple[int, int, int], cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv (B, T, (Hq + Hk + Hv)·hd)`` (a fused projection's output) → ``q (B, T, Hq, hd)`` and
    ``k (B, T, Hk, hd)`` rotated ("rotate half": pair ``(i, i + hd/2)`` at position ``t`` by the angle whose
    ``cos, sin (T, hd/2)`` row ``t`` holds) and ``v (B, T, Hv, hd)`` copied; ``heads = (Hq, Hk, Hv)``."""
    B, T, width = qkv.shape
    hq, hk, hv = heads
    hd = width // (hq + hk + hv)
    q, k, v = qkv.new_empty(B, T, hq, hd), qkv.new_empty(B, T, hk, hd), qkv.new_empty(B, T, hv, hd)
    _kernel("rope_qkv_fwd", qkv.dtype)(qkv.data_ptr(), B * T, T, hq, hk, hv, hd, cos.data_ptr(), sin.data_ptr(),
                                       q.data_ptr(), k.data_ptr(), v.data_ptr(), torch.get_num_threads())
    return q, k, v


def rope_qkv_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """The gradient ``(B, T, (Hq + Hk + Hv)·hd)`` of :func:`rope_qkv_forward`'s input: ``grad_q`` and ``grad_k``
    rotated back (the angles negated), ``grad_v`` copied, all written once into one tensor. The gradients may be
    strided views (e.g. transposed from ``(B, H, T, hd)``) with a contiguous last dim."""
    B, T, hq, hd = grad_q.shape
    hk, hv = grad_k.shape[2], grad_v.shape[2]
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
    strides = [torch.tensor(g.stride()[:3], dtype=torch.int64) for g in grads]
    out = grad_q.new_empty(B, T, (hq + hk + hv) * hd)
    _kernel("rope_qkv_bwd", out.dtype)(
        grads[0].data_ptr(), strides[0].data_ptr(), grads[1].data_ptr(), strides[1].data_ptr(), grads[2].data_ptr(),
        strides[2].data_ptr(), B * T, T, hq, hk, hv, hd, cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
        torch.get_num_threads(),
    )
    return out
