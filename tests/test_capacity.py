"""tools/capacity.py: generated configs (committed = generated, parse, FLOP-matched), the plan, bits and targets on
fake cells, and the quick path end to end on a 2-cell micro grid (real training, a few steps), resumed."""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from memzoo.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def load_capacity():
    spec = importlib.util.spec_from_file_location("memzoo_capacity_tool", ROOT / "tools" / "capacity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


capacity = load_capacity()


@pytest.mark.parametrize("family", sorted(capacity.FAMILIES))
def test_committed_configs_are_the_generated_ones(family):
    texts = capacity.config_texts(family)
    folder = capacity.FAMILIES[family].config_dir
    committed = {p.name: p.read_text() for p in folder.glob("*.yaml")}
    assert committed == texts, f"{folder} differs from tools/capacity.py: run --write-configs --family {family}"


def test_the_w16_family_halves_every_width_and_stays_flop_matched():
    """``--family w16``: every model within 10% of its FLOP target, a third of w32's dense FLOPs, and tables of the
    same 4,096 rows at half the width."""
    folder = capacity.FAMILIES["w16"].config_dir
    costs = {c.model: c for c in capacity.study.flop_table(list(capacity.MODELS), capacity.MODELS, folder,
                                                              vocab_size=capacity.vocab_size())}
    assert capacity.study.check_flop_matching(list(costs.values()), 0.10, folder) == []
    w32 = {c.model: c for c in capacity.study.flop_table(["dense"], capacity.MODELS, capacity.CONFIG_DIR,
                                                            vocab_size=capacity.vocab_size())}
    assert costs["dense"].flops_per_token < 0.4 * w32["dense"].flops_per_token
    assert capacity.memory_parameters("memoryplus", folder) == 64 * 64 * 16
    assert capacity.model_configs("w16")["dense"]["model"]["init_args"]["architecture"]["dim"] == 16
    plan = capacity.main(["--cpu", "--dry-run", "--models", "dense", "memoryplus"])  # resolves the w16 folder
    assert [c["flops_per_token"] for c in plan["flop_table"]] == [costs["dense"].flops_per_token,
                                                                  costs["memoryplus"].flops_per_token]
    assert [(w["name"], w["steps"], w["batch_size"]) for w in plan["plan"]] == [("people-1000", 9184, 64)]


def test_the_cpu_hour_grid_is_w8_flop_matched_with_three_rates_per_model():
    """``--cpu-hour``: the w8 family (width 8, tables of 4,096 rows of width 8) within 10% of every FLOP target,
    people-300 at 2,000 exposures in batches of 64, every model at its own three rates; ``--model-lrs`` replaces one
    model's rates and ``--lrs`` every model's; two grid flags are refused."""
    folder = capacity.FAMILIES["w8"].config_dir
    costs = capacity.study.flop_table(list(capacity.MODELS), capacity.MODELS, folder, vocab_size=capacity.vocab_size())
    assert capacity.study.check_flop_matching(costs, 0.10, folder) == []
    assert capacity.memory_parameters("memoryplus", folder) == 64 * 64 * 8
    assert capacity.model_configs("w8")["dense"]["model"]["init_args"]["architecture"]["dim"] == 8
    plan = capacity.main(["--cpu-hour", "--dry-run"])
    assert [(w["name"], w["steps"], w["batch_size"]) for w in plan["plan"]] == [("people-300", 5500, 64)]
    assert len(plan["cells"]) == 3 * len(capacity.MODELS)
    assert {c.split("__")[1] for c in plan["cells"] if c.split("__")[1].startswith("dense@")} == {
        "dense@lr0.03", "dense@lr0.1"}  # and the config's 1e-2 as the plain cell
    assert "people-300__peer@lr0.003" in plan["cells"] and "people-300__peer@lr0.1" not in plan["cells"]
    one = capacity.main(["--cpu-hour", "--dry-run", "--models", "dense", "peer", "--model-lrs", "peer=0.02"])
    assert one["cells"] == ["people-300__dense", "people-300__dense@lr0.03", "people-300__dense@lr0.1",
                            "people-300__peer@lr0.02"]
    every = capacity.main(["--cpu-hour", "--dry-run", "--models", "dense", "peer", "--lrs", "0.01"])
    assert every["cells"] == ["people-300__dense", "people-300__peer"]
    with pytest.raises(capacity.StudyError, match="choose one grid"):
        capacity.main(["--cpu", "--cpu-hour", "--dry-run"])


def test_every_capacity_config_parses_and_the_grid_is_flop_matched():
    costs = capacity.study.flop_table(list(capacity.MODELS), capacity.MODELS, capacity.CONFIG_DIR,
                                      vocab_size=capacity.vocab_size())
    assert capacity.study.check_flop_matching(costs, 0.10, capacity.CONFIG_DIR) == []
    by = {c.model: c for c in costs}
    assert by["dense-2x"].flop_ratio == pytest.approx(2.0, rel=0.1)
    memory = {m: capacity.memory_parameters(m) for m in capacity.MODELS}
    assert memory["dense"] == memory["dense-2x"] == memory["moe"] == 0
    assert memory["memoryplus"] == memory["pkm"] == 64 * 64 * 32  # one shared pool / one private table
    assert memory["peer"] == 2 * 64 * 64 * 32  # PEER's down and up tables
    wider = capacity.study.variant_args(["model.init_args.architecture.pools.memory.n_keys=128"], "v")
    assert capacity.memory_parameters("memoryplus", overrides=wider) == 128 * 128 * 32  # as the variant's cells
    # the data config parses as the CLI would read it
    from memzoo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(capacity.CONFIG_DIR / "model-memoryplus.yaml"), "--config",
              str(capacity.CONFIG_DIR / capacity.DATA_CONFIG), "--print_config"])
    assert exit_.value.code == 0


def test_token_indexed_models_bind_the_biographies_word_tokenizer():
    """Engram's compressed vocabulary is built from the data's tokenizer (the biographies' WordTokenizer), as a
    capacity cell builds it; STEM and MoLE index the same word ids."""
    import torch

    import memzoo

    data_config = str(capacity.CONFIG_DIR / capacity.DATA_CONFIG)
    words = capacity.biographies(1).tokenizer.words
    ids = torch.tensor([[0, *range(2, 17)]])
    for model in ("engram", "stem", "mole"):
        module = memzoo.build_model(["--config", str(capacity.CONFIG_DIR / f"model-{model}.yaml"),
                                     "--config", data_config, "--data.init_args.n_people", "3"])
        assert torch.isfinite(module.model(ids)).all()
        if model == "engram":
            engram = next(m for m in module.model.modules() if type(m).__name__ == "Engram")
            # one compressed id per lower-cased word (Engram's normalisation)
            assert engram.lookup.unique().numel() == len({w.lower() for w in words})


def test_plan_gives_every_fact_the_exposures_and_validates_on_the_last_step():
    (workload,) = capacity.capacity_plan([50], exposures=100, batch_size=16, val_points=4)
    tokens = capacity.biographies(50).tokens_per_pass()
    assert workload.steps * workload.tokens_per_step >= 100 * tokens
    assert workload.steps % workload.val_every == 0 and workload.steps // workload.val_every == 4
    args = workload.overrides()
    assert args[args.index("--trainer.limit_val_batches") + 1] == "1.0"  # every fact is probed
    assert args[args.index("--data.init_args.n_people") + 1] == "50"
    with pytest.raises(capacity.StudyError, match="exposures"):
        capacity.capacity_plan([50], exposures=0, batch_size=16, val_points=4)
    small, large = capacity.capacity_plan([50, 3000], exposures=100, batch_size=16, val_points=4, min_steps=1500)
    assert small.steps == 1500 and small.steps > workload.steps  # a small load gets the minimum of updates
    assert large.steps == 4 * math.ceil(100 * capacity.biographies(3000).tokens_per_pass() / (16 * 64) / 4)


def fake_cell(model, load, val_loss, params, recall=0.5, earlier=()):
    """A stored cell whose validation curve is ``earlier`` losses, then ``val_loss`` (the final one)."""
    curve = [{"step": 10 * (i + 1), "val_loss": loss} for i, loss in enumerate([*earlier, val_loss])]
    return {"workload": f"people-{load}", "model": model, "knowledge_load": load, "parameters": params,
            "train_flops": 1e12, "final": {"val_loss": val_loss, "fact_recall": recall}, "curve": curve, "memory": {}}


def uniform_loss():
    """The validation loss of a model that knows nothing of people-N (uniform over every value set)."""
    data = capacity.biographies(1000)
    return sum(math.log(s) for s in data.corpus.value_set_sizes.values()) / 7


def fraction_cell(model, load, fraction, params, memory=0, earlier=()):
    """A cell storing ``fraction`` of the corpus at the end, ``earlier`` fractions before."""
    loss = uniform_loss()
    return capacity.add_bits(fake_cell(model, load, loss * (1 - fraction), params,
                                       earlier=[loss * (1 - f) for f in earlier]), memory)


def test_bits_and_targets_on_fake_cells():
    data = capacity.biographies(1000)
    memory = 131072
    cells = [fraction_cell("dense", 300, 0.95, 56000, earlier=[0.9]),
             fraction_cell("dense", 1000, 0.25, 56000, earlier=[0.24]),  # flattened: its last quarter added 4%
             fraction_cell("dense-2x", 1000, 0.4, 118000),
             fraction_cell("pkm", 1000, 0.6, 185000, memory),
             fraction_cell("memoryplus", 1000, 0.75, 185000, memory),
             fraction_cell("memoryplus-no-gate", 1000, 0.95, 185000, memory)]  # an ablation: not a candidate
    dense, mp = cells[1], cells[4]
    assert dense["bits"] == pytest.approx(0.25 * data.max_bits)
    assert mp["bits"] == pytest.approx(0.75 * data.max_bits)
    assert mp["bits_per_dense_param"] == pytest.approx(mp["bits"] / (185000 - memory))
    assert capacity.last_interval_growth(dense) == pytest.approx(0.01 / 0.25)
    checked = {t["target"]: t for t in capacity.targets(cells)}
    assert all(set(t) == {"target", "met", "detail"} for t in checked.values())
    best = checked["people-1000: the best memory design stores >= 2x dense's bits (equal FLOPs)"]
    assert best["met"] and best["detail"].startswith("best memoryplus; memoryplus")  # 0.75 >= 2 x 0.25
    assert "allows at most 4.00x here;" in best["detail"]  # dense holds a quarter of the corpus
    per = (mp["bits"] - dense["bits"]) / memory  # 0.5 x 39,612 bits / 131,072 = 0.151
    held = checked["people-1000: the best memory design's memory parameters hold >= 0.5 bit each beyond dense"]
    assert not held["met"] and f"{per:.3f}" in held["detail"]
    assert checked["people-1000: gated Memory+ stores >= 1.5x dense's bits"]["met"]  # 3.00x
    assert not any("no-gate" in t["detail"] for t in checked.values() if "Memory+" in t["target"])  # the ablation
    annotated = {c["model"]: c for c in capacity.add_memory_bits(cells) if c["knowledge_load"] == 1000}
    assert annotated["memoryplus"]["bits_per_memory_param"] == pytest.approx(per)
    assert annotated["dense"]["bits_per_memory_param"] is None
    assert "| 0.151 |" in capacity.results_table(list(annotated.values()))
    sat = capacity.saturation(cells)
    assert sat["first_load_below_90pct"] == 1000 and sat["at_load"] == 300

    # dense still climbing at that load: the load does not measure capacity, every target is missed and says so
    climbing = [fraction_cell("dense", 1000, 0.25, 56000, earlier=[0.15]), mp]
    missed = capacity.targets(climbing)
    assert missed and not any(t["met"] for t in missed)
    assert all("still climbing" in t["detail"] and "added 40.0%" in t["detail"] for t in missed)
    # dense holds >= 90% everywhere: the grid never reached its capacity
    (never,) = capacity.targets([fraction_cell("dense", 100, 0.99, 56000, earlier=[0.5]), mp])
    assert not never["met"] and "people-100: 99.0%" in never["detail"]
    assert capacity.targets([mp]) == []  # no dense cell: nothing to compare
    # dense holds 80% of the corpus: no design can store 2x (or 1.5x) its bits there, and the detail says so
    bounded = capacity.targets([fraction_cell("dense", 1000, 0.8, 56000, earlier=[0.79]),
                                fraction_cell("memoryplus", 1000, 1.0, 185000, memory)])
    assert all(not t["met"] for t in bounded if "x dense" in t["target"])
    assert "allows at most 1.25x here, so >= 2x needs a larger load" in bounded[0]["detail"]
    assert "allows at most 1.25x here, so >= 1.5x needs a larger load" in bounded[2]["detail"]
    # the best design without a table as trained (MoLE): the per-parameter target is missed, not a division by zero
    mole = fraction_cell("mole", 1000, 0.9, 57000)
    (_, per_table, _) = capacity.targets([cells[1], mp, mole])
    assert not per_table["met"] and per_table["detail"].startswith("mole has no memory table as trained")


def test_quick_path_on_a_two_cell_micro_grid_trains_reports_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cells' run folders (runs/study-micro-*) land here, not in the checkout
    argv = ["--quick", "--models", "dense", "memoryplus", "--loads", "6", "--exposures", "2", "--batch-size", "4",
            "--min-steps", "0",
            "--name", "micro", "--out", str(tmp_path)]
    result = capacity.main(argv)
    assert [c["model"] for c in result["cells"]] == ["dense", "memoryplus"]
    report = json.loads((tmp_path / "micro.json").read_text())
    assert report["targets"] and all(set(t) == {"target", "met", "detail"} for t in report["targets"])
    assert report["hardware"] == describe_machine()  # the CPU by name (a GPU by name where one trained the cells)
    assert all(c["machine"] == describe_machine() for c in report["cells"])  # each cell names its own machine
    assert f"Trained on: {describe_machine()} (2 cells)" in (tmp_path / "micro.md").read_text()
    assert {c["model"]: c["memory_params"] for c in report["cells"]} == {"dense": 0, "memoryplus": 64 * 64 * 32}
    for c in report["cells"]:
        assert c["max_bits"] == pytest.approx(capacity.biographies(6).max_bits)
        assert math.isfinite(c["bits"]) and 0 <= c["final"]["fact_recall"] <= 1
    assert (tmp_path / "micro-bits-vs-load.png").stat().st_size > 0
    assert (tmp_path / "micro-bits-vs-step.png").stat().st_size > 0
    assert "| 6 |" in (tmp_path / "micro.md").read_text()
    md = tmp_path / "micro.md"
    md.write_text(md.read_text() + f"{capacity.NOTES_MARKER}\nReading: hand-written.\n")

    # --reproduce: every cell trains again as micro-reproduced (nothing restored) and is compared with micro.json's
    fresh = capacity.main([*argv, "--reproduce"])
    assert [c["bits"] for c in fresh["cells"]] == [c["bits"] for c in result["cells"]]  # same machine: to the bit
    assert all("study-micro-reproduced-people-6-" in c["run_dir"] for c in fresh["cells"])  # trained, not restored
    reproduced = json.loads((tmp_path / "micro-reproduced.json").read_text())["reproduction"]
    assert [(r["model"], r["status"], r["delta_bits"]) for r in reproduced["rows"]] == [
        ("dense", "bit-exact", 0.0), ("memoryplus", "bit-exact", 0.0)]
    assert reproduced["compared"] == reproduced["bit_exact"] == 2
    assert "2 of 2 cells that train the committed runs came out bit-exact" in (
        tmp_path / "micro-reproduced.md").read_text()
    assert json.loads((tmp_path / "micro.json").read_text()) == report  # the committed page is left alone
    with pytest.raises(capacity.StudyError, match="no committed page .*other.json to reproduce"):
        capacity.main([*argv[:-4], "--name", "other", "--out", str(tmp_path), "--reproduce"])
    with pytest.raises(capacity.StudyError, match="--reproduce trains the cells afresh .*; drop --cells-of"):
        capacity.main([*argv, "--reproduce", "--cells-of", "micro"])

    def no_training(*args, **kwargs):
        raise AssertionError("a stored cell was trained again")

    monkeypatch.setattr("memzoo.cli.main", no_training)
    again = capacity.main(argv)  # resumes: every cell stored with the same hash
    capacity.main([*argv, "--reproduce", "--report-only"])  # the reproduced page rewritten, nothing trained
    assert json.loads((tmp_path / "micro-reproduced.json").read_text())["reproduction"] == reproduced
    assert [c["bits"] for c in again["cells"]] == [c["bits"] for c in result["cells"]]
    assert md.read_text().count("Reading: hand-written.") == 1  # the notes survive the rewrite, once
    shutil.rmtree(tmp_path / "micro-cells")  # a fresh clone: the page is committed, its cells folder is not
    page = json.loads((tmp_path / "micro.json").read_text())
    (tmp_path / "micro.json").write_text(json.dumps({**page, "hardware": "one NVIDIA H200"}))  # trained elsewhere
    restored = capacity.main([*argv, "--report-only"])  # the cells come back from micro.json, nothing trains
    assert json.loads((tmp_path / "micro.json").read_text())["hardware"] == "one NVIDIA H200"  # its machine kept
    assert [c["bits"] for c in restored["cells"]] == [c["bits"] for c in result["cells"]]
    assert sorted(p.name for p in (tmp_path / "micro-cells").iterdir()) == ["people-6__dense.json",
                                                                             "people-6__memoryplus.json"]

    # --cells-of: a page of its own over micro's cells; the trained cell is reused, only its control trains
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    page_before = (tmp_path / "micro.json").read_text()
    runs_before = {p.name for p in tmp_path.glob("runs/*")}
    shared = ["--quick", "--models", "memoryplus", "--loads", "6", "--exposures", "2", "--batch-size", "4",
              "--min-steps", "0", "--out", str(tmp_path), "--cells-of", "micro"]
    ctl = capacity.main([*shared, "--name", "micro-ctl", "--controls", "frozen"])
    trained = sorted({p.name for p in tmp_path.glob("runs/*")} - runs_before)
    assert trained == ["study-micro-people-6-memoryplus@frozen"]  # in micro's cells, under micro's experiment name
    (row,) = ctl["controls"]
    assert row["bits_trained"] == restored["cells"][1]["bits"]  # paired with micro's stored memoryplus cell
    assert (tmp_path / "micro.json").read_text() == page_before  # micro's own page is not rewritten
    assert (tmp_path / "micro-cells" / "people-6__memoryplus@frozen.json").exists()
    with pytest.raises(capacity.StudyError, match="people-6__memoryplus of micro were trained with other arguments"):
        capacity.main([*shared[:8], "8", *shared[9:], "--name", "micro-b8"])  # batch 8: would replace its cells
    with pytest.raises(capacity.StudyError, match="with --set"):
        capacity.main([*shared, "--name", "micro-set", "--set", "trainer.max_steps=1"])
    with pytest.raises(capacity.StudyError, match="this run's own study"):
        capacity.main([*shared, "--name", "micro"])


def test_summarize_config_vocab_size_override_sizes_the_embedding():
    from memzoo.config_accounting import summarize_config

    path = str(capacity.CONFIG_DIR / "model-dense.yaml")
    small, large = summarize_config(path, vocab_size=500), summarize_config(path, vocab_size=1000)
    assert large.parameters - small.parameters == 500 * capacity.DIM  # tied embedding rows
    assert large.flops > small.flops  # and the LM head


# ------------------------------------------------------------------------------------------------ variants
def test_new_models_are_in_the_flop_matched_grid_with_their_sizing_in_the_header():
    for m in ("ultramem_v2", "engram", "stem", "mole"):
        assert m in capacity.MODELS
        assert "# Sizing:" in (capacity.CONFIG_DIR / f"model-{m}.yaml").read_text()


def test_variant_cells_name_their_rate_seed_and_control():
    configs = capacity.model_configs()
    extra = capacity.variants(["dense", "memoryplus"], [capacity.LR, 3e-2], [capacity.SEED, 7], ["frozen"], configs)
    assert extra["dense"] == [] and extra["memoryplus"] == []
    assert extra["dense@lr0.03@seed7"] == ["--model.init_args.optimizer.init_args.lr", "0.03", "--seed_everything", "7"]
    assert "dense@frozen" not in extra  # dense has no table
    assert extra["memoryplus@frozen"] == ["--model.init_args.freeze", '["pools.memory.*"]']
    assert extra["memoryplus@seed7@frozen"] == [*extra["memoryplus@frozen"], "--seed_everything", "7"]  # every seed
    rate = ["--model.init_args.optimizer.init_args.lr", "0.03"]
    assert extra["memoryplus@lr0.03@frozen"] == [*extra["memoryplus@frozen"], *rate]  # the control of every rate
    assert extra["memoryplus@lr0.03@seed7@frozen"] == [*extra["memoryplus@frozen"], *rate, "--seed_everything", "7"]
    mole = capacity.variants(["mole"], [capacity.LR], [capacity.SEED], ["frozen", "shuffled"], configs)
    assert sorted(mole) == ["mole", "mole@frozen"]  # MoLE's experts have no rows to shuffle
    assert capacity.study.base_model("memoryplus@lr0.03@seed7") == "memoryplus"
    own = capacity.variants(["dense", "stem"], [3e-2], [capacity.SEED], [], configs, {"dense": [1e-3, 3e-2]})
    assert sorted(own) == ["dense@lr0.001", "dense@lr0.03", "stem@lr0.03"]  # dense at its own rates, stem at --lrs
    engram = capacity.control_args("engram", "single_row", configs["engram"])
    assert engram == ["--model.init_args.architecture.layers.1.add.table", "single_row"]
    assert "tie_rows" in capacity.control_args("peer", "single_row", configs["peer"])[1]
    assert "shuffle_rows" in capacity.control_args("stem", "shuffled", configs["stem"])[1]
    with pytest.raises(capacity.StudyError, match="no memory table"):
        capacity.control_args("dense", "frozen", configs["dense"])
    with pytest.raises(capacity.StudyError, match="not defined"):
        capacity.control_args("mole", "shuffled", configs["mole"])


def test_lr_sweep_and_control_rows_on_fake_cells():
    cells = [{"knowledge_load": 10, "model": m, "bits": b, "final": {"fact_recall": 0.5}} for m, b in
             [("pkm", 100.0), ("pkm@seed2", 80.0), ("pkm@lr0.03", 120.0), ("pkm@lr0.03@seed2", 110.0),
              ("pkm@frozen", 30.0), ("pkm@shuffled", -500.0), ("pkm@seed2@frozen", 20.0)]]
    (sweep,) = capacity.lr_sweep(cells)
    assert sweep["best_lr"] == 0.03 and sweep["best_bits"] == pytest.approx(115.0)
    assert [r["mean_bits"] for r in sweep["bits_by_lr"]] == [90.0, 115.0]
    assert not sweep["bracketed"]  # its best rate is the highest run: a higher one may store more
    above = {"knowledge_load": 10, "model": "pkm@lr0.1", "bits": 50.0, "final": {"fact_recall": 0.1}}
    (swept,) = capacity.lr_sweep([*cells, above])
    assert swept["best_lr"] == 0.03 and swept["bracketed"]
    assert not capacity.lr_sweep([*cells, {**above, "bits": 200.0}])[0]["bracketed"]  # the new top rate wins
    assert not capacity.bracketed(0.01, [0.01])
    rows = {(r["control"], r["seed"]): r for r in capacity.control_rows(cells)}
    assert rows["frozen", capacity.SEED]["bits_attributed"] == 70.0
    assert rows["shuffled", capacity.SEED]["bits_attributed"] == 100.0  # a bound below 0 stores nothing: all 100
    assert rows["shuffled", capacity.SEED]["bits_control"] == -500.0  # the bound itself is kept
    assert rows["frozen", 2]["bits_attributed"] == 60.0 and rows["frozen", 2]["model"] == "pkm"  # trained at seed 2


def test_best_rate_cells_average_the_seeds_of_each_models_best_rate_and_the_targets_say_so():
    memory = 131072
    cells = [fraction_cell("dense", 1000, 0.30, 56000, earlier=[0.29]),
             fraction_cell("dense@seed1338", 1000, 0.20, 56000, earlier=[0.19]),
             fraction_cell("dense@lr0.03", 1000, 0.10, 56000, earlier=[0.09]),  # a worse rate: not averaged in
             fraction_cell("engram", 1000, 0.40, 190000, memory, earlier=[0.38]),
             fraction_cell("engram@seed1338", 1000, 0.50, 190000, memory, earlier=[0.49]),
             fraction_cell("engram@lr0.03", 1000, 0.60, 190000, memory, earlier=[0.59]),  # its best rate, one seed
             fraction_cell("engram@frozen", 1000, 0.05, 190000, memory)]  # a control: never a candidate
    best = {c["model"]: c for c in capacity.best_rate_cells(cells)}
    assert set(best) == {"dense", "engram"}
    dense, engram = best["dense"], best["engram"]
    assert dense["lr"] == capacity.LR and dense["seeds"] == [capacity.SEED, 1338]
    assert dense["bits"] == pytest.approx((cells[0]["bits"] + cells[1]["bits"]) / 2)
    assert dense["bits_fraction"] == pytest.approx(0.25)
    assert dense["bits_by_seed"] == [cells[0]["bits"], cells[1]["bits"]]
    assert dense["curve_bits_by_seed"] == [cells[0]["curve_bits"], cells[1]["curve_bits"]]  # each seed's curve, plotted
    assert [p["bits"] for p in dense["curve_bits"]] == pytest.approx(
        [(a["bits"] + b["bits"]) / 2 for a, b in zip(cells[0]["curve_bits"], cells[1]["curve_bits"])])
    assert dense["final"]["val_loss"] == pytest.approx((cells[0]["final"]["val_loss"]
                                                        + cells[1]["final"]["val_loss"]) / 2)
    assert engram["lr"] == 0.03 and engram["seeds"] == [capacity.SEED] and engram["bits"] == cells[5]["bits"]
    checked = capacity.targets(capacity.add_memory_bits(list(best.values())))
    assert "(2.40x at rate 0.03 (best of 2 rates), mean of 1 seed)" in checked[0]["detail"]
    assert "at rate 0.01 (best of 2 rates), mean of 2 seeds (25.0% of the corpus)" in checked[0]["detail"]
    assert engram["rates"] == [capacity.LR, 0.03]
    one_rate = capacity.best_rate_cells([cells[0], cells[1], cells[3]])  # seeds swept, rates not: said so
    detail = capacity.targets(one_rate)[0]["detail"]
    assert "at rate 0.01 (its only rate run), mean of 2 seeds" in detail  # dense
    assert "(its only rate run), mean of 1 seed)" in detail  # engram: one seed, named since the grid swept seeds
    # with the config's rate and seed only, nothing was averaged and the details stay as they were
    plain = capacity.best_rate_cells([cells[0], cells[3]])
    assert [c["seeds"] for c in plain] == [[capacity.SEED]] * 2 and "mean of" not in capacity.targets(plain)[0]["detail"]
    late = fraction_cell("dense@seed7", 1000, 0.2, 56000, earlier=[0.1, 0.15])  # one more validation than seed 1337
    with pytest.raises(capacity.StudyError, match="validated at different steps"):
        capacity.best_rate_cells([cells[0], late])


def test_frozen_tied_and_shuffled_tables_change_as_they_should(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--models", "pkm", "--loads", "4", "--exposures", "1", "--batch-size", "2", "--min-steps", "0",
            "--lrs", str(capacity.LR), "--seeds", str(capacity.SEED),
            "--controls", "frozen", "single_row", "shuffled", "--name", "ctl", "--out", str(tmp_path)]
    import torch

    from memzoo.blocks.pool import MemoryPool

    seen = {}
    from memzoo import cli as memzoo_cli

    real = memzoo_cli.main

    def spy(args):
        out = real(args)
        model = out.model
        pool = next(m for m in model.modules() if isinstance(m, MemoryPool))
        seen[next(a for a in args if a.startswith("study-ctl"))] = pool.values.detach().clone()
        return out

    monkeypatch.setattr("memzoo.cli.main", spy)
    result = capacity.main(argv)
    values = {k.rsplit("-", 1)[-1]: v for k, v in seen.items()}
    fresh = next(m for m in __import__("memzoo").build_model(capacity.model_configs()["pkm"],
                 vocab_size=capacity.vocab_size()).modules() if isinstance(m, MemoryPool)).values
    assert torch.equal(values["pkm@frozen"], fresh)  # frozen: the init values, unchanged by training
    assert not torch.equal(values["pkm"], fresh)
    tied = values["pkm@single_row"]
    assert torch.equal(tied, tied[:1].expand_as(tied))  # one row's worth of values
    shuffled = values["pkm@shuffled"]
    assert not torch.equal(shuffled, values["pkm"])
    assert torch.equal(shuffled.sort(0).values, values["pkm"].sort(0).values)  # the same rows, permuted
    report = json.loads((tmp_path / "ctl.json").read_text())
    assert {r["control"] for r in report["controls"]} == {"frozen", "single_row", "shuffled"}
    for r in report["controls"]:
        assert set(r) >= {"bits_trained", "bits_control", "bits_attributed"}
        assert r["bits_attributed"] == pytest.approx(r["bits_trained"] - max(r["bits_control"], 0))
        assert r["lr"] == capacity.LR and r["seed"] == capacity.SEED
    assert {c["model"] for c in report["variant_cells"]} == {"pkm@frozen", "pkm@single_row", "pkm@shuffled"}
    assert result["controls"] == report["controls"]
    md = (tmp_path / "ctl.md").read_text()
    assert "Cells run: 4 of 4" in md and not report["cells_not_run"]  # the control cells count as run
    assert all(f"| pkm@{c} |" in md for c in ("frozen", "single_row", "shuffled"))  # every cell's bits are listed
    assert f"| 4 | pkm | {capacity.LR:g} | {capacity.SEED} | frozen |" in md  # the controls table names rate and seed
    assert report["command"].startswith("python tools/capacity.py --models pkm")


def test_every_model_has_its_own_plot_colour():
    colours = [capacity.model_color(m) for m in capacity.ALL_MODELS]
    assert len(set(colours)) == len(colours)


def test_targets_read_every_load_below_90_percent_up_to_the_first_where_dense_has_flattened():
    memory = 131072
    climbing = fraction_cell("dense", 500, 0.8, 56000, earlier=[0.7])  # below 90% but its last quarter added 12.5%
    flat = fraction_cell("dense", 1000, 0.25, 56000, earlier=[0.245])
    later = fraction_cell("dense", 3000, 0.1, 56000, earlier=[0.099])
    designs = [fraction_cell("memoryplus", load, fraction, 185000, memory)
               for load, fraction in ((500, 0.95), (1000, 0.75), (3000, 0.3))]
    checked = capacity.targets([climbing, flat, later, *designs])
    loads = [t["target"].split(":")[0] for t in checked]
    assert loads == ["people-500"] * 3 + ["people-1000"] * 3  # people-3000 lies past the capacity load
    assert not any(t["met"] for t in checked[:3]) and all("still climbing" in t["detail"] for t in checked[:3])
    best, _, gated = checked[3:]
    assert best["met"] and gated["met"] and "still climbing" not in best["detail"]  # 0.75 >= 2 x 0.25
    assert capacity.flattened(flat) and not capacity.flattened(climbing)
    # a flat first load ends the list there
    assert [t["target"].split(":")[0] for t in capacity.targets([flat, later, *designs])] == ["people-1000"] * 3


def test_model_lrs_parse_and_name_the_bad_spec():
    assert capacity.parse_model_lrs(["dense=0.01,0.03", "stem=0.1"], ["dense", "stem"]) == {
        "dense": [0.01, 0.03], "stem": [0.1]}
    for spec, message in (("dense", "is not MODEL=RATE"), ("pkm=0.01", "not among --models"),
                          ("dense=fast", "rates must be numbers"), ("dense=0", "must be positive")):
        with pytest.raises(capacity.StudyError, match=message):
            capacity.parse_model_lrs([spec], ["dense", "stem"])
    with pytest.raises(capacity.StudyError, match="twice"):
        capacity.parse_model_lrs(["dense=0.01", "dense=0.03"], ["dense"])
