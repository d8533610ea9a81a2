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


def test_the_loss_gradient_has_no_subnormals_inside_the_block_and_matches_torch_outside():
    """A probability of e^-80 over 4,096 rows is a subnormal gradient (~4e-39): outside the block the fused loss
    kernel writes it as PyTorch does; inside it comes out as 0 (error below 1.2e-38) and every normal entry and the
    loss are unchanged."""
    from memzoo.nn.cross_entropy import cross_entropy

    tiny = torch.finfo(torch.float32).tiny
    logits = torch.zeros(4096, 4)
    logits[:, 1], logits[:, 2], logits[:, 3] = -80.0, -60.0, -3.0
    labels = torch.zeros(4096, dtype=torch.int64)

    def loss_and_grad(fn):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, labels)
        loss.backward()
        return loss.detach(), x.grad

    loss, grad = loss_and_grad(cross_entropy)
    torch_loss, torch_grad = loss_and_grad(torch.nn.functional.cross_entropy)
    assert 0 < torch_grad[0, 1].item() < tiny and 0 < grad[0, 1].item() < tiny  # subnormal, as in PyTorch
    with flushing_subnormals():
        flushed_loss, flushed = loss_and_grad(cross_entropy)
    assert (flushed[:, 1] == 0).all() and ((flushed.abs() >= tiny) | (flushed == 0)).all()
    torch.testing.assert_close(flushed, grad, rtol=0, atol=tiny)
    assert torch.equal(flushed[:, [0, 2, 3]], grad[:, [0, 2, 3]]) and torch.equal(flushed_loss, loss)
    torch.testing.assert_close(loss, torch_loss)


def test_every_thread_of_a_pool_started_before_the_block_flushes_inside_it_and_not_after():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.full((1 << 22,), SUBNORMAL)
        assert ((x * 1.0) != 0).all()  # starts the pool; no thread flushes
        with flushing_subnormals():
            assert ((x * 1.0) == 0).all()  # both threads' halves
        assert ((x * 1.0) != 0).all()
    finally:
        torch.set_num_threads(threads)


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
