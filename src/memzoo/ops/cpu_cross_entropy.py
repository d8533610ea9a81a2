"""The C++/OpenMP CPU kernel of the language-model loss: softmax cross-entropy over a vocabulary and its gradient,
in one pass over the logits.

For ``logits (N, V)``, ``labels (N,)`` and a ``scale``, row ``n`` with ``m = max_v x[n, v]`` and
``s = Σ_v exp(x[n, v] − m)``:

- ``loss[n] = (m − x[n, y[n]]) + log s`` (``−log softmax(x[n])[y[n]]``), 0 for a row whose label is ``ignore_index``;
- with a gradient buffer, ``grad[n] = scale · (softmax(x[n]) − onehot(y[n]))``, a zero row for an ignored label.

PyTorch's ``F.cross_entropy`` runs ``log_softmax`` (a pass that writes an ``(N, V)`` output it saves), then, in the
backward, zero-fills an ``(N, V)`` gradient for ``nll_loss``, scatters into it, and runs ``log_softmax``'s backward
(two more passes over two ``(N, V)`` tensors). Here the forward writes the finished gradient (the exponentials kept in
the buffer while a row is still in cache), and the backward has nothing left to do. For a 728-word vocabulary and
4,096 rows on one core that is about a fifth of the time (``tools/bench_blocks.py`` measures it).

float32 exponentials use the vectorised polynomial of :data:`memzoo.ops.cpu_build.EXP_CPP`; an exponent below
−87.5 (a probability under about 1e-38 of its row's largest) is taken at −87.5, so such a probability is off by at
most 1.2e-38 absolute. NaN logits give a NaN loss and gradient for their row, as in PyTorch. float64 uses
``std::exp``. Built with ``torch.utils.cpp_extension.load`` on first use and called through ``ctypes``, as the other
kernels of :mod:`memzoo.ops` (same cache, same ``MEMZOO_CPU_KERNELS=0`` switch, one warning when it cannot be built).
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

__all__ = ["available", "cross_entropy_forward", "library", "supports"]

SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <omp.h>
""" + EXP_CPP + r"""
namespace {
inline float exp_from_max(float d) { return exp_small(d < -87.5f ? -87.5f : d); }  // d = x - max <= 0; NaN kept
inline double exp_from_max(double d) { return std::exp(d); }

template <typename T>
void xent_fwd(const T* __restrict x, const int64_t* __restrict y, int64_t N, int64_t V, int64_t ignore, T scale,
              T* __restrict loss, T* __restrict grad, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && N > 1)
  for (int64_t n = 0; n < N; ++n) {
    const T* xr = x + n * V;
    T* gr = grad ? grad + n * V : nullptr;
    const int64_t t = y[n];
    if (t == ignore) {
      loss[n] = T(0);
      if (gr) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) gr[v] = T(0);
      }
      continue;
    }
    T m = xr[0];
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = xr[v] > m ? xr[v] : m;
    T s = T(0);
    if (gr) {
#pragma omp simd reduction(+ : s)
      for (int64_t v = 0; v < V; ++v) {
        const T e = exp_from_max(xr[v] - m);
        gr[v] = e;
        s += e;
      }
      const T r = scale / s;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) gr[v] *= r;
      gr[t] -= scale;
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t v = 0; v < V; ++v) s += exp_from_max(xr[v] - m);
    }
    loss[n] = (m - xr[t]) + std::log(s);
  }
}
}  // namespace

#define MEMZOO_XENT_KERNELS(T, S)                                                                                  \
  extern "C" int memzoo_xent_fwd_##S(const T* x, const int64_t* y, int64_t n, int64_t v, int64_t ignore, double sc, \
                                     T* loss, T* grad, int th) {                                                    \
    xent_fwd<T>(x, y, n, v, ignore, T(sc), loss, grad, th); return 0; }

MEMZOO_XENT_KERNELS(float, f32)
MEMZOO_XENT_KERNELS(double, f64)
"""

_KERNELS = CompiledLibrary("the C++ cross-entropy kernel", lambda: _build())
available = _KERNELS.available
library = _KERNELS.library


def supports(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether ``logits`` and ``labels`` can take the compiled path: plain CPU tensors (subclasses such as DTensor
    and fake tensors keep the PyTorch path), contiguous ``logits (N, V)`` of float32 or float64 with ``V >= 1``,
    ``labels (N,)`` of int64, and the kernel built."""
    return (type(logits) in (torch.Tensor, torch.nn.Parameter) and type(labels) is torch.Tensor
            and logits.device.type == "cpu" and labels.device.type == "cpu" and logits.dtype in FLOAT_SUFFIX
            and labels.dtype == torch.int64 and logits.dim() == 2 and labels.shape == logits.shape[:1]
            and logits.shape[1] > 0 and logits.is_contiguous() and labels.is_contiguous() and available())


def _build() -> ctypes.CDLL:
    lib = compile_library("memzoo_xent", "xent.cpp", SOURCE, ["-fno-math-errno", "-fno-trapping-math"])
    i64, ptr, f64, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    return declare_float_kernels(lib, {"xent_fwd": [ptr, ptr, i64, i64, i64, f64, ptr, ptr, cint]})


def cross_entropy_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale: float,
                          need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(loss (N,), grad (N, V) or None)`` for ``logits (N, V)`` and ``labels (N,)`` as the module docstring says
    (labels must lie in ``[0, V)`` or equal ``ignore_index``; the caller checks). Costs one read of the logits and,
    with ``need_grad``, one write of the gradient."""
    n, v = logits.shape
    loss = logits.new_empty(n)
    grad = torch.empty_like(logits) if need_grad else None
    _KERNELS.float_kernel("xent_fwd", logits.dtype)(
        logits.data_ptr(), labels.data_ptr(), n, v, int(ignore_index), float(scale), loss.data_ptr(),
        None if grad is None else grad.data_ptr(), torch.get_num_threads(),
    )
    return loss, grad
