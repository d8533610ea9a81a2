"""What a result was measured on, in one line, for the results pages and benchmark JSON.

A training run on one CPU thread repeats to the bit on the same machine, not on another one: torch and oneDNN pick
their kernels by the processor (its vendor and vector extensions) and memzoo's C++ kernels are compiled for torch's
CPU capability, so a float sum can round differently elsewhere, and training amplifies the difference. A page that
names the processor says where its runs repeat to the bit.

:func:`describe_machine` returns, e.g., ``"2 CPU cores: Intel(R) Xeon(R) Processor @ 2.80GHz (AVX512), torch
2.13.0+cpu"`` or ``"one NVIDIA H200, torch 2.13.0+cu128"``.
"""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_model_name", "describe_machine"]


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The processor's marketing name (Linux: ``model name`` of ``cpuinfo``; elsewhere ``platform.processor()``), or
    the architecture (``x86_64``) where neither names it."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def describe_machine(device: str | None = None) -> str:
    """One line naming what computes: the CUDA GPU by name where ``device`` is ``"cuda"`` (or ``None`` and CUDA is
    available), else the CPU's core count, model name and the vector capability torch dispatches to; torch's version
    either way."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return f"one {torch.cuda.get_device_name()}, torch {torch.__version__}"
    if device != "cpu":
        raise ValueError(f"describe_machine: device {device!r} is neither 'cpu' nor 'cuda'")
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{os.cpu_count()} CPU cores: {cpu_model_name()} ({capability}), torch {torch.__version__}"
