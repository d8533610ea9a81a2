"""tests/mp_workers.start_ranks: forked ranks never collect the garbage they inherit (a copied gloo process group's
destructor hangs in a child, whose threads fork did not copy)."""

import gc
import os

from mp_workers import start_ranks


class _Records:
    """A cycle member whose finaliser writes the collecting process's pid to ``path``."""

    def __init__(self, path):
        self.path = path
        self.cycle = self

    def __del__(self):
        with open(self.path, "a") as handle:
            handle.write(f"{os.getpid()}\n")


def _collect_in_rank(rank, path):
    gc.collect()
    with open(path, "a") as handle:
        handle.write(f"rank {rank}\n")


def test_ranks_do_not_collect_what_they_inherit(tmp_path):
    log = tmp_path / "log"
    gc.disable()  # no collection in this process before the fork but the one start_ranks makes
    try:
        _Records(log)  # garbage: a cycle, collected only by gc
        start_ranks(_collect_in_rank, 2, str(log))
    finally:
        gc.enable()
    lines = log.read_text().splitlines()
    assert sorted(lines) == sorted([str(os.getpid()), "rank 0", "rank 1"]), lines  # finalised once, in this process
