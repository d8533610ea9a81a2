"""Memory blocks at the wall-clock cost of their FLOPs: training steps against dense, and product-key top-k alone.

One run measures, as ratios within the run (absolute times only in the JSON's raw section):

- **blocks** (CPU): one full training step (forward, loss (memzoo's fused cross-entropy), backward, optimizers:
  AdamW + the pools' row-wise optimizer) of the iso-FLOP study's models (``configs/study/model-*.yaml``: dense, MoE, PKM, Memory+, PEER at
  equal forward FLOPs; dim 128, 4 layers, batch 12 × 64) and UltraMem, UltraMemV2 and Engram beside a narrowed FFN ("dense" with layers 1 and 3
  replaced at equal forward FLOPs, :data:`DENSE_VARIANTS`) at 1 and 2 threads; ratio = step time ÷ dense's. At 1
  thread both by wall time and by the compute thread's CPU time (the headline and the targets' measure: on a
  shared machine it does not count the time other processes hold the core); at 2 threads by wall time. Each ratio
  is the median over ``--rounds`` paired rounds (every model's step timed in turn, divided by dense's of the same
  round), with the rounds' min–max beside it. Beside it,
  where PKM's, Memory+'s and PEER's memory layer spends its time (:func:`layer_breakdown`: the layer, its query,
  selection and reads alone, and the dense FFN it replaces; fwd+bwd CPU time at 1 thread).
- **topk** (CPU, 1 thread, CPU time of the thread): ``memzoo.ops.product_key_topk`` forward+backward at knn 32, heads 4, k_dim 96, 768
  tokens, n_keys 128–1024, against the previous PyTorch path (per-half ``torch.topk`` + top-k of the candidate
  sums, autograd through the indexing) and against ``torch.topk`` of the full ``n_keys²`` product set (measured
  on 64 tokens and scaled to 768; left out where it would not fit in memory); beside them the forward merge kernel
  alone (``memzoo.ops.cpu_topk.half_topk_merge`` on the half scores: bounds, candidates, ranking, selection), in µs
  per (token, head) row.
- **lookup** (CPU, 1 thread, CPU time of the thread): the token-indexed blocks (STEM; MoLE as trained, ``experts``,
  and re-parameterised, ``lookup``; Engram alone, 2- and 3-grams, 8 heads × 32 values per order) forward+backward at dim 256, vocab 8192, batch 8 × 128, each against a dense
  SwiGLU FFN of equal forward FLOPs (hidden = the block's FLOPs ÷ 6·dim); ratio = block ÷ that dense FFN.
- **cuda** (``--device cuda``): the same top-k against the previous path and ``torch.topk`` of the per-half scores,
  and at the 1.3B layer shape (dim 2048, 1024² keys, value_dim 2048, heads 4, knn 32) a Memory+ layer's
  forward+backward against a dense SwiGLU FFN of equal forward FLOPs.

    python tools/bench_blocks.py [--device cpu|cuda] [--json docs/results/bench_blocks.json]
        [--sections blocks,topk,lookup] [--models dense,engram,ultramem,ultramem_v2] [--repeats 10] [--rounds 5]

The process runs with memzoo's allocator settings (:func:`memzoo.host_allocator.keep_freed_memory`, as every
``memzoo`` command). Writes the JSON (with a ``targets`` list: ``target``, ``met``, ``detail``) and a Markdown table
beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

import memzoo
from memzoo.atomic import write_bytes_atomic
from memzoo.blocks.base import BlockContext
from memzoo.blocks.registry import create_block
from memzoo.host_allocator import keep_freed_memory
from memzoo.nn.cross_entropy import cross_entropy
from memzoo.ops import cpu_topk, product_key_topk
from memzoo.ops.product_keys import _candidate_ranks, _half_scores
from memzoo.training.module import LanguageModel
from memzoo.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "study"
BLOCK_MODELS = ("dense", "moe", "pkm", "memoryplus", "peer", "ultramem", "ultramem_v2", "ultramem_v2_shared",
                "engram")


def _engram_layer(layer_id: int) -> dict:
    """A study layer with Engram beside a dense FFN narrowed to hidden 296: FFN + Engram 294,272 forward FLOPs per
    token against the dense study layer's 294,912 (2- and 3-grams, 4 heads × 16 values per order, ~4,096-row tables)."""
    return {"block": "beside", "init": "none", "base": {"block": "dense", "hidden": 296},
            "add": {"block": "engram", "layer_id": layer_id, "max_ngram": 3, "ngram_dim": 64, "heads": 4,
                    "table_rows": 4096, "update": "sparse", "lr": 1.0e-2, "weight_decay": 0.0}}


#: Models that are "dense" (``configs/study/model-dense.yaml``) with these ``layers:`` (and the ``pools:`` of
#: :data:`DENSE_VARIANT_POOLS`), at equal forward FLOPs (``flops_per_token``): UltraMem 297k per layer (a 128² grid,
#: rank 2, 2 cores, over 4,096 rows of width 176 through 4 projections, 2 heads × top-32, k_dim 32, private tables
#: with dense updates as the authors train them, read and added in place), UltraMemV2 285k (16,384 FFN-valued slots
#: of width 128, 1 head × top-32, k_dim 32, beside a SwiGLU FFN of half the width) over private tables with dense
#: updates (``ultramem_v2``, the iso-FLOP study's model) or over ONE pool both layers share with sparse LazyAdam
#: updates (``ultramem_v2_shared``, as configs/text-ultramem-v2.yaml ships it), and
#: Engram beside a narrowed FFN 294k, against the dense FFN's 295k.
_ULTRAMEM = {"block": "ultramem", "n_keys": 128, "value_dim": 176, "value_expand": 4, "heads": 2, "knn": 32, "k_dim": 32}
_ULTRAMEM_V2 = {"block": "ultramem_v2", "n_keys": 128, "value_dim": 128, "heads": 1, "knn": 32, "k_dim": 32,
                "ffn_fraction": 0.5}
_ULTRAMEM_V2_SHARED = {"block": "ultramem_v2", "pool": "experts", "heads": 1, "knn": 32, "k_dim": 32,
                       "ffn_fraction": 0.5}
DENSE_VARIANTS = {
    "ultramem": {1: _ULTRAMEM, 3: _ULTRAMEM},
    "ultramem_v2": {1: _ULTRAMEM_V2, 3: _ULTRAMEM_V2},
    "ultramem_v2_shared": {1: _ULTRAMEM_V2_SHARED, 3: _ULTRAMEM_V2_SHARED},
    "engram": {1: _engram_layer(1), 3: _engram_layer(3)},
}
#: the shared pools of :data:`DENSE_VARIANTS` (the study's Memory+ pool rate and optimizer)
DENSE_VARIANT_POOLS = {
    "ultramem_v2_shared": {"experts": {"kind": "experts", "n_keys": 128, "value_dim": 128, "update": "sparse",
                                       "lr": 1.0e-2, "weight_decay": 0.0}},
}
STEP_TARGET, TOPK_TARGET, GPU_LAYER_TARGET, GPU_TOPK_TARGET = 1.25, 4.0, 1.2, 2.0
#: a run whose model's rounds differ by more than this factor (slowest round's ratio ÷ fastest) is flagged busy; the
#: committed run's widest are 1.20 (1 thread, CPU time) and 1.35 (2 threads, wall time), runs beside other jobs' 1.9–2.0
BUSY_SPREAD = 1.4


# ---------------------------------------------------------------------------------------------- timing
def timed(fn, repeats: int, warmup: int = 3, device: str = "cpu", clock: str = "wall") -> float:
    """Median seconds of ``fn()``: ``clock="wall"`` (wall time), or ``"thread"``: CPU time of the calling thread,
    which at one torch thread is all of the step's compute and, unlike wall time, does not count the time other
    processes on a shared machine hold the core."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    now = time.thread_time if clock == "thread" else time.perf_counter
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        sync()
        times.append(now() - start)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int, rounds: int = 3, device: str = "cpu", clock: str = "wall") -> dict:
    """Best-of-rounds median time of each function, the functions interleaved round by round (a noisy machine
    then slows all of them alike)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, repeats, device=device, clock=clock))
    return best


# ---------------------------------------------------------------------------------------------- blocks
def study_model(name: str) -> tuple[LanguageModel, str]:
    """The iso-FLOP study's model ``name`` as ``memzoo fit`` builds it (:func:`memzoo.build_model`, byte
    vocabulary, seed 0), or "dense" with the ``layers:`` of :data:`DENSE_VARIANTS` (and pools of
    :data:`DENSE_VARIANT_POOLS`); and its sparse optimizer's name."""
    config = yaml.safe_load((STUDY / f"model-{'dense' if name in DENSE_VARIANTS else name}.yaml").read_text())
    if name in DENSE_VARIANTS:
        layers = {i: dict(spec) for i, spec in DENSE_VARIANTS[name].items()}
        config["model"]["init_args"]["architecture"]["layers"] = layers
        if name in DENSE_VARIANT_POOLS:
            config["model"]["init_args"]["architecture"]["pools"] = DENSE_VARIANT_POOLS[name]
            config["model"]["init_args"]["sparse_optimizer"] = "lazy_adam"
    module = memzoo.build_model({**config, "seed_everything": 0}, vocab_size=258)
    return module, module.hparams.sparse_optimizer


def train_step_fn(name: str, batch: torch.Tensor):
    module, sparse_optimizer = study_model(name)
    model = module.model
    optimizer = build_optimizer(
        model, lambda params: torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        sparse_optimizer=sparse_optimizer,
    )

    def step():
        logits = model(batch[:, :-1])
        loss = cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        for aux in model.aux_losses().values():
            loss = loss + aux
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def paired_ratios(fns: dict, base: str, repeats: int, rounds: int, clock: str = "wall") -> dict:
    """Each function's time over ``base``'s, paired by round: in every round each function's median of ``repeats``
    calls (the functions in turn, so a slow stretch of a shared machine hits one round's functions alike) is divided
    by ``base``'s of that round. ``{name: {"ms": median ms over rounds, "ratio": median ratio, "spread": [min, max]
    ratio}}``."""
    per_round: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(timed(fn, repeats, clock=clock))
    out = {}
    for name, times in per_round.items():
        ratios = [t / b for t, b in zip(times, per_round[base])]
        out[name] = {"ms": 1e3 * statistics.median(times), "ratio": statistics.median(ratios),
                     "spread": [min(ratios), max(ratios)]}
    return out


def bench_blocks(threads: int, repeats: int, models=BLOCK_MODELS, rounds: int = 5) -> dict:
    """Each model's training step over dense's at ``threads`` threads: wall time, and at one thread also the CPU
    time of the compute thread (the headline), each the median over ``rounds`` paired rounds
    (:func:`paired_ratios`) with the rounds' spread."""
    torch.set_num_threads(threads)
    batch = torch.randint(0, 256, (12, 65), generator=torch.Generator().manual_seed(0))
    steps = {name: train_step_fn(name, batch) for name in dict.fromkeys(("dense", *models))}
    wall = paired_ratios(steps, "dense", repeats, rounds)
    rows = {name: {"ms": m["ms"], "ratio_to_dense": m["ratio"], "ratio_spread": m["spread"]} for name, m in wall.items()}
    if threads == 1:  # all compute on this thread: its CPU time is the load-independent measure (the headline)
        for name, m in paired_ratios(steps, "dense", repeats, rounds, clock="thread").items():
            rows[name].update(cpu_ms=m["ms"], cpu_ratio_to_dense=m["ratio"], cpu_ratio_spread=m["spread"])
    return rows


def _ratio_cell(row: dict, key: str) -> str:
    """``1.24`` or, where the rounds' spread was recorded, ``1.24 (1.19–1.30)``."""
    spread = row.get(key.replace("ratio_to_dense", "ratio_spread"))
    return f"{row[key]:.2f}" + (f" ({spread[0]:.2f}–{spread[1]:.2f})" if spread else "")


def widest_round_spread(blocks: dict) -> float:
    """The largest max ÷ min of a model's per-round ratios (its headline clock's) in one thread count's blocks; 1.0
    where no spread was recorded. Near 1 when the rounds agree; a busy machine shows as a wide spread."""
    widest = 1.0
    for row in blocks.values():
        spread = headline_spread(row)
        if spread and spread[0] > 0:
            widest = max(widest, spread[1] / spread[0])
    return widest


def busy_machine_warnings(result: dict) -> list[str]:
    """One line per thread count whose rounds disagree by more than :data:`BUSY_SPREAD` (a model's slowest round's
    ratio over its fastest): that run's ratios say more about the machine's other jobs than about the blocks."""
    out = []
    for threads, blocks in result.get("blocks", {}).items():
        widest = widest_round_spread(blocks)
        if widest > BUSY_SPREAD:
            out.append(f"{threads} thread(s): a model's rounds differ by up to {widest:.2f}x (over {BUSY_SPREAD}x): "
                       f"the machine was busy; rerun on a quiet machine before comparing these ratios")
    return out


def headline_ratio(row: dict) -> float:
    """A block's step ÷ dense's: by the compute thread's CPU time where measured (1 thread), else wall time."""
    return row.get("cpu_ratio_to_dense", row["ratio_to_dense"])


def headline_spread(row: dict) -> list[float] | None:
    """The rounds' ``[min, max]`` of :func:`headline_ratio`'s clock, or ``None`` where no spread was recorded."""
    return row.get("cpu_ratio_spread" if "cpu_ratio_to_dense" in row else "ratio_spread")


#: the product-key models whose layer :func:`layer_breakdown` takes apart
BREAKDOWN_MODELS = ("pkm", "memoryplus", "peer")


def layer_breakdown(name: str, repeats: int) -> dict:
    """Where a product-key model's memory layer (the study model's first) spends its time: forward+backward CPU
    time of the calling thread (1 thread) at the study shape (12 × 64 tokens), of the whole layer, of its parts
    alone and of the dense FFN it replaces (``ms``). Parts: ``query`` (the router's projection and query norm),
    ``router`` (query, qk-norm, exact top-k, weights: ``router - query`` is the selection, which no FLOP counts),
    ``read`` (the table reads and their backward on the router's rows: ``pool.read`` / PEER's ``experts``); the
    rest of the layer (``layer - router - read``) is its projections and gate. A read's backward here sums one
    layer's table gradient; in a training step the last read of a shared pool sums both layers' in one pass.
    Also ``read_cold_ms``, the read with its table evicted from the caches before each call (:func:`timed_cold`),
    and ``read_table_mb``, the MB of table rows its forward reads (``table_bytes_read_per_token`` × tokens)."""
    torch.set_num_threads(1)
    layers = study_model(name)[0].model.layers
    index = next(i for i, layer in enumerate(layers) if getattr(layer.ffn, "reads_pool", False))
    layer, dense = layers[index].ffn, study_model("dense")[0].model.layers[index].ffn
    x = torch.randn(12, 64, 128, generator=torch.Generator().manual_seed(0)).requires_grad_()
    params = [*layer.parameters(), *layer.pool.parameters(), *dense.parameters(), x]
    with torch.no_grad():
        indices, weights = layer.router(x)
    indices, weights = indices.flatten(-2), weights.flatten(-2).requires_grad_()
    read = (lambda: layer.experts(x, indices, weights)) if name == "peer" else (lambda: layer.pool.read(indices, weights))
    parts = {"layer": lambda: layer(x), "dense_ffn": lambda: dense(x), "query": lambda: layer.router.queries(x),
             "router": lambda: layer.router(x)[1], "read": read}

    def fwd_bwd(part):
        def run():
            part().float().square().mean().backward()
            for tensor in [*params, weights]:
                tensor.grad = None
        return run

    times = interleaved({part: fwd_bwd(fn) for part, fn in parts.items()}, repeats, clock="thread")
    row = {f"{part}_ms": 1e3 * t for part, t in times.items()}
    # the read again with its table out of the caches, as in a training step (where the optimizer's pass over the
    # table and its moments, and the rest of the model, come between two reads), and the bytes it reads
    row["read_cold_ms"] = 1e3 * timed_cold(fwd_bwd(read), repeats)
    row["read_table_mb"] = x.shape[0] * x.shape[1] * layer.table_bytes_read_per_token() / 1e6
    return row


#: bytes written between two calls of :func:`timed_cold`: twice the largest last-level cache of this class of machine
EVICT_BYTES = 64 * 2**20


def timed_cold(fn, repeats: int) -> float:
    """Median CPU time of the calling thread of ``fn()``, the caches evicted before each call (``EVICT_BYTES``
    written, not timed)."""
    evict = torch.empty(EVICT_BYTES // 4)
    fn()
    times = []
    for _ in range(repeats):
        evict.fill_(len(times))
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- lookup blocks
#: Token-indexed blocks of the lookup section: name -> (preset, settings, re-parameterise before timing).
LOOKUP_BLOCKS = {
    "stem": ("stem", {"hidden": 1056}, False),
    "mole (experts)": ("mole", {"hidden": 512, "expert_hidden": 512}, False),
    "mole (lookup)": ("mole", {"hidden": 512, "expert_hidden": 512}, True),
    "engram": ("engram", {"ngram_dim": 256, "heads": 8, "table_rows": 16384, "update": "sparse"}, False),
}
LOOKUP_SHAPE = {"dim": 256, "vocab": 8192, "batch": 8, "length": 128}


def bench_lookup(repeats: int) -> dict:
    """Each lookup block's fwd+bwd ÷ a dense SwiGLU FFN's of equal forward FLOPs (1 thread, thread CPU time)."""
    torch.set_num_threads(1)
    dim, vocab = LOOKUP_SHAPE["dim"], LOOKUP_SHAPE["vocab"]
    ids = torch.randint(0, vocab, (LOOKUP_SHAPE["batch"], LOOKUP_SHAPE["length"]),
                        generator=torch.Generator().manual_seed(0))
    x = torch.randn(*ids.shape, dim, requires_grad=True)
    ctx = BlockContext.for_tokens(ids)
    embedding = torch.nn.Embedding(vocab, dim)
    rows = {}
    for name, (preset, settings, reparameterize) in LOOKUP_BLOCKS.items():
        torch.manual_seed(0)
        block = create_block(preset, dim=dim, vocab_size=vocab, embedding=embedding, **settings)
        if reparameterize:
            block.reparameterize()
        dense = create_block("dense", dim=dim, hidden=round(block.flops_per_token() / (6 * dim)))

        def fwd_bwd(module, *args):
            return lambda: module(x, *args).square().mean().backward()

        times = interleaved({"block": fwd_bwd(block, ctx), "dense": fwd_bwd(dense)}, repeats, clock="thread")
        rows[name] = {"flops_per_token": block.flops_per_token(), "dense_hidden": dense.hidden,
                      "block_ms": 1e3 * times["block"], "dense_ms": 1e3 * times["dense"],
                      "ratio_to_dense": times["block"] / times["dense"]}
    return rows


# ---------------------------------------------------------------------------------------------- top-k
def previous_topk(query, sub_keys, k):
    """The PyTorch path memzoo used before its kernels: per-half torch.topk, top-k of the candidate sums."""
    n_keys, half = sub_keys.shape[2], sub_keys.shape[3]
    halves = (query[..., :half], query[..., half:])
    scores = [torch.einsum("...hd,hnd->...hn", q, sub_keys[:, side]) for side, q in enumerate(halves)]
    (best1, idx1), (best2, idx2) = (s.topk(k, dim=-1) for s in scores)
    rank1, rank2 = _candidate_ranks(k, query.device)
    top, position = (best1[..., rank1] + best2[..., rank2]).topk(k, dim=-1)
    return top, idx1.gather(-1, rank1[position]) * n_keys + idx2.gather(-1, rank2[position])


def full_product_topk(query, sub_keys, k):
    """``torch.topk`` over all ``n_keys²`` product keys (the definition)."""
    half = sub_keys.shape[-1]
    s1 = torch.einsum("...hd,hnd->...hn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", query[..., half:], sub_keys[:, 1])
    return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2).topk(k, dim=-1)


def half_scores_topk(query, sub_keys, k):
    """Only ``torch.topk`` of the two per-half score rows (a floor for any per-half top-k path)."""
    half = sub_keys.shape[-1]
    s1 = torch.einsum("...hd,hnd->...hn", query[..., :half], sub_keys[:, 0])
    s2 = torch.einsum("...hd,hnd->...hn", query[..., half:], sub_keys[:, 1])
    return s1.topk(k, dim=-1)[0] + s2.topk(k, dim=-1)[0], None


def fwd_bwd(fn, query, sub_keys, k):
    def run():
        scores, _ = fn(query, sub_keys, k)
        scores.float().sum().backward()
    return run


def bench_topk(device: str, n_keys_list, tokens: int, repeats: int, dtype=torch.float32,
               against_torch_topk: bool | None = None) -> dict:
    """Product-key top-k fwd+bwd (4 heads, Dk 96, knn 32) against the previous path, and (``against_torch_topk``,
    default: on CUDA) against ``torch.topk`` of the per-half scores, per ``n_keys``: ms and speedups."""
    against_torch_topk = device == "cuda" if against_torch_topk is None else against_torch_topk
    rows = {}
    for n_keys in n_keys_list:
        gen = torch.Generator().manual_seed(n_keys)
        query = torch.randn(tokens, 4, 96, generator=gen).to(device, dtype).requires_grad_()
        sub_keys = torch.randn(4, 2, n_keys, 48, generator=gen).to(device, dtype).requires_grad_()
        fns = {"new": fwd_bwd(product_key_topk, query, sub_keys, 32),
               "previous": fwd_bwd(previous_topk, query, sub_keys, 32)}
        if against_torch_topk:
            fns["torch_topk_halves"] = fwd_bwd(half_scores_topk, query, sub_keys, 32)
        times = interleaved(fns, repeats, device=device, clock="thread" if device == "cpu" else "wall")
        row = {f"{name}_ms": 1e3 * t for name, t in times.items()}
        row["speedup_vs_previous"] = times["previous"] / times["new"]
        if against_torch_topk:
            row["speedup_vs_torch_topk_halves"] = times["torch_topk_halves"] / times["new"]
        small = 64
        if device == "cpu" and 4 * small * n_keys**2 * 4 * 3 < 2**30:  # scores, grads and topk buffers < 1 GiB
            q_small = query.detach()[:small].clone().requires_grad_()
            t_full = timed(fwd_bwd(full_product_topk, q_small, sub_keys, 32), max(3, repeats // 3), clock="thread")
            row["full_product_ms_scaled"] = 1e3 * t_full * tokens / small
            row["speedup_vs_full_product"] = t_full * tokens / small / times["new"]
        if device == "cpu" and cpu_topk.available():  # the merge kernel alone, forward: per (token, head) row
            with torch.no_grad():
                half_scores = _half_scores(query, sub_keys).contiguous()
            t_merge = timed(lambda h=half_scores: cpu_topk.half_topk_merge(h, 32), repeats, clock="thread")
            row["merge_kernel_us_per_row"] = 1e6 * t_merge / (tokens * query.shape[1])
        rows[str(n_keys)] = row
    return rows


# ---------------------------------------------------------------------------------------------- 1.3B layer (GPU)
def bench_layer_13b(repeats: int, device: str = "cuda", dim: int = 2048, n_keys: int = 1024, tokens: int = 8192,
                    k_dim: int = 512) -> dict:
    """The paper's 1.3B memory layer (dim 2048, 1024² keys, value_dim 2048, 4 heads, knn 32, qk-norm, SiLU gate) in
    bfloat16 against a SwiGLU FFN of equal FLOPs, fwd+bwd on ``tokens`` tokens: ms and the ratio (the sizes are
    arguments only so a test can run the same code small on a CPU)."""
    from memzoo.blocks.dense import DenseMLP
    from memzoo.blocks.memory import ProductKeyMemory

    torch.manual_seed(0)
    memory = ProductKeyMemory(dim, heads=4, knn=32, k_dim=k_dim, qk_norm=True, gate="silu", n_keys=n_keys,
                              value_dim=dim).to(device, torch.bfloat16)
    hidden = max(64, round(memory.flops_per_token() / (6 * dim) / 64) * 64)  # SwiGLU: 6·dim·hidden FLOPs/token
    dense = DenseMLP(dim, hidden=hidden).to(device, torch.bfloat16)
    x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)

    def step(block):
        def run():
            block(x).float().square().mean().backward()
        return run

    times = interleaved({"memory": step(memory), "dense": step(dense)}, repeats, device=device)
    return {
        "memory_ms": 1e3 * times["memory"], "dense_ms": 1e3 * times["dense"],
        "ratio": times["memory"] / times["dense"], "dense_hidden": hidden,
        "memory_flops_per_token": memory.flops_per_token(), "dense_flops_per_token": dense.flops_per_token(),
        "tokens": tokens,
    }


# ---------------------------------------------------------------------------------------------- report
def targets(result: dict) -> list[dict]:
    out = []
    for threads in ("1", "2"):
        blocks = result.get("blocks", {}).get(threads)
        if not blocks:
            continue
        for name in ("pkm", "memoryplus", "peer", "ultramem", "ultramem_v2", "ultramem_v2_shared", "engram"):
            if name not in blocks:
                continue
            row = blocks[name]
            ratio = headline_ratio(row)
            spread = headline_spread(row)
            rounds = f", rounds {spread[0]:.2f}–{spread[1]:.2f}" if spread else ""
            detail = f"{ratio:.2f}x dense" + (
                f" (CPU time{rounds}; wall time {row['ratio_to_dense']:.2f}x)" if "cpu_ratio_to_dense" in row
                else f" (wall time{rounds})")
            out.append({"target": f"{name} training step <= {STEP_TARGET}x dense ({threads} thread(s), CPU)",
                        "met": ratio <= STEP_TARGET, "detail": detail})
    topk = result.get("topk_cpu", {})
    if topk:
        speedups = {n: row["speedup_vs_previous"] for n, row in topk.items()}
        out.append({"target": f"product-key top-k fwd+bwd >= {TOPK_TARGET}x the previous path (knn 32, 1 thread, CPU)",
                    "met": min(speedups.values()) >= TOPK_TARGET,
                    "detail": ", ".join(f"n_keys {n}: {s:.2f}x" for n, s in speedups.items())})
    if "topk_cuda" in result:
        speedups = {n: row["speedup_vs_torch_topk_halves"] for n, row in result["topk_cuda"].items()}
        out.append({"target": f"top-k kernel >= {GPU_TOPK_TARGET}x torch.topk (fwd+bwd, CUDA)",
                    "met": min(speedups.values()) >= GPU_TOPK_TARGET,
                    "detail": ", ".join(f"n_keys {n}: {s:.2f}x" for n, s in speedups.items())})
    if "layer_13b" in result:
        ratio = result["layer_13b"]["ratio"]
        out.append({"target": f"1.3B-shape memory layer fwd+bwd <= {GPU_LAYER_TARGET}x a SwiGLU FFN of equal FLOPs",
                    "met": ratio <= GPU_LAYER_TARGET, "detail": f"{ratio:.2f}x"})
    return out


def markdown(result: dict) -> str:
    lines = ["# Memory blocks against dense, product-key top-k against the previous path", "",
             f"Ratios measured in one run (`python tools/bench_blocks.py`); {result['machine']}.", ""]
    for warning in busy_machine_warnings(result):
        lines += [f"**Busy machine**: {warning}.", ""]
    for threads, blocks in result.get("blocks", {}).items():
        cpu = all("cpu_ratio_to_dense" in row for row in blocks.values())
        lines += [f"## Training step at equal forward FLOPs, {threads} thread(s) (time ÷ dense)", ""]
        if cpu:
            lines += ["| model | ratio to dense (CPU time) | ratio to dense (wall time) |", "|---|---|---|"]
            lines += [f"| {name} | {_ratio_cell(row, 'cpu_ratio_to_dense')} | {_ratio_cell(row, 'ratio_to_dense')} |"
                      for name, row in blocks.items()]
        else:
            lines += ["| model | ratio to dense |", "|---|---|"]
            lines += [f"| {name} | {_ratio_cell(row, 'ratio_to_dense')} |" for name, row in blocks.items()]
        if any("ratio_spread" in row for row in blocks.values()):
            lines += ["", "Median of the paired rounds, (min–max) over the rounds."]
        lines.append("")
    for key, title in (("topk_cpu", "CPU, 1 thread"), ("topk_cuda", "CUDA")):
        if key not in result:
            continue
        rows = result[key]
        extra = [c for c in ("speedup_vs_full_product", "speedup_vs_torch_topk_halves") if any(c in r for r in rows.values())]
        merge = any("merge_kernel_us_per_row" in r for r in rows.values())
        lines += [f"## product_key_topk fwd+bwd, knn 32, {title} (speedup of the new path)", "",
                  "| n_keys | vs previous path | " + " | ".join(c.replace("speedup_", "").replace("_", " ") for c in extra)
                  + (" | merge kernel alone, forward (µs per token and head)" if merge else "") + " |",
                  "|---|---|" + "---|" * (len(extra) + merge)]
        for n, row in rows.items():
            cells = [f"{row[c]:.2f}x" if c in row else "n/a (memory)" for c in extra]
            if merge:
                cells.append(f"{row['merge_kernel_us_per_row']:.2f}" if "merge_kernel_us_per_row" in row else "n/a")
            lines.append(f"| {n} | {row['speedup_vs_previous']:.2f}x | " + " | ".join(cells) + " |")
        lines.append("")
    if "lookup_cpu" in result:
        shape = ", ".join(f"{k} {v}" for k, v in LOOKUP_SHAPE.items())
        lines += [f"## Token-indexed blocks fwd+bwd vs a dense SwiGLU FFN of equal FLOPs, CPU, 1 thread ({shape})", "",
                  "| block | FLOPs/token | dense hidden | ratio to dense (CPU time) |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['flops_per_token']:,} | {row['dense_hidden']} | {row['ratio_to_dense']:.2f} |"
                  for name, row in result["lookup_cpu"].items()]
        lines.append("")
    if "layer_13b" in result:
        lines += ["## 1.3B layer shape (CUDA)", "", f"Memory+ layer fwd+bwd ÷ SwiGLU FFN of equal FLOPs: "
                  f"{result['layer_13b']['ratio']:.2f}", ""]
    if result.get("layer_breakdown"):
        lines += ["## Where a memory layer's time goes (fwd+bwd, CPU time, 1 thread, 12 × 64 tokens, ms)", "",
                  "Each part alone (`layer_breakdown`): selection = router − query (qk-norm, exact top-k, weights: no "
                  "FLOPs counted), rest = layer − router − read (projections, gate; parts timed alone do not add up exactly, so "
                  "a small rest can come out negative). Read, table cold: the same read with the table evicted from "
                  "the caches before each call, as in a training step, where the optimizer's pass over the table and "
                  "its moments and the rest of the model come between two reads; table MB: the rows its forward reads "
                  "(each read row once per head and pick: a 128² × 128 float32 table is 8.4 MB).", "",
                  "| model | layer | dense FFN it replaces | query | selection | read | read, table cold | rest | "
                  "table MB read (fwd) |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in result["layer_breakdown"].items():
            selection = row["router_ms"] - row["query_ms"]
            rest = row["layer_ms"] - row["router_ms"] - row["read_ms"]
            cold = f"{row['read_cold_ms']:.1f}" if "read_cold_ms" in row else "–"
            table_mb = f"{row['read_table_mb']:.1f}" if "read_table_mb" in row else "–"
            lines.append(f"| {name} | {row['layer_ms']:.1f} | {row['dense_ffn_ms']:.1f} | {row['query_ms']:.1f} | "
                         f"{selection:.1f} | {row['read_ms']:.1f} | {cold} | {rest:.1f} | {table_mb} |")
        lines.append("")
    lines += ["## Targets", "", "| target | met | detail |", "|---|---|---|"]
    lines += [f"| {t['target']} | {'yes' if t['met'] else 'no'} | {t['detail']} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "bench_blocks.json")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (their median)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="paired rounds of the blocks section (its ratios: the median over rounds)")
    parser.add_argument("--n-keys", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--sections", default="blocks,topk,lookup", help="comma list of: blocks, topk, lookup")
    parser.add_argument("--models", default=",".join(BLOCK_MODELS),
                        help=f"comma list of the blocks section's models (dense is always run: the ratios' base): "
                             f"{', '.join(BLOCK_MODELS)}")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as every memzoo command
    sections = set(args.sections.split(","))
    models = ["dense", *(m for m in args.models.split(",") if m and m != "dense")]
    unknown = [m for m in models if m not in BLOCK_MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(BLOCK_MODELS)}")
    threads = torch.get_num_threads()
    result: dict = {"machine": f"torch {torch.__version__}, {args.device}"}
    if args.device == "cpu":
        if "blocks" in sections:
            result["blocks"] = {str(t): bench_blocks(t, args.repeats, models, args.rounds) for t in (1, 2)}
            result["layer_breakdown"] = {name: layer_breakdown(name, args.repeats) for name in BREAKDOWN_MODELS
                                         if name in models}
        if "topk" in sections:
            torch.set_num_threads(1)
            result["topk_cpu"] = bench_topk("cpu", args.n_keys, 768, args.repeats)
        if "lookup" in sections:
            result["lookup_cpu"] = bench_lookup(args.repeats)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_blocks: --device cuda needs a CUDA GPU")
        result["machine"] += f" ({torch.cuda.get_device_name()})"
        result["topk_cuda"] = bench_topk("cuda", args.n_keys, 8192, args.repeats)
        result["layer_13b"] = bench_layer_13b(args.repeats)
    torch.set_num_threads(threads)
    result["targets"] = targets(result)
    for target in result["targets"]:
        print(f"{'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['detail']}")
    for warning in busy_machine_warnings(result):
        print(f"WARNING {warning}", file=sys.stderr)
    text = markdown(result)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode())
    write_bytes_atomic(args.json.with_suffix(".md"), text.encode())
    return result


if __name__ == "__main__":
    main()
