"""memzoo's attention memory side by side with the Extended Mind authors' Llama code, on the same weights and the
same memories: logits (prompt forward and KV-cached decode steps) and the memory indices each query head retrieves.

The authors' module (normal-computing/extended-mind-transformers, ``src/llama/modeling.py``) is imported from a clone
at run time, never copied into memzoo. ``--repo`` is the clone's work tree (holding ``src/llama``) or its bare git
directory (then ``src/`` is extracted with ``git archive`` into a temporary folder). Their code targets transformers
4.33; the adaptations made here, all at import / construction time and none to their attention arithmetic:

- ``einops`` (imported at the top of their module) is stubbed when it is not installed, with a ``rearrange`` for the
  one pattern their manual-memory path uses (``"b h s i -> b h (s i)"``, the similarity mask); other patterns raise.
- newer transformers fill ``config.rope_scaling`` with ``{"rope_type": "default", ...}``, which their ``_init_rope``
  reads as an unknown scaling (``KeyError: 'type'``): it is reset to ``None`` (no scaling) before the model is built.
- their rotary angles are computed in float32 (about 1e-4 rad off at position 3000); their tables are rebuilt here
  from float64 angles, as memzoo's are, then stored in float32 (``--keep-float32-rope`` keeps theirs).

Both sides run in float32: their memory mask is built as float32 filled with the minimum of the activations' dtype,
which overflows for float64 activations.

Both models get the same memzoo weights (a tiny random Llama, and optionally a real model: ``--model``), the same
memory tokens (one document: the authors' ``external_memories = [eos, *doc]`` with their special-token removal;
memzoo's ``MemoryBank.build`` of the document with ``window``/``stride`` set to their ``max_len``/``stride``, 3072/512)
and the same prompt. Retrieved indices are compared as sets per (layer, query head, position): ties in similarity may
order them differently (the table gives the similarity gap where sets differ).

    python tools/sidebyside_extended_mind.py --repo /path/to/extended-mind-transformers
    python tools/sidebyside_extended_mind.py --repo CLONE --model /path/to/smollm2-export --out /tmp/sbs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

import memzoo
import memzoo.model.attention_memory as attention_memory
from memzoo.data.biographies_corpus import BiographyCorpus
from memzoo.model.hf_llama import _LAYER_NAMES
from memzoo.model.memory_bank import MemoryBank

SPECIAL = (0, 1, 2)  # the authors' default tokenizer_all_special_ids: pad 0, bos 1, eos 2
AUTHORS_STRIDE, AUTHORS_MAX_LEN = 512, 3072  # their generate_cache defaults


# ------------------------------------------------------------------------------------------------ the authors' code
def authors_source(repo: Path) -> Path:
    """A folder holding ``src/llama/modeling.py`` from ``repo`` (a work tree, or a bare git dir: extracted)."""
    if (repo / "src" / "llama" / "modeling.py").is_file():
        return repo
    if (repo / "HEAD").is_file() and (repo / "objects").is_dir():
        out = Path(tempfile.mkdtemp(prefix="emt-"))
        archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", "src"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
        return out
    raise SystemExit(f"--repo {repo}: neither a work tree with src/llama/modeling.py nor a git directory")


def _rearrange(tensor: torch.Tensor, pattern: str) -> torch.Tensor:
    if pattern.replace(" ", "") != "bhsi->bh(si)":
        raise NotImplementedError(f"einops stub: pattern {pattern!r} (install einops for the authors' faiss path)")
    return tensor.reshape(*tensor.shape[:2], -1)


def import_authors(repo: Path) -> tuple[types.ModuleType, type]:
    """``(modeling module, ExtendedLlamaConfig)`` imported from the clone."""
    root = authors_source(repo)
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = types.SimpleNamespace(rearrange=_rearrange)
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[name]  # another project's `src` package must not shadow theirs
    sys.path.insert(0, str(root))
    try:
        configuration = importlib.import_module("src.llama.configuration")
        modeling = importlib.import_module("src.llama.modeling")
    finally:
        sys.path.remove(str(root))
    return modeling, configuration.ExtendedLlamaConfig


def authors_model(modeling, config_cls, model, topk: int, threshold: float | None, float64_rope: bool):
    """The authors' ``ExtendedLlamaForCausalLM`` with ``model``'s (a dense memzoo Transformer) weights."""
    attn = model.layers[0].attn
    hidden = model.layers[0].ffn.up.weight.shape[0]
    config = config_cls(
        vocab_size=model.vocab_size, hidden_size=model.dim, intermediate_size=hidden, num_hidden_layers=model.n_layers,
        num_attention_heads=attn.n_heads, num_key_value_heads=attn.n_kv_heads, max_position_embeddings=model.max_seq_len,
        rms_norm_eps=model.norm.eps, rope_theta=float(attn.rope.base), tie_word_embeddings=False,
        memory_config={"mask_by_sim": threshold is not None, "sim_threshold": threshold or 0.0, "topk": topk,
                       "use_external_mind": True, "memory_type": "manual", "memory_device": "cpu",
                       "tokenizer_all_special_ids": list(SPECIAL),
                       "use_external_mind_by_layer": [True] * model.n_layers, "remove_special_ids": True},
    )
    config.rope_scaling = None  # transformers >= 4.4x fills a default dict their _init_rope cannot read
    theirs = modeling.ExtendedLlamaForCausalLM(config).float().eval()
    missing, unexpected = theirs.load_state_dict(hf_names(model), strict=False)
    if unexpected or [k for k in missing if "rotary_emb" not in k]:
        raise SystemExit(f"weights do not map onto the authors' model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if float64_rope:
        for layer in theirs.model.layers:
            rope = layer.self_attn.rotary_emb
            rope.inv_freq = 1.0 / (rope.base ** (torch.arange(0, rope.dim, 2, dtype=torch.float64) / rope.dim))
            rope._set_cos_sin_cache(rope.max_position_embeddings, rope.inv_freq.device, torch.float32)
    return theirs


def hf_names(model) -> dict[str, torch.Tensor]:
    """memzoo's dense-decoder weights under Hugging Face Llama names (q/k/v split out of ``qkv``), float32."""
    inverse = {target: name for name, target in _LAYER_NAMES.items()}
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd.get("head.weight", sd["embed.weight"])}
    for i, layer in enumerate(model.layers):
        a = layer.attn
        q, k, v = sd[f"layers.{i}.attn.qkv.weight"].split(
            [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim])
        out.update({f"model.layers.{i}.self_attn.q_proj.weight": q, f"model.layers.{i}.self_attn.k_proj.weight": k,
                    f"model.layers.{i}.self_attn.v_proj.weight": v})
        for key, tensor in sd.items():
            prefix = f"layers.{i}."
            if key.startswith(prefix) and key[len(prefix):] in inverse:
                out[f"model.layers.{i}.{inverse[key[len(prefix):]]}"] = tensor
    return out


# ------------------------------------------------------------------------------------------------ memzoo
@contextlib.contextmanager
def recorded_retrieval(model):
    """While open, ``log[layer]`` holds memzoo's retrieved indices ``(B, H, T, k)`` of each forward, and
    ``log["sims"]`` every retrieved cosine similarity."""
    log: dict = {"sims": []}
    original = attention_memory.retrieve
    current = {"layer": None}
    hooks = []
    for i, layer in enumerate(model.layers):
        if layer.attn.memory is not None:
            hooks.append(layer.attn.memory.register_forward_pre_hook(lambda m, a, i=i: current.update(layer=i)))

    def retrieve(queries, unit_keys, topk):
        sims, idx = original(queries, unit_keys, topk)  # what memzoo retrieves
        B, C, G, T, k = idx.shape
        more = original(queries, unit_keys, topk + 1)[0]  # one more: the margin to the first entry left out
        margin = more[..., k - 1] - more[..., k] if more.shape[-1] > k else torch.full_like(more[..., 0], 2.0)
        log.setdefault(current["layer"], []).append(idx.reshape(B, C * G, T, k))
        log.setdefault(("margin", current["layer"]), []).append(margin.reshape(B, C * G, T))
        log["sims"].append(sims.flatten())
        return sims, idx

    attention_memory.retrieve = retrieve
    try:
        yield log
    finally:
        attention_memory.retrieve = original
        for hook in hooks:
            hook.remove()


class _Ids:
    """The tokenizer ``MemoryBank.build`` needs, for token ids given as a space-separated string."""

    eos_id = 2
    spec = "ids"

    @staticmethod
    def encode(text: str) -> list[int]:
        return [int(t) for t in text.split()]


def tiny_llama(seed: int):
    """A random 4-layer grouped-query Llama (Hugging Face folder read by ``memzoo.load_pretrained``), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=10000.0, initializer_range=0.2, tie_word_embeddings=False)
    folder = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    LlamaForCausalLM(config).save_pretrained(folder)
    return memzoo.load_pretrained(folder, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ comparison
@torch.no_grad()
def compare(model, modeling, config_cls, doc: list[int], prompt: list[int], topk: int, threshold: float | None,
            steps: int, float64_rope: bool) -> dict:
    """One side-by-side run: prompt forward + ``steps`` cached decode steps; differences of logits and indices."""
    model = model.float().eval()
    theirs = authors_model(modeling, config_cls, model, topk, threshold, float64_rope)
    theirs.memory_ids = [_Ids.eos_id, *doc]
    bank = MemoryBank.build(model, _Ids, {"doc": " ".join(map(str, doc))}, window=AUTHORS_MAX_LEN,
                            stride=AUTHORS_STRIDE, dtype=torch.float32)
    if bank.entry_offset.tolist() != list(range(len(doc))):
        raise SystemExit("memzoo's bank entries are not the document's tokens in order")
    ids = torch.tensor([prompt])
    plain = model(ids)
    model.attach_memory(bank, topk=topk, similarity_threshold=threshold)
    out = theirs(ids, use_cache=True, output_retrieved_memory_idx=True, topk=topk)
    with recorded_retrieval(model) as log:
        caches = model.new_caches(1, len(prompt) + steps + 1)
        mine = model(ids, caches)
        logit_diff = [float((mine[0] - out.logits[0]).abs().max())]
        effect = float((mine[0] - plain[0]).abs().max())
        past = out.past_key_values if hasattr(out, "past_key_values") else out[1]
        their_idx = [[t] for t in out.attentions[1]]
        token = mine[0, -1].argmax().view(1, 1)
        for _ in range(steps):
            step = theirs(token, past_key_values=past, use_cache=True, output_retrieved_memory_idx=True, topk=topk)
            mine = model(token, caches)
            logit_diff.append(float((mine[0, -1] - step.logits[0, -1]).abs().max()))
            past = step.past_key_values if hasattr(step, "past_key_values") else step[1]
            for layer, t in enumerate(step.attentions[1]):
                their_idx[layer].append(t)
            token = mine[0, -1].argmax().view(1, 1)
    model.detach_memory()
    same = total = 0
    margins = [0.0]
    for layer, forwards in enumerate(their_idx):
        for theirs_t, mine_t, margin in zip(forwards, log[layer], log[("margin", layer)]):
            B, H, T, k = mine_t.shape
            a = theirs_t.reshape(B, H, T, -1).sort(-1).values
            b = mine_t.sort(-1).values
            equal = (a == b).all(-1)
            same += int(equal.sum())
            total += B * H * T
            margins += margin[~equal].tolist()
    scale = float(out.logits.abs().max())
    sims = torch.cat(log["sims"])
    masked = float((sims < threshold).float().mean()) if threshold is not None else 0.0
    return {"topk": topk, "similarity_threshold": threshold, "bank_entries": bank.n_entries,
            "prompt_tokens": len(prompt), "decode_steps": steps, "logit_scale": scale,
            "memory_effect_on_logits": effect, "retrieved_below_threshold": masked,
            "max_abs_logit_diff_prompt": logit_diff[0], "max_abs_logit_diff_decode": max(logit_diff[1:], default=0.0),
            "retrieved_sets_equal": same, "retrieved_sets_compared": total,
            # where the sets differ: memzoo's similarity gap between its last retrieved entry and the next one
            "largest_similarity_margin_where_sets_differ": max(margins)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, type=Path, help="clone of normal-computing/extended-mind-transformers")
    parser.add_argument("--model", default=None, help="also compare this dense model (anything load_pretrained reads)")
    parser.add_argument("--topk", type=int, nargs="+", default=[2, 12])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.25, 0.6],
                        help="also run with the authors' mask_by_sim at these thresholds (with the largest top-k)")
    parser.add_argument("--model-label", default=None, help="how the results name --model (default: its path)")
    parser.add_argument("--doc-tokens", type=int, default=3600, help="tiny model's memory document (3 windows)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--keep-float32-rope", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="docs/results/sidebyside-extended-mind")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    started = time.time()
    modeling, config_cls = import_authors(options.repo)
    rope64 = not options.keep_float32_rope
    g = torch.Generator().manual_seed(0)
    runs = []
    tiny = tiny_llama(0)
    doc = (torch.randint(3, tiny.vocab_size, (options.doc_tokens,), generator=g)).tolist()
    prompt = [1, *torch.randint(3, tiny.vocab_size, (15,), generator=g).tolist()]
    settings = [(k, None) for k in options.topk] + [(options.topk[-1], t) for t in options.thresholds]
    for topk, threshold in settings:
        row = {"model": "tiny random Llama (4 layers, 4 heads, 2 kv heads, head_dim 16)", **compare(
            tiny, modeling, config_cls, doc, prompt, topk, threshold, options.steps, rope64)}
        runs.append(row)
        print(json.dumps(row), flush=True)
    if options.model:
        real, tokenizer = memzoo.load_pretrained(options.model, with_tokenizer=True, dtype=torch.float32)
        corpus = BiographyCorpus(8, seed=0)
        text = " ".join(corpus.prompt_and_answer(p, a, 0)[0] + corpus.prompt_and_answer(p, a, 0)[1] + "."
                        for p in range(8) for a in ("birth_city", "employer"))
        doc = [t for t in tokenizer.encode(text) if t not in SPECIAL]
        prompt = [tokenizer.eos_id, *tokenizer.encode(corpus.prompt_and_answer(3, "birth_city", 0)[0])]
        _Ids.eos_id = tokenizer.eos_id
        for topk, threshold in settings:
            row = {"model": options.model_label or options.model, **compare(real, modeling, config_cls, doc, prompt, topk, threshold,
                                                     options.steps, rope64)}
            runs.append(row)
            print(json.dumps(row), flush=True)
    result = {"authors_code": "normal-computing/extended-mind-transformers src/llama/modeling.py (imported at run time)",
              "float64_rope_angles": rope64, "runs": runs, "seconds": round(time.time() - started, 1)}
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    return result


def markdown(r: dict) -> str:
    lines = ["# Extended Mind side by side: memzoo against the authors' Llama code", "",
             "Written by `tools/sidebyside_extended_mind.py` "
             f"({r['seconds']:.0f} s). Same weights (float32), same memory tokens, same prompt through the authors' "
             "`ExtendedLlamaForCausalLM` (imported from their repository at run time) and memzoo's `attach_memory`: "
             "the largest logit difference over the prompt forward and the KV-cached decode steps, and how many "
             "(layer, query head, position) retrieved the same set of memories. For scale: the largest change the "
             "memory makes to memzoo's prompt logits (memory effect), and the share of retrieved entries the "
             "similarity threshold masks. Where a set differs, memzoo's cosine-similarity gap between its last "
             "retrieved entry and the first one left out shows whether it is a near tie (float32 rounding).", "",
             "| model | top-k | similarity threshold (masked) | bank entries | logit scale | memory effect | "
             "max logit diff (prompt) | max logit diff (decode) | same retrieved sets | gap where they differ |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["runs"]:
        differ = row["retrieved_sets_equal"] < row["retrieved_sets_compared"]
        gap = f"{row['largest_similarity_margin_where_sets_differ']:.1e}" if differ else "-"
        threshold = ("none" if row["similarity_threshold"] is None
                     else f"{row['similarity_threshold']:.2f} ({row['retrieved_below_threshold']:.0%})")
        lines.append(f"| {row['model']} | {row['topk']} | {threshold} | {row['bank_entries']} | "
                     f"{row['logit_scale']:.2f} | {row['memory_effect_on_logits']:.2f} | "
                     f"{row['max_abs_logit_diff_prompt']:.2e} | "
                     f"{row['max_abs_logit_diff_decode']:.2e} | {row['retrieved_sets_equal']} / "
                     f"{row['retrieved_sets_compared']} | {gap} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
