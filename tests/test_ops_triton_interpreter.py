"""The Triton kernels' interpreter tests (``-k interpreted`` in test_ops_triton.py and test_ops_triton_topk.py), run
in one child pytest started with ``TRITON_INTERPRET=1``: Triton decides between interpreting and compiling when a
kernel is defined, and this process may have imported the kernels already (see test_ops_triton.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

FILES = ("test_ops_triton.py", "test_ops_triton_topk.py", "test_ops_triton_grouped.py")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the session interprets Triton already")
def test_interpreted_kernels_in_a_child_process():
    here = Path(__file__).parent
    child = subprocess.run(
        [sys.executable, "-m", "pytest", *(str(here / f) for f in FILES), "-q", "-rA", "-p", "no:cacheprovider",
         "-k", "interpreted"],
        check=False, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    summary = child.stdout.splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, child.stdout[-2000:]
    passed = [line for line in child.stdout.splitlines() if line.startswith("PASSED ")]
    for name in FILES:  # each file's interpreter tests ran
        assert any(f"{name}::test_interpreted" in line for line in passed), (name, child.stdout[-2000:])
