"""``RunCheckpoint``: Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds where training stopped.

- At the end of training ``last.ckpt`` is saved at the final step, unless it already holds that step (Lightning's
  own callback keeps the last periodic save, e.g. step 25 of a 30-step run validated every 25). With ``max_steps``
  it is saved at the end of the last batch, where the loops' state resumes exactly (at ``on_train_end`` Lightning
  has already closed the epoch, and a run resumed from there would start a new one).
- SIGTERM (schedulers, preemptible machines) and SIGINT (Ctrl-C) during ``fit`` stop training at the end of the
  current batch: ``last.ckpt`` is saved atomically at that step (resuming from it reproduces the uninterrupted run),
  the loggers are flushed, and :class:`StoppedBySignal` is raised; the ``memzoo`` command exits with status
  128 + signal number (143 for SIGTERM, 130 for SIGINT). A second Ctrl-C aborts at once without saving.

The configuration keys are ``ModelCheckpoint``'s (``--checkpoint.every_n_train_steps`` ...). With several processes
(DDP) a signal to any of them stops all: every :attr:`RunCheckpoint.sync_every` steps they agree (one all-reduce)
whether one was signalled, and all stop after the same batch. Only the process of global rank 0 prints the
signal and stop lines (:attr:`StoppedBySignal.rank`), so they appear once, not once per process.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(Exception):
    """Training stopped by ``signum`` after saving ``checkpoint`` (``None`` if no step had been trained), in the
    process of global rank ``rank`` (every process of a DDP run raises it; rank 0 reports it)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, rank: int = 0):
        self.signum, self.step, self.checkpoint, self.rank = signum, step, checkpoint, rank
        name = signal.Signals(signum).name
        saved = f"saved {checkpoint}" if checkpoint else "nothing saved (no step trained, or checkpoint.save_last off)"
        super().__init__(f"stopped by {name} at step {step}; {saved}")

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + signal number."""
        return 128 + self.signum


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves the final step and stops gracefully on SIGTERM / SIGINT (see module doc)."""

    #: steps between the processes' agreement on a stop signal (one small all-reduce each time; with one process
    #: nothing is exchanged)
    sync_every = 10

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._signal_received: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._rank = 0  # the process's global rank, set when training starts: only rank 0 prints

    # ------------------------------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal_received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now
        self._signal_received = signum
        if self._rank != 0:
            return
        print(f"\nmemzoo: {signal.Signals(signum).name} received: saving last.ckpt after this step, then stopping"
              + (" (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""), file=sys.stderr,
              flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._signal_received = None
        self._rank = trainer.global_rank
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        signum = self._stop_signal(trainer)
        if signum is None:
            if 0 < trainer.max_steps <= trainer.global_step and not _validates_now(trainer):
                self._save_last_now(trainer)  # the final step (a validation now would save it, with its metrics)
            return
        saved = self._save_last_now(trainer)
        for logger in trainer.loggers:
            logger.save()
        self._restore_handlers()
        raise StoppedBySignal(signum, trainer.global_step, saved, rank=trainer.global_rank)

    def _stop_signal(self, trainer: L.Trainer) -> int | None:
        """The signal to stop on after this batch, or None. With several processes, only every ``sync_every`` steps,
        when all of them learn whether any received a signal (the largest signal number wins): all stop after the
        same batch and save together (one process alone would wait forever in the collective save)."""
        import torch.distributed as dist

        if trainer.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return self._signal_received
        if trainer.global_step % self.sync_every:
            return None
        import torch

        received = torch.tensor([self._signal_received or 0], device=trainer.strategy.root_device)
        dist.all_reduce(received, op=dist.ReduceOp.MAX)
        return int(received.item()) or None

    # ------------------------------------------------------------------------------------------ final step
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Training ended on another limit (epochs, time): saves the step unless it is saved already."""
        self._restore_handlers()
        self._save_last_now(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        super().on_exception(trainer, pl_module, exception)

    def _save_last_now(self, trainer: L.Trainer) -> str | None:
        """Saves ``last.ckpt`` at the current step unless it holds it already; returns its path (None: no step)."""
        if not self.save_last or trainer.global_step == 0 or trainer.fast_dev_run or trainer.sanity_checking:
            return self.last_model_path or None
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path


def _validates_now(trainer: L.Trainer) -> bool:
    """Whether Lightning runs validation right after the current training batch (its own rule; False if unknown,
    which at worst saves the final step twice)."""
    from memzoo.parallel.torch_private import validates_after_this_batch

    try:
        return validates_after_this_batch(trainer)
    except Exception:  # noqa: BLE001 - a Lightning without these internals: save, validation may save again
        return False
