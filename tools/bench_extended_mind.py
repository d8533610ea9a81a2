"""Cost of attention memory at decode time on CPU: time per generated token against bank size.

A decoder with SmolLM2-135M's shape (dim 576, 30 layers, 9 query / 3 key-value heads of 64, random weights) decodes one
token at a time (KV cache) after a prompt. For each bank size N (random entries: the work does not depend on their
values) and index (``exact``; ``faiss_ivf`` too when faiss-cpu is installed), two things are timed, each as the minimum
over ``--repeats`` runs (the least disturbed by other processes on a shared machine):

- ``layer_extra_ms``: one memory layer's attention for one decoded token (retrieval over N entries + attention over
  the retrieved and local keys) minus the same layer's plain attention, timed on the layer alone;
- ``decode_ms``: a whole decode step with memory in ``--memory-layers`` layers, against the plain step.

``all_layers_x``: the plain step plus 30 × ``layer_extra_ms``, relative to the plain step (memory in every layer,
as Extended Mind uses it), an extrapolation from the per-layer figure.

    python tools/bench_extended_mind.py                     # N = 1e3 .. 1e6, writes docs/results/extended-mind-cost.*
    python tools/bench_extended_mind.py --sizes 1000 10000 --out /tmp/cost
"""

from __future__ import annotations

import argparse
import json
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


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def bank_bytes_per_layer(model, n_entries: int) -> int:
    """float32 keys, values and unit-norm keys (for retrieval) of one layer."""
    dims = model_dimensions(model)
    return 3 * dims["n_kv_heads"] * n_entries * dims["head_dim"] * 4


@torch.no_grad()
def decode_step_ms(model, prompt_len: int, steps: int, repeats: int) -> float:
    """Minimum over ``repeats`` of the mean time of one decode step (one token, KV cache, greedy) after a prompt,
    in memzoo's decode loop (:func:`memzoo.model.decoding.decode_steps`): the prompt's forward is not timed."""
    from memzoo.model.decoding import decode_steps

    prompt = torch.randint(0, model.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(repeats):
        tokens = decode_steps(model, prompt, steps + 1)
        next(tokens)  # the prompt's forward and the first token
        start = time.perf_counter()
        n = sum(1 for _ in tokens)
        times.append((time.perf_counter() - start) / max(n, 1) * 1e3)
    return min(times)


@torch.no_grad()
def layer_attention_ms(attn, prompt_len: int, calls: int, repeats: int) -> float:
    """Minimum over ``repeats`` of the mean time of ``attn`` on one token after a ``prompt_len``-token cache."""
    x = torch.randn(1, 1, attn.dim, generator=torch.Generator().manual_seed(2))
    times = []
    for _ in range(repeats):
        cache = attn.new_cache(1, prompt_len + 1, x.device, x.dtype)
        start = time.perf_counter()
        for _ in range(calls):
            cache.length = prompt_len
            attn(x, cache)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--memory-layers", type=int, default=1, help="layers with memory in the whole-step timing")
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=8, help="decode steps (and layer calls) timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--indexes", nargs="+", default=None,
                        help="exact and/or faiss_ivf (default: both when faiss imports, else exact)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads mostly wait for each other)")
    parser.add_argument("--out", default="docs/results/extended-mind-cost", help="writes OUT.json and OUT.md")
    options = parser.parse_args(argv)

    indexes = options.indexes or (["exact", "faiss_ivf"] if faiss_available() else ["exact"])
    torch.set_num_threads(options.threads)
    if "faiss_ivf" in indexes:
        import faiss

        faiss.omp_set_num_threads(options.threads)
    torch.manual_seed(0)
    model = memzoo.Transformer(**SMOLLM2_135M).eval()
    layers = list(range(options.memory_layers))
    attn = model.layers[0].attn
    plain = decode_step_ms(model, options.prompt, options.steps, options.repeats)
    plain_layer = layer_attention_ms(attn, options.prompt, options.steps, options.repeats)
    print(json.dumps({"plain_decode_ms": round(plain, 3), "plain_layer_attention_ms": round(plain_layer, 3)}))
    rows = []
    for n in options.sizes:
        bank = random_bank(model, n, layers)
        for index in indexes:
            start = time.perf_counter()
            model.attach_memory(bank, topk=options.topk, check_weights=False, index=index)
            attach_s = time.perf_counter() - start
            layer = layer_attention_ms(attn, options.prompt, options.steps, options.repeats)
            step = decode_step_ms(model, options.prompt, options.steps, options.repeats)
            model.detach_memory()
            extra = layer - plain_layer
            rows.append({"entries": n, "index": index, "layer_attention_ms": round(layer, 3),
                         "layer_extra_ms": round(extra, 3), "decode_ms": round(step, 3),
                         "decode_x": round(step / plain, 3),
                         "all_layers_x": round((plain + model.n_layers * extra) / plain, 2),
                         "attach_s": round(attach_s, 3), "bank_mb_per_layer": round(bank_bytes_per_layer(model, n) / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
        del bank
    result = {
        "what": "decode time per generated token with attention memory against bank size, CPU",
        "model": "SmolLM2-135M shape, random weights: " + json.dumps(SMOLLM2_135M),
        "memory_layers": layers, "topk": options.topk, "prompt_tokens": options.prompt,
        "steps": options.steps, "repeats": options.repeats, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "plain_decode_ms": round(plain, 3),
        "plain_layer_attention_ms": round(plain_layer, 3), "rows": rows,
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
        f"Written by `tools/bench_extended_mind.py`. Model: {result['model']}. Top-k {result['topk']}, float32, "
        f"{result['torch_threads']} torch threads, torch {result['torch']}. One decoded token with the KV cache after "
        f"a {result['prompt_tokens']}-token prompt; each time is the minimum over {result['repeats']} runs of "
        f"{result['steps']} calls (the machine is shared, so the least disturbed run).",
        "",
        f"Plain decode step (no memory): **{result['plain_decode_ms']:.1f} ms**; one layer's plain attention: "
        f"{result['plain_layer_attention_ms']:.2f} ms.",
        "",
        "| bank entries | index | memory layer extra (ms) | decode step, memory in layers "
        f"{result['memory_layers']} (ms) | × plain | all 30 layers (× plain, extrapolated) | attach (s) "
        "| bank MB per layer |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['entries']:,} | {row['index']} | {row['layer_extra_ms']:.2f} | {row['decode_ms']:.1f} | "
                     f"{row['decode_x']:.2f} | {row['all_layers_x']:.2f} | {row['attach_s']:.1f} | "
                     f"{row['bank_mb_per_layer']:.1f} |")
    lines += ["", "`memory layer extra`: one layer's attention with memory (retrieval over the bank + attention over the "
              "retrieved and local keys) minus its plain attention, for one token. Exact retrieval reads every key of "
              "the bank per key/value head, so it grows linearly with the bank; `faiss_ivf` reads about "
              "`nprobe / nlist` of it (approximate; `attach` includes training its index, and normalising the keys).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
