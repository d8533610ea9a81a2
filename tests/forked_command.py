"""``memzoo ARGS`` run by the console script's entry point in a child forked from the test process: the child
inherits the imported torch, Lightning and memzoo, so it starts in milliseconds where ``python -m memzoo`` spends
~5 s of CPU importing them. :class:`ForkedMemzoo` has the ``Popen`` methods the tests use (``poll``,
``send_signal``, ``communicate``, ``returncode``, ``pid``).

The child is a new session (its own process group), runs in ``cwd`` with exactly ``env``, reads ``/dev/null``,
writes its stdout and stderr to files of its own, has Python's default SIGINT / SIGTERM handling and one torch
thread, and exits with ``entry_point``'s status (an exception escaping it: its traceback, status 1). Not for
commands that start processes from ``sys.argv`` (Lightning's DDP launcher): the child's ``sys.argv[0]`` is not a
script."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


class ForkedMemzoo:
    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:
            self._child(args, cwd, env)

    def _child(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        status = 1
        try:
            os.setsid()
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(self._out.fileno(), 1)
            os.dup2(self._err.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # the test process's are pytest's captures
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            import torch

            torch.set_num_threads(1)
            sys.argv = ["memzoo", *args]
            from memzoo.cli import entry_point

            status = entry_point()
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(status or 0)

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                if self.returncode < 0:  # killed by a signal: the shell's convention, as the tests' statuses
                    self.returncode = 128 - self.returncode
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"memzoo child {self.pid} still running after {timeout} s")
            time.sleep(0.05)
        texts = []
        for file in (self._out, self._err):
            file.seek(0)
            texts.append(file.read().decode("utf-8", errors="replace"))
            file.close()
        return texts[0], texts[1]
