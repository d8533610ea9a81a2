"""Early, clear checks of checkpoint files given on the command line (``--ckpt_path``)."""

from __future__ import annotations

import zipfile
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or not a PyTorch checkpoint."""


def check_checkpoint_file(path: str | Path) -> Path:
    """Verifies ``path`` is a complete PyTorch zip checkpoint (every member's CRC is read) before training starts.

    Raises :class:`CheckpointError` naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check --ckpt_path (or use 'last')")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint (not a zip archive: truncated or corrupted?); "
            f"resume from another file, e.g. checkpoints/last.ckpt of the run"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: {err}") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted: member {bad!r} fails its checksum")
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointError(f"checkpoint {str(path)!r} is a zip archive but not a PyTorch checkpoint")
    return path
