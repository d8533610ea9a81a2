"""memzoo's MoLE (``mole`` preset) side by side with the authors' decoder layers (JieShibo/MoLE), both modes.

The authors' modules are imported from a clone given at run time (never copied into memzoo)::

    git -C /path/to/MoLE archive HEAD | tar -x -C /tmp/mole     # or a git clone
    python tools/sidebyside_mole.py --repo /tmp/mole [--out docs/results]

What is compared (their modules need ``transformers``; nothing is stubbed):

- **training form**: ``modeling_mole.MoleDecoderLayer`` (its own forward) against ``x + block(RMSNorm(x), ctx)`` of
  memzoo's ``mole`` block with the same router, dense MLP, expert norm and experts, both reading one shared
  ``nn.Embedding``. Their layer's self-attention is replaced by a module returning zeros, so the layer's output is
  exactly its FFN slot plus the residual (attention is not part of MoLE). Outputs and the gradients of ``x``, the
  embedding, the router and the experts.
- **inference form**: their table as ``reparameterize.py`` builds it (``expert_layernorm(embed.weight)`` through each
  expert) against memzoo's :meth:`LookupExperts.lookup_table`, and ``modeling_mole_rep.MoleDecoderLayer`` fed their
  table's rows against memzoo's block after ``reparameterize()``.

Dtype float64 for the numbers (their RMSNorm computes in float32 and their softmax is float32, so differences of
~1e-7 are their rounding); forward+backward time in float32 at equal shapes (``ratio`` = memzoo ÷ authors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from memzoo.blocks.base import BlockContext
from memzoo.blocks.registry import create_block
from memzoo.nn.norms import RMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sidebyside import RESULTS, import_from_clone, max_abs_diff, time_fwd_bwd, write_results  # noqa: E402

#: (dim, intermediate, n_experts, vocab, batch, length)
SHAPES = [(16, 32, 2, 50, 2, 5), (64, 256, 4, 1000, 2, 32), (128, 512, 16, 4096, 2, 64)]
TIMING_SHAPE = (256, 1024, 4, 8192, 4, 128)
EPS = 1e-6


class ZeroAttention(nn.Module):
    """Stands in for the authors' self-attention: output zero, no weights, no cache."""

    def forward(self, hidden_states, **kwargs):
        return torch.zeros_like(hidden_states), None, None


def build(mole, mole_rep, dim, inter, n_experts, vocab, dtype, seed=0):
    from transformers.models.llama.configuration_llama import LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=dim, intermediate_size=inter, num_attention_heads=2, num_key_value_heads=2,
                         vocab_size=vocab, rms_norm_eps=EPS, pretraining_tp=1, attn_implementation="eager")
    config.num_experts = n_experts
    config._attn_implementation = "eager"
    # fields their (older-transformers) attention reads at construction, which newer LlamaConfigs keep elsewhere
    for key, value in (("rope_theta", 10000.0), ("rope_scaling", None), ("attention_dropout", 0.0)):
        if not hasattr(config, key) or key == "rope_scaling":
            setattr(config, key, value)
    theirs = mole.MoleDecoderLayer(config, 0)
    theirs_rep = mole_rep.MoleDecoderLayer(config, 0)
    for layer in (theirs, theirs_rep):
        layer.self_attn = ZeroAttention()
    embedding = nn.Embedding(vocab, dim)
    with torch.no_grad():
        for param in [*theirs.parameters(), embedding.weight]:
            if param.dim() > 1:  # matrices at 1/sqrt(fan_in), so every activation is O(1)
                param.normal_(0, param.shape[-1] ** -0.5)
            else:  # norm weights away from 1
                param.uniform_(0.5, 1.5)
    theirs, embedding = theirs.to(dtype), embedding.to(dtype)
    ours = create_block("mole", dim=dim, vocab_size=vocab, n_experts=n_experts, hidden=inter,
                        norm_eps=EPS, embedding=embedding).to(dtype)
    norm = RMSNorm(dim, EPS).to(dtype)
    with torch.no_grad():
        ours.router.weight.copy_(theirs.router.weight)
        ours.up.weight.copy_(theirs.mlp.up_proj.weight)
        ours.down.weight.copy_(theirs.mlp.down_proj.weight)
        ours.expert_norm.weight.copy_(theirs.expert_layernorm.weight)
        for j, expert in enumerate(theirs.experts):
            ours.experts.up[j].copy_(expert.up_proj.weight)
            ours.experts.down[j].copy_(expert.down_proj.weight)
        norm.weight.copy_(theirs.post_attention_layernorm.weight)
        theirs_rep.load_state_dict({k: v for k, v in theirs.state_dict().items() if k in theirs_rep.state_dict()})
    return theirs, theirs_rep.to(dtype), ours, norm, embedding


def compare(mole, mole_rep, shape) -> dict:
    dim, inter, n_experts, vocab, batch, length = shape
    theirs, theirs_rep, ours, norm, embedding = build(mole, mole_rep, dim, inter, n_experts, vocab, torch.float64)
    ids = torch.randint(0, vocab, (batch, length))
    ids[0, :2] = vocab - 1
    x = torch.randn(batch, length, dim, dtype=torch.float64, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_()
    out_theirs = theirs((x, embedding(ids)))[0]
    their_grads = torch.autograd.grad((out_theirs * out_theirs.detach().sin()).sum(),
                                      [x, embedding.weight, theirs.router.weight, theirs.experts[0].up_proj.weight])
    ctx = BlockContext.for_tokens(ids)
    out_ours = x_ours + ours(norm(x_ours), ctx)
    our_grads = torch.autograd.grad((out_ours * out_ours.detach().sin()).sum(),
                                    [x_ours, embedding.weight, ours.router.weight, ours.experts.up])
    with torch.no_grad():  # their reparameterize.py's table for one layer: (vocab, n_experts, dim)
        their_table = torch.stack([e(theirs.expert_layernorm(embedding.weight)) for e in theirs.experts], dim=1)
        our_table = ours.lookup_table().view(vocab, n_experts, dim)
        rep_theirs = theirs_rep((x.detach(), their_table[ids]))[0]
        ours.reparameterize()
        rep_ours = x.detach() + ours(norm(x.detach()), ctx)
    return {
        "dim": dim, "intermediate": inter, "n_experts": n_experts, "vocab": vocab, "batch": batch, "length": length,
        "dtype": "float64",
        "max_abs_diff": {
            "output_experts_mode": max_abs_diff(out_ours, out_theirs),
            "grad_x": max_abs_diff(our_grads[0], their_grads[0]),
            "grad_embedding": max_abs_diff(our_grads[1], their_grads[1]),
            "grad_router": max_abs_diff(our_grads[2], their_grads[2]),
            "grad_expert0_up": max_abs_diff(our_grads[3][0], their_grads[3]),
            "lookup_table": max_abs_diff(our_table, their_table),
            "output_lookup_mode": max_abs_diff(rep_ours, rep_theirs),
        },
        "scale": {"output": out_theirs.abs().max().item(), "grad_x": their_grads[0].abs().max().item(),
                  "grad_embedding": their_grads[1].abs().max().item(),
                  "grad_router": their_grads[2].abs().max().item()},
    }


def timing(mole, mole_rep, shape, repeats: int) -> dict:
    dim, inter, n_experts, vocab, batch, length = shape
    theirs, _, ours, norm, embedding = build(mole, mole_rep, dim, inter, n_experts, vocab, torch.float32)
    ids = torch.randint(0, vocab, (batch, length))
    x = torch.randn(batch, length, dim, requires_grad=True)
    ctx = BlockContext.for_tokens(ids)
    times = time_fwd_bwd({"authors": lambda: theirs((x, embedding(ids)))[0],
                          "memzoo": lambda: x + ours(norm(x), ctx)}, repeats=repeats)
    return {"dim": dim, "intermediate": inter, "n_experts": n_experts, "vocab": vocab, "batch": batch,
            "length": length, "dtype": "float32", "mode": "experts (training)",
            "authors_ms": 1e3 * times["authors"], "memzoo_ms": 1e3 * times["memzoo"],
            "ratio": times["memzoo"] / times["authors"]}


def markdown(result: dict, threads: int) -> str:
    keys = ["output_experts_mode", "grad_x", "grad_embedding", "grad_router", "grad_expert0_up", "lookup_table",
            "output_lookup_mode"]
    lines = ["# MoLE: memzoo vs the authors' MoleDecoderLayer (training) and its re-parameterised form", "",
             f"Command: `{result['command']}`", "", result["compared"], "",
             f"Stubbed at import: {', '.join(result['stubbed']) or 'nothing'}.", "",
             "| dim | inter | experts | vocab | tokens | " + " | ".join(keys) + " |",
             "|---" * (5 + len(keys)) + "|"]
    for row in result["shapes"]:
        d = row["max_abs_diff"]
        lines.append(f"| {row['dim']} | {row['intermediate']} | {row['n_experts']} | {row['vocab']} | "
                     f"{row['batch'] * row['length']} | " + " | ".join(f"{d[k]:.1e}" for k in keys) + " |")
    t = result["timing"]
    lines += ["", "Max abs differences, float64 (the authors' RMSNorm and softmax compute in float32).", "",
              f"Forward+backward (training form), float32, CPU ({threads} threads), dim {t['dim']}, intermediate "
              f"{t['intermediate']}, {t['n_experts']} experts, {t['batch']}×{t['length']} tokens: authors "
              f"{t['authors_ms']:.1f} ms, memzoo {t['memzoo_ms']:.1f} ms, ratio {t['ratio']:.2f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a clone of JieShibo/MoLE (modeling_mole.py)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    mole, stubbed = import_from_clone(args.repo, "modeling_mole")
    mole_rep, _ = import_from_clone(args.repo, "modeling_mole_rep")
    result = {
        "command": "python tools/sidebyside_mole.py --repo <clone of JieShibo/MoLE>",
        "compared": "modeling_mole.MoleDecoderLayer (self-attention replaced by zeros: the FFN slot and residual) vs "
                    "x + mole(RMSNorm(x)) with the same weights and one shared embedding: outputs and gradients; "
                    "their reparameterize.py table vs LookupExperts.lookup_table(); modeling_mole_rep."
                    "MoleDecoderLayer on their table rows vs memzoo's block after reparameterize().",
        "stubbed": stubbed,
        "shapes": [compare(mole, mole_rep, shape) for shape in SHAPES],
        "timing": timing(mole, mole_rep, TIMING_SHAPE, args.repeats),
    }
    result["max_abs_diff"] = max(v for row in result["shapes"] for v in row["max_abs_diff"].values())
    text = markdown(result, torch.get_num_threads())
    path = write_results("mole", result, text, args.out)
    print(text)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
