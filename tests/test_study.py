"""tools/study.py: cell hashing and resume, the FLOP-matching check, metrics.csv parsing, the report (tables, plots,
targets) on fake cell results, and that every configs/study/*.yaml parses. No training."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memzoo.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
STUDY_CONFIGS = ROOT / "configs" / "study"


def load_study():
    spec = importlib.util.spec_from_file_location("memzoo_study_tool", ROOT / "tools" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


study = load_study()


# ------------------------------------------------------------------------------------------------ hashing, resume
def test_config_hash_covers_arguments_and_config_file_contents(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text("model: {dim: 128}\n")
    args = ["--config", str(model), "--trainer.max_steps", "10"]
    first = study.config_hash(args)
    assert study.config_hash(list(args)) == first  # deterministic
    assert study.config_hash(["--config", str(model), "--trainer.max_steps", "11"]) != first
    model.write_text("model: {dim: 256}\n")  # same path, edited content: the cell must rerun
    assert study.config_hash(args) != first
    # the hash names config files by file name, so a moved checkout keeps its finished cells
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "model.yaml").write_text("model: {dim: 256}\n")
    assert study.config_hash(["--config", str(moved / "model.yaml"), "--trainer.max_steps", "10"]) == \
        study.config_hash(args)

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"merges": ["a b"]}')
    with_tokenizer = [*args, "--data.init_args.tokenizer", str(tokenizer)]
    before = study.config_hash(with_tokenizer)
    tokenizer.write_text('{"merges": ["b a"]}')  # other merges, other tokens: the cell must rerun
    assert study.config_hash(with_tokenizer) != before
    (moved / "tokenizer.json").write_text('{"merges": ["b a"]}')  # a moved checkout's tokenizer: the same cells
    assert study.config_hash([*args, "--data.init_args.tokenizer", str(moved / "tokenizer.json")]) == \
        study.config_hash(with_tokenizer)


def test_load_cell_resumes_only_matching_complete_results(tmp_path):
    path = tmp_path / "cells" / "facts-100__dense.json"
    assert study.load_cell(path, "abc") is None  # never run
    study.write_json_atomic(path, {"config_hash": "abc", "final": {"val_loss": 1.5}})
    assert study.load_cell(path, "abc")["final"]["val_loss"] == 1.5
    assert study.load_cell(path, "other") is None  # config changed since
    path.write_text('{"config_hash": "abc", "fin')  # a torn write from an old, non-atomic writer
    assert study.load_cell(path, "abc") is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left behind


def test_a_results_page_restores_its_cells_into_a_fresh_cells_folder(tmp_path):
    """A clone has the committed page JSON but no cells folder: restore_cells writes each listed cell's record (not
    the page's derived fields) where no file is, and load_cell still reuses it only under today's config hash."""
    record = {"workload": "people-500", "model": "dense", "config_hash": "abc", "final": {"val_loss": 1.5},
              "curve": [{"step": 9, "val_loss": 1.5}], "tokens": 640, "parameters": 100}
    variant = {**record, "model": "dense@seed1338", "config_hash": "def"}
    page = tmp_path / "capacity-cpu.json"
    page.write_text(json.dumps({"cells": [{**record, "bits": 7.0, "curve_bits": []}], "variant_cells": [variant]}))
    cells = tmp_path / "capacity-cpu-cells"
    kept = cells / "people-500__dense@seed1338.json"
    study.write_json_atomic(kept, {**variant, "final": {"val_loss": 1.25}})  # a cell trained here wins
    assert study.restore_cells(page, cells) == 1
    assert json.loads((cells / "people-500__dense.json").read_text()) == record
    assert study.load_cell(cells / "people-500__dense.json", "abc")["final"]["val_loss"] == 1.5
    assert study.load_cell(cells / "people-500__dense.json", "changed") is None  # a config edited since: retrain
    assert json.loads(kept.read_text())["final"]["val_loss"] == 1.25
    assert study.restore_cells(page, cells) == 0  # nothing left to restore
    assert study.restore_cells(tmp_path / "no-such-page.json", cells) == 0
    page.write_text(json.dumps({"cells": [{**record, "model": "../../escape"}]}))
    with pytest.raises(study.StudyError, match="not a plain file name"):
        study.restore_cells(page, cells)
    page.write_text('{"cells": [')
    with pytest.raises(study.StudyError, match="not valid JSON"):
        study.restore_cells(page, cells)


def test_a_stored_cell_is_counted_with_todays_cost(tmp_path):
    """What a cell measured stays; what it costs (FLOPs, parameters) comes from the FLOP table it is loaded with."""
    path = tmp_path / "cells" / "text__pkm.json"
    cell = fake_cell("text", "pkm", 1.5)
    study.write_json_atomic(path, {**cell, "config_hash": "abc"})
    counted = study.load_cell(path, "abc", study.ModelCost("pkm", 2_000, 900, 300, 1.0, 1.1))
    assert counted["flops_per_token"] == 2_000 and counted["parameters"] == 900 and counted["active_parameters"] == 300
    assert counted["train_flops"] == 3 * 2_000 * 10_000
    assert [p["train_flops"] for p in counted["curve"]] == [3 * 2_000 * 5_000, 3 * 2_000 * 10_000]
    assert counted["final"] == cell["final"] and counted["tokens_per_s"] == cell["tokens_per_s"]
    assert study.load_cell(path, "abc")["parameters"] == 100  # without a cost: as stored


def test_run_cell_skips_a_stored_cell_without_training(tmp_path, monkeypatch):
    workload = study.study_plan(quick=True, text=Path("/data/t.txt"))[0]
    args = study.cell_args("unit", workload, "dense")
    stored = {"config_hash": study.config_hash(args), "marker": 7}
    study.write_json_atomic(tmp_path / f"{study.cell_name(workload, 'dense')}.json", stored)

    def no_training(*a, **k):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr("memzoo.cli.main", no_training)
    assert study.run_cell("unit", workload, "dense", None, tmp_path)["marker"] == 7


def test_workload_overrides_fix_schedule_and_data_for_every_model():
    facts, _, text = study.study_plan(quick=True, text=Path("/data/t.txt"))
    args = facts.overrides()
    assert args[args.index("--trainer.max_steps") + 1] == str(facts.steps)
    assert args[args.index("--model.init_args.lr_decay_steps") + 1] == str(facts.steps)
    assert args[args.index("--data.init_args.n_entities") + 1] == str(facts.knowledge_load)
    assert facts.steps % facts.val_every == 0  # the last step validates: the final numbers are end-of-training
    assert text.overrides()[text.overrides().index("--data.init_args.path") + 1] == "/data/t.txt"
    cell = study.cell_args("q", facts, "peer")
    assert str(study.model_config("peer")) in cell and "study-q-facts-100-peer" in cell


# ------------------------------------------------------------------------------------------------ FLOP matching
def cost(model, ratio, target=1.0):
    return study.ModelCost(model, int(1000 * ratio), 10, 10, target, ratio)


def test_flop_check_accepts_matched_and_names_every_unmatched_model():
    assert study.check_flop_matching([cost("dense", 1.0), cost("pkm", 1.08), cost("dense-2x", 2.1, 2.0)], 0.1) == []
    problems = study.check_flop_matching([cost("dense", 1.0), cost("peer", 1.25), cost("dense-4x", 3.0, 4.0)], 0.1)
    assert len(problems) == 2
    assert "peer" in problems[0] and "+25.0%" in problems[0] and "model-peer.yaml" in problems[0]
    assert "dense-4x" in problems[1] and "-25.0%" in problems[1]


@pytest.mark.parametrize("tolerance", [0, 1.5, -0.1])
def test_flop_check_rejects_meaningless_tolerance(tolerance):
    with pytest.raises(study.StudyError, match="tolerance must be in"):
        study.check_flop_matching([cost("dense", 1.0)], tolerance)


@pytest.mark.slow  # builds the seven study models (pools of 16k rows): ~15 s on a busy 2-core machine
def test_the_study_grid_is_flop_matched_within_ten_percent():
    costs = {c.model: c for c in study.flop_table(list(study.MODELS))}
    assert study.check_flop_matching(list(costs.values()), 0.10) == []
    assert costs["dense"].flop_ratio == 1.0
    for memory_model in study.MEMORY_MODELS:  # memory adds parameters, not active FLOPs
        assert costs[memory_model].parameters > 2 * costs["dense"].parameters


def test_a_variants_model_overrides_reach_its_flop_row_and_not_the_reference():
    """The FLOP table of a variant study costs the models as its cells train them (``--set model...``); the ratio is
    to the reference's own config; ``--set`` keys outside ``model.`` (seed, data, trainer) do not reach the build."""
    plain = study.flop_table(["pkm"])[0]
    extra = study.variant_args(["model.init_args.architecture.layers.2.knn=64", "seed_everything=3",
                                "data.init_args.not_a_key=1"], "v")
    varied = study.flop_table(["pkm"], overrides=extra)[0]
    assert varied.flops_per_token > plain.flops_per_token  # twice the rows read per head
    assert varied.flop_ratio / plain.flop_ratio == pytest.approx(varied.flops_per_token / plain.flops_per_token)
    assert varied.parameters == plain.parameters


# ------------------------------------------------------------------------------------------------ tokenizers
def test_write_bpe_tokenizer_learns_from_the_training_share_only(tmp_path):
    from memzoo.data.tokenizers import build_tokenizer

    text = tmp_path / "t.txt"
    text.write_text("abc abd " * 1000 + " xyzw" * 100)  # "xyzw" only in the held-out tail (the last 10%)
    path = study.write_bpe_tokenizer(text, tmp_path / "bpe.json", vocab_size=300)
    tokenizer = build_tokenizer(str(path))
    # 256 bytes, <|endoftext|> and the merges this short text has (fewer than asked for)
    assert 257 < tokenizer.vocab_size <= 300 and tokenizer.eos_id == tokenizer.pad_id  # <|endoftext|> ends and pads
    assert len(tokenizer.encode(" abc")) == 1  # merged: learned from the text
    assert len(tokenizer.encode(" xyzw")) == 5  # never merged: the tail is not learned from
    assert tokenizer.decode(tokenizer.encode("abc xyzw é")) == "abc xyzw é"  # byte-level: any text round-trips
    with pytest.raises(study.StudyError, match="--bpe-vocab 256: a byte-level BPE needs >= 257 ids"):
        study.write_bpe_tokenizer(text, tmp_path / "small.json", vocab_size=256)


def test_the_committed_bpe_tokenizer_loads_with_its_vocabulary():
    from memzoo.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(str(study.BPE_TOKENIZER))
    assert tokenizer.vocab_size == study.BPE_VOCAB
    line = "First Citizen:\nBefore we proceed any further, hear me speak."
    assert tokenizer.decode(tokenizer.encode(line)) == line
    assert len(tokenizer.encode(line)) < len(line.encode()) / 2  # subwords: under half the bytes


def test_a_study_tokenizer_reaches_every_cell_and_the_flop_table(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    byte = study.main(["--dry-run", "--text", str(text), "--models", "dense"])
    bpe = study.main(["--dry-run", "--text", str(text), "--models", "dense", "--tokenizer", str(study.BPE_TOKENIZER)])
    assert all(["tokenizer", str(study.BPE_TOKENIZER)] in w["data_args"] for w in bpe["plan"])
    assert not any(a[0] == "tokenizer" for w in byte["plan"] for a in w["data_args"])
    # the output layer and embedding grow by (2048 - 258) x 128: FLOPs by 2x that, the table counts it
    assert bpe["flop_table"][0]["flops_per_token"] - byte["flop_table"][0]["flops_per_token"] == 2 * 1790 * 128
    with pytest.raises(study.StudyError, match="--tokenizer .*missing.json"):
        study.main(["--dry-run", "--text", str(text), "--tokenizer", str(tmp_path / "missing.json")])


def test_a_grid_that_is_not_matched_is_refused(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    # dense-2x at 2.04x while the grid claims it matches dense (target 1x)
    monkeypatch.setattr(study, "flop_table", lambda models, **kwargs: [cost("dense", 1.0), cost("dense-2x", 2.04)])
    with pytest.raises(study.StudyError, match=r"not FLOP-matched:\n  dense-2x: 2.040x the dense FLOPs"):
        study.main(["--dry-run", "--text", str(text), "--models", "dense", "dense-2x"])


def test_bad_command_lines_fail_with_the_fix(tmp_path):
    with pytest.raises(study.StudyError, match="no such file"):
        study.main(["--dry-run", "--text", str(tmp_path / "missing.txt")])
    text = tmp_path / "t.txt"
    text.write_text("hello")
    with pytest.raises(study.StudyError, match="unknown model.*'densee'"):
        study.main(["--dry-run", "--text", str(text), "--models", "densee"])
    with pytest.raises(study.StudyError, match="unknown workload.*facts-7"):
        study.main(["--dry-run", "--quick", "--text", str(text), "--workloads", "facts-7"])


# ------------------------------------------------------------------------------------------------ metrics.csv
def test_read_validation_merges_split_rows_and_parses_memory_usage(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,train/loss,val/loss,val/ppl,val/fact_recall,val/memory/pools/memory/used_fraction,"
        "val/memory/pools/memory/kl_uniform\n"
        "0,9,2.5,,,,,\n"
        "0,19,,2.0,7.39,,,\n"
        "0,19,,,,0.25,0.9,0.1\n"
        "0,29,2.1,,,,,\n"
        "0,39,,1.5,4.48,0.5,0.95,0.05\n"
    )
    rows = study.read_validation(csv)
    assert [r["step"] for r in rows] == [19, 39]
    assert rows[0]["val/fact_recall"] == 0.25 and rows[0]["val/loss"] == 2.0
    assert study.memory_usage(rows[1]) == {"pools/memory": {"used_fraction": 0.95, "kl_uniform": 0.05}}

    workload = study.Workload("facts-10", "data-facts.yaml", steps=40, val_every=20, val_batches=1, batch_size=2,
                              block_size=8, knowledge_load=10)
    result = study.cell_result(workload, "memoryplus", cost("memoryplus", 1.0), csv, 4.0, "h", ["--x"])
    assert result["tokens"] == 40 * 16 and result["tokens_per_s"] == 160.0
    assert result["train_flops"] == 40 * 16 * 3 * 1000
    assert result["final"]["val_loss"] == 1.5 and result["final"]["fact_recall"] == 0.5
    assert [p["tokens"] for p in result["curve"]] == [20 * 16, 40 * 16]
    assert result["machine"] == describe_machine()  # where it trained: a run repeats to the bit only there
    assert result["code"] == study.code_version()  # with which code and configs
    assert result["flush_subnormals"] is (os.environ.get("MEMZOO_FLUSH_SUBNORMALS", "1") != "0")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_names_the_commit_and_changes_to_code_or_configs(tmp_path):
    assert study.code_version(tmp_path) is None  # not a checkout

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert study.code_version(tmp_path) == head
    (tmp_path / "notes.md").write_text("b\n")  # outside src and configs: the same code
    assert study.code_version(tmp_path) == head
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    assert study.code_version(tmp_path) == head + "+changes"


def test_reproduction_rows_pair_each_cell_with_its_committed_run():
    def cell(model, loss, args=("--config", "/a/model.yaml", "--experiment", "study-x-dense"), machine=None,
             code=None, flush=None):
        return {"workload": "w", "model": model, "final": {"val_loss": loss}, "args": list(args), "machine": machine,
                "code": code, "flush_subnormals": flush}

    committed = [cell("dense", 1.5, machine="A", code="c1", flush=False), cell("pkm", 1.25),
                 cell("peer", 2.0, args=("--lr", "1"))]
    here = [cell("dense", 1.5, ("--config", "/b/model.yaml", "--experiment", "study-x-reproduced-dense"), "B", "c2",
                 True), cell("pkm", 1.0), cell("peer", 2.0), cell("stem", 3.0)]
    rep = study.reproduction_rows(here, committed, bits=lambda c: 10 * c["final"]["val_loss"])
    rows = {r["model"]: r for r in rep["rows"]}
    assert [r["model"] for r in rep["rows"]] == ["dense", "peer", "pkm", "stem"]
    assert rows["dense"]["status"] == "bit-exact"  # another folder and run name: the same run
    assert (rows["dense"]["committed_machine"], rows["dense"]["machine"]) == ("A", "B")
    assert (rows["dense"]["committed_code"], rows["dense"]["code"]) == ("c1", "c2")
    assert (rows["dense"]["committed_flush_subnormals"], rows["dense"]["flush_subnormals"]) == (False, True)
    assert rows["pkm"]["status"] == "differs" and rows["pkm"]["delta_val_loss"] == -0.25
    assert rows["pkm"]["delta_bits"] == -2.5 and rows["pkm"]["committed_bits"] == 12.5
    assert rows["peer"]["status"] == "other arguments"  # equal loss, but not the committed run
    assert rows["stem"]["status"] == "no committed cell" and "committed_val_loss" not in rows["stem"]
    assert (rep["compared"], rep["bit_exact"], rep["max_abs_delta_val_loss"], rep["max_abs_delta_bits"]) == (
        2, 1, 0.25, 2.5)
    md = "\n".join(study.reproduction_section(rep, bits=True, level=3))
    assert md.startswith("### Reproduction: each cell against the committed one")
    assert "1 of 2 cells that train the committed runs came out bit-exact; the largest validation-loss difference " \
           "is 0.2500 (2 bits at most)" in md
    assert ("Committed cells: code not recorded (2), c1 (1); subnormals flushed: not recorded (2), no (1). This run: "
            "B, code c2, subnormals flushed: yes.") in md
    assert "| w | pkm | differs | 1.2500 → 1.0000 | -0.2500 | 12 → 10 | -2 (-20.0%) | not recorded |" in md
    assert "| w | stem | no committed cell | – → 3.0000 | – | – → 30 | – | – |" in md
    assert "bits" not in "\n".join(study.reproduction_section(study.reproduction_rows(here, committed)))


def test_reproduce_trains_a_study_afresh_beside_its_committed_page(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cells' run folders land here, not in the checkout
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 200)
    argv = ["--quick", "--models", "dense", "--workloads", "facts-100", "--name", "mini", "--out", str(tmp_path),
            "--text", str(text), "--threads", "1"]
    first = study.main(argv)
    again = study.main([*argv, "--reproduce"])
    assert [c["final"]["val_loss"] for c in again["cells"]] == [c["final"]["val_loss"] for c in first["cells"]]
    assert "study-mini-reproduced-facts-100-dense" in again["cells"][0]["run_dir"]  # trained, not restored
    page = json.loads((tmp_path / "mini-reproduced.json").read_text())
    assert [(r["model"], r["status"]) for r in page["reproduction"]["rows"]] == [("dense", "bit-exact")]
    assert "## Reproduction: each cell against the committed one" in (tmp_path / "mini-reproduced.md").read_text()


def test_reproduce_needs_a_committed_page(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be " * 200)
    with pytest.raises(study.StudyError, match="no committed page .*mine.json to reproduce"):
        study.main(["--name", "mine", "--out", str(tmp_path), "--text", str(text), "--reproduce"])


def test_machines_line_counts_each_machine_and_the_cells_that_name_none():
    cells = [{"machine": "2 CPU cores: A"}, {"machine": "one H200"}, {}, {"machine": "2 CPU cores: A"},
             {"machine": None}]
    assert study.machines_line(cells) == (
        "Trained on: 2 CPU cores: A (2 cells); not recorded (cells trained before cells named their machine) "
        "(2 cells); one H200 (1 cell)")
    assert study.machines_line([]) == "Trained on: no cells yet"


def test_cell_result_without_validation_is_an_error(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss\n0,9,2.5\n")
    workload = study.Workload("w", "data-facts.yaml", 10, 10, 1, 1)
    with pytest.raises(study.StudyError, match="no validation rows"):
        study.cell_result(workload, "dense", cost("dense", 1.0), csv, 1.0, "h", [])


def test_training_seconds_subtracts_the_validation_runs():
    from lightning.pytorch.callbacks import Timer

    timer = Timer()
    timer._start_time.update({"train": 100.0, "validate": 150.0})
    timer._end_time.update({"train": 160.0, "validate": 155.0})

    class FakeTrainer:
        callbacks = [timer]

    assert study.training_seconds(FakeTrainer(), n_validations=4) == pytest.approx(60.0 - 4 * 5.0)
    FakeTrainer.callbacks = []
    with pytest.raises(study.StudyError, match="no Timer"):
        study.training_seconds(FakeTrainer(), 1)


def _store_quick_cells(out: Path, text: Path, models: list[str], workload_name: str,
                       seed_args: dict[str, list[str]] | None = None) -> None:
    """Stored results, with the right config hashes, for ``models`` on a quick-study workload: a rerun trains nothing.
    ``seed_args``: a seed variant's extra arguments (``<model>@seed<n>`` -> ``["--seed_everything", "<n>"]``)."""
    workload = next(w for w in study.study_plan(quick=True, text=text.resolve()) if w.name == workload_name)
    for model in models:
        cell = fake_cell(workload.name, model, 1.0 + len(model) / 100, recall=0.1, load=workload.knowledge_load)
        cell["config_hash"] = study.config_hash(study.cell_args("quick", workload, model,
                                                                (seed_args or {}).get(model, [])))
        study.write_json_atomic(out / "quick-cells" / f"{study.cell_name(workload, model)}.json", cell)


@pytest.fixture(scope="module")
def zygote():
    """Runs tools/study.py as ``python tools/study.py`` does, without the ~7 s of CPU each such process spends
    importing Lightning (tests/forked_command.py)."""
    from forked_command import MemzooZygote

    server = MemzooZygote()
    yield server
    server.close()


def run_study_tool(zygote, cwd, *args):
    return zygote.run_script(ROOT / "tools" / "study.py", *args, cwd=cwd, env=dict(os.environ))


def test_parallel_jobs_run_every_cell_in_worker_processes_and_report_in_grid_order(tmp_path, zygote):
    """``--jobs 2`` end to end in a fresh process (the tool as users run it): the spawned workers find the stored
    cells (so nothing trains) and the report lists them in grid order."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 50)
    models = ["dense", "moe", "memoryplus"]
    cells = ["dense", "dense@seed2", "moe", "moe@seed2", "memoryplus", "memoryplus@seed2"]
    _store_quick_cells(tmp_path, text, cells, "facts-100",
                       {f"{m}@seed2": ["--seed_everything", "2"] for m in models})
    run = run_study_tool(zygote, tmp_path, "--quick", "--jobs", "2", "--threads", "1", "--out", str(tmp_path),
                         "--text", str(text), "--workloads", "facts-100", "--models", *models,
                         "--seeds", str(study.SEED), "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done before") == 6, run.stdout  # every seed's cell found under its own hash
    report = json.loads((tmp_path / "quick.json").read_text())
    assert [c["model"] for c in report["cells"]] == cells
    assert report["jobs"] == 2


def test_variant_overrides_become_trailing_fit_arguments_and_change_the_hash():
    assert study.variant_args(["model.init_args.architecture.dim=96", "--trainer.max_steps=5"], "v") == \
        ["--model.init_args.architecture.dim", "96", "--trainer.max_steps", "5"]
    pools = 'model.init_args.architecture.pools={"memory": {"lr": 0.03}}'  # JSON values keep their own "="-free text
    assert study.variant_args([pools], "v")[1] == '{"memory": {"lr": 0.03}}'
    workload = study.study_plan(quick=True, text=Path("/data/t.txt"))[0]
    base = study.cell_args("v", workload, "dense")
    varied = study.cell_args("v", workload, "dense", ["--model.init_args.architecture.dim", "96"])
    assert varied[-2:] == ["--model.init_args.architecture.dim", "96"] and varied[:-2] == base
    assert study.config_hash(varied) != study.config_hash(base)


@pytest.mark.parametrize("overrides, name, match", [
    (["model.init_args.architecture.dim=96"], None, "give it a --name"),
    (["model.init_args.architecture.dim"], "v", "expected KEY=VALUE"),
    (["=96"], "v", "expected KEY=VALUE"),
])
def test_bad_variant_overrides_name_the_fix(overrides, name, match):
    with pytest.raises(study.StudyError, match=match):
        study.variant_args(overrides, name)


def test_a_failing_cell_in_a_worker_stops_the_study_with_its_name(tmp_path, zygote):
    """The cell fails in its worker before training (its variant names a config file that does not exist), so the
    worker does not spend ~7 s of CPU importing Lightning first."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 50)
    run = run_study_tool(zygote, tmp_path, "--quick", "--jobs", "2", "--threads", "1", "--out", str(tmp_path),
                         "--text", str(text), "--workloads", "facts-100", "--models", "dense", "--name", "broken",
                         "--set", f"config={tmp_path / 'missing.yaml'}")
    assert run.returncode != 0
    assert "study: cell facts-100__dense failed" in run.stderr and "a rerun resumes" in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "broken-cells" / "facts-100__dense.json").exists()


def test_run_grid_in_process_reports_after_every_cell_in_grid_order(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 50)
    models = ["dense", "moe"]
    _store_quick_cells(tmp_path, text, models, "facts-100")
    workload = next(w for w in study.study_plan(quick=True, text=text.resolve()) if w.name == "facts-100")
    reports = []
    cells = study.run_grid("quick", [(workload, m) for m in models], {m: None for m in models},
                           tmp_path / "quick-cells", jobs=1, threads=1, on_cell=reports.append)
    assert [c["model"] for c in cells] == models
    assert [[c["model"] for c in r] for r in reports] == [["dense", "moe"]]  # stored: one report, nothing trained


def test_run_grid_reports_the_stored_cells_first_then_each_trained_one(tmp_path, monkeypatch):
    """A resumed grid: its stored cells are read (and reported, together) before any training, so a partial report
    lists every finished cell; then one report per trained cell, in grid order. Only missing cells reach a worker."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be\n" * 50)
    _store_quick_cells(tmp_path, text, ["moe"], "facts-100")
    workload = next(w for w in study.study_plan(quick=True, text=text.resolve()) if w.name == "facts-100")
    trained = []

    def fake_training(threads, name, w, model, *rest):
        trained.append(model)
        return {"model": model}

    monkeypatch.setattr(study, "_run_cell_in_worker", fake_training)
    models = ["dense", "moe", "pkm"]
    reports = []
    cells = study.run_grid("quick", [(workload, m) for m in models], {m: None for m in models},
                           tmp_path / "quick-cells", jobs=1, threads=1, on_cell=reports.append)
    assert trained == ["dense", "pkm"] and [c["model"] for c in cells] == models
    assert [[c["model"] for c in r] for r in reports] == [["moe"], ["dense", "moe"], ["dense", "moe", "pkm"]]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_grid_worker_ends_when_its_study_process_is_killed(tmp_path):
    """A stand-in study process (forked) starts a worker that runs the pool's initializer, then sleeps; SIGKILL to
    the study ends the worker too (without the initializer it would sleep on, and a real one would train on and
    store its cell)."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    study_pid = os.fork()
    if study_pid == 0:  # the study
        try:
            worker = os.fork()
            if worker == 0:
                try:
                    study._die_with_parent(os.getppid())
                    pid_file.write_text(str(os.getpid()))
                    time.sleep(60)
                finally:
                    os._exit(0)
            time.sleep(60)
        finally:
            os._exit(0)
    worker_pid = None
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.02)
        worker_pid = int(pid_file.read_text())
        assert _alive(worker_pid)
        os.kill(study_pid, signal.SIGKILL)
        os.waitpid(study_pid, 0)
        deadline = time.monotonic() + 10
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "the worker outlived its study"
            time.sleep(0.02)
    finally:
        for pid in (study_pid, worker_pid):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_whose_study_is_gone_exits_at_once():
    pid = os.fork()
    if pid == 0:
        try:
            study._die_with_parent(os.getppid() + 1)  # not its parent: the study that started it has ended
        finally:
            os._exit(7)  # reached only if it did not exit
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1  # os._exit(1) from _die_with_parent


def test_run_grid_rejects_zero_jobs(tmp_path):
    with pytest.raises(study.StudyError, match="--jobs and --threads must be >= 1"):
        study.run_grid("unit", [], {}, tmp_path, jobs=0, threads=1)


# ------------------------------------------------------------------------------------------------ report
def fake_cell(workload, model, loss, recall=None, load=None, used=None, speed=1000.0):
    """A cell of 10,000 tokens at ``speed`` tokens/s, validated halfway (loss + 0.5) and at the end (``loss``)."""
    return {
        "workload": workload, "model": model, "knowledge_load": load, "parameters": 100, "active_parameters": 50,
        "train_flops": 1e12, "tokens_per_s": speed, "tokens": 10_000, "train_seconds": 10_000 / speed,
        "final": {"val_loss": loss, "val_ppl": 2.718**loss, "fact_recall": recall,
                  "fact_recall_chance": 0.03 if load else None},
        "memory": {} if used is None else {"pools/memory": {"used_fraction": used, "kl_uniform": 0.2}},
        "curve": [{"train_flops": 5e11, "tokens": 5_000, "val_loss": loss + 0.5},
                  {"train_flops": 1e12, "tokens": 10_000, "val_loss": loss}],
    }


FAKE_CELLS = [
    fake_cell("facts-100", "dense", 1.2, recall=0.60, load=100),
    fake_cell("facts-100", "dense-2x", 1.1, recall=0.70, load=100, speed=500.0),
    fake_cell("facts-100", "memoryplus", 1.0, recall=0.80, load=100, used=0.95),
    fake_cell("facts-1000", "dense", 2.0, recall=0.10, load=1000),
    fake_cell("facts-1000", "dense-2x", 1.9, recall=0.25, load=1000, speed=500.0),
    fake_cell("facts-1000", "memoryplus", 1.5, recall=0.30, load=1000, used=0.50, speed=800.0),
    fake_cell("shakespeare", "dense", 1.9),
    fake_cell("shakespeare", "memoryplus", 1.85, used=0.99),
    fake_cell("shakespeare", "peer", 1.95, used=0.85),
]


def test_targets_are_checked_at_every_load_and_per_pool():
    checked = {t["target"]: t["met"] for t in study.targets(FAKE_CELLS)}
    assert checked["facts-1000: Memory+ recall >= 2x dense"] is True  # 0.30 >= 2 × 0.10
    assert checked["facts-1000: Memory+ recall >= 1x dense-2x"] is True
    assert checked["shakespeare: memoryplus val loss <= dense at equal FLOPs, every seed"] is True
    assert checked["shakespeare: peer val loss <= dense at equal FLOPs, every seed"] is False
    assert checked["facts-1000/memoryplus pool pools/memory: used >= 80%"] is False  # 50%: collapsed
    assert checked["shakespeare/peer pool pools/memory: used >= 80%"] is True
    assert checked["facts-100: Memory+ recall >= 2x dense"] is False  # 0.80 < 2 × 0.60
    assert checked["facts-100: Memory+ recall >= 1x dense-2x"] is True


def test_text_targets_pair_each_seed_with_dense_of_that_seed_and_need_every_seed():
    cells = [fake_cell("text", "dense", 2.0), fake_cell("text", "pkm", 1.9), fake_cell("text", "stem", 1.9),
             fake_cell("text", "dense@seed2", 1.8), fake_cell("text", "pkm@seed2", 1.85),
             fake_cell("text", "stem@seed2", 1.7), fake_cell("text", "moe", 1.0)]
    checked = {t["target"]: t for t in study.targets(cells)}
    assert set(checked) == {f"text: {m} val loss <= dense at equal FLOPs, every seed" for m in ("pkm", "stem")}
    pkm, stem = (checked[f"text: {m} val loss <= dense at equal FLOPs, every seed"] for m in ("pkm", "stem"))
    assert not pkm["met"] and stem["met"]  # pkm beats seed 1337's dense (2.0) but not seed 2's (1.8)
    assert pkm["detail"] == "seed 2: 1.8500 vs 1.8000; seed 1337: 1.9000 vs 2.0000"
    assert study.seed_variant("pkm", study.SEED) == "pkm" and study.seed_variant("pkm", 2) == "pkm@seed2"
    assert study.cell_seed("pkm@seed2") == 2 and study.cell_seed("pkm") == study.SEED
    assert study.base_model("pkm@seed2") == "pkm"
    engram = fake_cell("text", "engram", 1.5, used=0.3)  # a table indexed by the text: usage reported, not targeted
    assert [t["target"] for t in study.targets([engram, fake_cell("text", "pkm@seed2", 1.5, used=0.3)])] == \
        ["text/pkm@seed2 pool pools/memory: used >= 80%"]


def test_equal_wall_clock_reads_each_curve_at_dense_time_of_the_same_seed():
    cells = [fake_cell("text", "dense", 2.0, speed=1000.0),  # 10 s
             fake_cell("text", "pkm", 1.9, speed=800.0),  # 12.5 s: 10 s is 80% of its tokens
             fake_cell("text", "moe", 1.95, speed=2000.0),  # 5 s: done before dense, its final loss
             fake_cell("text", "peer", 1.9, speed=400.0),  # 25 s: 10 s is before its first point (12.5 s)
             fake_cell("text", "dense@seed2", 2.1, speed=500.0),  # 20 s
             fake_cell("text", "pkm@seed2", 1.9, speed=1000.0),  # 10 s: done, its final loss
             fake_cell("facts-9", "dense", 1.0, load=9)]  # not text: no row
    rows = {(r["model"], r["seed"]): r for r in study.equal_wall_clock(cells)}
    assert set(rows) == {("dense", 1337), ("pkm", 1337), ("moe", 1337), ("peer", 1337), ("dense", 2), ("pkm", 2)}
    # pkm's points: (6.25 s, 2.4) and (12.5 s, 1.9); at 10 s: 2.4 - 0.5 * 3.75 / 6.25
    assert rows[("pkm", 1337)]["val_loss_equal_time"] == pytest.approx(2.1)
    assert rows[("pkm", 1337)]["share_of_steps"] == pytest.approx(0.8)
    assert rows[("moe", 1337)]["val_loss_equal_time"] == 1.95 and rows[("moe", 1337)]["share_of_steps"] == 1.0
    assert rows[("peer", 1337)]["val_loss_equal_time"] is None
    assert rows[("dense", 1337)]["val_loss_equal_time"] == 2.0
    assert rows[("pkm", 2)]["seconds"] == 20.0 and rows[("pkm", 2)]["val_loss_equal_time"] == 1.9
    assert rows[("pkm", 2)]["dense_val_loss"] == 2.1
    table = study.equal_wall_clock_table(list(rows.values()))
    assert "| text | peer | 1337 | 40% | – | 1.9000 | 2.0000 |" in table
    speeds = {line.split("|")[2].strip(): line.split("|")[8].strip() for line in study.results_table(cells).splitlines()[2:]}
    assert speeds["pkm@seed2"] == "2.00" and speeds["pkm"] == "0.80"  # against dense of the same seed


def test_recall_at_chance_is_not_a_win():
    cells = [fake_cell("facts-9", "dense", 2.0, recall=0.0, load=9), fake_cell("facts-9", "memoryplus", 2.0,
                                                                               recall=0.0, load=9)]
    assert [t["met"] for t in study.targets(cells)] == [False]


def test_results_table_reports_speed_relative_to_dense():
    table = study.results_table(FAKE_CELLS)
    lines = table.splitlines()
    assert len(lines) == 2 + len(FAKE_CELLS)
    row = next(line for line in lines if "| facts-1000 | memoryplus |" in line)
    cells = [c.strip() for c in row.split("|")]
    assert cells[5] == "0.300" and cells[6] == "50.0%" and cells[8] == "0.80"  # recall, used, 800 / 1000


def test_write_report_writes_json_markdown_and_png_plots(tmp_path):
    costs = [cost("dense", 1.0), cost("dense-2x", 2.04, 2.0), cost("memoryplus", 1.0)]
    paths = study.write_report("unit", FAKE_CELLS, costs, tmp_path, {"command": "python tools/study.py --quick"})
    data = json.loads(paths["json"].read_text())
    assert len(data["cells"]) == len(FAKE_CELLS) and data["flop_table"][1]["flop_ratio"] == 2.04
    assert any(t["target"].startswith("shakespeare: peer") and not t["met"] for t in data["targets"])
    md = paths["md"].read_text()
    assert "| dense-2x | 2,040 | 2.04 | 2 |" in md and "MISSED: shakespeare: peer val loss <= dense" in md
    assert "## Text at equal wall-clock" in md and len(data["equal_wall_clock"]) == 3  # shakespeare's 3 cells
    assert "![loss vs FLOPs](unit-loss-vs-flops.png)" in md
    for plot in ("loss_plot", "recall_plot"):
        assert paths[plot].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert paths[plot].stat().st_size > 5000  # axes, lines and legend drawn, not an empty canvas


def test_each_model_keeps_its_colour_in_every_plot():
    colours = [study.model_color(m) for m in study.MODELS]
    assert len(set(colours)) == len(colours)
    assert study.model_color("peer") == study.model_color("peer") and study.model_color("unknown") == "black"


# ------------------------------------------------------------------------------------------------ configs parse
def print_config(capsys, *configs, extra=()):
    from memzoo.cli import main

    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, *extra, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.slow  # jsonargparse resolves every class of 9 configs: ~15 s on a busy 2-core machine
def test_every_study_config_parses_with_print_config(capsys, tmp_path):
    text = tmp_path / "shakespeare.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20)
    path_override = ("--data.init_args.path", str(text))
    models = sorted(STUDY_CONFIGS.glob("model-*.yaml"))
    assert {p.stem.removeprefix("model-") for p in models} == set(study.ALL_MODELS)
    for model in models:
        out = print_config(capsys, model, STUDY_CONFIGS / "data-facts.yaml")
        assert "memzoo.LanguageModel" in out and "FactsDataModule" in out
    out = print_config(capsys, STUDY_CONFIGS / "model-dense.yaml", STUDY_CONFIGS / "data-shakespeare.yaml",
                       extra=path_override)
    assert "TextDataModule" in out and "sampling: random" in out
    out = print_config(capsys, STUDY_CONFIGS / "shakespeare-nanogpt.yaml", extra=path_override)
    assert "max_steps: 2000" in out and "lr_decay_steps: 2000" in out and "- 0.99" in out
    listed = {p.name for p in STUDY_CONFIGS.glob("*.yaml")}
    covered = {p.name for p in models} | {"data-facts.yaml", "data-shakespeare.yaml", "shakespeare-nanogpt.yaml"}
    assert listed == covered  # a new study config must be added to this test
