"""tools/continual_smollm2.py's measures on a tiny untrained model and memzoo's byte tokenizer: answer-only labels,
the greedy-answer count (against a per-item reference), the cloze relations (the study itself, on SmolLM2, runs
outside the test suite)."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "tools"))
    import continual_smollm2

    return continual_smollm2


def test_answer_only_labels(study):
    from memzoo.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    batch = study.qa_batch(tok, [("ab", " c"), ("abcd", " ef")])
    assert batch["input_ids"].shape == (2, 7)
    # labels only where an answer token is predicted: " " after "b", "c" after " "; padding and prompt -100
    assert batch["labels"][0].tolist() == [-100, ord(" "), ord("c"), -100, -100, -100, -100]
    assert batch["labels"][1].tolist() == [-100, -100, -100, ord(" "), ord("e"), ord("f"), -100]
    assert study.consistent(tok, "ab", " c") and not study.consistent(tok, "ab", "")


class Successor(torch.nn.Module):
    """Predicts token ``t + 1`` after token ``t``: the greedy continuation of "ab" is "cdef..."."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * 10


def test_correct_is_the_greedy_answer_test(study):
    from memzoo.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    pairs = [("ab", "c"), ("ab", "cd"), ("ab", "cx"), ("ab", "d"), ("xy", "z{"), ("k", "lmnop")]
    assert study.correct(Successor(tok.vocab_size), tok, pairs, chunk=4) == [True, True, False, False, True, True]


def test_cloze_relations(study):
    import country_facts  # tools/ is on sys.path (the study fixture)

    record = {"name": "Chile", "capital": "Santiago", "region": "Americas", "subregion": "South America",
              "languages": ["es"]}
    made = {name: make(record) for name, make in country_facts.RELATIONS.items()}
    assert made == {"capital": ("The capital of Chile is", "Santiago"),
                    "capital_of": ("Santiago is the capital of", "Chile"),
                    "continent": ("Chile is a country in", "South America"),
                    "language": ("The official language of Chile is", "Spanish")}
    assert country_facts.continent({"region": "Americas", "subregion": "Caribbean"}) == "North America"
    assert country_facts.language({"languages": ["xx"]}) is None


def tiny_base(path):
    """A small dense byte-level model with the depth the study retrofits (layers 10 and 20), as a memzoo
    checkpoint: what the study's SmolLM2 source stands in for."""
    import lightning as L

    from memzoo.training.module import LanguageModel

    torch.manual_seed(0)
    module = LanguageModel({"vocab_size": 258, "dim": 16, "n_layers": 21, "n_heads": 2, "max_seq_len": 64,
                            "block_args": {"hidden": 32}})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path, weights_only=True)
    return path


def test_healing_and_every_method_train_through_lightnings_trainer(study, tmp_path, monkeypatch):
    """Healing trains the memory branches and the pool only; each method's finetuning runs its steps; all of it as
    LanguageModel + Lightning's Trainer fits (a study with a training loop of its own fails the fit count); the
    healed model round-trips through the --pretrained cache (a memzoo checkpoint with the base measures)."""
    import lightning as L
    import numpy as np

    from memzoo.data.tokenizers import ByteTokenizer
    from memzoo.training.module import LanguageModel
    from memzoo.training.slot_stats import collect_slot_stats

    fits = []
    real_fit = L.Trainer.fit

    def spy(trainer, module, *args, **kwargs):
        assert isinstance(module, LanguageModel)
        real_fit(trainer, module, *args, **kwargs)
        fits.append(trainer.global_step)

    monkeypatch.setattr(L.Trainer, "fit", spy)
    tok = ByteTokenizer()
    runs = (study.Run("full", 1e-3), study.Run("smf", 1e-2, 8, "tfidf"))  # lora: tests/test_continual.py
    settings = study.Settings("t", n_people=1, heal_steps=2, finetune_steps=(1, 2), runs=runs, n_keys=32, window=8,
                              heal_batch=2)
    module = study.retrofitted(settings.n_keys, source=str(tiny_base(tmp_path / "base.ckpt")), **study.HEAL)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    text = np.arange(300) % 90 + 32
    trainer = study.heal(module, settings, {"a": text, "b": text[::-1].copy()}, log=lambda _: None)
    changed = {k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".ffn.add." in k or k.startswith("pools.") for k in changed)
    prepared = {"study": "t", "old": [{"relation": "capital", "context": "ab", "answer": " c"}], "candidates": 3,
                "base_ppl": {"a": 2.0}, "generations": {"x": "y"}}
    healed = study.save_weights(trainer, tmp_path / "healed.ckpt", extra=prepared)
    loaded_prepared, loaded = study.load_healed(healed, "t")
    assert loaded_prepared == prepared
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.model.state_dict().items())
    with pytest.raises(SystemExit, match="holds the healed model of 't', not 'other'"):
        study.load_healed(healed, "other")

    facts = [("Ann lives in", " Oslo."), ("Bob works at", " Acme.")]
    stats = tmp_path / "stats.pt"
    torch.save(collect_slot_stats(loaded, [study.qa_batch(tok, facts)]).to_dict(), stats)
    for run in runs:
        points, taught = study.finetune(run, healed, settings, tok, facts, stats,
                                        lambda m: {"recall_b": sum(study.correct(m, tok, facts)) / len(facts)})
        assert [p["steps"] for p in points] == [1, 2] and not taught.training
        assert {"train_seconds", "recall_b", "optimizer", "rank"} <= set(points[0])
    assert fits == [2, 2, 2]


def test_greedy_is_memzoos_decode_loop(study):
    """``greedy`` continues a prompt as a plain argmax loop over full recomputation does (here: the successor
    rule of a model that predicts token t + 1), through Transformer.generate."""
    from memzoo.data.tokenizers import ByteTokenizer
    from memzoo.model.transformer import Transformer

    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = Transformer(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, max_seq_len=32,
                        block_args={"hidden": 32}).eval()
    ids = torch.tensor([tok.encode("abc")])
    for _ in range(5):  # the reference: recompute the whole sequence per token
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert study.greedy(model, tok, "abc", n=5) == tok.decode(ids[0, 3:].tolist())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_error(study):
    import importlib.util

    spec = importlib.util.spec_from_file_location("memzoo_continual_tool_device", ROOT / "tools" / "continual.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available here; run with --device cpu"):
        tool.main(["--base", "smollm2", "--device", "cuda", "--out", "unused"])
    with pytest.raises(SystemExit, match="--device cuda: the scratch study runs on the CPU"):
        tool.main(["--device", "cuda"])


def test_measures_run_on_the_models_device(study):
    """Batches are built on the CPU and moved to the weights' device (here the CPU: the CUDA path has not run)."""
    model = torch.nn.Linear(2, 2)
    batch = study.on_model(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    assert batch["input_ids"].device == next(model.parameters()).device
