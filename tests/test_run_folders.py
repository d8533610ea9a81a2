"""Run folders: a run that writes nothing of its own leaves no ``version_<n>`` folder, and partial checkpoint files
too young to remove are named in a warning."""

import sys
from pathlib import Path

import lightning as L
import pytest

from memzoo.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import write_config  # noqa: E402


class FailOnFitStart(L.Callback):
    """Fails after the run folder was claimed (a run that fails while starting)."""

    def on_fit_start(self, trainer, pl_module):
        raise RuntimeError("failing on purpose while starting")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memzoo"])
    return tmp_path


def test_zero_steps_leave_no_version_folder_and_young_partials_are_named(in_tmp, capsys):
    config = write_config(in_tmp, steps=2, val_every=2)
    main(["fit", "--config", str(config)])
    checkpoints = in_tmp / "runs" / "tiny" / "version_0" / "checkpoints"
    young = checkpoints / ".last.ckpt.abc.partial"
    young.write_bytes(b"x")
    capsys.readouterr()
    main(["fit", "--config", str(config), "--trainer.max_steps", "0"])
    err = capsys.readouterr().err
    assert sorted(p.name for p in (in_tmp / "runs" / "tiny").iterdir()) == ["version_0"]
    assert "removed its folder runs/tiny/version_1" in err
    assert "warning: kept 1 partial checkpoint file(s) younger than 30 s" in err
    assert "runs/tiny/version_0/checkpoints/.last.ckpt.abc.partial" in err
    assert young.exists() and (checkpoints / "last.ckpt").is_file()


def test_a_run_that_fails_while_starting_leaves_no_version_folder(in_tmp):
    config = write_config(in_tmp, steps=2, val_every=2)
    with pytest.raises(RuntimeError, match="failing on purpose"):
        main(["fit", "--config", str(config), "--trainer.callbacks+", "test_run_folders.FailOnFitStart"])
    assert list((in_tmp / "runs" / "tiny").iterdir()) == []
