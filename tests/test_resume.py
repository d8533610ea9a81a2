"""Checkpoints and resume through the memzoo command: the config decides the architecture (a checkpoint of another
one is refused), ``--ckpt_path last``, exact resume from step checkpoints, the final step saved, signals, stale
partial files, concurrent starts and file permissions."""

import sys
from pathlib import Path

import pytest
import torch

from memzoo.cli import main
from memzoo.export.checkpoint_check import CheckpointError, architecture_differences
from test_cli import step_losses, write_config


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memzoo"])


def last_ckpt(cli) -> Path:
    return Path(cli.trainer.logger.log_dir) / "checkpoints" / "last.ckpt"


def test_architecture_differences_compare_architecture_fields_only():
    saved = {"dim": 32, "n_layers": 2, "block": "dense", "pools": {"p": {"n_keys": 8, "lr": 1e-3}}, "dropout": 0.0,
             "layers": None, "warmup_steps": 5}
    same = {**saved, "dropout": 0.1, "warmup_steps": 9, "layers": {}, "pools": {"p": {"n_keys": 8, "lr": 5.0}}}
    assert architecture_differences(saved, same) == []
    other = {**saved, "dim": 64, "pools": {"p": {"n_keys": 16}}}
    assert architecture_differences(saved, other) == [
        "dim: checkpoint 32, config 64",
        "pools: checkpoint {'p': {'n_keys': 8}}, config {'p': {'n_keys': 16}}",
    ]
    # nested under `architecture` (as a dict or a dataclass) compares the same way
    assert architecture_differences({"architecture": saved}, other) == architecture_differences(saved, other)


def test_checkpoint_of_another_architecture_is_refused_naming_the_fields(tmp_path):
    first = main(["fit", "--config", str(write_config(tmp_path, steps=2, val_every=2))])
    config = str(write_config(tmp_path, steps=4, val_every=2))
    with pytest.raises(CheckpointError) as err:
        main(["fit", "--config", config, "--model.init_args.architecture.dim", "48", "--model.init_args.architecture.n_layers", "3",
              "--ckpt_path", str(last_ckpt(first))])
    message = str(err.value)
    assert "dim: checkpoint 32, config 48" in message and "n_layers: checkpoint 2, config 3" in message
    assert "config.yaml" in message
    # training settings may change on resume, and they are the config's, not the checkpoint's
    cli = main(["fit", "--config", config, "--model.init_args.warmup_steps", "7", "--ckpt_path", str(last_ckpt(first))])
    assert cli.model.hparams.warmup_steps == 7 and cli.trainer.global_step == 4


def test_ckpt_path_last_is_the_newest_last_ckpt_of_the_experiment(tmp_path, capsys):
    config = str(write_config(tmp_path, steps=2, val_every=2))
    with pytest.raises(CheckpointError, match="no earlier run of experiment 'tiny'"):
        main(["fit", "--config", config, "--ckpt_path", "last"])
    main(["fit", "--config", config])
    second = main(["fit", "--config", config])
    capsys.readouterr()
    resumed = main(["fit", "--config", str(write_config(tmp_path, steps=4, val_every=2)), "--ckpt_path", "last"])
    assert f"--ckpt_path last is {last_ckpt(second)}" in capsys.readouterr().err
    assert resumed.trainer.global_step == 4
    assert min(step_losses(resumed)) == 2  # continued from step 2, not from 0


@pytest.mark.parametrize("every, resume_at", [(5, 5), (4, 12)])
def test_resume_from_a_step_checkpoint_reproduces_the_uninterrupted_losses(tmp_path, every, resume_at):
    """``checkpoint.every_n_train_steps`` checkpoints are saved at a train batch's end: mid-epoch (step 5) or at the
    last batch of an epoch (step 12 of 12-batch epochs). The resumed run reads exactly the batches the uninterrupted
    run read next, so its losses are equal."""
    args = ["--model.init_args.lr_decay_steps", "16", "--checkpoint.every_n_train_steps", str(every),
            "--data.init_args.samples_per_epoch", "96", "--checkpoint.save_top_k", "-1"]  # 12 batches an epoch
    full = main(["fit", "--config", str(write_config(tmp_path, steps=16, val_every=100)), *args])
    losses = step_losses(full)
    ckpt = Path(full.trainer.logger.log_dir) / "checkpoints" / f"step{resume_at}.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == resume_at
    resumed = step_losses(main(["fit", "--config", str(write_config(tmp_path, steps=16, val_every=100)), *args,
                                "--ckpt_path", str(ckpt)]))
    assert sorted(resumed) == list(range(resume_at, 16))
    for step in resumed:
        assert resumed[step] == pytest.approx(losses[step], abs=1e-6), step


def test_last_ckpt_holds_the_final_step_and_resumes_exactly(tmp_path):
    """10 steps validated every 6: Lightning alone leaves step 6 in last.ckpt; memzoo saves step 10, and resuming
    from it to step 16 gives the losses of an uninterrupted 16-step run."""
    schedule = ["--model.init_args.lr_decay_steps", "16"]
    first = main(["fit", "--config", str(write_config(tmp_path, steps=10, val_every=6)), *schedule])
    assert torch.load(last_ckpt(first), weights_only=True)["global_step"] == 10
    full = step_losses(main(["fit", "--config", str(write_config(tmp_path, steps=16, val_every=6)), *schedule]))
    resumed = step_losses(main(["fit", "--config", str(write_config(tmp_path, steps=16, val_every=6)), *schedule,
                                "--ckpt_path", str(last_ckpt(first))]))
    assert sorted(resumed) == list(range(10, 16))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_resume_in_float64_continues_the_saved_weights_bitwise(tmp_path):
    """``precision: 64-true``: the checkpoint's float64 weights are restored into float64 parameters (not rounded
    through float32), so 2 + 2 steps end on the weights of 4 uninterrupted steps."""
    args = ["--trainer.precision", "64-true", "--model.init_args.lr_decay_steps", "4"]
    first = main(["fit", "--config", str(write_config(tmp_path, steps=2, val_every=2)), *args])
    full = main(["fit", "--config", str(write_config(tmp_path, steps=4, val_every=2)), *args])
    resumed = main(["fit", "--config", str(write_config(tmp_path, steps=4, val_every=2)), *args,
                    "--ckpt_path", str(last_ckpt(first))])
    expected, got = full.model.model.state_dict(), resumed.model.model.state_dict()
    assert all(value.dtype == torch.float64 for value in got.values())
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


#: Variables a distributed launcher sets in its own process; a ``memzoo fit`` started with them would wait for ranks.
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
                    "LOCAL_WORLD_SIZE", "PL_TRAINER_NUM_NODES")


def _env_without_launch_variables() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}


def _fit_until_checkpointed(tmp_path, config, *extra, forked: bool = False):
    """Starts a real ``memzoo fit`` of ``config`` and returns it once its first step checkpoint exists: a
    ``python -m memzoo`` process, or with ``forked`` the console script's entry point in a child forked from this
    process (tests/forked_command.py; not for DDP, whose launcher restarts ``sys.argv``)."""
    import contextlib
    import os
    import subprocess
    import time

    from forked_command import ForkedMemzoo

    ckpts = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    args = ["fit", "--config", str(config), "--checkpoint.every_n_train_steps", "3", "--model.init_args.lr_decay_steps",
            "200", *extra]
    if forked:
        process = ForkedMemzoo(args, tmp_path, _env_without_launch_variables())
    else:
        process = subprocess.Popen(
            [sys.executable, "-m", "memzoo", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_env_without_launch_variables(),
            start_new_session=True,  # its own process group: a failed wait kills DDP's other rank too
        )
    deadline = time.monotonic() + 240
    try:
        while not list(ckpts.glob("step*.ckpt")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 240 s (2 processes starting on a loaded machine)"
            time.sleep(0.1)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):  # a failed wait leaves no training process behind
            os.killpg(process.pid, 9)
        process.communicate()
        raise
    return process, ckpts


@pytest.mark.parametrize("signum, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_last_ckpt_at_the_current_step_and_exits_nonzero(tmp_path, signum, status):
    import signal

    config = write_config(tmp_path, steps=200, val_every=1000)
    process, ckpts = _fit_until_checkpointed(tmp_path, config, forked=True)
    process.send_signal(getattr(signal, signum))
    out, err = process.communicate(timeout=240)
    assert process.returncode == status, err
    step = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= step < 200
    assert f"stopped by {signum} at step {step}" in err and "Traceback" not in err, err
    assert not list(ckpts.glob(".*partial"))
    if signum == "SIGTERM":  # resuming from it reproduces the uninterrupted run
        schedule = ["--model.init_args.lr_decay_steps", "200", "--trainer.max_steps", str(step + 3)]
        resumed = step_losses(main(["fit", "--config", str(config), *schedule, "--ckpt_path", str(ckpts / "last.ckpt")]))
        full = step_losses(main(["fit", "--config", str(config), *schedule]))
        assert sorted(resumed) == [step, step + 1, step + 2]
        for s in resumed:
            assert resumed[s] == pytest.approx(full[s], abs=1e-6), s


def test_a_run_removes_the_partial_files_killed_runs_left(tmp_path, capsys):
    import os
    import time

    ckpts = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    stale = ckpts / ".last.ckpt.k1ll3d.partial"
    stale.write_bytes(b"\0" * 1000)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    main(["fit", "--config", str(write_config(tmp_path, steps=1, val_every=1))])
    assert not stale.exists()
    assert "removed 1 partial checkpoint file(s) left by killed runs" in capsys.readouterr().err


def _claim_version(save_dir, barrier, results):
    from memzoo.training.run_folder import RunFolderLogger

    logger = RunFolderLogger(save_dir=save_dir, name="exp")
    barrier.wait()  # every process looks for the next free number at the same instant
    results.put(logger.version)


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_runs_started_together_claim_distinct_version_folders(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    (tmp_path / "exp" / "version_0").mkdir(parents=True)  # an earlier run
    barrier, results = context.Barrier(6), context.Queue()
    processes = [context.Process(target=_claim_version, args=(str(tmp_path), barrier, results)) for _ in range(6)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    versions = sorted(results.get(timeout=5) for _ in processes)
    assert versions == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == [f"version_{n}" for n in range(7)]


def test_sigterm_to_one_of_two_ddp_processes_stops_both_after_the_same_step(tmp_path):
    """``--trainer.strategy ddp --trainer.devices 2`` on CPU (gloo): the signal reaches rank 0 only; both ranks stop
    at the next multiple of RunCheckpoint.sync_every steps, last.ckpt holds that step, and nothing hangs."""
    import signal

    from memzoo.training.run_checkpoint import RunCheckpoint

    config = write_config(tmp_path, steps=200, val_every=1000)
    process, ckpts = _fit_until_checkpointed(tmp_path, config, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    step = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert step % RunCheckpoint.sync_every == 0 and 3 <= step < 200
    assert err.count(f"stopped by SIGTERM at step {step}") == 1, err[-3000:]  # said once, not once per rank
