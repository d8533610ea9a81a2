"""memzoo's ``ultramem`` / ``ultramem_v2`` blocks against the UltraMem authors' own layers, same weights, on CPU.

The authors' code (ZihaoHuang-notabot/Ultra-Sparse-Memory-Network, an OLMo fork) is not part of memzoo: pass a
checkout that holds its ``olmo/`` folder; ``olmo/ultramem_layer.py`` (``UltraMemLayerV1``) and
``olmo/ultramem_layer_v2.py`` (``UltraMemLayerV2``) are imported at run time::

    git -C <mirror> archive HEAD olmo | tar -x -C /tmp/usmn     # or a git clone
    python tools/sidebyside_ultramem.py --repo /tmp/usmn [--json docs/results/sidebyside-ultramem.json]

Their modules import more than they use on CPU. This tool stubs, in ``sys.modules`` and only for the import:

- ``olmo`` (a bare package pointing at the checkout's ``olmo/`` so the rest of OLMo, which needs omegaconf and
  more, is never imported), ``olmo.model.LayerNormBase`` (``build`` returns a weight-only LayerNorm, eps 1e-5: OLMo's
  ``LayerNorm`` with ``bias_for_layer_norm=False``), ``olmo.config.DistributedStrategy`` (an enum for
  ``reset_parameters``); ``olmo.memory_parallel`` is their real module (single process: its groups stay unset);
- ``wandb`` (``run = None``: no logging), if it is not installed;
- ``fuse_ops.fused_index`` (``FusedLookup``, ``XperfGlu``): their value lookup calls a CUDA extension that is not
  in their repository. The stand-ins here are plain torch written from their own ``else`` branch of
  ``ImplicitValueExpansion`` (the non-fused path they keep in the file): ``FusedLookup`` gathers the rows
  ``((i mod value_num) + offset) mod all_value_num``, scales chunk ``c`` of each row by core ``c``'s score and sums
  into group ``i div value_num`` (``(bs, groups · vdim)``); ``XperfGlu`` is the dot product of the gathered
  ``pre_values`` rows with ``pre_input``. The full-layer comparison is therefore against their model with this
  stand-in, and the timing of their layer times the stand-in, not their CUDA kernel.

Compared (float64; weights copied memzoo → theirs): the rank-1 vectors ``u, v`` (memzoo's ``tucker_rank1`` against
their ``_calc_tucker_1rank`` + ``_online_update_tucker_approx``), the retrieval (their
``TuckerDecomposedQueryKeyRetrieval`` scores and selected slots after the shuffle, captured from their forward,
against memzoo's ``TuckerRouter``), the layer output, and the gradients of the input and of every parameter. Timed:
forward+backward of both layers (float32, equal shapes, one thread, CPU time of the thread; ratio = memzoo ÷
theirs with their lookup as the stand-in above).
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import importlib
import io
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from memzoo.atomic import write_bytes_atomic
from memzoo.blocks.ultramem import UltraMem, UltraMemV2
from memzoo.ops.tucker_topk import tucker_rank1

ROOT = Path(__file__).resolve().parents[1]
STUBS = ["olmo (bare package)", "olmo.model.LayerNormBase", "olmo.config.DistributedStrategy",
         "fuse_ops.fused_index.FusedLookup / XperfGlu (plain-torch stand-ins)"]


# ---------------------------------------------------------------------------------------------- stubs
class _LayerNormBase:
    @staticmethod
    def build(config, size: int, elementwise_affine: bool = True, **_):
        return nn.LayerNorm(size, eps=1e-5, elementwise_affine=elementwise_affine, bias=False)


def _fused_lookup(indices, values, scores, padding_idx, all_value_num, value_num, offset, groups, has_padding):
    """Stand-in for ``fuse_ops.fused_index.FusedLookup.apply`` (module docstring): ``(bs, groups · vdim)``."""
    if has_padding:
        raise NotImplementedError("the stand-in has no padding rows (only the model-parallel path uses them)")
    idx = indices.long()
    real, group = (idx % value_num + offset) % all_value_num, idx // value_num
    scores = scores.permute(1, 2, 0) if scores.dim() == 3 else scores.unsqueeze(-1)  # (bs, K, M)
    rows = values[real].unflatten(-1, (scores.shape[-1], -1)) * scores.unsqueeze(-1)  # (bs, K, M, vdim/M)
    out = rows.new_zeros(idx.shape[0], groups, values.shape[-1])
    out = out.scatter_add(1, group.unsqueeze(-1).expand(-1, -1, values.shape[-1]), rows.flatten(-2))
    return out.flatten(1)


def _xperf_glu(indices, pre_values, pre_input, all_value_num, value_num, offset, *_):
    """Stand-in for ``fuse_ops.fused_index.XperfGlu.apply``: ``(bs, K)`` dot products ``pre_values[row] · pre_input``."""
    real = (indices.long() % value_num + offset) % all_value_num
    return (pre_values[real] * pre_input.unsqueeze(1)).sum(-1)


def load_authors(repo: Path):
    """Their ``ultramem_layer`` and ``ultramem_layer_v2`` modules, with the import-time stubs above."""
    folder = repo / "olmo"
    if not (folder / "ultramem_layer.py").is_file():
        raise SystemExit(f"sidebyside_ultramem: {folder}/ultramem_layer.py not found; pass --repo a checkout of "
                         f"ZihaoHuang-notabot/Ultra-Sparse-Memory-Network (the folder holding olmo/)")
    stubs = {}
    package = types.ModuleType("olmo")
    package.__path__ = [str(folder)]
    stubs["olmo"] = package
    stubs["olmo.model"] = types.SimpleNamespace(LayerNormBase=_LayerNormBase)
    stubs["olmo.config"] = types.SimpleNamespace(DistributedStrategy=enum.Enum("DistributedStrategy", "ddp fsdp"))
    fused = types.SimpleNamespace(FusedLookup=types.SimpleNamespace(apply=_fused_lookup),
                                  XperfGlu=types.SimpleNamespace(apply=_xperf_glu))
    stubs["fuse_ops"] = types.SimpleNamespace(fused_index=fused)
    stubs["fuse_ops.fused_index"] = fused
    try:
        importlib.import_module("wandb")
    except ImportError:
        stubs["wandb"] = types.SimpleNamespace(run=None)
        STUBS.append("wandb (run = None)")
    sys.modules.update(stubs)
    return importlib.import_module("olmo.ultramem_layer"), importlib.import_module("olmo.ultramem_layer_v2")


# ---------------------------------------------------------------------------------------------- weights
def copy_router(theirs, ours, query_rows: int | None = None) -> None:
    """memzoo's router weights into their layer (``keys (H,2,n,r,k) → (H,2,n,k,r)``, cores per core, shuffle)."""
    r = ours.router
    with torch.no_grad():
        w = theirs.query_proj.weight
        w[: r.query.weight.shape[0]].copy_(r.query.weight)
        theirs.query_norm.weight.copy_(r.query_norm)
        theirs.keys_norm.weight.copy_(r.key_norm)
        theirs.keys.copy_(r.keys.transpose(-1, -2))
        for c, core in enumerate(theirs.tucker_core):
            core.copy_(r.cores[:, c])
        theirs.shuffle_index.copy_(r.permutation)
        u, v = tucker_rank1(r.cores.detach().sum(-3))
        # their sign rule keeps the previous (u, v)'s side: start from memzoo's so both pick the same side
        theirs.tucker_core_u, theirs.tucker_core_v = u[None, :, None, :].clone(), v[None, :, None, :].clone()
    theirs._online_update_tucker_approx()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def router_pairs(theirs, ours) -> dict:
    r = ours.router
    return {"query.weight": (r.query.weight, lambda: theirs.query_proj.weight.grad[: r.query.weight.shape[0]]),
            "query_norm": (r.query_norm, lambda: theirs.query_norm.weight.grad),
            "key_norm": (r.key_norm, lambda: theirs.keys_norm.weight.grad),
            "keys": (r.keys, lambda: theirs.keys.grad.transpose(-1, -2)),
            "cores": (r.cores, lambda: torch.stack([c.grad for c in theirs.tucker_core], 1))}


def compare(ours, run_theirs, pairs: dict, x: torch.Tensor, captured: dict) -> dict:
    """Forward both on ``x``, backward a fixed random cotangent, and the max abs diffs."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(xa)
    rows, groups, scores = ours.router(x)
    y_theirs = run_theirs(xb)
    cot = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(1), dtype=y_ours.dtype)
    (y_ours * cot).sum().backward()
    (y_theirs * cot).sum().backward()
    slots_ours = (groups * ours.pool.num_rows + rows).flatten(0, -2)
    their_slots = captured["slots"]
    same = (slots_ours == their_slots)
    out = {"tokens": x.shape[0] * x.shape[1],
           "u_v_max_abs_diff": captured["uv_diff"],
           "selected_slots_equal_fraction": float(same.double().mean()),
           "retrieval_scores_max_abs_diff": max_diff(scores.flatten(0, -3), captured["scores"]),
           "output_max_abs_diff": max_diff(y_ours, y_theirs), "output_max_abs": float(y_ours.abs().max()),
           "grad_input_max_abs_diff": max_diff(xa.grad, xb.grad), "grad_max_abs_diff": {}}
    for name, (param, their_grad) in pairs.items():
        out["grad_max_abs_diff"][name] = max_diff(param.grad, their_grad())
    out["grad_max_abs_diff_all"] = max([out["grad_input_max_abs_diff"], *out["grad_max_abs_diff"].values()])
    return out


# ---------------------------------------------------------------------------------------------- UltraMem (V1)
def build_v1(authors, dim, knum, kdim, vdim, knn, heads, rank, cores, expand, dtype):
    torch.manual_seed(0)
    ours = UltraMem(dim, n_keys=math.isqrt(expand) * knum, value_dim=vdim, value_expand=expand, heads=heads, knn=knn,
                    k_dim=kdim, rank=rank, cores=cores).to(dtype)
    theirs = authors.UltraMemLayerV1(dim, knum, kdim, vdim, knn, head=heads, tucker_rank=rank, tucker_multihead=cores,
                                     value_expand_time=expand, config=SimpleNamespace(
                                         attention_layer_norm_with_affine=True, mem_log_interval=10)).to(dtype)
    with torch.no_grad():
        theirs.values_for_look_up.copy_(ours.pool.values)
        theirs.values_proj.weight.copy_(ours.out.weight)
    copy_router(theirs, ours)
    captured = {}
    expand_values = theirs.ImplicitValueExpansion

    def capture(best_scores, best_indice):
        captured.update(scores=best_scores.detach(), slots=theirs.shuffle_index[best_indice])
        return expand_values(best_scores, best_indice)

    theirs.ImplicitValueExpansion = capture
    u, v = tucker_rank1(ours.router.cores.detach().sum(-3))
    captured["uv_diff"] = max(max_diff(theirs.tucker_core_u.flatten(), u.flatten()),
                              max_diff(theirs.tucker_core_v.flatten(), v.flatten()))
    pairs = {**router_pairs(theirs, ours), "values": (ours.pool.values, lambda: theirs.values_for_look_up.grad),
             "out.weight": (ours.out.weight, lambda: theirs.values_proj.weight.grad)}
    return ours, theirs, theirs, pairs, captured


# ---------------------------------------------------------------------------------------------- UltraMemV2
def v2_config(q_per_rank: bool, key_expand: int, glu: bool):
    return SimpleNamespace(
        attention_layer_norm_with_affine=True, mem_log_interval=10, mem_q_for_each_tucker_rank=q_per_rank,
        mem_key_expand_time=key_expand, mem_final_top_expand_time=1, mem_key_balance_reg_coef=0.0,
        mem_use_glu_act=glu, mem_output_dropout_rate=0.0, vertical_parallel=False, mem_parallel_size=1)


def build_v2(authors, dim, knum, kdim, vdim, knn, heads, rank, cores, expand, key_expand, glu, dtype,
             q_per_rank=True):
    torch.manual_seed(0)
    ours = UltraMemV2(dim, n_keys=key_expand * knum, value_dim=vdim, value_expand=expand, value_rows=knum * knum,
                      heads=heads, knn=knn, k_dim=kdim, rank=rank, cores=cores, ffn_fraction=0,
                      activation="gelu" if glu else "none").to(dtype)
    config = v2_config(q_per_rank, key_expand, glu)
    kwargs = dict(head=heads, tucker_rank=rank, tucker_multihead=cores, value_expand_time=expand, layer_id=0,
                  share_ratio=1.0, mem_layer_num=1, config=config)
    with contextlib.redirect_stdout(io.StringIO()):  # their constructor prints its sizes
        theirs = authors.UltraMemLayerV2(dim, knum, kdim, vdim, vdim, knn, has_value=False, **kwargs).to(dtype)
        full = authors.UltraMemLayerV2(dim, knum, kdim, vdim, vdim, knn, has_value=True, **kwargs).to(dtype)
    with torch.no_grad():
        full.values_for_look_up.copy_(ours.pool.up)
        full.pre_values_for_look_up.copy_(ours.pool.down)
        theirs.pre_values_proj.weight.copy_(ours.value_in.weight)
        theirs.values_proj.weight.copy_(ours.out.weight)
    copy_router(theirs, ours)
    captured = {}
    retrieve = theirs.TuckerDecomposedQueryKeyRetrieval

    def capture(query, keys):
        scores, indices, loss = retrieve(query, keys)
        captured.update(scores=scores.detach(), slots=theirs.shuffle_index[indices])
        return scores, indices, loss

    theirs.TuckerDecomposedQueryKeyRetrieval = capture
    u, v = tucker_rank1(ours.router.cores.detach().sum(-3))
    captured["uv_diff"] = max(max_diff(theirs.tucker_core_u.flatten(), u.flatten()),
                              max_diff(theirs.tucker_core_v.flatten(), v.flatten()))
    pairs = {**router_pairs(theirs, ours), "down": (ours.pool.down, lambda: full.pre_values_for_look_up.grad),
             "up": (ours.pool.up, lambda: full.values_for_look_up.grad),
             "value_in.weight": (ours.value_in.weight, lambda: theirs.pre_values_proj.weight.grad),
             "out.weight": (ours.out.weight, lambda: theirs.values_proj.weight.grad)}
    return ours, theirs, full, pairs, captured


def v2_failures(authors) -> list[dict]:
    """Their V2 where it does not run as written: each setting and the exact error."""
    out = []
    for q_per_rank, rank, what in ((False, 2, "mem_q_for_each_tucker_rank=false (their config default)"),
                                   (True, 3, "mem_q_for_each_tucker_rank=true, tucker_rank=3")):
        try:
            _, theirs, full, _, _ = build_v2(authors, 32, 4, 8, 16, 4, 1, rank, 2, 1, 2, False, torch.float64,
                                             q_per_rank=q_per_rank)
            theirs(torch.randn(1, 3, 32, dtype=torch.float64), full)
            out.append({"setting": what, "error": None})
        except Exception as err:  # noqa: BLE001 - recorded, not hidden
            out.append({"setting": what, "error": f"{type(err).__name__}: {err}".strip()})
    return out


# ---------------------------------------------------------------------------------------------- timing
def fwd_bwd_time(fn, x, repeats: int, rounds: int = 3) -> float:
    """Best-of-rounds median CPU time of the calling thread (at one torch thread: all of the compute, and not the
    time other processes on a shared machine hold the core) of one forward+backward."""
    def step():
        xg = x.clone().requires_grad_()
        fn(xg).square().mean().backward()
    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            start = time.thread_time()
            step()
            times.append(time.thread_time() - start)
        best = min(best, statistics.median(times))
    return best


def timing(ours, theirs_fn, x, repeats: int) -> dict:
    """Forward+backward of both at one torch thread, by the thread's CPU time (ratio = memzoo ÷ authors)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_ours, t_theirs = fwd_bwd_time(ours, x, repeats), fwd_bwd_time(theirs_fn, x, repeats)
        t_ours = min(t_ours, fwd_bwd_time(ours, x, repeats))  # once more after theirs: load drifts hit both
    finally:
        torch.set_num_threads(threads)
    return {"memzoo_ms": 1e3 * t_ours, "authors_ms": 1e3 * t_theirs, "ratio_memzoo_to_authors": t_ours / t_theirs,
            "tokens": x.shape[0] * x.shape[1], "threads": 1, "clock": "CPU time of the compute thread"}


# ---------------------------------------------------------------------------------------------- main
V1_CASES = [dict(dim=64, knum=8, kdim=16, vdim=32, knn=8, heads=2, rank=2, cores=2, expand=4),
            dict(dim=48, knum=6, kdim=12, vdim=24, knn=6, heads=1, rank=3, cores=1, expand=1),
            dict(dim=64, knum=8, kdim=16, vdim=48, knn=5, heads=2, rank=2, cores=3, expand=4)]
V2_CASES = [dict(dim=64, knum=8, kdim=16, vdim=32, knn=8, heads=1, rank=2, cores=2, expand=1, key_expand=2,
                 glu=False),
            dict(dim=64, knum=8, kdim=16, vdim=32, knn=8, heads=1, rank=2, cores=2, expand=4, key_expand=2,
                 glu=True),
            dict(dim=48, knum=6, kdim=12, vdim=24, knn=6, heads=1, rank=2, cores=1, expand=1, key_expand=1,
                 glu=False)]
TIME_V1 = dict(dim=256, knum=32, kdim=64, vdim=256, knn=16, heads=2, rank=2, cores=2, expand=4)
TIME_V2 = dict(dim=256, knum=32, kdim=64, vdim=256, knn=16, heads=1, rank=2, cores=2, expand=1, key_expand=2,
               glu=False)


def markdown(result: dict) -> str:
    lines = ["# UltraMem / UltraMemV2 side by side with the authors' layers", "",
             f"`{result['command']}` ({result['machine']}); authors' code at commit `{result['authors_commit']}`.", "",
             "Stubbed for the import (not compared): " + "; ".join(result["stubs"]) + ".", "",
             result["notes"], ""]
    for key, title in (("ultramem", "UltraMem (V1) vs `UltraMemLayerV1`"),
                       ("ultramem_v2", "UltraMemV2 vs `UltraMemLayerV2` (+ its `has_value` table layer)")):
        lines += [f"## {title}", "", "| case | tokens | u,v diff | slots equal | scores diff | output diff (max abs output) "
                  "| grad diff (all) |", "|---|---|---|---|---|---|---|"]
        for row in result[key]["cases"]:
            case = ", ".join(f"{k}={v}" for k, v in row["case"].items())
            lines.append(f"| {case} | {row['tokens']} | {row['u_v_max_abs_diff']:.1e} | "
                         f"{row['selected_slots_equal_fraction']:.3f} | {row['retrieval_scores_max_abs_diff']:.1e} | "
                         f"{row['output_max_abs_diff']:.1e} ({row['output_max_abs']:.2f}) | "
                         f"{row['grad_max_abs_diff_all']:.1e} |")
        t = result[key]["timing"]
        lines += ["", f"fwd+bwd at {t['case']} on {t['tokens']} tokens, float32, {t['threads']} thread, CPU time: memzoo "
                  f"{t['memzoo_ms']:.1f} ms, authors {t['authors_ms']:.1f} ms, ratio {t['ratio_memzoo_to_authors']:.2f}",
                  ""]
    lines += ["## Their V2 where it does not run as written", ""]
    lines += [f"- {f['setting']}: " + (f"`{f['error']}`" if f["error"] else "runs") for f in result["v2_failures"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="checkout holding the authors' olmo/ folder")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results" / "sidebyside-ultramem.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--authors-commit", help="their commit, recorded in the JSON (read from DIR/.git if omitted)")
    args = parser.parse_args(argv)
    v1, v2 = load_authors(args.repo)
    gen = torch.Generator().manual_seed(0)
    result = {"command": "python tools/sidebyside_ultramem.py --repo DIR", "machine": f"torch {torch.__version__}, cpu",
              "authors_commit": args.authors_commit or _commit(args.repo), "stubs": STUBS,
              "notes": ("Comparisons in float64 with memzoo's weights copied into theirs; scores diff: the per-core scores of the "
                        "selected slots; slots: the selected virtual slots after their shuffle (order included). "
                        "u,v diff: their V2 takes the SVD in float32. V2 runs with mem_q_for_each_tucker_rank=true (their run_ultramem_v2.sh) and tucker_rank 2, "
                        "the only setting in which its query split has matching shapes: it then scores the row keys "
                        "with query chunk (half 0, rank 0) and the column keys with chunk (half 0, rank 1) for every "
                        "rank, so memzoo's query weight is copied into those two chunks and the other half of their "
                        "query projection is unused (its gradient is zero). pre_vdim = vdim (memzoo ties the value "
                        "input width to value_dim); memzoo's dense FFN beside V2 is off (ffn_fraction 0).")}
    for key, builder, cases, time_case in (("ultramem", build_v1, V1_CASES, TIME_V1),
                                           ("ultramem_v2", build_v2, V2_CASES, TIME_V2)):
        rows = []
        for case in cases:
            ours, theirs, full, pairs, captured = builder(v1 if key == "ultramem" else v2, **case, dtype=torch.float64)
            run_theirs = theirs if key == "ultramem" else (lambda h, t=theirs, f=full: t(h, f))
            x = torch.randn(2, 9, case["dim"], generator=gen, dtype=torch.float64)
            row = {"case": case, **compare(ours, run_theirs, pairs, x, captured)}
            if key == "ultramem_v2":
                row["their_unused_query_rows_grad_max"] = float(theirs.query_proj.weight.grad[2 * case["kdim"]:].abs().max())
            rows.append(row)
            print(key, json.dumps({k: v for k, v in row.items() if k != "grad_max_abs_diff"}))
        ours, theirs, full, _, _ = builder(v1 if key == "ultramem" else v2, **time_case, dtype=torch.float32)
        run_theirs = theirs if key == "ultramem" else (lambda h, t=theirs, f=full: t(h, f))
        x = torch.randn(8, 128, time_case["dim"], generator=gen)
        result[key] = {"cases": rows, "timing": {"case": time_case, **timing(ours, run_theirs, x, args.repeats)}}
        print(key, "timing", json.dumps(result[key]["timing"]))
    result["v2_failures"] = v2_failures(v2)
    for failure in result["v2_failures"]:
        print("ultramem_v2 as written:", failure)
    text = markdown(result)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.json, (json.dumps(result, indent=2) + "\n").encode())
    write_bytes_atomic(args.json.with_suffix(".md"), text.encode())
    return result


def _commit(repo: Path) -> str:
    """The authors' commit if ``repo`` is a git checkout, else ``unknown``."""
    head = repo / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (repo / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return "unknown (not a git checkout)"


if __name__ == "__main__":
    main()
