"""Loading memzoo's compiled CPU kernels once: the build-or-fall-back rule shared by :mod:`memzoo.ops.cpu_topk` and
:mod:`memzoo.ops.cpu_read`.

A kernel library is built on first use (``torch.utils.cpp_extension.load`` into torch's extension cache) and loaded
with ctypes. A failed build warns once and leaves ``None``: callers then take their PyTorch path.
``MEMZOO_CPU_KERNELS=0`` turns every compiled kernel off without a warning.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from collections.abc import Callable

#: ``MEMZOO_CPU_KERNELS=0``: never build or use the compiled CPU kernels (the PyTorch paths run)
ENV_SWITCH = "MEMZOO_CPU_KERNELS"


def load_once(state: dict[str, object], lock: threading.Lock, build: Callable[[], ctypes.CDLL],
              what: str) -> ctypes.CDLL | None:
    """The library ``build()`` returns, built at the first call and kept in ``state["lib"]``; ``None`` after one
    ``RuntimeWarning`` naming ``what`` when the build fails (``state["error"]`` says why), or silently when
    :data:`ENV_SWITCH` is ``0``. Thread-safe: ``lock`` guards the one build."""
    if "lib" in state:
        return state["lib"]  # type: ignore[return-value]
    with lock:
        if "lib" not in state:
            if os.environ.get(ENV_SWITCH, "1") == "0":
                state["lib"], state["error"] = None, f"{ENV_SWITCH}=0"
            else:
                try:
                    state["lib"] = build()
                except Exception as error:  # noqa: BLE001 - any build failure means: use the PyTorch path
                    state["lib"], state["error"] = None, f"{type(error).__name__}: {error}"
                    warnings.warn(
                        f"memzoo: {what} could not be built ({str(state['error'])[:300]}); using the slower PyTorch "
                        f"path. Install a C++ compiler (g++) or set {ENV_SWITCH}=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
    return state["lib"]  # type: ignore[return-value]
