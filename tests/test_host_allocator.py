"""memzoo.host_allocator: glibc's mmap and trim thresholds raised once per process by every memzoo command, off with
MEMZOO_MALLOC_TUNING=0 (each case in a fresh interpreter: the settings are process-wide and applied once)."""

import platform
import subprocess
import sys

import pytest

from memzoo import host_allocator

PROBE = "from memzoo.host_allocator import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


def run_probe(env_value: str | None) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if k != host_allocator.ENV_SWITCH}
    if env_value is not None:
        env[host_allocator.ENV_SWITCH] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings exist on glibc only")
def test_the_thresholds_are_set_on_glibc_and_not_when_switched_off():
    assert run_probe(None) == "True True"
    assert run_probe("0") == "False False"


def test_every_command_applies_it_first(monkeypatch, capsys):
    from memzoo.cli import main

    calls = []
    monkeypatch.setattr(host_allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    main(["blocks"])
    assert calls == [True]
    assert "dense" in capsys.readouterr().out
