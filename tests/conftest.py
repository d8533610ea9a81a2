"""Shared test setup: offline Hugging Face libraries, CUDA-only tests skipped without a GPU, small thread pools."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402

# torch is imported where a test process needs it, not at the top: `pytest -n N`'s controller process runs no test and
# would spend ~2 s importing it before starting the workers.
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one torch thread per worker, no oversubscription
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment variables: Lightning's DDP launcher sets MASTER_PORT, NODE_RANK,
    LOCAL_RANK, WORLD_SIZE in its own process, and a later ``memzoo fit`` subprocess that inherited them would think
    it is an already-launched rank and wait for the others forever."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _no_run_folders_left_in_the_checkout():
    """Tests write their run folders under ``tmp_path`` (``monkeypatch.chdir``): one that leaves a new folder in the
    checkout's ``runs/`` fails the session, naming it."""
    from pathlib import Path

    runs = Path(__file__).resolve().parents[1] / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    yield
    left = sorted(str(p) for p in (set(runs.iterdir()) if runs.is_dir() else set()) - before)
    assert not left, f"tests left run folders in the checkout: {left}; write them under tmp_path (monkeypatch.chdir)"


@pytest.fixture
def clean_registry():
    """The block registry as it was before the test (tests register blocks of their own)."""
    from memzoo.blocks import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
