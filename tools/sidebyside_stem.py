"""memzoo's STEM layer (``stem`` preset) side by side with the authors' ``StemFeedForward`` (Infini-AI-Lab/STEM).

The authors' FFN is imported from a clone given at run time (``lingua/stem.py``; never copied into memzoo)::

    git -C /path/to/STEM archive HEAD lingua apps | tar -x -C /tmp/stem     # or a git clone
    python tools/sidebyside_stem.py --repo /tmp/stem [--out docs/results]

What is compared: their ``StemFeedForward(dim, hidden_dim=4·dim, multiple_of, None)`` called as
``ffn(x, U[token_ids])`` with ``U`` a plain ``(vocab, hidden)`` table looked up with ``F.embedding`` (their
``ParallelEmbedding`` shards the table over a process group and all-to-alls the rows; with one process it is this
lookup), against memzoo's block given the same ``w1``/``w2``/table (``gate``/``down``/``pool.values``) and the
token ids. Outputs and the gradients of ``x``, both projections and the table, in float64, at several shapes; then
forward+backward time of both in float32 at equal shapes (``ratio`` = memzoo ÷ authors).
``lingua.stem`` imports ``xformers`` (its attention classes, not the FFN); it is stubbed if it does not import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from memzoo.blocks.base import BlockContext
from memzoo.blocks.registry import create_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import RESULTS, import_from_clone, max_abs_diff, time_fwd_bwd, write_results  # noqa: E402

#: (dim, multiple_of, vocab, batch, length): the authors' width rule gives hidden = int(8·dim/3) rounded up.
SHAPES = [(16, 16, 37, 2, 5), (96, 32, 1000, 4, 64), (256, 256, 8192, 4, 128)]
TIMING_SHAPE = (512, 256, 32000, 8, 256)
XFORMERS_STUB = {"xformers": {}, "xformers.ops": {"fmha": None, "AttentionBias": object}}


def pair(stem_module, dim: int, multiple_of: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    """The authors' FFN and its table, and memzoo's block with the same weights."""
    torch.manual_seed(seed)
    theirs = stem_module.StemFeedForward(dim=dim, hidden_dim=4 * dim, multiple_of=multiple_of, ffn_dim_multiplier=None)
    theirs.reset_parameters()
    theirs = theirs.to(dtype)
    table = torch.nn.Parameter(torch.randn(vocab, theirs.hidden_dim, dtype=dtype))
    ours = create_block("stem", dim=dim, vocab_size=vocab, hidden=theirs.hidden_dim).to(dtype)
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.w1.weight)
        ours.down.weight.copy_(theirs.w2.weight)
        ours.pool.values.copy_(table)
    return theirs, table, ours


def compare(stem_module, shape) -> dict:
    dim, multiple_of, vocab, batch, length = shape
    theirs, table, ours = pair(stem_module, dim, multiple_of, vocab, torch.float64)
    ids = torch.randint(0, vocab, (batch, length))
    ids[0, :2] = vocab - 1  # a repeated id at the table's end
    x = torch.randn(batch, length, dim, dtype=torch.float64, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    out_theirs = theirs(x, F.embedding(ids, table))
    out_ours = ours(x_ours, BlockContext.for_tokens(ids))
    probe = torch.randn_like(out_theirs)
    (out_theirs * probe).sum().backward()
    (out_ours * probe).sum().backward()
    return {
        "dim": dim, "hidden": theirs.hidden_dim, "vocab": vocab, "batch": batch, "length": length,
        "dtype": "float64",
        "max_abs_diff": {
            "output": max_abs_diff(out_ours, out_theirs),
            "grad_x": max_abs_diff(x_ours.grad, x.grad),
            "grad_gate_w1": max_abs_diff(ours.gate.weight.grad, theirs.w1.weight.grad),
            "grad_down_w2": max_abs_diff(ours.down.weight.grad, theirs.w2.weight.grad),
            "grad_table": max_abs_diff(ours.pool.values.grad, table.grad),
        },
        "output_scale": out_theirs.abs().max().item(),
    }


def timing(stem_module, shape, repeats: int) -> dict:
    dim, multiple_of, vocab, batch, length = shape
    theirs, table, ours = pair(stem_module, dim, multiple_of, vocab, torch.float32)
    ids = torch.randint(0, vocab, (batch, length))
    x = torch.randn(batch, length, dim, requires_grad=True)
    ctx = BlockContext.for_tokens(ids)
    times = time_fwd_bwd({"authors": lambda: theirs(x, F.embedding(ids, table)), "memzoo": lambda: ours(x, ctx)},
                         repeats=repeats)
    return {"dim": dim, "hidden": theirs.hidden_dim, "vocab": vocab, "batch": batch, "length": length,
            "dtype": "float32", "authors_ms": 1e3 * times["authors"], "memzoo_ms": 1e3 * times["memzoo"],
            "ratio": times["memzoo"] / times["authors"]}


def markdown(result: dict) -> str:
    lines = ["# STEM: memzoo vs the authors' StemFeedForward", "", f"Command: `{result['command']}`", "",
             result["compared"], "", f"Stubbed at import: {', '.join(result['stubbed']) or 'nothing'}.", "",
             "| dim | hidden | vocab | tokens | output | grad x | grad W_gate | grad W_down | grad table |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["shapes"]:
        d = row["max_abs_diff"]
        lines.append(f"| {row['dim']} | {row['hidden']} | {row['vocab']} | {row['batch'] * row['length']} | "
                     f"{d['output']:.1e} | {d['grad_x']:.1e} | {d['grad_gate_w1']:.1e} | {d['grad_down_w2']:.1e} | "
                     f"{d['grad_table']:.1e} |")
    t = result["timing"]
    lines += ["", "Max abs differences, float64.", "",
              f"Forward+backward, float32, CPU ({result['machine']['threads']} threads), dim {t['dim']}, hidden "
              f"{t['hidden']}, vocab {t['vocab']}, {t['batch']}×{t['length']} tokens: authors {t['authors_ms']:.1f} ms, "
              f"memzoo {t['memzoo_ms']:.1f} ms, ratio {t['ratio']:.2f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone of Infini-AI-Lab/STEM (with lingua/)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    stem_module, stubbed = import_from_clone(args.repo, "lingua.stem", {"xformers.ops": XFORMERS_STUB["xformers.ops"]})
    result = {
        "command": "python tools/sidebyside_stem.py --repo <clone of Infini-AI-Lab/STEM>",
        "compared": "lingua/stem.py StemFeedForward(x, U[ids]) (U looked up with F.embedding: their ParallelEmbedding "
                    "with one process) vs memzoo's `stem` block with the same w1/w2/table: outputs and gradients of "
                    "x, w1, w2 and the table.",
        "stubbed": stubbed,
        "shapes": [compare(stem_module, shape) for shape in SHAPES],
        "timing": timing(stem_module, TIMING_SHAPE, args.repeats),
    }
    result["max_abs_diff"] = max(v for row in result["shapes"] for v in row["max_abs_diff"].values())
    path = write_results("stem", result, markdown({**result, "machine": {"threads": torch.get_num_threads()}}),
                         args.out)
    print(markdown({**result, "machine": {"threads": torch.get_num_threads()}}))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
