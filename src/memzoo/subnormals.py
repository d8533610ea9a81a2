"""CPU float arithmetic that flushes subnormal numbers to zero while memzoo trains or evaluates.

Floats below the smallest normal number (1.2e-38 in float32) are *subnormal*; x86 and ARM CPUs handle them in
microcode, tens of times slower than normal floats. A language model that grows confident produces them every step:
probabilities of ``exp(-80)`` and below in the softmax, their gradients scaled by ``1 / tokens``, and the matmuls
and elementwise kernels that read those gradients slow down with them. On the shared 2-core CPU the capacity
study's width-8 dense cell (``tools/capacity.py --cpu-hour``: ``configs/capacity-w8/model-dense.yaml`` at AdamW
3e-2, 5,500 steps, one thread) took 364-398 s with subnormals and 163 s with them flushed (final validation loss
1.0925 in both), its steps slowing as the model grew confident.

:func:`flushing_subnormals` sets the CPU's flush-to-zero and denormals-are-zero modes (``torch.set_flush_denormal``)
for the duration of a ``with`` block and restores the previous mode after it, on the calling thread and on every
thread of the GNU OpenMP pool that torch's CPU ops and memzoo's C++ kernels share (where torch runs on libgomp, as
its Linux wheels do; each thread runs one call in a parallel region). Threads created inside the block inherit the
mode. Every result changes by at most the subnormal values themselves (< 1.2e-38 absolute), as on GPUs, whose fast
paths flush them too; but training amplifies any change, so a run with the mode differs from one without it beyond
that. ``MEMZOO_FLUSH_SUBNORMALS=0`` leaves the mode as it is, which is what reproduces a run trained without it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

__all__ = ["ENV_SWITCH", "flush_requested", "flushing_subnormals", "subnormals_flushed"]

#: ``MEMZOO_FLUSH_SUBNORMALS=0`` leaves the CPU's float mode as it is
ENV_SWITCH = "MEMZOO_FLUSH_SUBNORMALS"
_SUBNORMAL = 1.0e-39  # below float32's smallest normal number, 1.1754944e-38


def flush_requested() -> bool:
    """Whether ``MEMZOO_FLUSH_SUBNORMALS`` asks training to flush subnormals (on unless it is ``0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0"


def subnormals_flushed() -> bool:
    """Whether this thread's CPU float arithmetic flushes subnormals: ``1e-39 · 1`` in float32 comes out as zero."""
    import torch

    return bool((torch.tensor([_SUBNORMAL], dtype=torch.float32) * 1.0)[0] == 0)


def _openmp_runtimes() -> list[ctypes.CDLL]:
    """The GNU OpenMP runtimes loaded in this process (Linux: from ``/proc/self/maps``); ``[]`` elsewhere."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if line.rstrip().split("/")[-1].startswith("libgomp")})
    except OSError:
        return []
    runtimes = []
    for path in paths:
        try:
            runtimes.append(ctypes.CDLL(path))
        except OSError:
            continue
    return [lib for lib in runtimes if hasattr(lib, "GOMP_parallel")]


_PARALLEL_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _set_mode(on: bool) -> bool:
    """Sets the mode on the calling thread and on every thread of each loaded OpenMP pool (as many as torch uses);
    ``False`` where the CPU cannot flush."""
    import torch

    supported = torch.set_flush_denormal(on)
    if supported:
        body = _PARALLEL_BODY(lambda _: torch.set_flush_denormal(on))
        for runtime in _openmp_runtimes():
            runtime.GOMP_parallel.argtypes = [_PARALLEL_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            runtime.GOMP_parallel(body, None, max(torch.get_num_threads(), 1), 0)
    return supported


@contextlib.contextmanager
def flushing_subnormals(enabled: bool | None = None) -> Iterator[bool]:
    """Within the block this thread's and the OpenMP pool's float arithmetic flushes subnormals to zero (see the
    module docstring); the previous mode is restored on exit. ``enabled=None`` reads ``MEMZOO_FLUSH_SUBNORMALS`` (on
    unless ``0``). Yields whether the mode is on inside the block (``False`` where the CPU cannot flush)."""
    if enabled is None:
        enabled = flush_requested()
    before = subnormals_flushed()
    if not enabled:
        yield before
        return
    supported = _set_mode(True)
    try:
        yield supported
    finally:
        if supported and not before:
            _set_mode(False)
