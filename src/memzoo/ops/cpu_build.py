"""Loading memzoo's compiled CPU kernels once: the build-or-fall-back rule shared by :mod:`memzoo.ops.cpu_topk` and
:mod:`memzoo.ops.cpu_read`.

A kernel library is built on first use (``torch.utils.cpp_extension.load`` into torch's extension cache) and loaded
with ctypes. A failed build warns once and leaves ``None``: callers then take their PyTorch path.
``MEMZOO_CPU_KERNELS=0`` turns every compiled kernel off without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import warnings
from collections.abc import Callable

import torch

#: C++ shared by the kernel sources: ``Divider(n).div(i)`` is ``i / n`` without a division per call (a shift for
#: powers of two, else a double reciprocal and one fix-up; exact for ``0 <= i < 2^52``).
DIVIDER_CPP = r"""
struct Divider {
  int64_t n; int shift; double inverse;
  explicit Divider(int64_t n_) : n(n_), shift(-1), inverse(1.0 / (double)n_) {
    if (n > 0 && (n & (n - 1)) == 0) { shift = 0; while ((int64_t(1) << shift) < n) ++shift; }
  }
  inline int64_t div(int64_t i) const {
    if (shift >= 0) return i >> shift;
    int64_t q = (int64_t)((double)i * inverse);
    if (q * n > i) --q; else if ((q + 1) * n <= i) ++q;
    return q;
  }
};
"""

#: C++ shared by the kernel sources: ``exp_small(x)``, a branch-free (vectorisable) ``exp`` for float ``|x| <= 87.5``
#: (about 1 ulp; ``in_range(x)`` says whether ``x`` is in that range, false for NaN; float64 calls ``std::exp``).
#: Needs ``<cmath>`` and ``<cstdint>``.
EXP_CPP = r"""
// exp(x) for |x| <= 87.5 in float: x = n·ln2 + f, |f| <= ln2/2, exp(f) by a degree-6 polynomial (Cephes' expf
// coefficients, about 1 ulp), times 2^n built in the exponent bits; branch-free, so the loops vectorise. Callers
// handle elements outside that range (and NaN) themselves.
inline float exp_small(float x) {
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  return p * __builtin_bit_cast(float, ((int32_t)n + 127) << 23);
}
inline double exp_small(double x) { return std::exp(x); }
inline bool in_range(float a) { return a >= -87.5f && a <= 87.5f; }  // false for NaN
inline bool in_range(double) { return true; }
"""

#: the name suffix of a kernel's float32 and float64 instances (``memzoo_<name>_f32``, ``memzoo_<name>_f64``)
FLOAT_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

#: ``MEMZOO_CPU_KERNELS=0``: never build or use the compiled CPU kernels (the PyTorch paths run)
ENV_SWITCH = "MEMZOO_CPU_KERNELS"
#: compiler flags per ``torch.backends.cpu.get_cpu_capability()`` (what torch itself dispatches to on this CPU)
VECTOR_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"]}


class CompiledLibrary:
    """One of memzoo's C++ kernel libraries: built by ``build()`` at first use, once per process (thread-safe), and
    kept. ``None`` after one ``RuntimeWarning`` naming ``what`` when it cannot be built, or silently with
    :data:`ENV_SWITCH` ``=0``; callers then take their PyTorch path. ``state`` holds ``"lib"`` (the CDLL or
    ``None``) and ``"error"`` (why it is ``None``); cleared, the next use builds again."""

    def __init__(self, what: str, build: Callable[[], ctypes.CDLL]):
        self.what, self._build, self._lock = what, build, threading.Lock()
        self.state: dict[str, object] = {}

    def library(self) -> ctypes.CDLL | None:
        """The compiled library, built and loaded on first call; ``None`` (after one warning) if it cannot be built,
        or without a warning when ``MEMZOO_CPU_KERNELS=0``."""
        state = self.state
        if "lib" in state:
            return state["lib"]  # type: ignore[return-value]
        with self._lock:
            if "lib" not in state:
                if os.environ.get(ENV_SWITCH, "1") == "0":
                    state["lib"], state["error"] = None, f"{ENV_SWITCH}=0"
                else:
                    try:
                        state["lib"] = self._build()
                    except Exception as error:  # noqa: BLE001 - any build failure means: use the PyTorch path
                        state["lib"], state["error"] = None, f"{type(error).__name__}: {error}"
                        warnings.warn(
                            f"memzoo: {self.what} could not be built ({str(state['error'])[:300]}); using the slower "
                            f"PyTorch path. Install a C++ compiler (g++) or set {ENV_SWITCH}=0 to silence this.",
                            RuntimeWarning,
                            stacklevel=3,  # the caller of available() / library()
                        )
        return state["lib"]  # type: ignore[return-value]

    def available(self) -> bool:
        """Whether the compiled kernels are in use (builds them on first call)."""
        return self.library() is not None

    def require(self) -> ctypes.CDLL:
        """The compiled library; a ``RuntimeError`` naming it and why when it could not be built."""
        lib = self.library()
        if lib is None:
            raise RuntimeError(f"memzoo: {self.what} could not be built ({self.state.get('error')})")
        return lib

    def float_kernel(self, name: str, dtype: torch.dtype):
        """``memzoo_<name>_<f32|f64>`` for ``dtype`` (float32 or float64); :meth:`require`'s error when the library
        could not be built."""
        return getattr(self.require(), f"memzoo_{name}_{FLOAT_SUFFIX[dtype]}")


def compile_library(stem: str, file_name: str, source: str, flags: list[str]) -> ctypes.CDLL:
    """``source`` (plain C++, no torch headers) compiled with ``-O3 -fopenmp``, ``flags`` and this CPU's vector flags
    into torch's extension cache (one folder per stem, capability and hash of source and flags, so a changed source
    never loads a stale build) and loaded with ctypes. The source file is written atomically, so concurrent processes
    never compile a half-written file; ``cpp_extension.load`` serialises the build itself."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", "VSX", ...
    flags = ["-O3", *flags, "-fopenmp", *VECTOR_FLAGS.get(capability, [])]
    digest = hashlib.sha256((source + " ".join(flags)).encode()).hexdigest()[:16]
    name = f"{stem}_{capability.lower()}_{digest}"
    build_dir = os.path.join(cpp_extension.get_default_build_root(), name)
    os.makedirs(build_dir, exist_ok=True)
    path = os.path.join(build_dir, file_name)
    if not os.path.exists(path):
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w") as handle:
            handle.write(source)
        os.replace(partial, path)
    library = cpp_extension.load(
        name, sources=[path], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=build_dir,
        is_python_module=False, verbose=False,
    )
    return ctypes.CDLL(library)


def declare_float_kernels(lib: ctypes.CDLL, signatures: dict[str, list]) -> ctypes.CDLL:
    """Sets the argument types of ``memzoo_<name>_f32`` and ``_f64`` for each ``name: argtypes`` (they return int)."""
    for name, argtypes in signatures.items():
        for suffix in FLOAT_SUFFIX.values():
            fn = getattr(lib, f"memzoo_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib
