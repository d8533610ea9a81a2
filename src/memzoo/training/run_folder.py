"""``RunFolderLogger``: Lightning's CSV logger whose ``version_<n>`` folder is claimed atomically.

Lightning picks ``max(existing versions) + 1`` and creates the folder later, so runs started at the same instant in
one folder can pick the same number and write into one folder. Here the folder is created with an exclusive
``mkdir`` when the version is first asked for; if another run created it first, the next number is tried. Only the
process of global rank 0 claims a folder (other ranks receive its number from Lightning's broadcast).
"""

from __future__ import annotations

import os

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger


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
                return version
            except FileExistsError:
                version += 1
