"""Running a test with one of memzoo's compiled CPU kernel libraries switched off (``MEMZOO_CPU_KERNELS=0``)."""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator

import pytest


@contextlib.contextmanager
def kernels_switched(module: ModuleType, monkeypatch: pytest.MonkeyPatch, off: bool = True) -> Iterator[None]:
    """Inside: ``module``'s kernels (``memzoo.ops.cpu_dense``, ``cpu_read``, ``cpu_topk``) reloaded with
    ``MEMZOO_CPU_KERNELS=0`` when ``off``, as loaded before otherwise. Afterwards the module's load state and the
    environment are as they were."""
    saved = dict(module._KERNELS.state)
    try:
        with monkeypatch.context() as patch:
            if off:
                module._KERNELS.state.clear()
                patch.setenv("MEMZOO_CPU_KERNELS", "0")
            yield
    finally:
        module._KERNELS.state.clear()
        module._KERNELS.state.update(saved)
