"""The host allocator's settings for training on a CPU: keep freed tensor memory in the process.

A training step on the CPU allocates and frees the same large temporaries every step (activations, logits, their
gradients: tens of MB). glibc's ``malloc`` serves blocks above its mmap threshold (dynamic, at most 32 MiB) with fresh
``mmap`` calls and returns free memory above its trim threshold to the system, so every step pays the page faults of
first touching that memory again. :func:`keep_freed_memory` raises both thresholds (``mallopt``): blocks up to
32 MiB come from the heap and up to 1 GiB of freed heap stays mapped, so a step reuses the pages the previous step
freed. On the 2-core CPU the width-16 capacity model's training step (`configs/capacity-w16/model-dense.yaml`)
runs about a third faster with it. The price: the process keeps up to 1 GiB of freed memory instead of returning it.

``memzoo`` applies it at the start of every command (:func:`memzoo.cli.main`); ``MEMZOO_MALLOC_TUNING=0`` turns it off.
It does nothing off glibc (macOS, musl), where the allocator has other policies.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["ENV_SWITCH", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: ``MEMZOO_MALLOC_TUNING=0`` leaves the allocator's settings as they are
ENV_SWITCH = "MEMZOO_MALLOC_TUNING"
#: bytes: blocks at most this large come from the heap (glibc's ceiling for this setting on 64-bit systems)
MMAP_THRESHOLD = 32 * 2**20
#: bytes: freed memory at the heap's top kept mapped up to this much
TRIM_THRESHOLD = 2**30

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_applied: list[bool] = []


def keep_freed_memory() -> bool:
    """Sets glibc's mmap and trim thresholds once per process (see the module docstring); ``True`` when they are
    set, ``False`` off glibc, when ``mallopt`` refuses a value, or with ``MEMZOO_MALLOC_TUNING=0``."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get(ENV_SWITCH, "1") != "0" and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _applied.append(ok)
    return ok
