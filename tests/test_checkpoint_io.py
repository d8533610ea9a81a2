"""Atomic writes: ``AtomicCheckpointIO`` and the atomic file/folder helpers never leave a partial file, and a
failed save keeps the checkpoint that was there."""

import os

import fsspec
import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from memzoo.atomic import atomic_file, staging_directory
from memzoo.export.checkpoint_check import check_checkpoint_file
from memzoo.export.checkpoint_io import AtomicCheckpointIO


def checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


def test_save_and_load_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "deep" / "folder" / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), path)
    loaded = io.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(64, 64)) and loaded["global_step"] == 1
    check_checkpoint_file(path)
    io.save_checkpoint(checkpoint(2.0), path)  # replaces
    assert io.load_checkpoint(path)["global_step"] == 2
    assert os.listdir(path.parent) == ["last.ckpt"]


def failing_save(obj, handle, *args, **kwargs):
    """Writes half a checkpoint, then dies (a full disk, a killed job)."""
    handle.write(b"PK\x03\x04 half a zip archive")
    raise OSError(28, "No space left on device")


def test_a_failed_save_leaves_no_file_and_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr("memzoo.export.checkpoint_io.torch.save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), path)
    before = path.read_bytes()
    monkeypatch.setattr("memzoo.export.checkpoint_io.torch.save", failing_save)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint(checkpoint(2.0), path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]
    check_checkpoint_file(path)


def test_an_interrupt_during_the_write_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "x.bin") as handle:
        handle.write(b"partial")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_remote_paths_use_lightnings_fsspec_save():
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(3.0), "memory://bucket/last.ckpt")
    with fsspec.open("memory://bucket/last.ckpt", "rb") as handle:
        assert torch.load(handle, weights_only=True)["global_step"] == 3
    fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_storage_options_are_refused_like_lightnings(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), tmp_path / "a.ckpt", storage_options={"x": 1})


def test_trainer_saves_through_the_plugin(tmp_path, monkeypatch):
    written = []
    original = AtomicCheckpointIO.save_checkpoint

    def spy(self, ckpt, path, storage_options=None):
        written.append(str(path))
        original(self, ckpt, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    model = BoringModel()
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    trainer.fit(model)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    assert written == [str(tmp_path / "final.ckpt")]
    check_checkpoint_file(tmp_path / "final.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.ckpt"]


# ---------------------------------------------------------------------------------------------- folders
def test_staging_directory_appears_complete_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staging_directory(out) as folder:
        (folder / "a.txt").write_text("a")
        raise RuntimeError("crash while writing")
    assert os.listdir(tmp_path) == []
    with staging_directory(out) as folder:
        (folder / "a.txt").write_text("a")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "a"
    with staging_directory(out) as folder:
        (folder / "b.txt").write_text("b")
    assert os.listdir(out) == ["b.txt"] and os.listdir(tmp_path) == ["out"]


@pytest.mark.skipif(os.name != "posix", reason="flock and umask are POSIX")
def test_stale_partials_are_removed_and_files_being_written_are_not(tmp_path):
    import fcntl
    import time

    from memzoo.atomic import STALE_AFTER_S, remove_stale_partials

    old = time.time() - STALE_AFTER_S - 5
    stale = tmp_path / ".last.ckpt.abc123.partial"
    stale.write_bytes(b"x" * 100)  # left by a kill -9: nobody holds its lock
    young = tmp_path / ".last.ckpt.young.partial"
    young.write_bytes(b"x")  # just created: its writer may not hold the lock yet
    with atomic_file(tmp_path / "step3.ckpt") as handle:  # being written now by this process
        handle.write(b"y")
        (writing,) = [p for p in tmp_path.glob(".step3.ckpt.*.partial")]
        for path in (stale, writing):
            os.utime(path, (old, old))
        keep = tmp_path / "last.ckpt"
        keep.write_bytes(b"z")
        kept = []
        assert remove_stale_partials(tmp_path, kept) == [stale]
        assert kept == [young]
        assert writing.exists() and young.exists() and keep.exists()
        fd = os.open(writing, os.O_RDONLY)
        with pytest.raises(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert (tmp_path / "step3.ckpt").read_bytes() == b"y"


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        with atomic_file(tmp_path / "a.bin") as handle:
            handle.write(b"a")
        AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), tmp_path / "c.ckpt")
        with staging_directory(tmp_path / "export") as folder:
            (folder / "w.bin").write_bytes(b"w")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "c.ckpt").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "export").stat().st_mode & 0o777 == dir_mode
