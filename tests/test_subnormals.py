"""memzoo.subnormals: the flush-to-zero mode inside the block and the previous mode after it, the env switch, a
mode already on is kept, and the training verbs run inside it."""

import pytest
import torch

import memzoo.cli
import memzoo.cli_lightning
from memzoo.subnormals import ENV_SWITCH, flushing_subnormals, subnormals_flushed

SUBNORMAL = 1e-39


def product() -> float:
    return (torch.tensor([SUBNORMAL]) * torch.tensor([1.0]))[0].item()


def test_subnormals_are_flushed_inside_the_block_and_kept_after_it():
    assert not subnormals_flushed() and product() > 0  # the CPU's default mode
    with flushing_subnormals() as on:
        assert on and subnormals_flushed()
        assert product() == 0.0
        assert (torch.full((1000,), 3e-39) * 0.5 == 0).all()
    assert not subnormals_flushed() and product() > 0


def test_the_env_switch_and_enabled_false_leave_the_mode_alone(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")
    with flushing_subnormals() as on:
        assert not on and product() > 0
    with flushing_subnormals(enabled=False) as on:
        assert not on and product() > 0


def test_a_mode_that_was_on_before_stays_on_after():
    torch.set_flush_denormal(True)
    try:
        with flushing_subnormals():
            assert subnormals_flushed()
        assert subnormals_flushed()
    finally:
        torch.set_flush_denormal(False)
    assert not subnormals_flushed()


def test_the_mode_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError):
        with flushing_subnormals():
            raise RuntimeError("a failed fit")
    assert not subnormals_flushed()


@pytest.mark.parametrize("switch, expected", [("1", True), ("0", False)])
def test_the_training_verbs_run_with_subnormals_flushed(monkeypatch, switch, expected):
    seen = []
    monkeypatch.setattr(memzoo.cli_lightning, "run_lightning_cli", lambda args: seen.append((args, subnormals_flushed())))
    monkeypatch.setenv(ENV_SWITCH, switch)
    memzoo.cli.main(["validate", "--config", "x.yaml"])
    assert seen == [(["validate", "--config", "x.yaml"], expected)]
    assert not subnormals_flushed()
