"""PEER layer forward+backward: memzoo's sparse-op PEER against the materialising formulation, same run.

Both variants share one :class:`memzoo.blocks.peer.PEER` module (same weights, same product-key routing,
``PEER.router``). They differ in how the retrieved experts are applied:

- ``ops``: ``memzoo`` PEER, ``h = gather_dot(down, idx, x)``, ``y = weighted_gather(up, idx, w · act(h))``;
- ``materialised``: what public PEER implementations do, ``down[idx]`` and ``up[idx]`` gathered into
  ``(B, T, heads, k, dim)`` tensors, then two einsums (autograd keeps both gathered tensors for backward).

Default size: ``N = 2^18`` experts (n_keys 512), heads 8, knn 16, dim 256, batch 8 × 256 tokens; float32.
The input requires its gradient, as inside a network. Headline: ``time ratio = materialised / ops`` (target ≥ 2)
and ``memory ratio = materialised / ops`` (target ≥ 4).

Time: median of ``--repeats`` forward+backward steps after ``--warmup`` steps, variants interleaved (A, B, A, B, …)
in one process so machine drift hits both alike. On a CPU shared with other work, pass ``--threads 1``: with more
threads than free cores every OpenMP barrier waits for a descheduled thread, and the variant with more (smaller)
parallel regions is penalised far beyond its real cost.

Two gradient regimes, each timed and measured (the headline ratios are ``zeroed``'s):

- ``zeroed``: the ``.grad`` buffers exist (from a warm-up step) and are zeroed in place before each step, as in the
  later micro-batches of gradient accumulation or with ``zero_grad(set_to_none=False)``. The ops add the rows a
  batch touched into the table's ``.grad`` in place; the materialised variant's ``F.embedding`` backward builds a
  fresh dense ``(N, dim)`` gradient per table and autograd adds it in.
- ``none``: every ``.grad`` is ``None`` before each step (``zero_grad()``'s default, Lightning's). Both variants
  allocate the table gradients the step leaves behind, two ``(N, dim)`` tensors in dense update mode, so the peak of
  either includes them and the step-peak ratio is bounded by how large they are next to the activations.

``--update sparse`` trains the pool as ``update: sparse`` pools are trained: row-sparse table gradients in both
variants (a sparse gradient has no fixed buffer, so the two regimes coincide).

Memory, above the resting state (weights, the ``.grad`` buffers of the regime, and the input): ``step_peak``, the peak
of one forward+backward (the headline ``memory ratio``), and ``after_forward``, what the forward leaves alive for the
backward (saved activations). On CUDA:
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the resting allocation. On CPU there is no
allocator peak counter, so each variant runs in a fresh subprocess that reads the kernel's peak resident set
(``VmHWM`` in ``/proc/self/status``) after resetting it (writing ``5`` to ``/proc/self/clear_refs``) at the resting
state, and the resident set ``VmRSS`` after the forward; glibc is told to serve every allocation over 64 KiB by
``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``), so freed tensors go back to the kernel and the resting RSS holds no
cached garbage. Linux only.

    python tools/bench_peer.py [--quick] [--device cpu|cuda] [--threads N] [--batch B] [--update dense|sparse]
                               [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memzoo.blocks.peer import ACTIVATIONS, PEER
from memzoo.blocks.pool import MemoryPool

FULL = dict(n_keys=512, dim=256, heads=8, knn=16, k_dim=128, batch=8, seq=256, update="dense")  # 2^18 experts
QUICK = dict(n_keys=32, dim=64, heads=4, knn=8, k_dim=32, batch=2, seq=64, update="dense")  # 2^10 experts
VARIANTS = ("ops", "materialised")
REGIMES = ("zeroed", "none")  # .grad before each step: kept and zeroed in place | None (module docstring)


def materialised_forward(peer: PEER, x: torch.Tensor) -> torch.Tensor:
    """PEER with the gathered expert vectors built: ``(B, T, heads, k, dim)`` twice."""
    indices, weights = peer.router(x)  # (B, T, heads, knn)
    sparse = peer.pool.sparse  # row-sparse table gradients for both variants when the pool trains sparsely
    down = F.embedding(indices, peer.pool.down, sparse=sparse)  # (B, T, heads, k, dim)
    up = F.embedding(indices, peer.pool.up, sparse=sparse)
    hidden = ACTIVATIONS[peer.activation](torch.einsum("bthkd,btd->bthk", down, x))
    return torch.einsum("bthk,bthkd->btd", weights * hidden, up)


def build(cfg: dict, device: str) -> tuple[PEER, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    pool = MemoryPool(cfg["n_keys"], cfg["dim"], kind="experts", update=cfg.get("update", "dense"))
    peer = PEER(cfg["dim"], pool=pool, heads=cfg["heads"], knn=cfg["knn"], k_dim=cfg["k_dim"], query_norm="layernorm")
    peer.bench_pool = pool  # a shared pool is not the layer's submodule; registering it here moves and zeroes it
    peer = peer.to(device)
    # the layer's input needs its gradient, as inside a network (it also makes autograd keep down[idx] alive)
    x = torch.randn(cfg["batch"], cfg["seq"], cfg["dim"], device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    return peer, x, grad_out


def step(peer: PEER, variant: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    """One forward+backward into the parameters' existing ``.grad`` buffers."""
    y = peer(x) if variant == "ops" else materialised_forward(peer, x)
    y.backward(grad_out)


def zero_grads(peer: PEER, x: torch.Tensor, regime: str = "zeroed") -> None:
    """``zeroed``: zeroes dense ``.grad`` buffers in place and drops sparse ones (a sparse gradient has no fixed
    buffer); ``none``: sets every ``.grad`` to ``None``."""
    for p in (*peer.parameters(), x):
        if p.grad is not None:
            if p.grad.is_sparse or regime == "none":
                p.grad = None
            else:
                p.grad.zero_()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- time
def time_variants(cfg: dict, device: str, warmup: int, repeats: int, regime: str) -> dict[str, float]:
    """Median seconds per forward+backward step of each variant, interleaved, ``.grad`` as ``regime`` says."""
    peer, x, grad_out = build(cfg, device)
    for _ in range(warmup):
        for variant in VARIANTS:
            step(peer, variant, x, grad_out)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            zero_grads(peer, x, regime)
            sync(device)
            start = time.perf_counter()
            step(peer, variant, x, grad_out)
            sync(device)
            times[variant].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def max_output_difference(cfg: dict, device: str) -> float:
    """Sanity check: the two variants compute the same function."""
    peer, x, _ = build(cfg, device)
    with torch.no_grad():
        return (peer(x) - materialised_forward(peer, x)).abs().max().item()


# ----------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory_here(cfg: dict, device: str, variant: str, regime: str) -> dict[str, int]:
    """Bytes above the resting state (see module docstring): ``after_forward``, what the forward leaves for the
    backward (outputs and saved activations), and ``step_peak``, the peak over the whole forward+backward."""
    peer, x, grad_out = build(cfg, device)
    step(peer, variant, x, grad_out)  # warm-up: allocates the .grad buffers
    zero_grads(peer, x, regime)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
        y = peer(x) if variant == "ops" else materialised_forward(peer, x)
        torch.cuda.synchronize()
        after_forward = torch.cuda.memory_allocated() - resting
        y.backward(grad_out)
        torch.cuda.synchronize()
        return {"after_forward": after_forward, "step_peak": torch.cuda.max_memory_allocated() - resting}
    resting = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    y = peer(x) if variant == "ops" else materialised_forward(peer, x)
    after_forward = _status_kib("VmRSS") - resting
    y.backward(grad_out)
    return {"after_forward": after_forward * 1024, "step_peak": (_status_kib("VmHWM") - resting) * 1024}


def measure_memory(cfg: dict, device: str, variant: str, regime: str) -> dict[str, int]:
    """On CUDA in this process; on CPU in a fresh subprocess (so one variant's RSS never inflates the other's)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        return measure_memory_here(cfg, device, variant, regime)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_peer as b; "
        "print(json.dumps(b.measure_memory_here(json.loads(sys.argv[2]), 'cpu', sys.argv[3], sys.argv[4])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent), json.dumps(cfg), variant, regime],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_step(cfg: dict, device: str, variant: str, rows: int = 15) -> str:
    """torch.profiler's table of one warm forward+backward step of ``variant``."""
    from torch.profiler import ProfilerActivity, profile

    peer, x, grad_out = build(cfg, device)
    for _ in range(2):
        step(peer, variant, x, grad_out)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        step(peer, variant, x, grad_out)
        sync(device)
    sort_by = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


# ----------------------------------------------------------------------------------------------- main
def measure_regime(cfg: dict, device: str, warmup: int, repeats: int, regime: str) -> dict:
    """Times and peak memories of both variants in one gradient regime, and their ratios (materialised / ops)."""
    seconds = time_variants(cfg, device, warmup, repeats, regime)
    memory = {v: measure_memory(cfg, device, v, regime) for v in VARIANTS}
    return {
        "seconds_per_step": seconds,
        "memory_bytes": memory,
        "time_ratio": seconds["materialised"] / seconds["ops"],
        "memory_ratio": memory["materialised"]["step_peak"] / max(memory["ops"]["step_peak"], 1),
        "after_forward_memory_ratio": memory["materialised"]["after_forward"] / max(memory["ops"]["after_forward"], 1),
    }


def run(cfg: dict, device: str, warmup: int, repeats: int) -> dict:
    regimes = {regime: measure_regime(cfg, device, warmup, repeats, regime) for regime in REGIMES}
    return {
        "config": {**cfg, "experts": cfg["n_keys"] ** 2, "dtype": "float32", "device": device,
                   "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats},
        "max_abs_output_difference": max_output_difference(cfg, device),
        "one_gathered_tensor_bytes": cfg["batch"] * cfg["seq"] * cfg["heads"] * cfg["knn"] * cfg["dim"] * 4,
        "one_table_gradient_bytes": cfg["n_keys"] ** 2 * cfg["dim"] * 4,  # one dense (N, dim) float32 gradient
        "headline_regime": REGIMES[0],
        **regimes[REGIMES[0]],  # the headline: seconds_per_step, memory_bytes and the three ratios
        "regimes": regimes,
        "memory_method": "cuda max_memory_allocated" if device == "cuda"
        else "VmHWM - VmRSS in a fresh subprocess, MALLOC_MMAP_THRESHOLD_=65536",
    }


def table(result: dict) -> str:
    mib = 2**20
    lines = [f"{'.grad':<8}{'variant':<14}{'fwd+bwd ms':>12}{'step peak MiB':>15}{'after fwd MiB':>15}"]
    for regime in REGIMES:
        r = result["regimes"][regime]
        s, m = r["seconds_per_step"], r["memory_bytes"]
        lines += [
            *(f"{regime:<8}{v:<14}{s[v] * 1e3:>12.1f}{m[v]['step_peak'] / mib:>15.1f}"
              f"{m[v]['after_forward'] / mib:>15.1f}" for v in VARIANTS),
            (f"{regime:<8}{'ratio mat/ops':<14}{r['time_ratio']:>11.2f}x{r['memory_ratio']:>14.2f}x"
             f"{r['after_forward_memory_ratio']:>14.2f}x"),
        ]
    lines.append("(.grad zeroed: buffers kept and zeroed in place, as in gradient accumulation - the headline; "
                 ".grad none: set to None, so each step's peak includes the gradients it leaves behind")
    if result["config"]["update"] == "dense":
        lines[-1] += f", {result['one_table_gradient_bytes'] / mib:.3g} MiB per table here"
    lines[-1] += ")"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 2, quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 5, quick 3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (default 8, quick 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 avoids OpenMP barrier stalls on a shared machine")
    parser.add_argument("--update", choices=["dense", "sparse"], default="dense",
                        help="expert pool update mode: sparse gives both variants row-sparse table gradients "
                             "(no dense (N, dim) transient), as a pool with update: sparse is trained")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops of each variant (.grad zeroed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    options = parser.parse_args(argv)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    cfg = dict(QUICK if options.quick else FULL)
    if options.batch is not None:
        cfg["batch"] = options.batch
    cfg["update"] = options.update
    warmup = options.warmup if options.warmup is not None else (1 if options.quick else 2)
    repeats = options.repeats if options.repeats is not None else (3 if options.quick else 5)
    result = run(cfg, options.device, warmup, repeats)
    text = json.dumps(result, indent=2)
    print(text)
    print(table(result))
    if options.json:
        options.json.write_text(text)
    if options.profile:
        for variant in VARIANTS:
            print(f"\n--- {variant}: one forward+backward step, top ops by total device (or CPU) time")
            print(profile_step(cfg, options.device, variant))
    return result


if __name__ == "__main__":
    main()
