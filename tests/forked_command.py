"""``memzoo ARGS`` run by the console script's entry point in a child forked from the test process: the child
inherits the imported torch, Lightning and memzoo, so it starts in milliseconds where ``python -m memzoo`` spends
~5 s of CPU importing them. :class:`ForkedMemzoo` has the ``Popen`` methods the tests use (``poll``,
``send_signal``, ``communicate``, ``returncode``, ``pid``).

The child is a new session (its own process group), runs in ``cwd`` with exactly ``env``, reads ``/dev/null``,
writes its stdout and stderr to files of its own, has Python's default SIGINT / SIGTERM handling and one torch
thread, and exits with ``entry_point``'s status (an exception escaping it: its traceback, status 1). Not for
commands that start processes from ``sys.argv`` (Lightning's DDP launcher): the child's ``sys.argv[0]`` is not a
script.

:class:`MemzooZygote` forks its children from a clean interpreter instead of the test process, for tests whose point is
what a fresh ``python -m memzoo`` prints."""

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


class MemzooZygote:
    """``memzoo ARGS`` as a fresh ``python -m memzoo`` process runs it, for tests whose point is what such a process
    prints, without its ~7 s of CPU importing torch and Lightning: a clean interpreter (started from this file, not
    the test process: no pytest captures, logging handlers or warning filters) imports ``memzoo.cli`` and
    ``memzoo.cli_lightning`` once, as a Lightning verb does, then forks one child per :meth:`run` (or
    :meth:`run_script`, for a tool that builds models through memzoo's CLI parser). The child runs
    in ``cwd`` with exactly ``env`` (its folder first on ``sys.path``), reads ``/dev/null``, writes its own stdout
    and stderr files, and exits with the console script's status (an escaping exception: its traceback, status 1)
    after running the ``atexit`` handlers and flushing its output, as the interpreter's shutdown does.

    What a fresh process would print while importing is not repeated by every child, so the zygote refuses to start
    if its import prints anything (the message shows it). Environment variables read at import time are the ones
    this process had when the zygote started; ``env`` holds for everything read later. Commands run one at a time."""

    def __init__(self, timeout: float = 120) -> None:
        import subprocess

        self._server = subprocess.Popen([sys.executable, __file__, "zygote"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        try:
            ready = self._reply(timeout)
        except TimeoutError:
            self.close()
            raise
        if ready != "ready":
            self.close()
            raise RuntimeError(f"the memzoo zygote's imports printed (a fresh process would too): {ready}")

    def _reply(self, timeout: float) -> str:
        import json
        import select

        if not select.select([self._server.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"the memzoo zygote did not answer within {timeout} s")
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"the memzoo zygote ended (status {self._server.wait()})")
        return json.loads(line)

    def run(self, *args: str, cwd: Path, env: dict[str, str], timeout: float = 120):
        """``memzoo ARGS`` in a child: a ``subprocess.CompletedProcess`` with its status, stdout and stderr."""
        return self._child(None, args, cwd, env, timeout)

    def run_script(self, script: Path, *args: str, cwd: Path, env: dict[str, str], timeout: float = 300):
        """``python SCRIPT ARGS`` in a child (a tool of tools/): the script runs as ``__main__`` with its folder
        first on ``sys.path``, so ``multiprocessing``'s spawned workers import it as they would from a fresh
        process."""
        return self._child(str(script), args, cwd, env, timeout)

    def _child(self, script: str | None, args: tuple[str, ...], cwd: Path, env: dict[str, str], timeout: float):
        import json
        import subprocess

        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"script": script, "args": list(args), "cwd": str(cwd), "env": dict(env), "stdout": str(out),
                       "stderr": str(err)}
            self._server.stdin.write(json.dumps(request) + "\n")
            self._server.stdin.flush()
            pid = self._reply(30)
            try:
                status = self._reply(timeout)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)  # no child left running; the zygote reaps it
                self._reply(30)
                raise TimeoutError(f"{' '.join([script or 'memzoo', *args])}: still running after {timeout} s") from None
            return subprocess.CompletedProcess([script or "memzoo", *args], status, out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))

    def close(self) -> None:
        if self._server.poll() is None:
            self._server.stdin.close()
            try:
                self._server.wait(timeout=30)
            except Exception:
                self._server.kill()
                self._server.wait()
        self._server.stdout.close()


def _zygote() -> None:
    """The :class:`MemzooZygote` server: requests (JSON lines) on stdin; for each, the child's pid, then its exit
    status, on stdout."""
    import json

    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    own_stderr = os.dup(2)
    imports_printed = tempfile.TemporaryFile()
    _redirect(0, os.devnull, os.O_RDONLY)
    os.dup2(imports_printed.fileno(), 1)
    os.dup2(imports_printed.fileno(), 2)
    sys.path.pop(0)  # this file's folder: `python -m memzoo` does not see the tests
    import memzoo.cli
    import memzoo.cli_lightning  # noqa: F401

    sys.stdout.flush()
    sys.stderr.flush()
    imports_printed.seek(0)
    printed = imports_printed.read().decode("utf-8", errors="replace")
    imports_printed.close()
    _redirect(1, os.devnull, os.O_WRONLY)
    os.dup2(own_stderr, 2)  # the zygote's own errors reach the test's stderr
    replies.write(json.dumps(printed or "ready") + "\n")
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid:
            replies.write(json.dumps(pid) + "\n")
        else:
            requests.close()
            replies.close()
            os.close(own_stderr)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            _redirect(1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            _redirect(2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            script = request["script"]
            if script is None:
                sys.path.insert(0, request["cwd"])  # as `python -m memzoo` started there
                sys.argv = [str(Path(memzoo.cli.__file__).with_name("__main__.py")), *request["args"]]
                os._exit(_shut_down(_exit_status(lambda: sys.exit(memzoo.cli.entry_point()))))
            import functools
            import runpy

            sys.path.insert(0, str(Path(script).parent))  # as `python SCRIPT`
            sys.argv = [script, *request["args"]]
            os._exit(_shut_down(_exit_status(functools.partial(runpy.run_path, script, run_name="__main__"))))
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        replies.write(json.dumps(status if status >= 0 else 128 - status) + "\n")
    os._exit(0)  # the request stream ended: no module teardown (~1.4 s of CPU)


def _exit_status(main) -> int:
    """``main()`` (the console script's ``sys.exit(entry_point())``, or a script) as the interpreter ends it: 0, the
    status of a ``SystemExit`` (its message on stderr and status 1 if it is not an int), else an escaping
    exception's traceback and status 1."""
    try:
        main()
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1


def _shut_down(status: int) -> int:
    """What the interpreter's shutdown does that a command's output shows: the ``atexit`` handlers run, then stdout
    and stderr are flushed (an error doing so: status 120, as Python's). Its module teardown, ~1.4 s of CPU with
    torch and Lightning loaded, is left out (``os._exit``)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = 120
    return status


def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)


if __name__ == "__main__" and sys.argv[1:] == ["zygote"]:
    _zygote()
