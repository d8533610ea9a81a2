"""Cost of attention memory at decode time on CPU: time per generated token against bank size.

A decoder with SmolLM2-135M's shape (dim 576, 30 layers, 9 query / 3 key-value heads of 64, random weights) decodes
one token at a time after a prompt, first without memory, then with a bank of N random entries in ``--memory-layers``
layers (exact retrieval: a matmul + top-k over the bank, per key/value head). Reported per N: the decode step, the
extra time over the plain step, that extra per memory layer (the retrieval + memory attention cost of one layer),
and the bank's bytes per layer. Random keys cost the same as real ones (the work does not depend on their values).

    python tools/bench_extended_mind.py                     # N = 1e3 .. 1e6, writes docs/results/extended-mind-cost.*
    python tools/bench_extended_mind.py --sizes 1000 10000 --out /tmp/cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import memzoo
from memzoo.model.memory_bank import MemoryBank, model_dimensions

SMOLLM2_135M = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, block="dense",
                    block_args={"hidden": 1536}, max_seq_len=2048, rope_base=100000.0, tie_embeddings=True,
                    norm_eps=1e-5)


def random_bank(model, n_entries: int, layers: list[int], seed: int = 0) -> MemoryBank:
    g = torch.Generator().manual_seed(seed)
    dims = model_dimensions(model)
    shape = (dims["n_kv_heads"], n_entries, dims["head_dim"])
    return MemoryBank(
        keys={layer: torch.randn(shape, generator=g) for layer in layers},
        values={layer: torch.randn(shape, generator=g) for layer in layers},
        entry_doc=torch.zeros(n_entries, dtype=torch.long), entry_offset=torch.arange(n_entries),
        doc_names=["random"], doc_tokens=[[0] * n_entries], model=dims,
        probe={layer: torch.zeros(dims["n_kv_heads"], 8, dims["head_dim"]) for layer in layers},
    )


def bank_bytes_per_layer(model, n_entries: int) -> int:
    """float32 keys, values and unit-norm keys (for retrieval) of one layer."""
    dims = model_dimensions(model)
    return 3 * dims["n_kv_heads"] * n_entries * dims["head_dim"] * 4


@torch.no_grad()
def decode_step_ms(model, prompt_len: int, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one decode step (one token, KV cache) after a prompt."""
    ids = torch.randint(0, model.vocab_size, (1, prompt_len + steps), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(repeats):
        caches = model.new_caches(1, prompt_len + steps)
        model(ids[:, :prompt_len], caches)
        start = time.perf_counter()
        for t in range(prompt_len, prompt_len + steps):
            model(ids[:, t : t + 1], caches)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--memory-layers", type=int, default=1, help="layers with memory (the first ones)")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/results/extended-mind-cost", help="writes OUT.json and OUT.md")
    options = parser.parse_args(argv)

    torch.manual_seed(0)
    model = memzoo.Transformer(**SMOLLM2_135M).eval()
    layers = list(range(options.memory_layers))
    plain = decode_step_ms(model, options.prompt, options.steps, options.repeats)
    rows = []
    for n in options.sizes:
        model.attach_memory(random_bank(model, n, layers), topk=options.topk, check_weights=False)
        step = decode_step_ms(model, options.prompt, options.steps, options.repeats)
        model.detach_memory()
        extra = step - plain
        row = {"entries": n, "decode_ms": round(step, 3), "extra_ms": round(extra, 3),
               "extra_ms_per_memory_layer": round(extra / len(layers), 3), "relative_to_plain": round(step / plain, 3),
               "bank_mb_per_layer": round(bank_bytes_per_layer(model, n) / 1e6, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "what": "decode time per generated token with attention memory (exact retrieval) against bank size, CPU",
        "model": "SmolLM2-135M shape, random weights: " + json.dumps(SMOLLM2_135M),
        "memory_layers": layers, "topk": options.topk, "prompt_tokens": options.prompt,
        "steps": options.steps, "repeats": options.repeats, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "plain_decode_ms": round(plain, 3), "rows": rows,
    }
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    return result


def markdown(result: dict) -> str:
    lines = [
        "# Attention memory: decode cost against bank size (CPU)",
        "",
        f"Written by `tools/bench_extended_mind.py`. Model: {result['model']}. Memory in layers "
        f"{result['memory_layers']}, top-k {result['topk']}, exact retrieval (matmul + top-k over the bank per "
        f"key/value head), float32, {result['torch_threads']} torch threads, torch {result['torch']}. Decode step: "
        f"one token with the KV cache after a {result['prompt_tokens']}-token prompt (median of {result['repeats']} "
        f"runs of {result['steps']} steps).",
        "",
        f"Plain decode step (no memory): **{result['plain_decode_ms']:.1f} ms**.",
        "",
        "| bank entries | decode step (ms) | extra (ms) | extra per memory layer (ms) | × plain | bank MB per layer |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['entries']:,} | {row['decode_ms']:.1f} | {row['extra_ms']:.1f} | "
                     f"{row['extra_ms_per_memory_layer']:.1f} | {row['relative_to_plain']:.2f} | "
                     f"{row['bank_mb_per_layer']:.1f} |")
    lines += ["", "The retrieval cost grows linearly with the bank (one pass over every key per query head); a bank in "
              "L layers costs about L times the per-layer figure.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
