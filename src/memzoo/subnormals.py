"""CPU float arithmetic that flushes subnormal numbers to zero while memzoo trains or evaluates.

Floats below the smallest normal number (1.2e-38 in float32) are *subnormal*; x86 and ARM CPUs handle them in
microcode, tens of times slower than normal floats. A language model that grows confident produces them every step:
probabilities of ``exp(-80)`` and below in the softmax, their gradients scaled by ``1 / tokens``, and the matmuls
and elementwise kernels that read those gradients slow down with them. On the shared 2-core CPU the capacity
study's width-8 dense model (``configs/capacity-w8/model-dense.yaml``, AdamW 3e-2, one thread) went from 26 to
30 ms a step between steps 800 and 3,200 with them (the loss kernel already writing its tiny gradients as zero), and
stayed at 26-27 ms with them flushed (the losses printed to three decimals identical); its whole 5,500-step
``tools/capacity.py --cpu-hour`` cell took 364-398 s with neither, 163 s with both (same final loss).

:func:`flushing_subnormals` sets the CPU's flush-to-zero and denormals-are-zero modes (``torch.set_flush_denormal``)
on the calling thread for the duration of a ``with`` block and restores the previous mode after it. Threads created
inside the block (a torch/OpenMP pool started by the first parallel op) inherit the mode and keep it; a pool started
before the block keeps its own mode, so apply it before the first parallel op (``memzoo``'s training verbs do, first
thing). Every result changes by at most the subnormal values themselves (< 1.2e-38 absolute), as on GPUs, whose
fast paths flush them too. ``MEMZOO_FLUSH_SUBNORMALS=0`` leaves the mode as it is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["ENV_SWITCH", "flushing_subnormals", "subnormals_flushed"]

#: ``MEMZOO_FLUSH_SUBNORMALS=0`` leaves the CPU's float mode as it is
ENV_SWITCH = "MEMZOO_FLUSH_SUBNORMALS"
_SUBNORMAL = 1.0e-39  # below float32's smallest normal number, 1.1754944e-38


def subnormals_flushed() -> bool:
    """Whether this thread's CPU float arithmetic flushes subnormals: ``1e-39 · 1`` in float32 comes out as zero."""
    import torch

    return bool((torch.tensor([_SUBNORMAL], dtype=torch.float32) * 1.0)[0] == 0)


@contextlib.contextmanager
def flushing_subnormals(enabled: bool | None = None) -> Iterator[bool]:
    """Within the block this thread's float arithmetic flushes subnormals to zero (see the module docstring); the
    previous mode is restored on exit. ``enabled=None`` reads ``MEMZOO_FLUSH_SUBNORMALS`` (on unless ``0``). Yields
    whether the mode is on inside the block (``False`` where the CPU cannot flush)."""
    import torch

    if enabled is None:
        enabled = os.environ.get(ENV_SWITCH, "1") != "0"
    before = subnormals_flushed()
    if not enabled:
        yield before
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported and not before:
            torch.set_flush_denormal(False)
