"""``RunFolderLogger``: Lightning's CSV logger whose ``version_<n>`` folder is claimed atomically.

Lightning picks ``max(existing versions) + 1`` and creates the folder later, so runs started at the same instant in
one folder can pick the same number and write into one folder. Here the folder is created with an exclusive
``mkdir`` when the version is first asked for; if another run created it first, the next number is tried. Only the
process of global rank 0 claims a folder (other ranks receive its number from Lightning's broadcast).

A run that ends without writing anything of its own into its folder (``--trainer.max_steps 0``, a run that failed
while starting) leaves no folder behind: :func:`remove_unused_run_folders`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger

# files memzoo writes into a run folder before the run does anything: not a result of the run
SETUP_FILES = {"config.yaml", "hparams.yaml"}
_claimed: list[Path] = []  # folders this process claimed, in order


class RunFolderLogger(CSVLogger):
    """``CSVLogger`` writing to ``<save_dir>/<name>/version_<n>``, ``n`` claimed by an exclusive ``mkdir``."""

    def _get_next_version(self) -> int:
        version = super()._get_next_version()
        if getattr(rank_zero_only, "rank", 0) != 0 or "://" in str(self._root_dir):
            return version
        parent = os.path.join(self._root_dir, self.name)
        os.makedirs(parent, exist_ok=True)
        while True:
            try:
                os.mkdir(os.path.join(parent, f"version_{version}"))
                _claimed.append(Path(parent, f"version_{version}"))
                return version
            except FileExistsError:
                version += 1


def claimed_run_folders() -> list[Path]:
    """The run folders this process has claimed so far (oldest first)."""
    return list(_claimed)


def remove_unused_run_folders(since: int = 0) -> list[Path]:
    """Removes the run folders claimed after the first ``since`` that hold nothing but :data:`SETUP_FILES` (and
    empty folders); returns them. A folder with metrics, checkpoints or predictions is kept."""
    removed = []
    for folder in _claimed[since:]:
        if folder.is_dir() and _holds_only_setup_files(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _holds_only_setup_files(folder: Path) -> bool:
    for path in folder.rglob("*"):
        if path.is_file() or path.is_symlink():
            if path.parent != folder or path.name not in SETUP_FILES:
                return False
    return True
